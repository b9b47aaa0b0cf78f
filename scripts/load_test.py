"""Load test for an OpenAI-compatible chat server: N concurrent streaming clients, three steering mixes.

Mixes (one run each, in the same invocation, so the ratios compare like with like):

* ``unsteered``: no request is steered (the baseline every other mix is divided by);
* ``4configs``: 4 distinct steering configurations and unsteered requests, interleaved (request n uses config
  n mod 5);
* ``distinct``: every request carries its own steering (its own coefficient and layer).

Reports requests/s, generated tokens/s, p50/p95 latency and p50/p95 time to first token, and each mix's
throughput as a ratio to ``unsteered``. Without ``--url`` it starts steerlib's server in-process on the embedded
SmolLM2-135M-Instruct with one random (seeded) vector; with ``--url`` it loads any server speaking the OpenAI chat
API (steering goes in the body's ``steering`` field, which other servers may ignore or refuse). The local server
runs in a child process, so the clients do not compete with its engine for the GIL.

Examples:
    python scripts/load_test.py --clients 16 --requests 2 --max-tokens 48
    python scripts/load_test.py --url http://127.0.0.1:8000 --model smollm2 --vector optimistic
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

QUESTIONS = [
    "How do you feel about the future of your city?",
    "What is a good way to spend a rainy afternoon?",
    "Describe your ideal weekend.",
    "What do you think about learning a new language?",
    "How will technology change schools?",
    "What makes a good friend?",
    "Tell me about the ocean.",
    "What should I cook tonight?",
]
MIXES = ("unsteered", "4configs", "distinct")


@dataclass(frozen=True)
class Result:
    """Summary of one load-test run."""

    mix: str
    clients: int
    requests: int
    ok: int
    errors: int
    wall_s: float
    requests_per_s: float
    tokens_per_s: float
    p50_ms: float
    p95_ms: float
    ttft_p50_ms: float
    ttft_p95_ms: float
    mean_batch_size: float | None
    first_error: str | None = None


def _percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (no numpy needed)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


def steering_for(mix: str, n: int, vector: str, layer: int) -> list[dict] | None:
    """The ``steering`` field of request ``n`` under ``mix`` (None: send no field, i.e. unsteered)."""
    if mix == "unsteered":
        return None
    if mix == "4configs":
        configs = [None,
                   [{"vector": vector, "layer": layer, "coef": 4.0}],
                   [{"vector": vector, "layer": layer, "coef": -4.0, "positions": "response"}],
                   [{"vector": vector, "layer": max(1, layer - 3), "mode": "ablate"}],
                   [{"vector": vector, "layer": layer, "mode": "cap", "cap_max": 0.0}]]
        return configs[n % len(configs)]
    return [{"vector": vector, "layer": max(1, layer - 2 + n % 5), "coef": round(1.0 + 0.01 * n, 3)}]


def _stats(url: str, headers: dict) -> dict:
    try:
        return httpx.get(f"{url}/v1/stats", headers=headers, timeout=30).json()
    except Exception:  # another server: no stats route
        return {}


def run_load(url: str, mix: str, clients: int, requests: int, max_tokens: int, *, model: str, vector: str,
             layer: int, api_key: str | None = None, timeout: float = 600.0) -> _Raw:
    """Run one mix against ``url`` (without ``/v1``) with streaming requests and return what it measured."""
    latencies: list[float] = []
    ttfts: list[float] = []
    tokens = [0]
    errors: list[str] = []
    lock = threading.Lock()
    gate = threading.Barrier(clients)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    before = _stats(url, headers)

    def client(cid: int) -> None:
        with httpx.Client(base_url=url, timeout=timeout, headers=headers) as http:
            gate.wait()  # all clients start together
            for r in range(requests):
                n = r * clients + cid  # interleaved: neighbours in time get different configs
                body: dict = {"model": model, "temperature": 0, "max_tokens": max_tokens, "stream": True,
                              "stream_options": {"include_usage": True},
                              "messages": [{"role": "user", "content": QUESTIONS[n % len(QUESTIONS)]}]}
                steering = steering_for(mix, n, vector, layer)
                if steering is not None:
                    body["steering"] = steering
                t0 = time.perf_counter()
                first = None
                used = 0
                try:
                    with http.stream("POST", "/v1/chat/completions", json=body) as resp:
                        if resp.status_code != 200:
                            raise RuntimeError(f"HTTP {resp.status_code}: {resp.read()[:300]!r}")
                        for line in resp.iter_lines():
                            if not line.startswith("data: ") or line == "data: [DONE]":
                                continue
                            chunk = json.loads(line[6:])
                            if "error" in chunk:
                                raise RuntimeError(chunk["error"])
                            if first is None and any(c.get("delta", {}).get("content") for c in chunk["choices"]):
                                first = time.perf_counter()
                            if chunk.get("usage"):
                                used = chunk["usage"]["completion_tokens"]
                except Exception as exc:  # counted and reported, the load goes on
                    with lock:
                        errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                end = time.perf_counter()
                with lock:
                    latencies.append((end - t0) * 1000)
                    ttfts.append(((first or end) - t0) * 1000)
                    tokens[0] += used

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    after = _stats(url, headers)
    steps = after.get("steps", 0) - before.get("steps", 0)
    rows = after.get("rows_stepped", 0) - before.get("rows_stepped", 0)
    return _Raw(mix, clients * requests, latencies, ttfts, tokens[0], errors, wall, steps, rows)


@dataclass
class _Raw:
    """What one run of one mix measured, before summarising."""

    mix: str
    requests: int
    latencies: list[float]
    ttfts: list[float]
    tokens: int
    errors: list[str]
    wall: float
    steps: int
    rows: int


def summarise(runs: list[_Raw], clients: int) -> Result:
    """Pool several runs of one mix: throughput over their summed wall time, percentiles over all requests."""
    wall = sum(r.wall for r in runs)
    latencies = [x for r in runs for x in r.latencies]
    ttfts = [x for r in runs for x in r.ttfts]
    errors = [e for r in runs for e in r.errors]
    steps, rows = sum(r.steps for r in runs), sum(r.rows for r in runs)
    return Result(
        mix=runs[0].mix, clients=clients, requests=sum(r.requests for r in runs), ok=len(latencies),
        errors=len(errors), wall_s=round(wall, 2), requests_per_s=round(len(latencies) / wall, 3),
        tokens_per_s=round(sum(r.tokens for r in runs) / wall, 1), p50_ms=round(_percentile(latencies, 50), 1),
        p95_ms=round(_percentile(latencies, 95), 1), ttft_p50_ms=round(_percentile(ttfts, 50), 1),
        ttft_p95_ms=round(_percentile(ttfts, 95), 1), mean_batch_size=round(rows / steps, 2) if steps else None,
        first_error=errors[0] if errors else None,
    )


class LocalServer:
    """``steerlib serve`` on the embedded model in a child process, with one random (seeded) vector ``random``.

    A separate process, as in a real deployment: clients in the server's own process would compete with the
    engine for the GIL and slow every step down.
    """

    def __init__(self, max_batch: int, max_tokens: int, workdir: Path, extra_args: tuple[str, ...] = ()):
        import torch

        from steerlib.core.models import load_model
        from steerlib.core.vectors import TraitVectors

        loaded = load_model(device="cpu")
        cfg = loaded.model.config
        vec = torch.randn(cfg.num_hidden_layers + 1, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
        vec = vec / vec.norm(dim=-1, keepdim=True) * 8.0
        self.layer = cfg.num_hidden_layers // 2
        tv = TraitVectors({"response_mean": vec}, model_name=loaded.name, trait="random",
                          metadata={"recommended_layer": self.layer})
        path = tv.save(workdir / "random")
        self.model = loaded.name
        del loaded
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "steerlib.cli", "serve", "--vector", f"random={path.parent}", "--port", str(port),
             "--max-batch", str(max_batch), "--default-max-tokens", str(max_tokens),
             "--max-tokens-limit", str(max(max_tokens, 512)), *extra_args],
            stdout=subprocess.DEVNULL, stderr=(workdir / f"server-{port}.log").open("w"))
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start; see {workdir / f'server-{port}.log'}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _table(results: list[Result]) -> str:
    base = next((r for r in results if r.mix == "unsteered"), None)
    lines = ["| mix | ok | req/s | tok/s | p50 ms | p95 ms | TTFT p50 ms | TTFT p95 ms | mean batch | tok/s vs unsteered |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ratio = f"{r.tokens_per_s / base.tokens_per_s:.2f}x" if base and base.tokens_per_s else "-"
        lines.append(f"| {r.mix} | {r.ok}/{r.requests} | {r.requests_per_s:.2f} | {r.tokens_per_s:.1f} | "
                     f"{r.p50_ms:.0f} | {r.p95_ms:.0f} | {r.ttft_p50_ms:.0f} | {r.ttft_p95_ms:.0f} | "
                     f"{r.mean_batch_size} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="server base URL; default: start steerlib's server in-process")
    ap.add_argument("--model", help="model id sent with --url (default: the first one its /v1/models lists; a "
                                    "name the server does not serve is a 404)")
    ap.add_argument("--vector", default="random", help="steering vector name with --url (default 'random')")
    ap.add_argument("--layer", type=int, default=15, help="steering layer with --url (default 15)")
    ap.add_argument("--api-key", help="bearer token for the server")
    ap.add_argument("--mixes", default=",".join(MIXES), help=f"comma-separated subset of {','.join(MIXES)}")
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    ap.add_argument("--requests", type=int, default=2, help="requests per client per mix and round (default 2)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="rounds; each runs every mix once, in turn, so a machine whose load drifts during the "
                         "invocation weighs on every mix alike (default 2)")
    ap.add_argument("--max-tokens", type=int, default=48, help="max_tokens per request (default 48)")
    ap.add_argument("--max-batch", type=int, default=16, help="in-process server: max batch (default 16)")
    ap.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    mixes = [m.strip() for m in args.mixes.split(",") if m.strip()]
    unknown = [m for m in mixes if m not in MIXES]
    if unknown or not mixes:
        ap.error(f"--mixes: unknown {unknown}; choose from {MIXES}")
    if args.clients < 1 or args.requests < 1 or args.max_tokens < 1 or args.rounds < 1:
        ap.error("--clients, --requests, --rounds and --max-tokens must be >= 1")

    server = None
    workdir = tempfile.TemporaryDirectory(prefix="steerlib-load-")
    if args.url:
        url, model, vector, layer = args.url.rstrip("/"), args.model, args.vector, args.layer
        if model is None:
            headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
            model = httpx.get(f"{url}/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
    else:
        server = LocalServer(args.max_batch, args.max_tokens, Path(workdir.name))
        url, model, vector, layer = server.url, server.model, "random", server.layer
    raw: dict[str, list[_Raw]] = {mix: [] for mix in mixes}
    try:
        run_load(url, "unsteered", 1, 1, args.max_tokens, model=model, vector=vector, layer=layer,
                 api_key=args.api_key)  # warm-up: first-call overheads stay out
        for _ in range(args.rounds):
            for mix in mixes:
                raw[mix].append(run_load(url, mix, args.clients, args.requests, args.max_tokens, model=model,
                                         vector=vector, layer=layer, api_key=args.api_key))
    finally:
        if server is not None:
            server.stop()
        workdir.cleanup()
    results = [summarise(runs, args.clients) for runs in raw.values()]
    for r in results:
        if r.first_error:
            print(f"{r.mix}: first error: {r.first_error}", file=sys.stderr)
    print(f"{args.clients} clients x {args.requests} requests x {args.max_tokens} tokens x {args.rounds} rounds "
          f"(mixes in turn), streaming, greedy")
    print(_table(results))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0 if all(r.errors == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
