"""Serving throughput with per-request steering: vLLM (steerlib's plugin) vs steerlib's HF engine.

Both engines are driven through the same surface (``submit`` rows, wait for them), so the client side is
identical. For each engine, concurrency (1, 4, 16 requests in flight) and steering variant:

* unsteered;
* one layer: add one vector at the middle layer;
* all layers: add one vector at every layer;
* 16 configs: request ``i`` adds its own vector (one of 16) at the middle layer;

it times ``--tokens`` generated tokens per request (EOS ignored, so every run generates the same count) and
reports tokens/s, the ratio to unsteered on the same engine and the vLLM/HF ratio. Rounds are interleaved
(round-robin over every cell) so machine-load drift hits all cells alike; the table gives medians.
With ``--extract`` it also times ``steerlib extract`` (a small config) with each engine generating.

    python scripts/bench_vllm.py                       # CPU: embedded model, vLLM compiled
    python scripts/bench_vllm.py --eager --rounds 2    # skip vLLM's compile (faster start)

Run it in the vLLM environment (``make vllm-env``; ``.venv-vllm/bin/python scripts/bench_vllm.py``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

VARIANTS = ("unsteered", "one layer", "all layers", "16 configs")


def _edits(variant: str, i: int, vectors: torch.Tensor, n_layers: int) -> list:
    from steerlib.steering.plan import SteerOp, lower_ops

    mid = n_layers // 2
    if variant == "unsteered":
        return []
    if variant == "one layer":
        ops = [SteerOp(layer=mid, vector=vectors[0], coef=1.0)]
    elif variant == "all layers":
        ops = [SteerOp(layer=layer, vector=vectors[0], coef=1.0) for layer in range(1, n_layers + 1)]
    else:
        ops = [SteerOp(layer=mid, vector=vectors[i % len(vectors)], coef=1.0)]
    return lower_ops(ops)


def run_cell(engine, prompt_ids: list[int], variant: str, concurrency: int, tokens: int, vectors: torch.Tensor,
             n_layers: int) -> float:
    """Tokens/s for ``concurrency`` rows of ``tokens`` tokens submitted together."""
    from steerlib.serve.engine import Sampling

    done = [threading.Event() for _ in range(concurrency)]
    errors: list = []

    def sink(k: int):
        def put(item: tuple) -> None:
            if item[0] in ("done", "error"):
                if item[0] == "error":
                    errors.append(item[1])
                done[k].set()
        return put

    started = time.perf_counter()
    for k in range(concurrency):
        edits = _edits(variant, k, vectors, n_layers)
        # A distinct last prompt token per row, so no engine can share a whole prompt between rows.
        engine.submit(prompt_ids + [100 + k], edits, Sampling(max_tokens=tokens), sink(k), steered=bool(edits))
    for ev in done:
        ev.wait()
    if errors:
        raise RuntimeError(f"{variant}: {errors[0]}")
    return concurrency * tokens / (time.perf_counter() - started)


def bench_engines(args) -> dict:
    from steerlib.core.chat import format_prompt
    from steerlib.core.models import load_model, resolve_model_path
    from steerlib.serve.engine import Engine
    from steerlib.serve.vllm_engine import VllmEngine, engine_args

    loaded = load_model(None, device="cpu")
    model, tok = loaded.model, loaded.tokenizer
    n_layers, d_model = model.config.num_hidden_layers, model.config.hidden_size
    gen = torch.Generator().manual_seed(0)
    vectors = torch.randn(16, d_model, generator=gen)
    vectors = vectors / vectors.norm(dim=-1, keepdim=True) * 2.0
    prompt_ids = list(tok(format_prompt(tok, "Tell me about the history of your town."),
                          add_special_tokens=False)["input_ids"])
    folder, _ = resolve_model_path(None)
    engines = {}
    t0 = time.perf_counter()
    engines["vllm"] = VllmEngine(engine_args(str(folder), max_batch=16, max_model_len=512, enforce_eager=args.eager),
                                 tok, max_batch=16, ignore_eos=True)
    engines["vllm"].start()
    print(f"vLLM started in {time.perf_counter() - t0:.0f} s ({'eager' if args.eager else 'compiled'})", flush=True)
    engines["hf"] = Engine(model, tok, max_batch=16, eos_ids=set())
    engines["hf"].start()
    results: dict = {}
    cells = [(e, c, v) for e in engines for c in args.concurrency for v in VARIANTS]
    for _ in range(2):  # warm-up: the first steps of each shape
        run_cell(engines["vllm"], prompt_ids, "16 configs", 4, 4, vectors, n_layers)
        run_cell(engines["hf"], prompt_ids, "16 configs", 4, 4, vectors, n_layers)
    for r in range(args.rounds):
        for cell in cells:
            e, c, v = cell
            results.setdefault(cell, []).append(run_cell(engines[e], prompt_ids, v, c, args.tokens, vectors,
                                                         n_layers))
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    for engine in engines.values():
        engine.stop()
    return {cell: statistics.median(v) for cell, v in results.items()}


def table(med: dict, concurrency: list[int]) -> str:
    lines = ["| concurrency | variant | vLLM tok/s | vs unsteered | HF tok/s | vs unsteered | vLLM/HF |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for c in concurrency:
        for v in VARIANTS:
            vl, hf = med[("vllm", c, v)], med[("hf", c, v)]
            lines.append(f"| {c} | {v} | {vl:.1f} | {vl / med[('vllm', c, 'unsteered')]:.2f} | {hf:.1f} | "
                         f"{hf / med[('hf', c, 'unsteered')]:.2f} | {vl / hf:.2f} |")
    return "\n".join(lines)


def bench_extract(args) -> dict[str, float]:
    from steerlib.extraction.extract import ExtractionConfig
    from steerlib.jobs import extract_file

    out: dict[str, float] = {}
    cfg = ExtractionConfig(max_pairs=1, max_questions=args.extract_questions, max_new_tokens=32, evaluate=False)
    for engine in ("hf", "vllm"):
        folder = Path(tempfile.mkdtemp(prefix=f"bench-extract-{engine}-"))
        t0 = time.perf_counter()
        extract_file("optimistic", folder, config=cfg, engine=engine)
        out[engine] = time.perf_counter() - t0
        shutil.rmtree(folder, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--eager", action="store_true", help="vLLM without torch.compile")
    parser.add_argument("--extract", action="store_true", help="also time steerlib extract with each engine")
    parser.add_argument("--extract-questions", type=int, default=8)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    med = bench_engines(args)
    print(f"\n{args.tokens} tokens per request, medians of {args.rounds} interleaved rounds; "
          f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}\n")
    print(table(med, args.concurrency))
    if args.extract:
        times = bench_extract(args)
        print(f"\nextract (optimistic, 1 pair x {args.extract_questions} questions, 32 tokens, no eval split): "
              + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()))


if __name__ == "__main__":
    main()
