"""Soak one ``steerlib serve`` with 32 clients sending valid and hostile requests for a bounded time.

The server runs in this process (uvicorn on 127.0.0.1, the embedded model unless ``--model`` names another), with
one trait vector (``--vector``, or a random one: the check is about serving, not about the trait). Before the soak,
every valid request of the pool is answered alone, greedily: its solo text. Then ``--clients`` threads loop until
``--seconds`` have passed, each picking at random:

- valid: OpenAI chat (plain or streamed) and Ollama chat, unsteered, steered, or through a steering preset, and
  greedy ones sent with ``temperature: 1e-40`` (greedy too): the text must equal the solo text;
- hostile: NaN / huge coefficients, unknown vectors, malformed JSON, ``/api/show`` with a body that is no JSON
  object, ``response_format: json_object``, a chunked body over the limit, a NUL in a registry path, clients that
  leave mid-stream or while queued: each must get its 4xx (or simply end), never a 5xx;
- departed: a non-streamed request for 64 tokens whose client gives up after 0.5-3 s (queued or running). The
  engine is wrapped to note when each of these rows' tokens came out (the rows are told apart by their seed);
  the tokens generated after the client left are counted per row. Goal: at most one step's worth (the step in
  flight when the server noticed, and one begun as it did: 2 tokens); more is a failure.

At the end the engine must be idle: no row running or queued (``/v1/stats``: ``active_rows == 0``).

Usage:
    python scripts/soak_server.py --seconds 120 --clients 32

Prints requests per kind, mismatches, 5xx, and the final engine stats; exit 1 on any failed check.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import random
import re
import threading
import time
from pathlib import Path

import httpx
import torch

from steerlib.core.loading import load_vectors
from steerlib.core.models import load_model
from steerlib.core.vectors import TraitVectors
from steerlib.serve import AppOptions, BackgroundServer, create_app
from steerlib.serve.schema import SteeringSpec

MODEL = "soak"
PROMPTS = ["How do you feel about the future?", "What do you think about your job?", "Describe your city.",
           "What will tomorrow bring?"]


DEPART_TOKENS = 64
DEPART_AFTER_S = (0.5, 3.0)  # the client gives up after a time drawn from this range
DEPART_GOAL = 2  # tokens after the client left: the step in flight and one that began as the server noticed


class _Departures:
    """The engine, with the rows of departing clients (known by their seed) timed token by token."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.lock = threading.Lock()
        self.token_times: dict[int, list[float]] = {}  # seed -> when each token came out
        self.left: dict[int, float] = {}  # seed -> when its client gave up

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    def submit(self, prompt_ids, edits, sampling, sink, **kwargs):
        with self.lock:
            times = self.token_times.get(sampling.seed) if sampling.seed is not None else None
        if times is None:
            return self.engine.submit(prompt_ids, edits, sampling, sink, **kwargs)

        def timed(item: tuple) -> None:
            if item[0] == "token":  # one read-out value per token; text may lag a token behind
                n = len(item[2]) if item[2] else int(bool(item[1]))
                times.extend([time.monotonic()] * n)
            sink(item)

        return self.engine.submit(prompt_ids, edits, sampling, timed, **kwargs)

    def depart(self, url: str, seed: int, after_s: float) -> None:
        """One departing client: it asks for DEPART_TOKENS tokens and leaves after ``after_s`` seconds."""
        with self.lock:
            self.token_times[seed] = []
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Write a long story about the sea."}],
                "max_tokens": DEPART_TOKENS, "temperature": 1.0, "seed": seed}
        try:
            httpx.post(f"{url}/v1/chat/completions", json=body, timeout=after_s)
        except httpx.TimeoutException:
            with self.lock:
                self.left[seed] = time.monotonic()

    def after_leaving(self) -> list[tuple[int, int]]:
        """Per departed row (its client left before the answer): (tokens before the client left, after it)."""
        with self.lock:
            return [(sum(1 for t in self.token_times[seed] if t <= left),
                     sum(1 for t in self.token_times[seed] if t > left)) for seed, left in self.left.items()]


