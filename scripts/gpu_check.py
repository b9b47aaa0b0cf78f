"""The Python parts of ``scripts/gpu_check.sh``: the first checks to run when a GPU is lent (issue 24, item 8).

Each part prints ``SUMMARY <part>: ...`` lines, which the shell script collects into one quotable block, and
exits non-zero when its check fails. ``--cpu-dry-run`` runs every part on CPU at toy sizes, so the code paths are
known to work before a GPU is ever available (kernel parity torch vs Triton's interpreter; vLLM's CPU build).

    python scripts/gpu_check.py build     [--cpu-dry-run]          # choose + build the kernel backend, registers
    python scripts/gpu_check.py parity    [--cpu-dry-run]          # torch / Triton / CUDA, fp16 + bf16, D <= 8192
    python scripts/gpu_check.py model OUT [--cpu-dry-run]          # a random-weight 7B-shaped folder, no hub
    python scripts/gpu_check.py vllm MODEL OUT.json [--eager] [--cpu-dry-run]   # greedy tokens + tok/s
    python scripts/gpu_check.py compare GRAPHS.json EAGER.json     # graphs vs eager tokens, tok/s table
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

WIDTHS = (576, 2048, 4096, 5120, 8192)
DRY_WIDTHS = (576, 8192)


def summary(part: str, text: str) -> None:
    print(f"SUMMARY {part}: {text}", flush=True)


# ----------------------------------------------------------------------------------------------- build
def cmd_build(args: argparse.Namespace) -> int:
    from steerlib.kernels import cuda_steer, prepare_backend

    device = "cpu" if args.cpu_dry_run else "cuda"
    forced = None if args.cpu_dry_run else "cuda"
    start = time.perf_counter()
    choice = prepare_backend(device, forced)
    summary("build", f"{choice} in {time.perf_counter() - start:.1f} s")
    if cuda_steer.find_nvcc() is None:
        summary("registers", "skipped: no nvcc")
        return 0
    if args.cpu_dry_run:
        archs = cuda_steer.TARGET_ARCHS
    else:
        major, minor = torch.cuda.get_device_capability()
        archs = tuple(sorted({f"sm_{major}{minor}", *cuda_steer.TARGET_ARCHS}))
    resources = cuda_steer.kernel_resources(archs)
    threads = cuda_steer.launch_threads(list(range(576, 8193, 64)))
    worst = max(threads.values())
    ok = True
    for arch in archs:
        regs = [r.registers for r in resources if r.arch == arch]
        per_block = max(r.registers_per_block(worst) for r in resources if r.arch == arch)
        fits = per_block <= cuda_steer.REGISTERS_PER_SM
        ok &= fits
        summary("registers", f"{arch}: {min(regs)}-{max(regs)} regs/thread x {worst} threads = {per_block} "
                             f"<= {cuda_steer.REGISTERS_PER_SM}: {'ok' if fits else 'DOES NOT FIT'}")
    return 0 if ok else 1


# ---------------------------------------------------------------------------------------------- parity
def _mixed_rows(n: int, d: int, k: int, g: int, dtype: torch.dtype, device: str, seed: int) -> dict:
    """Rows that add, cap, ablate, stay unsteered or are gated, with a K-direction read-out."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen)

    table = torch.nn.functional.normalize(rand(6, d), dim=-1)
    table[0] = 0.0
    index = torch.randint(0, 6, (n,), generator=gen)
    index[index == 0] = -1  # row 0 is the plan's "no edit" row; -1 leaves the row alone as well
    coef = rand(n) * 3.0
    lo = torch.where(torch.arange(n) % 3 == 0, -0.5, -torch.inf)
    hi = torch.where(torch.arange(n) % 3 == 0, 0.5, torch.inf)
    lo[torch.arange(n) % 5 == 0], hi[torch.arange(n) % 5 == 0] = 0.0, 0.0  # ablations
    gate_dir = torch.nn.functional.normalize(rand(g, d), dim=-1)
    gate_index = torch.randint(-1, g, (n,), generator=gen)
    gate_lo = torch.full((n,), -0.3)
    gate_hi = torch.full((n,), torch.inf)
    args = dict(hidden=(rand(n, d) * 2.0).to(dtype), table=table, index=index, coef=coef, cap_min=lo, cap_max=hi,
                readout=torch.nn.functional.normalize(rand(k, d), dim=-1), gate_dir=gate_dir, gate_index=gate_index,
                gate_lo=gate_lo, gate_hi=gate_hi)
    return {name: t.to(device) for name, t in args.items()}


