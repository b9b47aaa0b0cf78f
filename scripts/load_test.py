"""Load test for the steerlib chat server: N concurrent clients, each sending R chat completions.

Reports requests/s, generated tokens/s, p50/p95/max latency and the server's mean batch size. Without
``--url`` it starts the server in-process on the embedded SmolLM2-135M-Instruct, monitoring a random (seeded)
direction: the cost of the read-out does not depend on which direction it is.

Examples:
    python scripts/load_test.py --clients 8 --requests 4 --max-tokens 16
    python scripts/load_test.py --compare-unbatched            # also run with max_batch=1
    python scripts/load_test.py --url http://127.0.0.1:8000    # against a running `steerlib serve`
"""

from __future__ import annotations

import argparse
import json
import sys
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


@dataclass
class Result:
    """Summary of one load-test run."""

    clients: int
    requests: int
    ok: int
    errors: int
    wall_s: float
    requests_per_s: float
    tokens_per_s: float
    p50_ms: float
    p95_ms: float
    max_ms: float
    mean_batch_size: float | None
    max_batch: int | None
    batch_wait_ms: float | None


def _percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (no numpy needed)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


def run_load(url: str, clients: int, requests: int, max_tokens: int, steer_every: int = 0,
             steering: list[dict] | None = None, timeout: float = 600.0) -> Result:
    """Run the load against ``url`` and return its summary.

    Args:
        url: server base URL (without ``/v1``).
        clients: concurrent client threads.
        requests: requests per client, sent one after another.
        max_tokens: generation length of every request.
        steer_every: every n-th request carries ``steering`` (0: none), to see batches split by config.
        steering: the per-request steering extension used then.
        timeout: per-request timeout in seconds.
    """
    latencies: list[float] = []
    tokens = [0]
    errors: list[str] = []
    lock = threading.Lock()
    start_gate = threading.Barrier(clients)
    before = httpx.get(f"{url}/v1/monitor", params={"last": 1}, timeout=30).json().get("server", {})

    def client(cid: int) -> None:
        with httpx.Client(base_url=url, timeout=timeout) as http:
            start_gate.wait()  # all clients start together
            for r in range(requests):
                n = cid * requests + r
                body: dict = {"model": "any", "temperature": 0, "max_tokens": max_tokens,
                              "messages": [{"role": "user", "content": QUESTIONS[n % len(QUESTIONS)]}]}
                if steer_every and steering and n % steer_every == 0:
                    body["steering"] = steering
                t0 = time.perf_counter()
                try:
                    resp = http.post("/v1/chat/completions", json=body)
                    resp.raise_for_status()
                    used = resp.json()["usage"]["completion_tokens"]
                except Exception as exc:  # counted and reported, the load goes on
                    with lock:
                        errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                with lock:
                    latencies.append((time.perf_counter() - t0) * 1000)
                    tokens[0] += used

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    after = httpx.get(f"{url}/v1/monitor", params={"last": 1}, timeout=30).json().get("server", {})
    batches = after.get("batches", 0) - before.get("batches", 0)
    batched = after.get("batched_requests", 0) - before.get("batched_requests", 0)
    return Result(
        clients=clients, requests=clients * requests, ok=len(latencies), errors=len(errors), wall_s=round(wall, 2),
        requests_per_s=round(len(latencies) / wall, 3), tokens_per_s=round(tokens[0] / wall, 1),
        p50_ms=round(_percentile(latencies, 50), 1), p95_ms=round(_percentile(latencies, 95), 1),
        max_ms=round(max(latencies, default=float("nan")), 1),
        mean_batch_size=round(batched / batches, 2) if batches else None,
        max_batch=after.get("max_batch"), batch_wait_ms=after.get("batch_wait_ms"),
    )


def _local_model():
    """The embedded model and one random (seeded) monitored direction at the middle layer."""
    import torch

    from steerlib.core.models import load_model
    from steerlib.core.vectors import TraitVectors

    loaded = load_model(device="cpu")
    cfg = loaded.model.config
    vec = torch.randn(cfg.num_hidden_layers + 1, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    tv = TraitVectors({"response_mean": vec}, model_name=loaded.name, trait="random",
                      metadata={"recommended_layer": cfg.num_hidden_layers // 2})
    return loaded, tv


def _start_local(loaded, tv, max_batch: int, batch_wait_ms: float, max_tokens: int):
    from steerlib.server import BackgroundServer, create_app

    app = create_app(loaded.model, loaded.tokenizer, {"random": tv}, model_name=loaded.name, max_batch=max_batch,
                     batch_wait_ms=batch_wait_ms, default_max_tokens=max_tokens,
                     max_tokens_limit=max(max_tokens, 512))
    return BackgroundServer(app).start()


def _print(label: str, r: Result) -> None:
    print(f"{label}: {r.ok}/{r.requests} ok ({r.errors} errors) in {r.wall_s:.1f} s | "
          f"{r.requests_per_s:.2f} req/s, {r.tokens_per_s:.1f} tok/s | latency p50 {r.p50_ms:.0f} ms, "
          f"p95 {r.p95_ms:.0f} ms, max {r.max_ms:.0f} ms | mean batch {r.mean_batch_size} "
          f"(max_batch {r.max_batch}, wait {r.batch_wait_ms} ms)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="server base URL; default: start one in-process on the embedded model")
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    ap.add_argument("--requests", type=int, default=4, help="requests per client (default 4)")
    ap.add_argument("--max-tokens", type=int, default=16, help="max_tokens per request (default 16)")
    ap.add_argument("--max-batch", type=int, default=8, help="in-process server: max batch (default 8)")
    ap.add_argument("--batch-wait-ms", type=float, default=20.0, help="in-process server: batch wait (default 20)")
    ap.add_argument("--steer-every", type=int, default=0,
                    help="every n-th request carries per-request steering (in-process server only; default 0)")
    ap.add_argument("--compare-unbatched", action="store_true",
                    help="in-process server: also run the same load with max_batch=1")
    ap.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    if args.clients < 1 or args.requests < 1 or args.max_tokens < 1:
        ap.error("--clients, --requests and --max-tokens must be >= 1")
    if args.url and (args.compare_unbatched or args.steer_every):
        ap.error("--compare-unbatched and --steer-every need the in-process server (drop --url)")

    results: dict[str, Result] = {}
    if args.url:
        results["server"] = run_load(args.url.rstrip("/"), args.clients, args.requests, args.max_tokens)
        _print("server", results["server"])
    else:
        loaded, tv = _local_model()
        steering = [{"vector": "random", "layer": tv.recommended_layer, "coef": 2.0}]
        configs = [("batched", args.max_batch)] + ([("unbatched", 1)] if args.compare_unbatched else [])
        for label, max_batch in configs:
            server = _start_local(loaded, tv, max_batch, args.batch_wait_ms, args.max_tokens)
            try:
                run_load(server.url, 1, 1, args.max_tokens)  # warm-up: first-call overheads stay out
                results[label] = run_load(server.url, args.clients, args.requests, args.max_tokens,
                                          args.steer_every, steering)
            finally:
                server.stop()
            _print(label, results[label])
    if args.json:
        args.json.write_text(json.dumps({k: asdict(v) for k, v in results.items()}, indent=2))
    return 0 if all(r.errors == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
