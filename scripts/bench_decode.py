"""Decode-step overhead of steering and per-token monitoring, eager and compiled, as ratios within one run.

For each model config (Llama and Qwen2 7B shapes with random weights in bf16 on a GPU; tiny versions with
``--cpu --tiny``), each batch size and each path, it times decode steps over a static KV cache for:

* unsteered;
* one layer: add one vector at the middle layer;
* all layers: add one vector at every layer;
* all layers + monitor: the same plus a 4-trait read-out at every layer;
* per-row 8 vectors: every layer, row ``i`` steered by vector ``i % 8`` (per-row coefficients).

Paths: ``eager`` (today's ``ResidualEditor`` hooks; per-row uses ``CompiledSteering`` run eagerly, since the
eager editor has no per-row vectors), ``compiled`` (``CompiledSteering`` hooks traced into
``torch.compile(fullgraph=True)``, the fused op as the custom op; on a GPU ``mode="reduce-overhead"``, i.e.
CUDA graphs) and ``inline`` (the same, with the op's math as plain torch ops the compiler fuses). Ratios are to the
unsteered run of the same path, model and batch; variants are interleaved across repeats so machine-load
drift hits them alike.

    python scripts/bench_decode.py                    # GPU: 7B shapes, batch 1 and 32
    python scripts/bench_decode.py --cpu --tiny       # CPU: tiny configs (a smoke run of the same matrix)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, StaticCache

from steerlib import build_ops, build_readout
from steerlib.core.compat import cache_keyword
from steerlib.steering.compiled import CompiledSteering
from steerlib.steering.steer import ResidualEditor

VARIANTS = ("unsteered", "one layer", "all layers", "all layers + 4-trait monitor", "per-row 8 vectors")


def model_configs(tiny: bool) -> dict[str, tuple[type, object]]:
    """name -> (model class, config): 7B shapes, or tiny ones of the same architectures."""
    if tiny:
        common = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                      vocab_size=1024, max_position_embeddings=512)
        return {"llama-tiny": (LlamaForCausalLM, LlamaConfig(**common, num_key_value_heads=4)),
                "qwen2-tiny": (Qwen2ForCausalLM, Qwen2Config(**common, num_key_value_heads=2))}
    return {
        "llama-7b": (LlamaForCausalLM, LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                                   num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)),
        "qwen2-7b": (Qwen2ForCausalLM, Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                                   num_attention_heads=28, num_key_value_heads=4, vocab_size=152064)),
    }


def build_model(cls: type, config: object, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """A randomly initialised model created directly in ``dtype`` on ``device`` (7B in fp32 would not fit)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def make_variant(model: torch.nn.Module, name: str, batch: int, path: str, prompt_len: int, steps: int):
    """A zero-argument factory for the context manager that installs ``name`` (None for unsteered)."""
    n = model.config.num_hidden_layers
    d = model.config.hidden_size
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    vecs = [(torch.randn(d, generator=g) / d**0.5).to(device) for _ in range(8)]
    every = list(range(1, n + 1))
    ops, monitor, row_coefs = [], None, None
    if name == "unsteered":
        return None
    if name == "one layer":
        ops = build_ops(model, vecs[0], n // 2, 4.0)
    elif name in ("all layers", "all layers + 4-trait monitor"):
        ops = build_ops(model, vecs[0], every, 4.0)
        if name.endswith("monitor"):
            monitor = build_readout(model, {f"t{i}": vecs[i] for i in range(4)}, every)
    else:  # per-row: 8 add ops per layer, row i takes vector i % 8 through its coefficient
        ops = [op for layer in every for op in build_ops(model, vecs, layer, [4.0] * 8)]
        per_layer = torch.zeros(batch, 8)
        per_layer[torch.arange(batch), torch.arange(batch) % 8] = 4.0
        row_coefs = per_layer.repeat(1, n)
    lengths = torch.full((batch,), prompt_len)
    if path == "eager" and row_coefs is None:
        return lambda: ResidualEditor(model, ops, monitor)
    backend = "inline" if path == "inline" else "auto"
    return lambda: CompiledSteering(model, ops, monitor, prompt_lengths=lengths, max_steps=steps + 1,
                                    row_coefs=row_coefs, backend=backend)


def decode_time(model: torch.nn.Module, forward: Callable, prompt: torch.Tensor, steps: int) -> float:
    """Mean seconds per decode step over a static cache, after an eager prefill.

    Args:
        model: The causal LM (the prefill runs through it eagerly).
        forward: What runs each decode step (``model`` or its compiled call).
        prompt: [B, T] prompt ids (no padding).
        steps: decode steps to time.
    """
    b, t = prompt.shape
    key = cache_keyword(model)
    cache = StaticCache(config=model.config, max_cache_len=t + steps + 1)
    device = prompt.device
    with torch.inference_mode():
        out = model(input_ids=prompt, position_ids=torch.arange(t, device=device).expand(b, t), use_cache=True,
                    **{key: cache})
        token = out.logits[:, -1:].argmax(-1)
        positions = torch.full((b, 1), t, device=device)
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            out = forward(input_ids=token, position_ids=positions, use_cache=True, **{key: cache})
            token = out.logits[:, -1:].argmax(-1)
            positions = positions + 1
        _sync(device)
    return (time.perf_counter() - start) / steps


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(args: argparse.Namespace) -> list[tuple[str, int, str, str, float, float]]:
    """Rows (model, batch, path, variant, microseconds per step, ratio to unsteered) for the whole matrix."""
    device = "cpu" if args.cpu else "cuda"
    dtype = torch.float32 if args.cpu else torch.bfloat16
    rows = []
    for model_name, (cls, config) in model_configs(args.tiny).items():
        if args.models and model_name not in args.models:
            continue
        torch.manual_seed(0)
        model = build_model(cls, config, device, dtype)
        compiled = torch.compile(model, fullgraph=True, backend=args.backend, mode=args.mode)
        for batch in args.batch:
            torch._dynamo.reset()  # each batch size compiles its own graphs; do not let dynamo go dynamic
            prompt = torch.randint(0, config.vocab_size, (batch, args.prompt_len), device=device)
            for path in args.paths:
                forward = model if path == "eager" else compiled
                factories = {v: make_variant(model, v, batch, path, args.prompt_len, args.steps) for v in VARIANTS}
                times: dict[str, list[float]] = {v: [] for v in VARIANTS}
                for repeat in range(args.repeats + 1):  # the first round warms up (and compiles)
                    for variant, factory in factories.items():
                        if factory is None:
                            t = decode_time(model, forward, prompt, args.steps)
                        else:
                            with factory():
                                t = decode_time(model, forward, prompt, args.steps)
                        if repeat:
                            times[variant].append(t)
                        print(f"  {model_name} bs={batch} {path} {variant}: {t * 1e6:.0f} us/step"
                              f"{' (warm-up)' if not repeat else ''}", file=sys.stderr, flush=True)
                base = statistics.median(times["unsteered"])
                for variant in VARIANTS:
                    med = statistics.median(times[variant])
                    rows.append((model_name, batch, path, variant, med * 1e6, med / base))
        del model, compiled
        torch._dynamo.reset()
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="run on CPU (needs --tiny)")
    p.add_argument("--tiny", action="store_true", help="tiny Llama/Qwen2 configs instead of 7B shapes")
    p.add_argument("--models", nargs="+", default=None, help="subset of model names (default: both)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--paths", nargs="+", choices=["eager", "compiled", "inline"],
                   default=["eager", "compiled", "inline"])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=32, help="decode steps per timing")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per configuration (median taken)")
    p.add_argument("--backend", default="inductor", help="torch.compile backend")
    p.add_argument("--mode", default=None, help="torch.compile mode (default: reduce-overhead on GPU, none on CPU)")
    args = p.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("bench_decode: no CUDA GPU found; running the CPU smoke version (--cpu --tiny)", file=sys.stderr)
        args.cpu = args.tiny = True
    if args.cpu and not args.tiny:
        p.error("7B shapes on CPU would take hours; add --tiny")
    if args.mode is None and not args.cpu:
        args.mode = "reduce-overhead"
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the matrix and print one table."""
    args = parse_args(argv)
    device = "cpu" if args.cpu else torch.cuda.get_device_name()
    print(f"device={device} torch={torch.__version__} dtype={'float32' if args.cpu else 'bfloat16'} "
          f"threads={torch.get_num_threads()} backend={args.backend} mode={args.mode} prompt={args.prompt_len} "
          f"steps={args.steps} repeats={args.repeats} (median)")
    # Five variants x two paths each trace their own graph; the default limit (8) would fall back to eager.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    # Guard graphs on the hooks present; with torch's default every variant would rerun the first graph.
    torch._dynamo.config.skip_nnmodule_hook_guards = False
    rows = bench(args)
    print(f"{'model':12s} {'batch':>5}  {'path':8s} {'variant':30s} {'us/step':>9}  {'ratio':>6}")
    for model_name, batch, path, variant, us, ratio in rows:
        print(f"{model_name:12s} {batch:5d}  {path:8s} {variant:30s} {us:9.0f}  {ratio:6.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