def cmd_parity(args: argparse.Namespace) -> int:
    from steerlib.kernels import available_backends, fused_steer_rows

    device = "cpu" if args.cpu_dry_run else "cuda"
    backends = [b for b in ("torch", "triton", "cuda") if b in available_backends()]
    widths = DRY_WIDTHS if args.cpu_dry_run else WIDTHS
    n = 8 if args.cpu_dry_run else 256
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
    worst_ok = True
    for dtype in (torch.float16, torch.bfloat16):
        for d in widths:
            case = _mixed_rows(n, d, 4, 3, dtype, device, seed=d)
            results = {}
            for backend in backends:
                hidden = case["hidden"].clone()
                gate_out = torch.zeros(n, dtype=torch.bool, device=device)
                rest = {k: v for k, v in case.items() if k != "hidden"}
                out, proj = fused_steer_rows(hidden, backend=backend, gate_out=gate_out, **rest)
                results[backend] = (out.float(), proj, gate_out)
            ref_h, ref_p, ref_g = results["torch"]
            scale = ref_h.abs().max().item()
            cells = []
            for backend in backends[1:]:
                h, p, gopen = results[backend]
                dh = (h - ref_h).abs().max().item() / scale
                dp = (p - ref_p).abs().max().item() / max(ref_p.abs().max().item(), 1.0)
                same_gates = bool((gopen == ref_g).all())
                ok = dh <= tol[dtype] and dp <= 1e-4 and same_gates
                worst_ok &= ok
                cells.append(f"{backend} h {dh:.1e} proj {dp:.1e} gates {'=' if same_gates else 'DIFFER'}"
                             f"{'' if ok else ' FAIL'}")
            gated = int((case["gate_index"] >= 0).sum())
            summary("parity", f"{str(dtype)[6:]} D={d} N={n} K=4 gated={gated}: "
                              + ("; ".join(cells) if cells else "torch only (no other backend here)"))
    return 0 if worst_ok else 1


