"""What Prometheus metrics cost the server: throughput with ``/metrics`` on (and scraped) vs ``--no-metrics``.

Two ``steerlib serve`` processes on the embedded model (same options, one with ``--no-metrics``) take the same
load in interleaved rounds (on, off, then off, on, ...), so a machine whose load drifts weighs on both alike.
While the metrics server is under load a scraper fetches its ``/metrics`` every ``--scrape-interval`` seconds
(1 s by default, 15 times Prometheus' default rate, to make the scrape cost visible). The load is
``load_test.py``'s ``4configs`` mix (unsteered and four steering configurations interleaved), streaming, greedy.
Only one server is loaded at a time; the idle one blocks on its queue.

Reports tokens/s per side (pooled over rounds), the ratio on/off, and the per-round ratios with their median.

Example:
    python scripts/bench_metrics.py --clients 8 --requests 2 --max-tokens 32 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

import httpx
from load_test import LocalServer, run_load, summarise


class Scraper(threading.Thread):
    """Fetches ``url/metrics`` every ``interval`` seconds until stopped; counts scrapes and their bytes."""

    def __init__(self, url: str, interval: float):
        super().__init__(daemon=True)
        self.url, self.interval = url, interval
        self.stopped = threading.Event()
        self.scrapes = 0
        self.bytes = 0
        self.seconds = 0.0

    def run(self) -> None:
        with httpx.Client(timeout=30) as http:
            while not self.stopped.wait(self.interval):
                t0 = time.perf_counter()
                r = http.get(f"{self.url}/metrics")
                r.raise_for_status()
                self.seconds += time.perf_counter() - t0
                self.scrapes += 1
                self.bytes += len(r.content)

    def stop(self) -> None:
        self.stopped.set()
        self.join()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    ap.add_argument("--requests", type=int, default=2, help="requests per client per round (default 2)")
    ap.add_argument("--max-tokens", type=int, default=32, help="max_tokens per request (default 32)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; each loads both servers once (default 3)")
    ap.add_argument("--max-batch", type=int, default=16, help="servers' max batch (default 16)")
    ap.add_argument("--scrape-interval", type=float, default=1.0, help="seconds between scrapes (default 1)")
    ap.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    if min(args.clients, args.requests, args.max_tokens, args.rounds) < 1 or args.scrape_interval <= 0:
        ap.error("--clients, --requests, --max-tokens and --rounds must be >= 1; --scrape-interval > 0")

    workdir = tempfile.TemporaryDirectory(prefix="steerlib-bench-metrics-")
    servers: dict[str, LocalServer] = {}
    raw: dict[str, list] = {"on": [], "off": []}
    scrapes = {"count": 0, "bytes": 0, "seconds": 0.0}
    try:
        servers["on"] = LocalServer(args.max_batch, args.max_tokens, Path(workdir.name), ("--metrics-no-auth",))
        servers["off"] = LocalServer(args.max_batch, args.max_tokens, Path(workdir.name), ("--no-metrics",))
        assert httpx.get(f"{servers['off'].url}/metrics", timeout=10).status_code == 404, "metrics are not off"
        for side in ("on", "off"):  # warm-up: first-call overheads stay out
            s = servers[side]
            run_load(s.url, "unsteered", 1, 1, args.max_tokens, model=s.model, vector="random", layer=s.layer)
        for rnd in range(args.rounds):
            for side in (("on", "off") if rnd % 2 == 0 else ("off", "on")):
                s = servers[side]
                scraper = Scraper(s.url, args.scrape_interval) if side == "on" else None
                if scraper:
                    scraper.start()
                raw[side].append(run_load(s.url, "4configs", args.clients, args.requests, args.max_tokens,
                                          model=s.model, vector="random", layer=s.layer))
                if scraper:
                    scraper.stop()
                    scrapes["count"] += scraper.scrapes
                    scrapes["bytes"] += scraper.bytes
                    scrapes["seconds"] += scraper.seconds
                print(f"round {rnd + 1} metrics {side}: {raw[side][-1].tokens / raw[side][-1].wall:.1f} tok/s",
                      file=sys.stderr)
    finally:
        for s in servers.values():
            s.stop()
        workdir.cleanup()

    on, off = summarise(raw["on"], args.clients), summarise(raw["off"], args.clients)
    per_round = [(a.tokens / a.wall) / (b.tokens / b.wall) for a, b in zip(raw["on"], raw["off"], strict=True)]
    ratio = on.tokens_per_s / off.tokens_per_s if off.tokens_per_s else float("nan")
    print(f"{args.clients} clients x {args.requests} requests x {args.max_tokens} tokens x {args.rounds} rounds "
          f"(interleaved), 4configs mix, streaming, greedy; scrape every {args.scrape_interval:g} s while on")
    print("| metrics | ok | tok/s | req/s | p50 ms | p95 ms | mean batch |")
    print("|---|---|---|---|---|---|---|")
    for name, r in (("on (scraped)", on), ("off", off)):
        print(f"| {name} | {r.ok}/{r.requests} | {r.tokens_per_s:.1f} | {r.requests_per_s:.2f} | {r.p50_ms:.0f} | "
              f"{r.p95_ms:.0f} | {r.mean_batch_size} |")
    mean_scrape_ms = 1000 * scrapes["seconds"] / scrapes["count"] if scrapes["count"] else float("nan")
    print(f"tok/s on/off: {ratio:.3f} (per round: {', '.join(f'{x:.3f}' for x in per_round)}; "
          f"median {statistics.median(per_round):.3f}); {scrapes['count']} scrapes, "
          f"mean {scrapes['bytes'] / max(1, scrapes['count']):.0f} bytes, {mean_scrape_ms:.1f} ms each")
    if args.json:
        args.json.write_text(json.dumps({"on": asdict(on), "off": asdict(off), "ratio": ratio,
                                         "per_round": per_round, "scrapes": scrapes}, indent=2))
    return 0 if on.errors == 0 and off.errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
