"""Tests for steerlib.kernels' per-row op: the torch reference against hand computation, input validation, and
the Triton / CUDA kernels against the reference over dtypes, widths, row counts and read-out sizes.

Triton runs on CPU tensors under TRITON_INTERPRET=1 (``make test`` sets it); the CUDA kernel
is compiled with plain ``nvcc -c`` wherever nvcc exists and executed only on a GPU.
"""

from __future__ import annotations

import math
import os
import subprocess
from typing import Any

import pytest
import torch
from helpers import HIDDEN_TOL, PROJ_TOL, assert_allclose_verbose
from steerlib.kernels import available_backends, cuda_steer, fused_steer_rows, steer_rows_reference

INF = math.inf
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
WIDTHS = (576, 896, 4096, 4097)
ROWS = (1, 7, 64, 512)
KS = (1, 3, 16)
MODES = ("add", "ablate", "cap", "all")


def make_case(n: int, d: int, k: int, mode: str, masked: bool, dtype: torch.dtype, seed: int = 0,
              device: str = "cpu") -> tuple[torch.Tensor, dict[str, Any]]:
    """Random hidden states and ``fused_steer_rows`` keyword arguments for one edit, on some or all rows.

    Args:
        n: Rows.
        d: Width.
        k: Read-out directions (0 for none).
        mode: ``add`` (a raw vector, coefficient 3), ``ablate`` (unit vector, bounds 0..0), ``cap`` (add along a
            unit vector, then cap it from above) or ``all`` (add, then a two-sided cap).
        masked: Edit a random half of the rows (the others get index -1).
        dtype: dtype of the hidden states.
        seed: RNG seed.
        device: Where to put the tensors.

    Returns:
        ``(hidden, kwargs)``.
    """
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g).to(dtype)
    v = torch.randn(d, generator=g)
    u = torch.randn(d, generator=g)
    u /= u.norm()
    steered = torch.rand(n, generator=g) < 0.5 if masked else torch.ones(n, dtype=torch.bool)
    lo, hi = {"add": (-INF, INF), "ablate": (0.0, 0.0), "cap": (-INF, 0.5), "all": (-0.5, 0.25)}[mode]
    kwargs: dict[str, Any] = {
        "table": (v if mode == "add" else u)[None],
        "index": torch.where(steered, 0, -1),
        "coef": torch.full((n,), 0.0 if mode == "ablate" else 3.0),
        "cap_min": torch.full((n,), lo),
        "cap_max": torch.full((n,), hi),
        "inplace": False,
    }
    if k:
        # Scaled so projections are O(1) and absolute tolerances mean the same at every width.
        kwargs["readout"] = torch.randn(k, d, generator=g) / d**0.5
    moved = {key: val.to(device) if isinstance(val, torch.Tensor) else val for key, val in kwargs.items()}
    return hidden.to(device), moved