# ----------------------------------------------------------------------------------------------- model
def cmd_model(args: argparse.Namespace) -> int:
    """A Llama-architecture folder with random weights: 7B-shaped on a GPU, toy-sized in the dry run, with the
    embedded model's tokenizer (vLLM needs one; nothing is downloaded)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from steerlib.core.models import resolve_model_path

    tok_folder, _ = resolve_model_path(None)
    vocab = json.loads((tok_folder / "config.json").read_text())["vocab_size"]
    if args.cpu_dry_run:
        shape = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=4)
        dtype, device = torch.float32, "cpu"
    else:
        shape = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32)
        dtype, device = torch.bfloat16, "cuda"
    config = LlamaConfig(**shape, vocab_size=vocab, max_position_embeddings=4096, rms_norm_eps=1e-5,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    out = Path(args.out)
    start = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tok_folder / name).exists():
            shutil.copy(tok_folder / name, out / name)
    params = sum(p.numel() for p in model.parameters()) / 1e9
    summary("model", f"random Llama {shape['num_hidden_layers']} x {shape['hidden_size']}, {params:.2f} B params, "
                     f"{str(dtype)[6:]}, written in {time.perf_counter() - start:.0f} s")
    return 0


# ------------------------------------------------------------------------------------------------ vLLM
PROMPTS = ["Tell me about the sea.", "What is a good breakfast?", "Describe your week.", "How do trains work?",
           "Write a line about autumn.", "Why is the sky blue?", "Name three colours.", "What is music?"]


def _spec(vector: torch.Tensor, layer: int, coef: float) -> str:
    from steerlib.steering.plan import SteerOp
    from steerlib.vllm.spec import encode_spec

    return encode_spec([SteerOp(layer, vector, coef=coef)])


def cmd_vllm(args: argparse.Namespace) -> int:
    """Greedy tokens of a mixed steered/unsteered batch and tok/s at 1, 16 and 256 vectors, on one engine."""
    from vllm import LLM, SamplingParams

    from steerlib.vllm.spec import SPEC_KEY
    from steerlib.vllm.worker import IDENTITY

    config = json.loads((Path(args.model) / "config.json").read_text())
    n_layers, d_model = config["num_hidden_layers"], config["hidden_size"]
    dry = args.cpu_dry_run
    kwargs = dict(dtype="float32" if dry else "bfloat16", max_model_len=512, enforce_eager=args.eager,
                  additional_config={"steerlib": IDENTITY}, seed=0)
    if not dry:
        kwargs["gpu_memory_utilization"] = 0.85
    start = time.perf_counter()
    llm = LLM(model=args.model, **kwargs)
    started = time.perf_counter() - start
    layer = max(1, n_layers // 2)
    gen = torch.Generator().manual_seed(1)
    # Vectors large enough to move a random model's greedy tokens: a few times the residual's typical norm.
    vectors = torch.nn.functional.normalize(torch.randn(256, d_model, generator=gen), dim=-1) * args.strength

    def params(spec: str | None, tokens: int) -> SamplingParams:
        return SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True,
                              extra_args={SPEC_KEY: spec} if spec else None)

    # 1. the mixed batch: even rows steered (each its own vector), odd rows unsteered
    specs = [_spec(vectors[i], layer, 1.0) if i % 2 == 0 else None for i in range(len(PROMPTS))]
    outs = llm.generate(PROMPTS, [params(s, args.tokens) for s in specs], use_tqdm=False)
    mixed = [list(o.outputs[0].token_ids) for o in outs]
    plain = llm.generate(PROMPTS, [params(None, args.tokens) for _ in PROMPTS], use_tqdm=False)
    unsteered = [list(o.outputs[0].token_ids) for o in plain]

    # 2. tok/s: unsteered vs 1 vector, 16 distinct, 256 registered in rotation (interleaved rounds); the dry run
    # keeps the shapes at a quarter / a thirty-second of the requests.
    few, many = (4, 8) if dry else (16, 256)
    one = _spec(vectors[0], layer, 1.0)
    cells = {f"unsteered x{few}": [None] * few, f"1 vector x{few}": [one] * few,
             f"{few} vectors x{few}": [_spec(vectors[i], layer, 1.0) for i in range(few)],
             f"unsteered x{many}": [None] * many,
             f"{many} vectors x{many}": [_spec(vectors[i], layer, 1.0) for i in range(many)]}
    rates: dict[str, list[float]] = {k: [] for k in cells}
    prompts_for = {k: [PROMPTS[i % len(PROMPTS)] for i in range(len(v))] for k, v in cells.items()}
    llm.generate(PROMPTS[:2], [params(None, 4)] * 2, use_tqdm=False)  # warm
    for _ in range(args.rounds):
        for name, cell_specs in cells.items():
            t0 = time.perf_counter()
            res = llm.generate(prompts_for[name], [params(s, args.bench_tokens) for s in cell_specs], use_tqdm=False)
            rates[name].append(sum(len(o.outputs[0].token_ids) for o in res) / (time.perf_counter() - t0))
    result = {"eager": args.eager, "start_s": started, "layer": layer, "mixed": mixed, "unsteered": unsteered,
              "steered_rows": [i for i, s in enumerate(specs) if s], "tok_s": {k: statistics.median(v)
                                                                             for k, v in rates.items()}}
    Path(args.out).write_text(json.dumps(result))
    mode = "eager" if args.eager else "default graphs"
    changed = sum(mixed[i] != unsteered[i] for i in result["steered_rows"])
    summary("vllm", f"{mode}: engine up in {started:.0f} s; steered rows changed {changed}/"
                    f"{len(result['steered_rows'])}; " + ", ".join(f"{k} {v:.1f} tok/s"
                                                                 for k, v in result["tok_s"].items()))
    llm.llm_engine.engine_core.shutdown()
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    graphs = json.loads(Path(args.graphs).read_text())
    eager = json.loads(Path(args.eager).read_text())
    steered = set(graphs["steered_rows"])
    rows = range(len(graphs["mixed"]))
    same_steered = sum(graphs["mixed"][i] == eager["mixed"][i] for i in rows if i in steered)
    same_plain = sum(graphs["mixed"][i] == eager["mixed"][i] for i in rows if i not in steered)
    same_baseline = sum(a == b for a, b in zip(graphs["unsteered"], eager["unsteered"], strict=True))
    n_steered, n_plain = len(steered), len(rows) - len(steered)
    summary("graphs-vs-eager", f"steered rows equal {same_steered}/{n_steered}, unsteered rows in the mixed batch "
                               f"{same_plain}/{n_plain}, all-unsteered batch {same_baseline}/{len(rows)} (the "
                               "baseline: graphs and eager differ only by kernel rounding)")
    ratios = []
    for name, rate in graphs["tok_s"].items():
        base = graphs["tok_s"].get(f"unsteered x{name.rsplit(' x', 1)[1]}")
        ratios.append(f"{name} {rate:.1f} tok/s ({rate / base:.2f}x)" if base else f"{name} {rate:.1f}")
    summary("tok/s graphs", "; ".join(ratios))
    # A graph-safe plugin steers under graphs exactly as eager: any row that differs where the unsteered
    # baseline does not is a failure.
    ok = same_steered == n_steered or same_baseline < len(rows)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-dry-run", action="store_true", help="toy sizes on CPU (no GPU needed)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build")
    sub.add_parser("parity")
    m = sub.add_parser("model")
    m.add_argument("out")
    v = sub.add_parser("vllm")
    v.add_argument("model")
    v.add_argument("out")
    v.add_argument("--eager", action="store_true")
    v.add_argument("--tokens", type=int, default=24)
    v.add_argument("--bench-tokens", type=int, default=64)
    v.add_argument("--rounds", type=int, default=2)
    v.add_argument("--strength", type=float, default=8.0)
    c = sub.add_parser("compare")
    c.add_argument("graphs")
    c.add_argument("eager")
    args = parser.parse_args(argv)
    if args.cpu_dry_run and args.cmd == "vllm":
        args.tokens, args.bench_tokens, args.rounds = min(args.tokens, 8), min(args.bench_tokens, 8), 1
    return {"build": cmd_build, "parity": cmd_parity, "model": cmd_model, "vllm": cmd_vllm,
            "compare": cmd_compare}[args.cmd](args)


if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    sys.exit(main())
