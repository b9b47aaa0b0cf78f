"""Tests for steerlib.kernels: reference semantics, input validation, and the Triton / CUDA
kernels against the torch reference.

Triton runs on CPU tensors under TRITON_INTERPRET=1 (``make test`` sets it); the CUDA kernel
is compiled with plain ``nvcc -c`` wherever nvcc exists and executed only on a GPU.
"""

from __future__ import annotations

import os
import subprocess
from typing import Any

import pytest
import torch
from steerlib.kernels import available_backends, cuda_steer, fused_steer_project, steer_project_reference

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
WIDTHS = (576, 896, 4096, 4097)
ROWS = (1, 7, 64, 512)
KS = (1, 3, 16)
MODES = ("add", "ablate", "cap", "all")

# (atol, rtol) for the stored hidden states: one ulp of the dtype, since kernel and reference
# only differ by fp32 summation order before the final rounding.
HIDDEN_TOL = {
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-3, 2e-3),
    torch.bfloat16: (1e-2, 1.6e-2),
}
# Projections are fp32 dot products of the fp32 update in every dtype.
PROJ_TOL = (1e-4, 1e-4)


def assert_allclose_verbose(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float,
                            what: str, max_report: int = 5) -> None:
    """``allclose`` that prints the first mismatches (index, values, difference) on failure.

    Args:
        actual: Tensor under test.
        expected: Reference tensor of the same shape.
        atol: Absolute tolerance.
        rtol: Relative tolerance (relative to ``expected``).
        what: Label for the message.
        max_report: How many mismatching elements to list.
    """
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    diff = (a - e).abs()
    bad = ~(diff <= atol + rtol * e.abs())  # NaN counts as a mismatch ...
    bad &= ~(a.isnan() & e.isnan())  # ... unless both are NaN
    if not bool(bad.any()):
        return
    lines = [f"{what}: {int(bad.sum())}/{bad.numel()} elements differ beyond atol={atol:g} rtol={rtol:g}; "
             f"max abs diff {float(diff[bad].nan_to_num(float('inf')).max()):.4g}"]
    for index in bad.nonzero()[:max_report].tolist():
        at = tuple(index)
        lines.append(f"  at {at}: got {float(a[at]):.7g}, expected {float(e[at]):.7g}, "
                     f"diff {float(diff[at]):.3g}")
    message = "\n".join(lines)
    print(message)
    raise AssertionError(message)


