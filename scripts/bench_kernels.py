"""Benchmark the fused per-row steer/cap/readout op and print one table of ratios.

Every call adds a vector to each row, caps the projection on it and reads out K directions (one table entry,
per-row coefficient and bounds, as a steering plan lowers an edit).
GPU (default): for bf16 [rows, width] over widths 2048-8192 and rows 1-512 it reports, per backend
(torch, Triton, CUDA, and ``op:<backend>``: the same through ``torch.ops.steerlib.steer_rows_``, the registered
op a steering plan calls, writing the read-out into a caller-owned buffer),
  * bandwidth as a fraction of the HBM peak (``--peak-tbps``, default H100 SXM 3.35 TB/s) and of
    a plain ``dst.copy_(src)`` of the same bytes (the practically reachable peak);
  * the speed-up over the same math written as separate torch ops (add, matmul, cap, matmul);
  * the slowdown of a batch-1 decode step of a randomly initialised 7B-shaped Llama
    (hidden 4096, 32 layers, bf16, KV cache) with steer+readout hooked on 1 layer and on all.

``--cpu`` runs the torch path against the unfused torch ops (and a small Llama) on CPU, so the
script does something on machines without a GPU; ``--tiny`` shrinks the matrix (widths 256 and 1024,
rows 1 and 64) for a quick smoke run.

Usage::

    python scripts/bench_kernels.py                 # GPU
    python scripts/bench_kernels.py --cpu --tiny    # CPU smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from steerlib.kernels import available_backends, fused_steer_rows, steer_rows_

from steerlib.core.compat import cache_keyword, output_cache

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Row:
    """One line of the output table."""

    measurement: str
    case: str
    backend: str
    time_us: float
    ratio: float


@dataclass
class Inputs:
    """Per-row steering inputs for one benchmark shape: every row edits with table entry 0."""

    hidden: torch.Tensor
    table: torch.Tensor  # [1, D] unit vector: added with ``coef`` and capped
    readout: torch.Tensor
    index: torch.Tensor
    coef: torch.Tensor
    cap_min: torch.Tensor
    cap_max: torch.Tensor


def make_inputs(tokens: int, hidden: int, k: int, dtype: torch.dtype, device: str, coef: float = 0.01,
                lo: float = -4.0, hi: float = 4.0) -> Inputs:
    """Random inputs; the steering step is small so repeated in-place calls stay bounded.

    Args:
        tokens: Rows N.
        hidden: Width D.
        k: Read-out directions.
        dtype: Hidden-state dtype.
        device: Torch device.
        coef, lo, hi: every row's coefficient and cap bounds.
    """
    g = torch.Generator(device="cpu").manual_seed(0)
    u = torch.randn(hidden, generator=g)
    return Inputs(
        hidden=torch.randn(tokens, hidden, generator=g).to(device=device, dtype=dtype),
        table=(u / u.norm())[None].to(device),
        readout=(torch.randn(k, hidden, generator=g) / hidden**0.5).to(device),
        index=torch.zeros(tokens, dtype=torch.int64, device=device),
        coef=torch.full((tokens,), coef, device=device),
        cap_min=torch.full((tokens,), lo, device=device),
        cap_max=torch.full((tokens,), hi, device=device),
    )


def time_fn(fn: Callable[[], object], device: str, reps: int = 50) -> float:
    """Median seconds per call: ``triton.testing.do_bench`` on GPU, a wall-clock loop on CPU.

    Args:
        fn: Zero-argument callable to time.
        device: ``"cuda"`` or ``"cpu"``.
        reps: Timed repetitions for the CPU loop.
    """
    if device == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:  # no triton: time with CUDA events instead
            return _time_cuda_events(fn, reps)
        return do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _time_cuda_events(fn: Callable[[], object], reps: int) -> float:
    """Median seconds per call measured with CUDA events."""
    for _ in range(5):
        fn()
    samples = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3)
    return statistics.median(samples)


def unfused_steer(x: Inputs) -> torch.Tensor:
    """The same update written the obvious way, one torch op per step (the baseline).

    Args:
        x: Inputs (``x.hidden`` is updated in place).

    Returns:
        The ``[N, K]`` fp32 projections.
    """
    h = x.hidden
    t = x.table[x.index]  # [N, D]
    h.add_((x.coef[:, None] * t).to(h.dtype))
    p = (h.float() * t).sum(-1)
    h.add_(((torch.clamp(p, x.cap_min, x.cap_max) - p)[:, None] * t).to(h.dtype))
    return h.float() @ x.readout.T


def bench_ops(args: argparse.Namespace, device: str, dtype: torch.dtype, backends: list[str]) -> list[Row]:
    """Kernel bandwidth and fused-vs-unfused rows for every token count."""
    rows: list[Row] = []
    for width, tokens in ((w, t) for w in args.widths for t in args.tokens):
        x = make_inputs(tokens, width, args.k, dtype, device)
        case = f"N={tokens} D={width} K={args.k}"
        elem = x.hidden.element_size()
        hbm_bytes = 2 * x.hidden.numel() * elem + tokens * (args.k + 4) * 4 + (args.k + 1) * width * 4
        copy_dst = torch.empty_like(x.hidden)
        t_copy = time_fn(lambda x=x, dst=copy_dst: dst.copy_(x.hidden), device)
        copy_bw = 2 * x.hidden.numel() * elem / t_copy
        if device == "cuda":
            rows.append(Row("memcpy / HBM peak", case, "copy_", t_copy * 1e6, copy_bw / (args.peak_tbps * 1e12)))
        t_unfused = time_fn(lambda x=x: unfused_steer(x), device)
        for backend in backends:
            def fused(x: Inputs = x, backend: str = backend) -> object:
                return fused_steer_rows(x.hidden, x.table, x.index, x.coef, x.cap_min, x.cap_max, x.readout,
                                        backend=backend, validate=False)

            t = time_fn(fused, device)
            bw = hbm_bytes / t
            if device == "cuda":
                rows.append(Row("fused / HBM peak", case, backend, t * 1e6, bw / (args.peak_tbps * 1e12)))
            rows.append(Row("fused / memcpy bandwidth", case, backend, t * 1e6, bw / copy_bw))
            rows.append(Row("unfused time / fused time", case, backend, t * 1e6, t_unfused / t))
            # The registered op as a steering plan calls it: the read-out written into a caller-owned buffer.
            proj_out = torch.empty(tokens, args.k, device=x.hidden.device)

            def via_op(x: Inputs = x, proj_out=proj_out, backend: str = backend) -> object:
                return steer_rows_(x.hidden, x.table, x.index, x.coef, x.cap_min, x.cap_max, x.readout, proj_out,
                                   backend)

            t_op = time_fn(via_op, device)
            if device == "cuda":
                rows.append(Row("fused / HBM peak", case, f"op:{backend}", t_op * 1e6,
                                hbm_bytes / t_op / (args.peak_tbps * 1e12)))
            rows.append(Row("custom-op time / fused time", case, f"op:{backend}", t_op * 1e6, t_op / t))
    return rows


def build_llama(args: argparse.Namespace, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """A randomly initialised Llama: 7B shapes on GPU, a small one for ``--cpu``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.cpu:
        config = LlamaConfig(hidden_size=256 if args.tiny else 512, intermediate_size=1024, num_hidden_layers=4,
                             num_attention_heads=8, num_key_value_heads=8, vocab_size=1024)
    else:
        config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=args.layers,
                             num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise straight in the target dtype: 7B fp32 would not fit
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def decode_step_time(model: torch.nn.Module, prompt: torch.Tensor, steps: int, device: str) -> float:
    """Mean seconds per batch-1 decode step, after a prefill, using the KV cache.

    Args:
        model: A causal LM.
        prompt: ``[1, T]`` prompt token ids.
        steps: Decode steps to time.
        device: Torch device.
    """
    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True)
        cache = output_cache(out)
        token = out.logits[:, -1:].argmax(-1)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            out = model(input_ids=token, use_cache=True, **{cache_keyword(model): cache})
            token = out.logits[:, -1:].argmax(-1)
        if device == "cuda":
            torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def add_steer_hooks(model: torch.nn.Module, layer_ids: list[int], backend: str, k: int) -> list:
    """Hook ``fused_steer_rows`` (ablate + K readouts, in place) onto decoder layers.

    Returns:
        The hook handles (call ``.remove()`` on each to undo).
    """
    layers = model.model.layers
    width = model.config.hidden_size
    param = next(model.parameters())
    by_rows: dict[int, Inputs] = {}  # per-row inputs per pass length (prefill, then one row per decode step)
    readouts: list[torch.Tensor] = []

    def hook(_module: torch.nn.Module, _args: tuple, output: object) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        flat = hidden.view(-1, width)
        n = flat.shape[0]
        if n not in by_rows:
            by_rows[n] = make_inputs(n, width, k, param.dtype, str(param.device), coef=0.0, lo=0.0, hi=0.0)
        x = by_rows[n]
        _, proj = fused_steer_rows(flat, x.table, x.index, x.coef, x.cap_min, x.cap_max, x.readout,
                                   backend=backend, validate=False)
        readouts[:] = [proj]  # keep the read-out alive like a real readout would, without syncing

    return [layers[i].register_forward_hook(hook) for i in layer_ids]


