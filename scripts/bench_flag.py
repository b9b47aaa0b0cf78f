"""Benchmark data flagging: samples/s of ``score_dataset`` stopping after the needed layer vs all blocks.

Usage: python scripts/bench_flag.py [--n 64] [--batch-size 16] [--layer 15] [--threads N] [--repeats 2]

Both variants score the same samples (cycled from ``tests/data/planted.jsonl``) on the embedded model; the
full variant runs every block but computes logits for the last position only, so the ratio measures the
blocks saved, not the vocabulary projection.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from steerlib.core.models import load_model
from steerlib.finetuning.flag.scoring import score_dataset
from steerlib.store.samples import Sample, read_samples

DATA = Path(__file__).resolve().parent.parent / "tests" / "data" / "planted.jsonl"


def _samples(n: int) -> list[Sample]:
    base = read_samples(DATA).samples
    return [Sample(index=i, line=base[i % len(base)].line, messages=base[i % len(base)].messages,
                   response=base[i % len(base)].response) for i in range(n)]


def _run(model, tok, samples, vector, layer, batch_size, truncate: bool) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        score_dataset(model, tok, samples, vector, layer, out_path=Path(tmp) / "s.jsonl",
                      batch_size=batch_size, resume=False, progress=False, truncate=truncate)
        return len(samples) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64, help="samples per run")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--layer", type=int, default=15, help="layer read (SmolLM2 has 30 blocks)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per variant; the best is reported")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(device="cpu")
    samples = _samples(args.n)
    vector = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    _run(model, tok, samples[: args.batch_size], vector, args.layer, args.batch_size, True)  # warm-up
    rates: dict[str, float] = {}
    # Interleave the variants so load from other processes hits both alike.
    for _ in range(args.repeats):
        for name, truncate in (("stop after layer", True), ("all blocks", False)):
            rate = _run(model, tok, samples, vector, args.layer, args.batch_size, truncate)
            rates[name] = max(rates.get(name, 0.0), rate)
    n_layers = model.config.num_hidden_layers
    for name, rate in rates.items():
        print(f"{name:>17}: {rate:7.1f} samples/s")
    ratio = rates["stop after layer"] / rates["all blocks"]
    print(f"speed-up {ratio:.2f}x reading layer {args.layer} of {n_layers} "
          f"(ideal ~{n_layers / args.layer:.2f}x); n={args.n}, batch={args.batch_size}, "
          f"threads={torch.get_num_threads()}")
    print(json.dumps({"layer": args.layer, "n": args.n, "batch_size": args.batch_size,
                      "threads": torch.get_num_threads(), **{k: round(v, 2) for k, v in rates.items()},
                      "ratio": round(ratio, 3)}))


if __name__ == "__main__":
    main()