def _covering_cases() -> list[tuple[int, int, int, str, bool, torch.dtype]]:
    """Every (dtype, width) pair once, with rows, K, mode and masking rotated so each value of
    each axis appears with several partners, instead of the full cartesian product."""
    cases = []
    for i, (dtype, d) in enumerate((dt, w) for dt in DTYPES for w in WIDTHS):
        n = ROWS[(i + i // 4) % len(ROWS)]
        cases.append((n, d, KS[i % len(KS)], MODES[i % len(MODES)], bool((i // 2) % 2), dtype))
    # Corners the rotation misses: no readout, every mode at the largest shapes.
    cases += [
        (512, 4097, 16, "all", True, torch.bfloat16),
        (64, 4096, 0, "cap", False, torch.float16),
        (7, 576, 0, "ablate", True, torch.float32),
        (1, 4097, 16, "add", True, torch.float16),
    ]
    return cases


COVERING_CASES = _covering_cases()


def _case_id(case: tuple[int, int, int, str, bool, torch.dtype]) -> str:
    n, d, k, mode, masked, dtype = case
    return f"{str(dtype).removeprefix('torch.')}-n{n}-d{d}-k{k}-{mode}-{'mask' if masked else 'all'}"


def check_backend(backend: str, device: str, case: tuple[int, int, int, str, bool, torch.dtype]) -> None:
    """Run one covering case on ``backend`` and compare with the torch reference."""
    n, d, k, mode, masked, dtype = case
    hidden, kwargs = make_case(n, d, k, mode, masked, dtype, seed=n * 31 + d, device=device)
    ref_out, ref_proj = steer_rows_reference(hidden.cpu(), **{
        key: val.cpu() if isinstance(val, torch.Tensor) else val for key, val in kwargs.items()})
    out, proj = fused_steer_rows(hidden, backend=backend, **kwargs)
    assert out.dtype == dtype and out.shape == (n, d)
    atol, rtol = HIDDEN_TOL[dtype]
    assert_allclose_verbose(out, ref_out, atol=atol, rtol=rtol, what=f"{backend} hidden")
    if k:
        assert proj is not None and proj.dtype == torch.float32 and proj.shape == (n, k)
        assert_allclose_verbose(proj, ref_proj, atol=PROJ_TOL[0], rtol=PROJ_TOL[1], what=f"{backend} proj")
    else:
        assert proj is None


def _triton_device() -> str | None:
    """Device the triton tests run on, or None (then they skip)."""
    if "triton" not in available_backends():
        return None
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return "cpu"
    return "cuda" if torch.cuda.is_available() else None


TRITON_DEVICE = _triton_device()
needs_triton = pytest.mark.skipif(
    TRITON_DEVICE is None,
    reason="triton not installed, or on a CPU machine without TRITON_INTERPRET=1 (make test sets it)")
needs_cuda_kernel = pytest.mark.skipif(
    not cuda_steer.toolchain_available(), reason="CUDA kernel needs a CUDA GPU, CUDA torch and nvcc")


# --------------------------------------------------------------------------- kernels vs reference


@needs_triton
@pytest.mark.parametrize("case", COVERING_CASES, ids=_case_id)
def test_triton_matches_reference(case: tuple[int, int, int, str, bool, torch.dtype]) -> None:
    check_backend("triton", TRITON_DEVICE, case)


@needs_cuda_kernel
@pytest.mark.parametrize("case", COVERING_CASES, ids=_case_id)
def test_cuda_matches_reference(case: tuple[int, int, int, str, bool, torch.dtype]) -> None:
    check_backend("cuda", "cuda", case)


def _kernel_backends() -> list[Any]:
    return [
        pytest.param("triton", marks=needs_triton),
        pytest.param("cuda", marks=needs_cuda_kernel),
    ]


def _device_for(backend: str) -> str:
    return TRITON_DEVICE if backend == "triton" else "cuda"


@pytest.mark.parametrize("backend", _kernel_backends())
def test_kernel_inplace_strided_rows_and_per_row_coefficients(backend: str) -> None:
    """In-place update of a row-strided view with a different coefficient per row leaves the padding alone."""
    device = _device_for(backend)
    n, d = 7, 576
    parent = torch.randn(n, d + 8).to(torch.bfloat16).to(device)
    before = parent.clone()
    hidden = parent[:, :d]
    _, kwargs = make_case(n, d, 3, "all", False, torch.bfloat16, seed=5, device=device)
    kwargs.update(coef=torch.linspace(0, 1, n, device=device), inplace=True)
    ref_out, ref_proj = steer_rows_reference(hidden.clone(), **kwargs)
    out, proj = fused_steer_rows(hidden, backend=backend, **kwargs)
    assert out.data_ptr() == hidden.data_ptr()
    assert torch.equal(parent[:, d:], before[:, d:])
    assert_allclose_verbose(hidden, ref_out, atol=1e-2, rtol=1.6e-2, what="strided hidden")
    assert_allclose_verbose(proj, ref_proj, atol=PROJ_TOL[0], rtol=PROJ_TOL[1], what="strided proj")


@pytest.mark.parametrize("backend", _kernel_backends())
def test_kernel_empty_and_monitor_only(backend: str) -> None:
    """Zero rows work, and readout-only calls leave hidden bit-identical."""
    device = _device_for(backend)
    mon = torch.randn(2, 896, device=device)
    table = torch.ones(1, 896, device=device)
    none = torch.full((5,), -1, device=device)
    out, proj = fused_steer_rows(torch.empty(0, 896, device=device), table, none[:0], readout=mon, backend=backend)
    assert out.shape == (0, 896) and proj.shape == (0, 2)
    hidden = torch.randn(5, 896, dtype=torch.float16, device=device)
    out, proj = fused_steer_rows(hidden, table, none, readout=mon, inplace=False, backend=backend)
    assert torch.equal(out, hidden)
    assert_allclose_verbose(proj, hidden.float() @ mon.T, atol=1e-3, rtol=1e-4, what="readout only")


# --------------------------------------------------------------------------- reference semantics


def _rows(n: int, steered: torch.Tensor, coef: float = 0.0, lo: float = -INF, hi: float = INF) -> dict:
    """Per-row arguments editing the rows where ``steered`` holds with table entry 0."""
    return {"index": torch.where(steered, 0, -1), "coef": torch.full((n,), coef), "cap_min": torch.full((n,), lo),
            "cap_max": torch.full((n,), hi)}


def test_reference_add_leaves_unsteered_rows() -> None:
    g = torch.Generator().manual_seed(1)
    h = torch.randn(6, 64, generator=g)
    v = torch.randn(64, generator=g)
    mask = torch.tensor([True, False, True, False, False, True])
    out, proj = steer_rows_reference(h, v[None], **_rows(6, mask, coef=2.5), inplace=False)
    assert proj is None
    expected = h.double() + 2.5 * v.double()
    assert_allclose_verbose(out[mask], expected[mask], atol=1e-6, rtol=1e-6, what="steered rows")
    assert torch.equal(out[~mask], h[~mask])


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_ablation_zeroes_projection(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(2)
    h = torch.randn(8, 576, generator=g).to(dtype)
    u = torch.randn(576, generator=g)
    u /= u.norm()
    mask = torch.arange(8) % 2 == 0
    out, proj = steer_rows_reference(h, u[None], **_rows(8, mask, lo=0.0, hi=0.0), readout=u[None], inplace=False)
    # The read-out is taken from fp32 before rounding, so it is ~0 in every dtype ...
    assert_allclose_verbose(proj[mask, 0], torch.zeros(4), atol=1e-5, rtol=0, what="ablated proj")
    # ... while the stored rows keep only the dtype's rounding of it.
    stored = out[mask].float() @ u
    assert float(stored.abs().max()) < {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 0.1}[dtype]
    assert torch.equal(out[~mask], h[~mask])
    expected_unmasked = h[~mask].double() @ u.double()
    assert_allclose_verbose(proj[~mask, 0], expected_unmasked, atol=1e-4, rtol=1e-4, what="unmasked proj")


def test_reference_cap_clamps_and_leaves_in_range_rows() -> None:
    g = torch.Generator().manual_seed(3)
    u = torch.zeros(32)
    u[0] = 1.0
    h = torch.randn(10, 32, generator=g)
    h[:, 0] = torch.linspace(-3, 3, 10)
    every = torch.ones(10, dtype=torch.bool)
    out, proj = steer_rows_reference(h, u[None], **_rows(10, every, lo=-1.0, hi=2.0), readout=u[None],
                                     inplace=False)
    assert_allclose_verbose(proj[:, 0], h[:, 0].clamp(-1.0, 2.0), atol=1e-6, rtol=0, what="capped proj")
    inside = (h[:, 0] >= -1.0) & (h[:, 0] <= 2.0)
    assert torch.equal(out[inside], h[inside])
    assert torch.equal(out[:, 1:], h[:, 1:])  # only the u component moves


def test_reference_full_formula_per_row() -> None:
    """Every row its own entry, coefficient and bounds, against the formula computed by hand in float64."""
    g = torch.Generator().manual_seed(4)
    n, d = 9, 96
    h = torch.randn(n, d, generator=g)
    table = torch.nn.functional.normalize(torch.randn(3, d, generator=g), dim=-1)
    index = torch.tensor([0, 1, 2, -1, 0, 1, 2, -1, 0])
    coef = torch.randn(n, generator=g) * 2
    lo = torch.tensor([-INF, -0.2, -INF, 0.0, -0.5, -INF, 0.1, -INF, -INF])
    hi = torch.tensor([0.3, INF, INF, 0.0, 0.5, INF, 0.1, INF, INF])
    w = torch.randn(3, d, generator=g)
    out, proj = steer_rows_reference(h, table, index, coef, lo, hi, w, inplace=False)
    rows = []
    for r in range(n):
        x = h[r].double()
        i = int(index[r])
        if i >= 0:
            t = table[i].double()
            x = x + float(coef[r]) * t
            if math.isfinite(lo[r]) or math.isfinite(hi[r]):
                p = float(x @ t)
                x = x + (min(max(p, float(lo[r])), float(hi[r])) - p) * t
        rows.append(x)
    h2 = torch.stack(rows)
    assert_allclose_verbose(out, h2, atol=1e-5, rtol=1e-5, what="hidden")
    assert_allclose_verbose(proj, h2 @ w.double().T, atol=1e-4, rtol=1e-5, what="proj")


def test_reference_inplace_contract() -> None:
    h = torch.randn(4, 32, dtype=torch.bfloat16)
    original = h.clone()
    args = _rows(4, torch.ones(4, dtype=torch.bool), coef=1.0)
    out, _ = steer_rows_reference(h, torch.ones(1, 32), **args, inplace=False)
    assert torch.equal(h, original) and out.data_ptr() != h.data_ptr()
    out, _ = steer_rows_reference(h, torch.ones(1, 32), **args, inplace=True)
    assert out.data_ptr() == h.data_ptr() and torch.equal(h, out) and not torch.equal(h, original)


def test_auto_backend_on_cpu_is_torch() -> None:
    hidden, kwargs = make_case(7, 896, 3, "all", True, torch.bfloat16, seed=9)
    ref = steer_rows_reference(hidden.clone(), **kwargs)
    torch_out = fused_steer_rows(hidden.clone(), backend="torch", **kwargs)
    got = fused_steer_rows(hidden.clone(), **kwargs)
    assert torch.equal(got[0], torch_out[0]) and torch.equal(got[1], torch_out[1])  # auto on CPU is torch
    assert_allclose_verbose(got[0], ref[0], atol=1e-2, rtol=1.6e-2, what="auto vs oracle")
    assert_allclose_verbose(got[1], ref[1], atol=PROJ_TOL[0], rtol=PROJ_TOL[1], what="auto vs oracle proj")
    assert "torch" in available_backends()


def test_table_edited_in_place_is_rechecked() -> None:
    """The checked call reads the values on every call: a table edited in place after a first call is refused."""
    h = torch.randn(2, 8)
    table = torch.ones(1, 8)
    index = torch.zeros(2, dtype=torch.int64)
    fused_steer_rows(h, table, index, torch.ones(2))
    table[0, 3] = float("nan")
    with pytest.raises(ValueError, match="table contains NaN or inf"):
        fused_steer_rows(h, table, index, torch.ones(2))


def test_inference_mode_tensors() -> None:
    with torch.inference_mode():
        h = torch.zeros(2, 8)
        table = torch.ones(1, 8)
        for _ in range(2):
            out, _ = fused_steer_rows(h, table, torch.zeros(2, dtype=torch.int64), torch.ones(2))
    assert torch.equal(out, torch.full((2, 8), 2.0))


# --------------------------------------------------------------------------- input validation


def _with_nan(shape: tuple[int, ...]) -> torch.Tensor:
    t = torch.ones(shape)
    t.view(-1)[t.numel() // 2] = float("nan")
    return t


ERROR_CASES = [
    ("width", {"table": torch.ones(1, 575)}, "table has width 575 but hidden has width 576"),
    ("readout-width", {"readout": torch.ones(2, 100)}, "readout has width 100 but hidden has width 576"),
    ("k17", {"readout": torch.ones(17, 576)}, "1 to 16 directions, got K=17"),
    ("readout-1d", {"readout": torch.ones(576)}, "readout must be a 2-D"),
    ("nan-table", {"table": _with_nan((1, 576))}, "table contains NaN or inf"),
    ("inf-readout", {"readout": torch.full((2, 576), float("inf"))}, "readout contains NaN or inf"),
    ("device", {"table": torch.ones(1, 576, device="meta")}, "table is on meta but hidden is on cpu"),
    ("coef-device", {"coef": torch.ones(4, device="meta")}, "coef is on meta but hidden is on cpu"),
    ("backend", {"backend": "cuda_graph"}, "backend must be one of"),
    ("cuda-on-cpu", {"backend": "cuda"}, "backend='cuda' needs CUDA tensors"),
]


@pytest.mark.parametrize(("kwargs", "message"), [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_invalid_inputs_raise_clear_errors(kwargs: dict[str, Any], message: str) -> None:
    args = {"table": torch.ones(1, 576), "index": torch.zeros(4, dtype=torch.int64), "coef": torch.ones(4),
            **kwargs}
    with pytest.raises(ValueError, match=message):
        fused_steer_rows(torch.zeros(4, 576), **args)


@pytest.mark.parametrize(("hidden", "message"), [
    (torch.zeros(2, 3, 576), r"hidden must be 2-D \[N, D\]"),
    (torch.zeros(4, 576, dtype=torch.int32), "hidden must be float32, float16 or bfloat16"),
    (torch.zeros(576, 4).T, "hidden rows must be contiguous"),
], ids=["3d", "int", "column-major"])
def test_invalid_hidden_raises(hidden: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fused_steer_rows(hidden, torch.ones(1, hidden.shape[-1]), torch.zeros(4, dtype=torch.int64))


def test_triton_on_cpu_without_interpreter_explains(monkeypatch: pytest.MonkeyPatch) -> None:
    if "triton" not in available_backends() and not torch.cuda.is_available():
        pytest.skip("triton not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fused_steer_rows(torch.zeros(2, 8), torch.ones(1, 8), torch.full((2,), -1), readout=torch.ones(1, 8),
                         backend="triton")


# --------------------------------------------------------------------------- CUDA source builds


@pytest.mark.skipif(cuda_steer.find_nvcc() is None, reason="nvcc not found (no CUDA toolkit)")
def test_cuda_source_compiles_with_plain_nvcc(tmp_path: Any) -> None:
    """The kernel .cu must build without torch headers (the binding lives in the .cpp)."""
    nvcc = cuda_steer.find_nvcc()
    obj = tmp_path / "steer_cuda.o"
    result = subprocess.run(
        [nvcc, "-c", str(cuda_steer.CUDA_SOURCE), "-o", str(obj), "-std=c++17", "-O2"],
        capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, f"nvcc failed:\n{result.stdout}\n{result.stderr}"
    assert obj.stat().st_size > 0