def bench_decode(args: argparse.Namespace, device: str, dtype: torch.dtype, backends: list[str]) -> list[Row]:
    """Decode-step overhead of steer+readout hooks at one layer and at every layer."""
    model = build_llama(args, device, dtype)
    n_layers = len(model.model.layers)
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt_len), device=device)
    name = "llama7b" if not args.cpu else f"llama-tiny(D={model.config.hidden_size})"
    decode_step_time(model, prompt, 4, device)  # warm-up: kernels, allocator, extension build
    rows: list[Row] = []
    base_samples: list[float] = []
    for backend in backends:
        for label, layer_ids in (("1 layer", [n_layers // 2]), (f"{n_layers} layers", list(range(n_layers)))):
            samples = []
            for _ in range(args.repeats):
                # Interleave base and steered runs so drift in clocks hits both alike.
                base_samples.append(decode_step_time(model, prompt, args.steps, device))
                handles = add_steer_hooks(model, layer_ids, backend, args.k)
                try:
                    samples.append(decode_step_time(model, prompt, args.steps, device))
                finally:
                    for handle in handles:
                        handle.remove()
            t = statistics.median(samples)
            rows.append(Row(f"decode step steered / base ({label})", f"{name} bs=1", backend, t * 1e6,
                            t / statistics.median(base_samples)))
    return rows


def print_table(rows: list[Row]) -> None:
    """Print the rows as one aligned text table."""
    header = ("measurement", "case", "backend", "time_us", "ratio")
    cells = [(r.measurement, r.case, r.backend, f"{r.time_us:.1f}", f"{r.ratio:.3f}") for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" if i < 3 else f"{{:>{w}}}" for i, w in enumerate(widths))
    print(fmt.format(*header))
    print(fmt.format(*("-" * w for w in widths)))
    for c in cells:
        print(fmt.format(*c))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="run the torch path vs unfused torch on CPU")
    p.add_argument("--tiny", action="store_true", help="small widths and row counts (a smoke run)")
    p.add_argument("--tokens", type=lambda s: [int(t) for t in s.split(",")], default=None,
                   help="comma-separated row counts (default 1,8,32,128,512; --tiny 1,64)")
    p.add_argument("--widths", type=lambda s: [int(t) for t in s.split(",")], default=None,
                   help="comma-separated hidden widths (default 2048,4096,8192; --tiny 256,1024)")
    p.add_argument("--k", type=int, default=16, help="readout directions (<= 16)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bfloat16 (CPU: float32)")
    p.add_argument("--peak-tbps", type=float, default=3.35, help="HBM peak in TB/s (H100 SXM: 3.35)")
    p.add_argument("--backends", type=lambda s: s.split(","), default=None,
                   help="comma-separated backends (default: all available)")
    p.add_argument("--layers", type=int, default=32, help="decoder layers of the 7B-shaped Llama")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=16, help="decode steps per timing")
    p.add_argument("--repeats", type=int, default=3, help="timings per configuration (median taken)")
    p.add_argument("--skip-decode", action="store_true", help="skip the Llama decode-step benchmark")
    args = p.parse_args(argv)
    if args.tokens is None:
        args.tokens = [1, 64] if args.tiny else [1, 8, 32, 128, 512]
    if args.widths is None:
        args.widths = [256, 1024] if args.tiny else [2048, 4096, 8192]
    if args.dtype is None:
        args.dtype = "float32" if args.cpu else "bfloat16"
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns a process exit code."""
    args = parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("bench_kernels: no CUDA GPU found, nothing to benchmark. "
              "Run with --cpu to time the torch path against unfused torch ops on CPU.")
        return 0
    device = "cpu" if args.cpu else "cuda"
    dtype = DTYPES[args.dtype]
    if args.backends is None:
        args.backends = ["torch"] if args.cpu else available_backends()
    print(f"device={torch.cuda.get_device_name() if device == 'cuda' else 'cpu'} dtype={args.dtype} "
          f"backends={','.join(args.backends)}", file=sys.stderr)
    rows = bench_ops(args, device, dtype, args.backends)
    if not args.skip_decode:
        rows += bench_decode(args, device, dtype, args.backends)
    print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