class _HungHandlers(logging.Handler):
    """Counts the handlers uvicorn had to cancel at shutdown: requests whose answer never came."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        found = re.search(r"Cancel (\d+) running task", record.getMessage())
        if found:
            self.count += int(found.group(1))


def _configs(layer: int) -> dict[str, dict]:
    """Valid request variants: body additions (OpenAI) and the Ollama equivalents."""
    up = [{"vector": "trait", "layer": layer, "coef": 4.0}]
    down = [{"vector": "trait", "layer": layer, "coef": -4.0, "positions": "response"}]
    return {"plain": {"openai": {}, "ollama": {}},
            "up": {"openai": {"steering": up}, "ollama": {"steer": up}},
            "down": {"openai": {"steering": down}, "ollama": {"steer": down}},
            "preset": {"openai": {"model": "cheerful"}, "ollama": {"model": "cheerful"}}}


def _openai(url: str, prompt: str, extra: dict, max_tokens: int, stream: bool = False, temperature: float = 0.0,
            timeout: float = 600) -> tuple[int, str]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": temperature, "stream": stream, **extra}
    if not stream:
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=timeout)
        return r.status_code, r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else r.text
    text = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=timeout) as r:
        if r.status_code != 200:
            return r.status_code, r.read().decode()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return 500, json.dumps(chunk)
                text += [c["delta"].get("content", "") for c in chunk["choices"]]
    return 200, "".join(text)


def _ollama(url: str, prompt: str, extra: dict, max_tokens: int, temperature: float = 0.0) -> tuple[int, str]:
    options = {"temperature": temperature, "num_predict": max_tokens, **{k: v for k, v in extra.items() if k != "model"}}
    body = {"model": extra.get("model", MODEL), "messages": [{"role": "user", "content": prompt}], "stream": False,
            "options": options}
    r = httpx.post(f"{url}/api/chat", json=body, timeout=600)
    return r.status_code, r.json()["message"]["content"] if r.status_code == 200 else r.text


def _hostile(url: str, rng: random.Random, layer: int, max_body: int) -> tuple[str, int]:
    """One hostile request: (its kind, the status it got; 0 = the client left on purpose)."""
    kind = rng.choice(["nan_coef", "huge_coef", "unknown_vector", "bad_json", "show_not_object", "json_object",
                       "chunked_over_limit", "nul_path", "leave_mid_stream", "leave_queued", "too_many_tokens"])
    chat = f"{url}/v1/chat/completions"
    base = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
    if kind == "nan_coef":
        r = httpx.post(chat, content=json.dumps({**base, "steering": [{"vector": "trait", "coef": "NaN"}]})
                       .replace('"NaN"', "NaN"), headers={"content-type": "application/json"})
    elif kind == "huge_coef":
        r = httpx.post(chat, json={**base, "steering": [{"vector": "trait", "layer": layer, "coef": 1e30}]})
    elif kind == "unknown_vector":
        r = httpx.post(f"{url}/api/chat", json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                                                "stream": False, "options": {"steer": [{"vector": "nope"}]}})
    elif kind == "bad_json":
        r = httpx.post(chat, content=b'{"model": ', headers={"content-type": "application/json"})
    elif kind == "show_not_object":
        r = httpx.post(f"{url}/api/show", content=rng.choice(["{", '"x"', "[1]", "null"]))
    elif kind == "json_object":
        r = httpx.post(chat, json={**base, "response_format": {"type": "json_object"}})
    elif kind == "chunked_over_limit":
        data = json.dumps({**base, "messages": [{"role": "user", "content": "x" * (max_body + 10)}]}).encode()
        r = httpx.post(chat, content=(data[i:i + 4096] for i in range(0, len(data), 4096)),
                       headers={"content-type": "application/json"})
    elif kind == "nul_path":
        r = httpx.post(f"{url}/v1/vectors", json={"name": "x", "path": "a\x00b"})
    elif kind == "too_many_tokens":
        r = httpx.post(chat, json={**base, "max_tokens": 10**6})
    elif kind == "leave_mid_stream":
        with httpx.stream("POST", chat, json={**base, "max_tokens": 32, "stream": True}, timeout=600) as s:
            for i, _ in enumerate(s.iter_lines()):
                if i >= 2:
                    break
        return kind, 0
    else:  # leave_queued: give up before the answer can come
        try:
            httpx.post(chat, json={**base, "max_tokens": 32}, timeout=0.05)
        except httpx.TimeoutException:
            pass
        return kind, 0
    return kind, r.status_code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--hostile-share", type=float, default=0.4)
    parser.add_argument("--departed-share", type=float, default=0.1,
                        help="share of requests from non-streamed clients that leave while their row runs")
    parser.add_argument("--vector", type=Path, default=None, help="trait vectors (default: a random direction)")
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--model", default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model, tok = load_model(args.model, device="cpu" if not torch.cuda.is_available() else None)
    if args.vector is not None:
        tv = load_vectors(args.vector, model)
    else:
        d = model.config.hidden_size
        n = model.config.num_hidden_layers
        tv = TraitVectors({"response_mean": torch.randn(n + 1, d, generator=torch.Generator().manual_seed(0))},
                          "soak", "trait", metadata={"recommended_layer": args.layer})
    max_body = 64_000
    options = AppOptions(model_name=MODEL, monitor_layer=args.layer, max_batch=16, max_queue=512,
                         max_tokens_limit=64, default_max_tokens=args.max_tokens, max_body_bytes=max_body,
                         presets=(("cheerful", (SteeringSpec(vector="trait", layer=args.layer, coef=4.0),)),))
    configs = _configs(args.layer)
    hung = _HungHandlers()
    counts: collections.Counter = collections.Counter()
    failures: list[str] = []
    lock = threading.Lock()
    app = create_app(model, tok, {"trait": tv}, options)
    departures = _Departures(app.state.service.engine)
    app.state.service.engine = departures  # the routes submit through service.engine
    with BackgroundServer(app) as srv:
        logging.getLogger("uvicorn.error").addHandler(hung)  # after uvicorn configured its loggers
        solo = {}
        for prompt in PROMPTS:
            for name, cfg in configs.items():
                status, text = _openai(srv.url, prompt, cfg["openai"], args.max_tokens)
                assert status == 200, text
                solo[prompt, name] = text
        print(f"solo greedy texts: {len(solo)} (prompts x configs)", flush=True)
        deadline = time.monotonic() + args.seconds

        def client(index: int) -> None:
            rng = random.Random(args.seed * 1000 + index)
            while time.monotonic() < deadline:
                try:
                    if rng.random() < args.departed_share:
                        departures.depart(srv.url, seed=10**6 + index * 10**5 + rng.randrange(10**5),
                                          after_s=rng.uniform(*DEPART_AFTER_S))
                        with lock:
                            counts["departed non-streamed"] += 1
                        continue
                    if rng.random() < args.hostile_share:
                        kind, status = _hostile(srv.url, rng, args.layer, max_body)
                        with lock:
                            counts[f"hostile {kind} -> {status}"] += 1
                            if status >= 500 or (status != 0 and status < 400):
                                failures.append(f"hostile {kind}: status {status}")
                        continue
                    prompt = rng.choice(PROMPTS)
                    name = rng.choice(list(configs))
                    route = rng.choice(["openai", "openai-stream", "ollama", "openai-tiny-temperature"])
                    if route == "ollama":
                        status, text = _ollama(srv.url, prompt, configs[name]["ollama"], args.max_tokens)
                    else:
                        status, text = _openai(srv.url, prompt, configs[name]["openai"], args.max_tokens,
                                               stream=route == "openai-stream",
                                               temperature=1e-40 if route.endswith("temperature") else 0.0)
                    with lock:
                        counts[f"valid {route}"] += 1
                        if status != 200:
                            failures.append(f"valid {route} {name}: status {status}: {text[:200]}")
                        elif text != solo[prompt, name]:
                            counts["valid text != solo"] += 1
                            failures.append(f"valid {route} {name} {prompt!r}: {text!r} != solo {solo[prompt, name]!r}")
                except Exception as exc:  # noqa: BLE001 - a client-side failure is a finding too
                    with lock:
                        failures.append(f"client {index}: {type(exc).__name__}: {exc}")

        started = time.monotonic()
        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - started
        idle_deadline = time.monotonic() + 60
        while True:
            stats = httpx.get(f"{srv.url}/v1/stats").json()
            if (stats["active_rows"] == 0 and stats["queue_depth"] == 0) or time.monotonic() > idle_deadline:
                break
            time.sleep(0.1)
    valid = sum(v for k, v in counts.items() if k.startswith("valid ") and k != "valid text != solo")
    hostile = sum(v for k, v in counts.items() if k.startswith("hostile "))
    print(f"{args.clients} clients for {elapsed:.0f} s: {valid + hostile} requests ({valid} valid, {hostile} hostile)")
    for key in sorted(counts):
        print(f"  {key}: {counts[key]}")
    print(f"valid texts equal to solo greedy: {valid - counts['valid text != solo']}/{valid}")
    print(f"engine at the end: active_rows={stats['active_rows']} queue_depth={stats['queue_depth']} "
          f"steps={stats['steps']} mean_batch_size={stats['mean_batch_size']}")
    if stats["active_rows"] or stats["queue_depth"]:
        failures.append(f"rows left: active {stats['active_rows']}, queued {stats['queue_depth']}")
    counted = departures.after_leaving()
    after = [n for _, n in counted]
    over = [n for n in after if n > DEPART_GOAL]
    if after:
        running = sum(1 for before, _ in counted if before)
        print(f"departed non-streamed clients: {len(after)} left before their answer came ({running} while their "
              f"row was generating); tokens generated after leaving: max {max(after)}, mean "
              f"{sum(after) / len(after):.2f}, total {sum(after)} (goal <= {DEPART_GOAL} per row; over it: "
              f"{len(over)})")
    if over:
        failures.append(f"{len(over)} departed rows generated more than {DEPART_GOAL} tokens after their client "
                        f"left (max {max(over)})")
    print(f"request handlers still waiting at shutdown (cancelled by uvicorn's graceful timeout): {hung.count}")
    if hung.count:
        failures.append(f"{hung.count} request handlers never ended (their rows gave no done/error signal)")
    print(f"failures: {len(failures)}")
    for line in failures[:20]:
        print(f"  {line}")
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