def make_case(n: int, d: int, k: int, mode: str, masked: bool, dtype: torch.dtype, seed: int = 0,
              device: str = "cpu") -> tuple[torch.Tensor, dict[str, Any]]:
    """Random hidden states and ``fused_steer_project`` keyword arguments for one mode.

    Args:
        n: Rows.
        d: Width.
        k: Read-out directions (0 for none).
        mode: ``add`` (steer only), ``ablate`` (cap 0..0), ``cap`` (steer + upper cap) or
            ``all`` (steer + two-sided cap).
        masked: Use a random bool row mask.
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
    kwargs: dict[str, Any] = {"inplace": False}
    if k:
        # Scaled so projections are O(1) and absolute tolerances mean the same at every width.
        kwargs["readout"] = torch.randn(k, d, generator=g) / d**0.5
    if masked:
        kwargs["row_mask"] = torch.rand(n, generator=g) < 0.5
    if mode in ("add", "cap", "all"):
        kwargs.update(steer_vec=v, alpha=3.0)
    if mode == "ablate":
        kwargs.update(cap_dir=u, cap_min=0.0, cap_max=0.0)
    elif mode == "cap":
        kwargs.update(cap_dir=u, cap_max=0.5)
    elif mode == "all":
        kwargs.update(cap_dir=u, cap_min=-0.5, cap_max=0.25)
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
    ref_out, ref_proj = steer_project_reference(hidden.cpu(), **{
        key: val.cpu() if isinstance(val, torch.Tensor) else val for key, val in kwargs.items()})
    out, proj = fused_steer_project(hidden, backend=backend, **kwargs)
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
def test_kernel_inplace_strided_rows_and_float_mask(backend: str) -> None:
    """In-place update of a row-strided view with a fractional mask leaves the padding alone.

    A fractional mask scales the addition; per-row caps are all or nothing, so a fractional mask with a cap
    is refused (the single-vector API lowers onto the per-row op)."""
    device = _device_for(backend)
    n, d = 7, 576
    parent = torch.randn(n, d + 8).to(torch.bfloat16).to(device)
    before = parent.clone()
    hidden = parent[:, :d]
    _, kwargs = make_case(n, d, 3, "all", False, torch.bfloat16, seed=5, device=device)
    kwargs["row_mask"] = torch.linspace(0, 1, n, device=device)
    kwargs["inplace"] = True
    with pytest.raises(ValueError, match="row_mask must be 0 or 1 on rows with a cap"):
        fused_steer_project(hidden.clone(), backend=backend, **kwargs)
    for name in ("cap_dir", "cap_min", "cap_max"):
        kwargs.pop(name, None)
    ref_out, ref_proj = steer_project_reference(hidden.clone(), **kwargs)
    out, proj = fused_steer_project(hidden, backend=backend, **kwargs)
    assert out.data_ptr() == hidden.data_ptr()
    assert torch.equal(parent[:, d:], before[:, d:])
    assert_allclose_verbose(hidden, ref_out, atol=1e-2, rtol=1.6e-2, what="strided hidden")
    assert_allclose_verbose(proj, ref_proj, atol=PROJ_TOL[0], rtol=PROJ_TOL[1], what="strided proj")


@pytest.mark.parametrize("backend", _kernel_backends())
def test_kernel_empty_and_monitor_only(backend: str) -> None:
    """Zero rows work, and readout-only calls leave hidden bit-identical."""
    device = _device_for(backend)
    mon = torch.randn(2, 896, device=device)
    out, proj = fused_steer_project(torch.empty(0, 896, device=device), readout=mon, backend=backend)
    assert out.shape == (0, 896) and proj.shape == (0, 2)
    hidden = torch.randn(5, 896, dtype=torch.float16, device=device)
    out, proj = fused_steer_project(hidden, readout=mon, inplace=False, backend=backend)
    assert torch.equal(out, hidden)
    assert_allclose_verbose(proj, hidden.float() @ mon.T, atol=1e-3, rtol=1e-4, what="readout only")


# --------------------------------------------------------------------------- reference semantics


def test_reference_add_masks_rows() -> None:
    g = torch.Generator().manual_seed(1)
    h = torch.randn(6, 64, generator=g)
    v = torch.randn(64, generator=g)
    mask = torch.tensor([True, False, True, False, False, True])
    out, proj = steer_project_reference(h, v, alpha=2.5, row_mask=mask, inplace=False)
    assert proj is None
    expected = h.double() + 2.5 * v.double()
    assert_allclose_verbose(out[mask], expected[mask], atol=1e-6, rtol=1e-6, what="steered rows")
    assert torch.equal(out[~mask], h[~mask])


def test_reference_float_mask_scales_step() -> None:
    h = torch.zeros(3, 16)
    v = torch.ones(16)
    out, _ = steer_project_reference(h, v, alpha=2.0, row_mask=torch.tensor([0.0, 0.5, 1.0]))
    assert torch.equal(out[:, 0], torch.tensor([0.0, 1.0, 2.0]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_ablation_zeroes_projection(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(2)
    h = torch.randn(8, 576, generator=g).to(dtype)
    u = torch.randn(576, generator=g)
    u /= u.norm()
    mask = torch.arange(8) % 2 == 0
    out, proj = steer_project_reference(h, cap_dir=u, cap_min=0.0, cap_max=0.0, row_mask=mask,
                                        readout=u[None], inplace=False)
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
    out, proj = steer_project_reference(h, cap_dir=u, cap_min=-1.0, cap_max=2.0, readout=u[None],
                                        inplace=False)
    assert_allclose_verbose(proj[:, 0], h[:, 0].clamp(-1.0, 2.0), atol=1e-6, rtol=0, what="capped proj")
    inside = (h[:, 0] >= -1.0) & (h[:, 0] <= 2.0)
    assert torch.equal(out[inside], h[inside])
    assert torch.equal(out[:, 1:], h[:, 1:])  # only the u component moves


def test_reference_one_sided_cap_and_full_formula() -> None:
    g = torch.Generator().manual_seed(4)
    n, d = 9, 96
    h = torch.randn(n, d, generator=g)
    v = torch.randn(d, generator=g)
    u = torch.randn(d, generator=g)
    u /= u.norm()
    w = torch.randn(3, d, generator=g)
    mask = torch.rand(n, generator=g) < 0.6
    out, proj = steer_project_reference(h, v, 1.5, mask, u, None, 0.3, w, inplace=False)
    # Hand-computed in float64.
    m = mask.double()[:, None]
    h1 = h.double() + m * 1.5 * v.double()
    p = h1 @ u.double()
    h2 = h1 + m * (p.clamp(max=0.3) - p)[:, None] * u.double()
    assert_allclose_verbose(out, h2, atol=1e-5, rtol=1e-5, what="hidden")
    assert_allclose_verbose(proj, h2 @ w.double().T, atol=1e-4, rtol=1e-5, what="proj")


def test_reference_inplace_contract() -> None:
    h = torch.randn(4, 32, dtype=torch.bfloat16)
    original = h.clone()
    v = torch.ones(32)
    out, _ = steer_project_reference(h, v, alpha=1.0, inplace=False)
    assert torch.equal(h, original) and out.data_ptr() != h.data_ptr()
    out, _ = steer_project_reference(h, v, alpha=1.0, inplace=True)
    assert out.data_ptr() == h.data_ptr() and torch.equal(h, out) and not torch.equal(h, original)


def test_auto_backend_on_cpu_is_reference() -> None:
    hidden, kwargs = make_case(7, 896, 3, "all", True, torch.bfloat16, seed=9)
    ref = steer_project_reference(hidden.clone(), **kwargs)
    torch_out = fused_steer_project(hidden.clone(), backend="torch", **kwargs)
    got = fused_steer_project(hidden.clone(), **kwargs)
    assert torch.equal(got[0], torch_out[0]) and torch.equal(got[1], torch_out[1])  # auto on CPU is torch
    assert_allclose_verbose(got[0], ref[0], atol=1e-2, rtol=1.6e-2, what="auto vs oracle")
    assert_allclose_verbose(got[1], ref[1], atol=PROJ_TOL[0], rtol=PROJ_TOL[1], what="auto vs oracle proj")
    assert "torch" in available_backends()


def test_vector_edit_in_place_is_revalidated() -> None:
    """Checked vectors are cached; an in-place edit bumps the version and forces a re-check."""
    h = torch.randn(2, 8)
    v = torch.ones(8)
    fused_steer_project(h, v, alpha=1.0)
    v[3] = float("nan")
    with pytest.raises(ValueError, match="steer_vec contains NaN or inf"):
        fused_steer_project(h, v, alpha=1.0)


def test_inference_mode_tensors() -> None:
    """Inference tensors have no version counter; the vector cache must still accept them."""
    with torch.inference_mode():
        h = torch.zeros(2, 8)
        v = torch.ones(8)
        for _ in range(2):
            out, _ = fused_steer_project(h, v, alpha=1.0)
    assert torch.equal(out, torch.full((2, 8), 2.0))


# --------------------------------------------------------------------------- input validation


def _unit(d: int) -> torch.Tensor:
    u = torch.zeros(d)
    u[0] = 1.0
    return u


def _with_nan(d: int) -> torch.Tensor:
    t = torch.ones(d)
    t[d // 2] = float("nan")
    return t


ERROR_CASES = [
    ("width", {"steer_vec": torch.ones(575)}, "steer_vec has width 575 but hidden has width 576"),
    ("cap-width", {"cap_dir": _unit(577), "cap_max": 0.0}, "cap_dir has width 577 but hidden has width 576"),
    ("readout-width", {"readout": torch.ones(2, 100)}, "readout has width 100 but hidden has width 576"),
    ("k17", {"readout": torch.ones(17, 576)}, "1 to 16 directions, got K=17"),
    ("readout-1d", {"readout": torch.ones(576)}, "readout must be 2-D"),
    ("nan-steer", {"steer_vec": _with_nan(576)}, "steer_vec contains NaN or inf"),
    ("inf-readout", {"readout": torch.full((2, 576), float("inf"))}, "readout contains NaN or inf"),
    ("nan-cap", {"cap_dir": _with_nan(576), "cap_min": 0.0}, "cap_dir contains NaN or inf"),
    ("device", {"steer_vec": torch.ones(576, device="meta")}, "steer_vec is on meta but hidden is on cpu"),
    ("mask-device", {"row_mask": torch.ones(4, device="meta")}, "row_mask is on meta but hidden is on cpu"),
    ("mask-shape", {"row_mask": torch.ones(5)}, r"row_mask must have shape \[4\]"),
    ("cap-order", {"cap_dir": _unit(576), "cap_min": 1.0, "cap_max": 0.0}, "cap_min .* must be <= cap_max"),
    ("cap-no-dir", {"cap_max": 0.0}, "cap_min/cap_max were given but cap_dir is None"),
    ("cap-not-unit", {"cap_dir": torch.ones(576), "cap_max": 0.0}, "cap_dir must have unit L2 norm, got norm 24"),
    ("nan-alpha", {"steer_vec": torch.ones(576), "alpha": float("nan")}, "alpha must be finite"),
    ("backend", {"backend": "cuda_graph"}, "backend must be one of"),
    ("cuda-on-cpu", {"backend": "cuda"}, "backend='cuda' needs CUDA tensors"),
]


@pytest.mark.parametrize(("kwargs", "message"), [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_invalid_inputs_raise_clear_errors(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fused_steer_project(torch.zeros(4, 576), **kwargs)


@pytest.mark.parametrize(("hidden", "message"), [
    (torch.zeros(2, 3, 576), r"hidden must be 2-D \[N, D\]"),
    (torch.zeros(4, 576, dtype=torch.int32), "hidden must be float32, float16 or bfloat16"),
    (torch.zeros(576, 4).T, "hidden rows must be contiguous"),
], ids=["3d", "int", "column-major"])
def test_invalid_hidden_raises(hidden: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fused_steer_project(hidden, steer_vec=torch.ones(hidden.shape[-1]), alpha=1.0)


def test_triton_on_cpu_without_interpreter_explains(monkeypatch: pytest.MonkeyPatch) -> None:
    if "triton" not in available_backends() and not torch.cuda.is_available():
        pytest.skip("triton not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fused_steer_project(torch.zeros(2, 8), readout=torch.ones(1, 8), backend="triton")


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
