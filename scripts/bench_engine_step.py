"""Per-step cost of the serving engine at 16 decoding rows on the embedded model.

Measures, per decode step, the whole step and the part spent outside the model's forward (the engine's host
work: building inputs, filling the steering arguments, sampling, detokenising), for three mixes: unsteered,
one shared steering config, and 16 distinct configs at three layers with a trait read-out.

Run it against two checkouts to compare (interleaved rounds, medians)::

    python scripts/bench_engine_step.py --compare /path/to/old/checkout --rounds 3

Each round runs every mix in a fresh subprocess per checkout, alternating checkouts, so machine load drifts
onto both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

MIXES = ("unsteered", "one-config", "16-configs")


def run_once(mix: str, rows: int, tokens: int) -> dict:
    """One engine, ``rows`` rows decoding ``tokens`` tokens together; returns per-step timings in ms."""
    import torch

    from steerlib.core.chat import format_prompt
    from steerlib.core.models import load_model
    from steerlib.serve.engine import Engine, Sampling

    try:
        from steerlib.steering.plan import lower_ops
    except ImportError:  # a checkout from before the one plan: its engine lowered ops itself
        from steerlib.serve.engine import edits_from_ops

        def lower_ops(ops, i=0):
            return edits_from_ops(ops, [("v", i, op.layer) for op in ops])
    from steerlib.steering.steer import build_ops, build_readout

    torch.set_num_threads(1)
    loaded = load_model(None)
    model, tok = loaded.model, loaded.tokenizer
    d = model.config.hidden_size
    gen = torch.Generator().manual_seed(0)
    vectors = [torch.randn(d, generator=gen) for _ in range(rows)]
    readout = build_readout(model, {"a": vectors[0], "b": vectors[1]}, [15])
    eos = set()  # no EOS: every row runs the full length, so every step has ``rows`` rows
    engine = Engine(model, tok, readout=readout if mix == "16-configs" else None, max_batch=rows, eos_ids=eos)
    # Per step: the whole of Engine._step and the model's forward inside it, recorded in the worker thread
    # itself (no counters read from another thread mid-step). The first step (the prefill) is dropped.
    steps: list[tuple[float, float]] = []
    inside = [0.0]
    forward = model.forward
    step = engine._step

    def timed_forward(*args, **kwargs):
        started = time.perf_counter()
        try:
            return forward(*args, **kwargs)
        finally:
            inside[0] += time.perf_counter() - started

    def timed_step():
        inside[0] = 0.0
        started = time.perf_counter()
        try:
            return step()
        finally:
            steps.append((time.perf_counter() - started, inside[0]))

    model.forward = timed_forward
    engine._step = timed_step
    engine.start()
    try:
        done = [threading.Event() for _ in range(rows)]
        ids = tok(format_prompt(tok, "Tell me about the sea."), add_special_tokens=False)["input_ids"]
        with engine.hold():
            for i in range(rows):
                if mix == "unsteered":
                    ops = []
                elif mix == "one-config":
                    ops = build_ops(model, vectors[0], 15, 2.0)
                else:
                    ops = build_ops(model, vectors[i], [8, 15, 22], 0.5 + i / 8)
                edits = lower_ops(ops)

                def sink(item, i=i):
                    if item[0] in ("done", "error"):
                        done[i].set()

                engine.submit(ids, edits, Sampling(tokens), sink, steered=bool(ops))
        for e in done:
            assert e.wait(600)
        engine.stop()
        decode = steps[1:]
        step_ms = 1000 * sum(t for t, _ in decode) / len(decode)
        forward_ms = 1000 * sum(f for _, f in decode) / len(decode)
        return {"mix": mix, "steps": len(decode), "step_ms": step_ms, "host_ms": step_ms - forward_ms,
                "forward_ms": forward_ms}
    finally:
        engine.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare", help="another checkout to measure beside this one")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one mix, print JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_once(args.one, args.rows, args.tokens)))
        return
    here = Path(__file__).resolve().parents[1]
    trees = {"this": here} | ({"other": Path(args.compare).resolve()} if args.compare else {})
    results: dict[tuple[str, str], list[dict]] = {}
    for r in range(args.rounds):
        for mix in MIXES:
            for name, tree in trees.items():
                env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1")
                out = subprocess.run([sys.executable, str(here / "scripts" / "bench_engine_step.py"), "--one", mix,
                                      "--rows", str(args.rows), "--tokens", str(args.tokens)],
                                     env=env, capture_output=True, text=True, check=True, cwd=tree)
                row = json.loads(out.stdout.strip().splitlines()[-1])
                results.setdefault((name, mix), []).append(row)
                print(f"round {r + 1} {name:5s} {mix:10s} step {row['step_ms']:7.2f} ms  host {row['host_ms']:6.2f} ms",
                      flush=True)
    print(f"\nmedians over {args.rounds} rounds, {args.rows} rows x {args.tokens} tokens (decode steps only)")
    print(f"{'checkout':8s} {'mix':10s} {'step ms':>8s} {'host ms':>8s}")
    for (name, mix), rows in sorted(results.items()):
        step = statistics.median(x["step_ms"] for x in rows)
        host = statistics.median(x["host_ms"] for x in rows)
        print(f"{name:8s} {mix:10s} {step:8.2f} {host:8.2f}")


if __name__ == "__main__":
    main()
