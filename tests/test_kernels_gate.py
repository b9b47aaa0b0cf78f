"""The per-row op's gate (``kernels/rows.py``): semantics of the torch reference against hand computation, and
the Triton / CUDA kernels against the reference in fp32/fp16/bf16.

The gate is decided on the row before the op's edit: open iff ``gate_lo <= <h, gate_dir[gi]> <= gate_hi``
(``gi = -1``: ungated, open). A closed row is left as it is; its read-out is still computed. Triton runs on CPU
tensors under TRITON_INTERPRET=1; the CUDA kernel only on a GPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from helpers import DTYPES, HIDDEN_TOL, PROJ_TOL, assert_allclose_verbose, mixed_case
from steerlib.kernels import available_backends, cuda_steer, load_triton_rows, steer_rows_reference
from steerlib.kernels.rows import prepare_row_inputs

INF = math.inf


def add_gates(hidden: torch.Tensor, args: dict, seed: int, n_dirs: int = 3) -> dict:
    """Gate arguments for ``args``: ungated rows, open and closed ``above``/``below``/band gates.

    Each threshold sits 0.5 away from the row's own projection, so every backend decides the same way whatever
    its summation order.
    """
    n, d = hidden.shape
    g = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(n_dirs, d, generator=g), dim=-1)
    gi = torch.randint(-1, n_dirs, (n,), generator=g)
    proj = (hidden.float().cpu() @ dirs.T).gather(1, gi.clamp_min(0)[:, None]).squeeze(1)
    kind = torch.randint(0, 6, (n,), generator=g)
    lo = torch.full((n,), -INF)
    hi = torch.full((n,), INF)
    lo = torch.where(kind == 0, proj - 0.5, lo)  # above, open
    lo = torch.where(kind == 1, proj + 0.5, lo)  # above, closed
    hi = torch.where(kind == 2, proj + 0.5, hi)  # below, open
    hi = torch.where(kind == 3, proj - 0.5, hi)  # below, closed
    lo = torch.where(kind == 4, proj - 0.5, lo)  # band, open
    hi = torch.where(kind == 4, proj + 0.5, hi)
    lo = torch.where(kind == 5, proj + 0.5, lo)  # band above the value: closed
    hi = torch.where(kind == 5, proj + 1.0, hi)
    device = hidden.device
    return {"gate_dir": dirs.to(device), "gate_index": gi.to(device), "gate_lo": lo.to(device),
            "gate_hi": hi.to(device)}


def expected_open(hidden: torch.Tensor, gates: dict) -> torch.Tensor:
    """Which rows are open, computed by hand in float64."""
    h = hidden.double().cpu()
    out = []
    for r in range(h.shape[0]):
        i = int(gates["gate_index"][r])
        if i < 0:
            out.append(True)
            continue
        g = float(h[r] @ gates["gate_dir"][i].double().cpu())
        out.append(float(gates["gate_lo"][r]) <= g <= float(gates["gate_hi"][r]))
    return torch.tensor(out)


def test_gate_semantics_against_hand_computation() -> None:
    """Open rows equal the ungated op's rows, closed rows are untouched, read-outs are computed for all, and
    ``gate_out`` says which were open."""
    hidden, args = mixed_case(60, 96, 2, torch.float32, seed=3)
    gates = add_gates(hidden, args, seed=4)
    ungated, uproj = steer_rows_reference(hidden.clone(), **args)
    gate_out = torch.zeros(60, dtype=torch.bool)
    out, proj = steer_rows_reference(hidden.clone(), **args, **gates, gate_out=gate_out)
    want = expected_open(hidden, gates)
    assert torch.equal(gate_out, want)
    assert want.any() and (~want).any() and (gates["gate_index"] < 0).any()
    assert torch.equal(out[want], ungated[want])
    assert torch.equal(out[~want], hidden[~want])
    assert_allclose_verbose(proj, out @ args["readout"].T, atol=1e-4, rtol=1e-5, what="read-out of every row")


def test_never_open_is_unsteered_and_always_open_is_ungated() -> None:
    hidden, args = mixed_case(32, 64, 1, torch.float32, seed=5)
    dirs = torch.eye(64)[:2]
    gi = torch.zeros(32, dtype=torch.int64)
    never = {"gate_dir": dirs, "gate_index": gi, "gate_lo": torch.full((32,), INF), "gate_hi": torch.full((32,), INF)}
    out, proj = steer_rows_reference(hidden.clone(), **args, **never)
    assert torch.equal(out, hidden)
    assert_allclose_verbose(proj, hidden @ args["readout"].T, atol=1e-5, rtol=1e-5, what="never-open read-out")
    always = {"gate_dir": dirs, "gate_index": gi}  # no bounds: (-inf, +inf) is open for every finite value
    out, _ = steer_rows_reference(hidden.clone(), **args, **always)
    expected, _ = steer_rows_reference(hidden.clone(), **args)
    assert torch.equal(out, expected)


def test_gate_reads_the_row_before_its_own_edit() -> None:
    """An edit that would push its row across the threshold does not open its own gate (and vice versa)."""
    d = 16
    u = torch.eye(d)[0]
    hidden = torch.zeros(2, d)
    hidden[:, 0] = torch.tensor([0.5, 1.5])  # projections on u before the edit
    args = {"table": u[None], "index": torch.zeros(2, dtype=torch.int64), "coef": torch.tensor([2.0, -2.0])}
    gates = {"gate_dir": u[None], "gate_index": torch.zeros(2, dtype=torch.int64),
             "gate_lo": torch.tensor([1.0, 1.0])}  # above 1.0: row 0 closed (0.5), row 1 open (1.5)
    gate_out = torch.zeros(2, dtype=torch.bool)
    out, _ = steer_rows_reference(hidden.clone(), **args, **gates, gate_out=gate_out)
    assert gate_out.tolist() == [False, True]
    assert out[:, 0].tolist() == [0.5, -0.5]


def _backend_fn(backend: str) -> Callable:
    if backend == "triton":
        load_triton_rows()
        from steerlib.kernels import triton_rows

        return triton_rows.steer_rows_triton
    return cuda_steer.steer_rows_cuda


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).removeprefix("torch."))
@pytest.mark.parametrize(("n", "d", "k"), [(1, 576, 1), (7, 897, 3), (64, 576, 16), (33, 4097, 0)])
def test_gated_kernel_matches_reference(backend: str, dtype: torch.dtype, n: int, d: int, k: int) -> None:
    if backend not in available_backends():
        pytest.skip(f"{backend} backend not usable here")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hidden, args = mixed_case(n, d, k, dtype, seed=n + d, device=device)
    gates = add_gates(hidden, args, seed=n * d)
    want_open = torch.zeros(n, dtype=torch.bool, device=device)
    expected, eproj = steer_rows_reference(hidden.clone(), **args, **gates, inplace=False, gate_out=want_open)
    assert torch.equal(want_open.cpu(), expected_open(hidden, gates))
    run = _backend_fn(backend)
    for inplace in (False, True):
        h = hidden.clone()
        spec = prepare_row_inputs(h, **args, **gates)
        got_open = torch.zeros(n, dtype=torch.bool, device=device)
        out, proj = run(h, spec, inplace=inplace, gate_out=got_open)
        assert (out.data_ptr() == h.data_ptr()) == inplace
        assert torch.equal(got_open, want_open)
        atol, rtol = HIDDEN_TOL[dtype]
        assert_allclose_verbose(out, expected, atol=atol, rtol=rtol, what=f"{backend} gated hidden")
        assert torch.equal(out[~want_open], hidden[~want_open])  # closed rows are bit-identical
        if k:
            assert_allclose_verbose(proj, eproj, atol=PROJ_TOL[0] * 10, rtol=PROJ_TOL[1],
                                    what=f"{backend} gated projections")
        else:
            assert proj is None


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_gate_out_without_gates_is_all_open(backend: str) -> None:
    if backend != "torch" and backend not in available_backends():
        pytest.skip(f"{backend} backend not usable here")
    device = "cuda" if torch.cuda.is_available() and backend != "torch" else "cpu"
    hidden, args = mixed_case(9, 40, 1, torch.float32, seed=8, device=device)
    gate_out = torch.zeros(9, dtype=torch.bool, device=device)
    if backend == "torch":
        steer_rows_reference(hidden.clone(), **args, gate_out=gate_out)
    else:
        _backend_fn(backend)(hidden.clone(), prepare_row_inputs(hidden, **args), gate_out=gate_out)
    assert bool(gate_out.all())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"gate_index": torch.tensor([0, 2, -1])}, "gate_index must lie in -1..1 (gate_dir has 2 rows)"),
        ({"gate_index": torch.tensor([0, 1])}, "gate_index must have shape [3]"),
        ({"gate_index": None}, "gate_dir and gate_index must be given together"),
        ({"gate_dir": torch.ones(2, 8)}, "gate_dir must have unit L2 norm"),
        ({"gate_dir": torch.eye(5)[:2]}, "gate_dir has width 5 but hidden has width 8"),
        ({"gate_lo": torch.tensor([math.nan, 0.0, 0.0])}, "gate_lo/gate_hi contain NaN"),
        ({"gate_dir": None, "gate_index": None}, "gate_lo/gate_hi were given but gate_dir and gate_index are None"),
    ],
)
def test_invalid_gate_inputs_raise_clear_errors(change: dict, message: str) -> None:
    args = {"table": torch.eye(8)[:2], "index": torch.tensor([0, 1, -1]), "coef": torch.tensor([1.0, 1.0, 0.0]),
            "gate_dir": torch.eye(8)[:2], "gate_index": torch.tensor([0, -1, 1]),
            "gate_lo": torch.zeros(3), **change}
    with pytest.raises(ValueError) as info:
        steer_rows_reference(torch.zeros(3, 8), **args)
    assert message in str(info.value)


def test_gate_out_buffer_is_checked() -> None:
    hidden, args = mixed_case(4, 8, 0, torch.float32, seed=1)
    with pytest.raises(ValueError, match=r"gate_out must be a contiguous bool tensor of shape \[4\]"):
        steer_rows_reference(hidden, **args, gate_out=torch.zeros(4))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gate_through_fused_steer_rows_and_the_registered_op(backend: str) -> None:
    """The public call and the in-place registered op take the gate arguments and agree with the reference."""
    if backend not in available_backends():
        pytest.skip(f"{backend} backend not usable here")
    from steerlib.kernels import fused_steer_rows

    hidden, args = mixed_case(24, 80, 2, torch.float32, seed=11)
    gates = add_gates(hidden, args, seed=12)
    want_open = torch.zeros(24, dtype=torch.bool)
    expected, eproj = steer_rows_reference(hidden.clone(), **args, **gates, gate_out=want_open)
    got_open = torch.zeros(24, dtype=torch.bool)
    out, proj = fused_steer_rows(hidden.clone(), **args, **gates, gate_out=got_open, backend=backend)
    assert torch.equal(got_open, want_open)
    assert_allclose_verbose(out, expected, atol=1e-5, rtol=1e-5, what="fused_steer_rows gated")
    h = hidden.clone()
    proj_out = torch.empty(24, 2)
    op_open = torch.zeros(24, dtype=torch.bool)
    torch.ops.steerlib.steer_rows_(h, args["table"], args["index"], args["coef"], args["cap_min"], args["cap_max"],
                                   args["readout"], proj_out, backend, gate_out=op_open, **gates)
    assert torch.equal(op_open, want_open)
    assert_allclose_verbose(h, expected, atol=1e-5, rtol=1e-5, what="steer_rows_ gated")
    assert_allclose_verbose(proj_out, eproj, atol=1e-4, rtol=1e-5, what="steer_rows_ read-out")
