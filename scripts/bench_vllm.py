"""Serving throughput with per-request steering: vLLM (steerlib's plugin) vs steerlib's HF engine; and what a
request's steering costs on the wire and in a vLLM worker, vectors inline vs registered keys.

Spec cost (``--part spec``, no engine): a 7B-shaped spec (``--width 4096``, ``--layers 32``: one random vector per
layer) as the server sends it, before (rows inline as JSON floats, what every request carried before registered
vectors) and after (content keys; ``steerlib.vllm.slots``): the request's spec in bytes, the API process's
registration of a client's spec, and the worker's parse + resolve per request (a key already in the slot table,
and a first miss that reads the store).

Throughput (``--part serve``): both engines are driven through the same surface (``submit`` rows, wait for them), so the client side is
identical. For each engine, concurrency (1, 4, 16 requests in flight) and steering variant:

* unsteered;
* one layer: add one vector at the middle layer;
* all layers: add one vector at every layer;
* 16 configs: request ``i`` adds its own vector (one of 16) at the middle layer;
* 256 rotating: each request adds the next of 256 vectors at the middle layer, more than the worker's slot table
  holds (``--max-steer-vectors``, default 64 here), so vLLM's workers keep loading and evicting rows (LRU);

it times ``--tokens`` generated tokens per request (EOS ignored, so every run generates the same count) and
reports tokens/s, the ratio to unsteered on the same engine and the vLLM/HF ratio. Rounds are interleaved
(round-robin over every cell) so machine-load drift hits all cells alike; the table gives medians.
With ``--extract`` it also times ``steerlib extract`` (a small config) with each engine generating.

    python scripts/bench_vllm.py                       # CPU: embedded model, vLLM compiled
    python scripts/bench_vllm.py --eager --rounds 2    # skip vLLM's compile (faster start)
    python scripts/bench_vllm.py --part spec           # request bytes and parse time, 7B-shaped
    python scripts/bench_vllm.py --part serve --engines vllm --concurrency 16

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

VARIANTS = ("unsteered", "one layer", "all layers", "16 configs", "256 rotating")
_ROTATION = [0]  # the next of the 256 rotating vectors


def _edits(variant: str, i: int, vectors: torch.Tensor, n_layers: int) -> list:
    from steerlib.steering.plan import SteerOp, lower_ops

    mid = n_layers // 2
    if variant == "unsteered":
        return []
    if variant == "one layer":
        ops = [SteerOp(layer=mid, vector=vectors[0], coef=1.0)]
    elif variant == "all layers":
        ops = [SteerOp(layer=layer, vector=vectors[0], coef=1.0) for layer in range(1, n_layers + 1)]
    elif variant == "16 configs":
        ops = [SteerOp(layer=mid, vector=vectors[i % 16], coef=1.0)]
    else:
        ops = [SteerOp(layer=mid, vector=vectors[16 + _ROTATION[0] % 256], coef=1.0)]
        _ROTATION[0] += 1
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
    vectors = torch.randn(16 + 256, d_model, generator=gen)
    vectors = vectors / vectors.norm(dim=-1, keepdim=True) * 2.0
    prompt_ids = list(tok(format_prompt(tok, "Tell me about the history of your town."),
                          add_special_tokens=False)["input_ids"])
    folder, _ = resolve_model_path(None)
    engines = {}
    if "vllm" in args.engines:
        t0 = time.perf_counter()
        engines["vllm"] = VllmEngine(engine_args(str(folder), max_batch=16, max_model_len=512,
                                                 enforce_eager=args.eager, max_steer_vectors=args.max_steer_vectors),
                                     tok, max_batch=16, ignore_eos=True)
        engines["vllm"].start()
        print(f"vLLM started in {time.perf_counter() - t0:.0f} s ({'eager' if args.eager else 'compiled'}, "
              f"{args.max_steer_vectors} vector slots)", flush=True)
    if "hf" in args.engines:
        engines["hf"] = Engine(model, tok, max_batch=16, eos_ids=set())
        engines["hf"].start()
    results: dict = {}
    cells = [(e, c, v) for e in engines for c in args.concurrency for v in VARIANTS]
    for _ in range(2):  # warm-up: the first steps of each shape
        for engine in engines.values():
            run_cell(engine, prompt_ids, "16 configs", 4, 4, vectors, n_layers)
    for r in range(args.rounds):
        for cell in cells:
            e, c, v = cell
            results.setdefault(cell, []).append(run_cell(engines[e], prompt_ids, v, c, args.tokens, vectors,
                                                         n_layers))
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    for engine in engines.values():
        engine.stop()
    return {cell: statistics.median(v) for cell, v in results.items()}


def table(med: dict, concurrency: list[int], engines: list[str]) -> str:
    names = {"vllm": "vLLM", "hf": "HF"}
    head = "| concurrency | variant | " + " | ".join(f"{names[e]} tok/s | vs unsteered" for e in engines)
    both = len(engines) == 2
    lines = [head + (" | vLLM/HF |" if both else " |"), "|---:|---|" + "---:|---:|" * len(engines)
             + ("---:|" if both else "")]
    for c in concurrency:
        for v in VARIANTS:
            cells = [f"{med[(e, c, v)]:.1f} | {med[(e, c, v)] / med[(e, c, 'unsteered')]:.2f}" for e in engines]
            ratio = f" | {med[('vllm', c, v)] / med[('hf', c, v)]:.2f}" if both else ""
            lines.append(f"| {c} | {v} | " + " | ".join(cells) + ratio + " |")
    return "\n".join(lines)


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def bench_spec(args) -> str:
    """Request bytes and per-request parse/resolve time of a ``--layers`` x ``--width`` spec, floats vs keys."""
    from steerlib.steering.plan import SteerOp, lower_ops
    from steerlib.vllm.slots import SlotTable, VectorStore
    from steerlib.vllm.spec import encode_rows, encode_spec, parse_spec, register_spec

    d, n_layers, reps = args.width, args.layers, args.spec_repeats
    gen = torch.Generator().manual_seed(0)
    ops = [SteerOp(layer=layer, vector=torch.randn(d, generator=gen), coef=4.0) for layer in range(1, n_layers + 1)]
    edits = lower_ops(ops)
    folder = Path(tempfile.mkdtemp(prefix="bench-spec-"))
    try:
        store = VectorStore(folder)
        inline = encode_rows(edits, readout=True)
        keyed = encode_rows(edits, readout=True, store=store)
        client = encode_spec(ops, readout=True)  # what a plain `vllm serve` client sends once
        api_store = VectorStore(folder, cache=1024)
        register_spec(client, n_layers, d, api_store)  # the rows are in the store from here on
        table = SlotTable(1024, load=VectorStore(folder).get)
        counter = iter(range(10**9))

        def resolve_hit() -> None:  # a new request whose vectors are registered in the worker
            rid = next(counter)
            parse_spec(keyed, n_layers, d, rows=lambda keys: table.acquire(rid, keys))
            table.release(rid)

        def resolve_miss() -> None:  # the first request using these vectors in this worker: read the store
            cold = SlotTable(1024, load=VectorStore(folder).get)
            parse_spec(keyed, n_layers, d, rows=lambda keys: cold.acquire(0, keys))

        rows = [
            ("request spec bytes (server -> vLLM)", f"{len(inline.encode()):,}", f"{len(keyed.encode()):,}"),
            ("server encodes a request's spec, ms", f"{_median_ms(lambda: encode_rows(edits), reps):.2f}",
             f"{_median_ms(lambda: encode_rows(edits, store=store), reps):.2f}"),
            ("worker parse + resolve per request, ms", f"{_median_ms(lambda: parse_spec(inline, n_layers, d), reps):.2f}",
             f"{_median_ms(resolve_hit, reps):.3f} (hit) / {_median_ms(resolve_miss, max(3, reps // 4)):.2f} (miss)"),
            ("API process: client spec -> request, ms",
             f"{_median_ms(lambda: parse_spec(client, n_layers, d), reps):.2f} (parse)",
             f"{_median_ms(lambda: register_spec(client, n_layers, d, api_store), reps):.2f} (floats, once) / "
             f"{_median_ms(lambda: register_spec(keyed, n_layers, d, api_store), reps):.2f} (keys)"),
        ]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    lines = [f"{n_layers} layers x {d} wide, one add edit per layer, medians of {reps}; "
             f"torch threads {torch.get_num_threads()}", "",
             "| | before: inline floats | after: content keys |", "|---|---:|---:|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def med_engines(med: dict) -> list[str]:
    return list(dict.fromkeys(e for e, _, _ in med))


def bench_extract(args) -> dict[str, float]:
    from steerlib.commands.extract import extract_file
    from steerlib.extraction.extract import ExtractionConfig

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
    parser.add_argument("--part", choices=["all", "spec", "serve"], default="all")
    parser.add_argument("--engines", nargs="+", choices=["vllm", "hf"], default=["vllm", "hf"])
    parser.add_argument("--max-steer-vectors", type=int, default=64, help="vLLM worker slot capacity")
    parser.add_argument("--width", type=int, default=4096, help="spec part: model width")
    parser.add_argument("--layers", type=int, default=32, help="spec part: layers (one edit each)")
    parser.add_argument("--spec-repeats", type=int, default=20)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    if args.part in ("all", "spec"):
        print(bench_spec(args), flush=True)
    if args.part == "spec":
        return
    med = bench_engines(args)
    print(f"\n{args.tokens} tokens per request, medians of {args.rounds} interleaved rounds; "
          f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}\n")
    print(table(med, args.concurrency, list(med_engines(med))))
    if args.extract:
        times = bench_extract(args)
        print(f"\nextract (optimistic, 1 pair x {args.extract_questions} questions, 32 tokens, no eval split): "
              + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()))


if __name__ == "__main__":
    main()
