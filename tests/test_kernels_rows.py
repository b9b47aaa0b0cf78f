"""Per-row steering op (``fused_steer_rows``): semantics row by row against the formula, validation, and the
Triton / CUDA kernels against the torch reference over dtypes, odd widths and mixed rows.

Triton runs on CPU tensors under TRITON_INTERPRET=1; the CUDA kernel only on a GPU.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import DTYPES, HIDDEN_TOL, PROJ_TOL, assert_allclose_verbose, mixed_case
from steerlib.kernels import available_backends, fused_steer_rows, steer_rows_reference

INF = math.inf


def test_rows_follow_the_formula_row_by_row() -> None:
    """Unsteered, added, ablated and capped rows mixed in one call: each row as the formula says (float64)."""
    hidden, args = mixed_case(40, 96, 3, torch.float32, seed=1)
    out, proj = fused_steer_rows(hidden.clone(), **args, backend="torch")
    kinds = set()
    for r in range(hidden.shape[0]):
        x = hidden[r].double()
        i = int(args["index"][r])
        if i >= 0:
            t = args["table"][i].double()
            x = x + float(args["coef"][r]) * t
            lo, hi = float(args["cap_min"][r]), float(args["cap_max"][r])
            if math.isfinite(lo) or math.isfinite(hi):
                p = float(x @ t)
                x = x + (min(max(p, lo), hi) - p) * t
                kinds.add("ablate" if lo == hi == 0 else "cap")
            else:
                kinds.add("add")
        else:
            kinds.add("none")
        assert_allclose_verbose(out[r], x, atol=1e-5, rtol=1e-5, what=f"row {r}")
        assert_allclose_verbose(proj[r], x @ args["readout"].double().T, atol=1e-4, rtol=1e-5, what=f"proj row {r}")
    assert kinds == {"none", "add", "ablate", "cap"}  # the case mixes every kind of row


def test_unsteered_rows_are_bit_identical_and_caps_hold() -> None:
    hidden, args = mixed_case(64, 128, 0, torch.float32, seed=2)
    out, proj = fused_steer_rows(hidden.clone(), **args, backend="torch")
    assert proj is None
    none = args["index"] < 0
    assert none.any() and torch.equal(out[none], hidden[none])
    table = args["table"]
    for r in (args["index"] >= 4).nonzero().flatten().tolist():
        p = float(out[r] @ table[int(args["index"][r])])
        assert float(args["cap_min"][r]) - 1e-4 <= p <= float(args["cap_max"][r]) + 1e-4



@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).removeprefix("torch."))
@pytest.mark.parametrize(("n", "d", "k"), [(1, 576, 1), (7, 897, 3), (64, 576, 16), (33, 4097, 0)])
def test_kernel_matches_reference(backend: str, dtype: torch.dtype, n: int, d: int, k: int) -> None:
    if backend not in available_backends():
        pytest.skip(f"{backend} backend not usable here")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hidden, args = mixed_case(n, d, k, dtype, seed=n + d, device=device)
    expected, eproj = steer_rows_reference(hidden.clone(), **args, inplace=False)
    for inplace in (False, True):
        h = hidden.clone()
        out, proj = fused_steer_rows(h, **args, inplace=inplace, backend=backend)
        assert (out.data_ptr() == h.data_ptr()) == inplace
        atol, rtol = HIDDEN_TOL[dtype]
        assert_allclose_verbose(out, expected, atol=atol, rtol=rtol, what=f"{backend} hidden")
        if k:
            assert_allclose_verbose(proj, eproj, atol=PROJ_TOL[0] * 10, rtol=PROJ_TOL[1],
                                    what=f"{backend} projections")
        else:
            assert proj is None


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_kernel_add_only_and_no_steering(backend: str) -> None:
    if backend not in available_backends():
        pytest.skip(f"{backend} backend not usable here")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hidden, args = mixed_case(20, 300, 2, torch.float32, seed=5, device=device, with_cap=False)
    expected, eproj = steer_rows_reference(hidden.clone(), **args, inplace=False)
    out, proj = fused_steer_rows(hidden.clone(), **args, backend=backend)
    assert_allclose_verbose(out, expected, atol=1e-4, rtol=1e-5, what="add-only")
    none = torch.full((20,), -1, dtype=torch.int64, device=device)
    out, proj = fused_steer_rows(hidden.clone(), args["table"], none, readout=args["readout"], backend=backend)
    assert torch.equal(out, hidden)
    assert_allclose_verbose(proj, hidden @ args["readout"].T, atol=1e-4, rtol=1e-5, what="read-out only")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_unvalidated_call_equals_validated(backend: str) -> None:
    """``validate=False`` (the serving engine's sync-free path) computes the same as the checked call, and leaves
    out the add or the cap when their per-row tensors are not given."""
    if backend not in available_backends():
        pytest.skip(f"{backend} backend not usable here")
    hidden, args = mixed_case(48, 200, 2, torch.float32, seed=9)
    expected, eproj = fused_steer_rows(hidden.clone(), **args, backend=backend)
    out, proj = fused_steer_rows(hidden.clone(), **args, backend=backend, validate=False)
    assert_allclose_verbose(out, expected, atol=1e-5, rtol=1e-5, what="hidden")
    assert_allclose_verbose(proj, eproj, atol=1e-4, rtol=1e-5, what="proj")
    no_cap = {**args, "cap_min": None, "cap_max": None}
    expected, _ = fused_steer_rows(hidden.clone(), **{**no_cap, "cap_min": torch.full((48,), -INF)},
                                   backend=backend)
    out, _ = fused_steer_rows(hidden.clone(), **no_cap, backend=backend, validate=False)
    assert_allclose_verbose(out, expected, atol=1e-5, rtol=1e-5, what="add only")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"index": torch.tensor([0, 6, -1])}, "index must lie in -1..5"),
        ({"index": torch.tensor([0, -2, -1])}, "index must lie in -1..5"),
        ({"index": torch.tensor([0.0, 1.0, -1.0])}, "index must be int32 or int64"),
        ({"index": torch.tensor([0, 1])}, "index must have shape [3]"),
        ({"coef": torch.tensor([1.0, math.nan, 0.0])}, "coef contains NaN or inf"),
        ({"cap_min": torch.tensor([math.nan, -INF, -INF])}, "cap_min/cap_max contain NaN"),
        ({"cap_min": torch.tensor([-INF, 2.0, -INF]), "cap_max": torch.tensor([INF, 1.0, INF])},
         "row 1 has 2.0 > 1.0"),
        ({"index": torch.tensor([0, 1, -1]), "cap_max": torch.tensor([1.0, INF, INF])},
         "table row 0 is used with cap bounds but has norm"),
        ({"table": torch.ones(6, 5)}, "table has width 5 but hidden has width 8"),
    ],
)
def test_invalid_row_inputs_raise_clear_errors(change: dict, message: str) -> None:
    table = torch.cat([torch.ones(4, 8) * 2, torch.eye(8)[:2]])
    args = {"table": table, "index": torch.tensor([0, 4, -1]), "coef": torch.tensor([1.0, 0.0, 0.0]),
            "cap_min": None, "cap_max": None, **change}
    with pytest.raises(ValueError, match=None) as info:
        fused_steer_rows(torch.zeros(3, 8), **args)
    assert message in str(info.value)
