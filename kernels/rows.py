"""Per-row steering: every row of the hidden states picks its own steering vector, coefficient and cap.

This is the op a continuous-batching server needs: one forward pass carries many requests, each with its own
steering, and a prefill row and a decode row of the same step may want different edits. The vectors live in one
table ``[V, D]``; each row names an entry (or ``-1`` for none) and brings its coefficient and cap bounds.

Math per row ``h`` with index ``i``, coefficient ``c`` and bounds ``lo <= hi`` (``-inf``/``+inf`` = unbounded)::

    i < 0:   h2 = h
    else:    t  = table[i]
             h1 = h + c * t
             p  = <h1, t>                      (only rows with a finite bound; t must be unit there)
             h2 = h1 + (clamp(p, lo, hi) - p) * t
    proj = h2 @ readout.T                      (every row, steered or not)

**Gate (optional).** A row may carry a condition that decides whether its edit happens at all: ``gate_dir
[G, D]`` holds unit condition directions, and per row ``gate_index`` (``-1``: no gate, the row is open),
``gate_lo`` and ``gate_hi``::

    gi < 0:  open = True
    else:    g    = <h, gate_dir[gi]>          (the row as it enters this op, before its edit)
             open = gate_lo <= g <= gate_hi     (a NaN g is closed)
    not open: the row is treated as i < 0 (no add, no cap); its read-out is still computed

The gate reads the hidden state before this call's edit, so an edit can never open or close its own gate.
When asked (``gate_out``, a caller-owned ``[N]`` bool tensor) every backend writes ``open`` per row, so the
host can latch a row's gate open for the rest of a generation. ``above T`` is ``(T, +inf)``, ``below T``
``(-inf, T)``; a gate that can never open is e.g. ``(+inf, +inf)`` and the row is then exactly unsteered.

So an ``add`` row is ``(i, coef, -inf, +inf)`` with a raw vector in the table, an ``ablate`` row is
``(i, 0, 0, 0)`` and a ``cap`` row ``(i, 0, lo, hi)`` with a unit vector in the table. Several edits at one layer
are several calls (the server passes the readout with the last). Math is fp32 and ``hidden`` keeps its dtype; the
projections come from the fp32 ``h2`` before it is rounded to that dtype: the read-out reflects the exact
update rather than half-precision rounding noise (at most one ulp of the stored dtype per element), and the kernels
compute it without re-reading memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_READOUT_DIRS = 16
HIDDEN_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# fp16/bf16 vectors normalised in fp32 then rounded still have norms within ~1e-3 of one.
UNIT_NORM_TOL = 1e-2


@dataclass(frozen=True)
class RowSteerSpec:
    """Validated, backend-ready arguments of ``fused_steer_rows`` (tensors on ``hidden``'s device).

    Attributes:
        table: ``[V, D]`` fp32 contiguous steering vectors (V may be 0 when no row is steered).
        index: ``[N]`` int64 entry of ``table`` per row, ``-1`` for none.
        coef: ``[N]`` fp32 coefficient per row.
        cap_min: ``[N]`` fp32 lower bound per row (``-inf``: unbounded).
        cap_max: ``[N]`` fp32 upper bound per row (``+inf``: unbounded).
        has_steer: Whether any row adds (a nonzero coefficient on a steered row).
        has_cap: Whether any steered row has a finite bound.
        readout: ``[K, D]`` fp32 read-out directions or None.
        gate_dir: ``[G, D]`` fp32 unit condition directions, or None (no row is gated).
        gate_index: ``[N]`` int64 entry of ``gate_dir`` per row (``-1``: no gate), or None.
        gate_lo: ``[N]`` fp32 lower gate bound per row (``-inf``: unbounded), or None.
        gate_hi: ``[N]`` fp32 upper gate bound per row (``+inf``: unbounded), or None.
    """

    table: torch.Tensor
    index: torch.Tensor
    coef: torch.Tensor
    cap_min: torch.Tensor
    cap_max: torch.Tensor
    has_steer: bool
    has_cap: bool
    readout: torch.Tensor | None
    gate_dir: torch.Tensor | None = None
    gate_index: torch.Tensor | None = None
    gate_lo: torch.Tensor | None = None
    gate_hi: torch.Tensor | None = None

    @property
    def has_gate(self) -> bool:
        """Whether rows carry gates (all four gate tensors are set)."""
        return self.gate_dir is not None

    @property
    def num_readouts(self) -> int:
        """Number of readout directions K (0 when there is no readout)."""
        return 0 if self.readout is None else int(self.readout.shape[0])


def prepare_vector(name: str, t: torch.Tensor, shape: tuple[int, ...], device: torch.device,
                    unit: bool = False, check_values: bool = True) -> torch.Tensor:
    """Check one steering/cap/readout tensor and return it as contiguous fp32.

    Args:
        name: Argument name used in error messages.
        t: The user's tensor.
        shape: Expected shape.
        device: ``hidden``'s device.
        unit: Also require every row to have unit L2 norm.
        check_values: Check the values (finite, unit norm): a host read on a GPU, on every call. ``False``
            checks shape, device and dtype only and reads no device memory: for callers whose values were
            checked on the host when they were written (a steering plan's tables), and for ops that run inside
            a captured graph, where a read back is not allowed.

    Returns:
        ``t`` as a contiguous fp32 tensor (``t`` itself when it already is one).
    """
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but hidden is on {device}")
    if tuple(t.shape) != shape:
        if t.dim() == len(shape) and t.shape[-1] != shape[-1]:
            raise ValueError(f"{name} has width {t.shape[-1]} but hidden has width {shape[-1]}")
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if not check_values:
        return t.to(torch.float32).contiguous()  # no-ops (no dispatch) for a contiguous fp32 tensor
    converted = t.to(torch.float32).contiguous()
    if not bool(torch.isfinite(converted).all()):
        raise ValueError(f"{name} contains NaN or inf values")
    if unit:
        norms = torch.linalg.vector_norm(converted, dim=-1).flatten()
        worst = int((norms - 1.0).abs().argmax())
        if abs(float(norms[worst]) - 1.0) > UNIT_NORM_TOL:
            raise ValueError(f"{name} must have unit L2 norm, got norm {float(norms[worst]):.4g} "
                             f"(normalise it first: v / v.norm())")
    return converted


def _check_per_row(name: str, t: object, n: int, device: torch.device) -> None:
    """``t`` is a tensor ``[n]`` (one entry per row of hidden) on ``device``."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but hidden is on {device}")
    if tuple(t.shape) != (n,):
        raise ValueError(f"{name} must have shape [{n}] (one entry per row of hidden), got {list(t.shape)}")


def _row_tensor(name: str, t: torch.Tensor | None, n: int, device: torch.device, fill: float) -> torch.Tensor:
    """A per-row fp32 tensor ``[n]`` (``fill`` everywhere when ``t`` is None)."""
    if t is None:
        return torch.full((n,), fill, dtype=torch.float32, device=device)
    _check_per_row(name, t, n, device)
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"{name} must be a real tensor, got {t.dtype}")
    return t.to(torch.float32).contiguous()


def _index_tensor(name: str, t: torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    """A per-row int64 index tensor ``[n]`` (shape, dtype and device checked; values are not read)."""
    _check_per_row(name, t, n, device)
    if t.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be int32 or int64, got {t.dtype}")
    return t.to(torch.int64).contiguous()


def _check_index_range(name: str, index64: torch.Tensor, v: int, what: str) -> None:
    """Every value of ``index64`` lies in ``-1..v-1`` (one host read)."""
    if index64.numel():
        lo_i, hi_i = int(index64.min()), int(index64.max())
        if lo_i < -1 or hi_i >= v:
            raise ValueError(f"{name} must lie in -1..{v - 1} ({what} has {v} rows), got values {lo_i}..{hi_i}")


def _prepare_gate(gate_dir: torch.Tensor | None, gate_index: torch.Tensor | None, gate_lo: torch.Tensor | None,
                  gate_hi: torch.Tensor | None, n: int, d: int, device: torch.device,
                  validate: bool) -> tuple[torch.Tensor | None, ...]:
    """Check the gate arguments; ``(gate_dir, gate_index, gate_lo, gate_hi)`` normalised, or four Nones."""
    if gate_dir is None and gate_index is None:
        if gate_lo is not None or gate_hi is not None:
            raise ValueError("gate_lo/gate_hi were given but gate_dir and gate_index are None")
        return None, None, None, None
    if gate_dir is None or gate_index is None:
        raise ValueError("gate_dir and gate_index must be given together")
    if not isinstance(gate_dir, torch.Tensor) or gate_dir.dim() != 2:
        raise ValueError("gate_dir must be a 2-D [G, D] tensor")
    g = int(gate_dir.shape[0])
    if g == 0:
        raise ValueError("gate_dir must have at least one direction")
    dirs = prepare_vector("gate_dir", gate_dir, (g, d), device, unit=validate, check_values=validate)
    gi = _index_tensor("gate_index", gate_index, n, device)
    lo = _row_tensor("gate_lo", gate_lo, n, device, float("-inf"))
    hi = _row_tensor("gate_hi", gate_hi, n, device, float("inf"))
    if validate:
        _check_index_range("gate_index", gi, g, "gate_dir")
        if bool(lo.isnan().any()) or bool(hi.isnan().any()):
            raise ValueError("gate_lo/gate_hi contain NaN (use -inf/+inf for an unbounded side)")
    return dirs, gi, lo, hi


def prepare_row_inputs(hidden: torch.Tensor, table: torch.Tensor, index: torch.Tensor,
                       coef: torch.Tensor | None = None, cap_min: torch.Tensor | None = None,
                       cap_max: torch.Tensor | None = None, readout: torch.Tensor | None = None,
                       validate: bool = True, gate_dir: torch.Tensor | None = None,
                       gate_index: torch.Tensor | None = None, gate_lo: torch.Tensor | None = None,
                       gate_hi: torch.Tensor | None = None) -> RowSteerSpec:
    """Validate the arguments of ``fused_steer_rows`` and normalise them for any backend.

    The checks read the per-row tensors on the host (one sync on a GPU); they are cheap next to a forward pass
    of a served batch, and they are what turns a NaN coefficient or an out-of-range index into a clear error
    instead of a silently wrong row.

    Args:
        hidden: ``[N, D]`` fp32/fp16/bf16 hidden states with unit stride along D.
        table: ``[V, D]`` steering vectors.
        index: ``[N]`` integer entry of ``table`` per row, ``-1`` for an unsteered row.
        coef: ``[N]`` coefficient per row (None: 0 everywhere).
        cap_min: ``[N]`` lower projection bound per row (None or ``-inf``: unbounded).
        cap_max: ``[N]`` upper projection bound per row (None or ``+inf``: unbounded).
        readout: ``[K, D]`` directions (K <= 16) read out after the update, or None.
        validate: Check the values (index range, finite coefficients, ordered bounds, unit rows where bounded).
            ``False`` is for callers that built the per-row tensors and vectors from values they checked on the
            host (the steering plan): shapes, dtypes and devices are still checked, nothing reads device memory
            (not even a first check of the table, gate or read-out vectors), and
            the op adds when ``coef`` is given and caps when ``cap_min`` or ``cap_max`` is given.
        gate_dir: ``[G, D]`` unit condition directions, or None for no gates.
        gate_index: ``[N]`` integer entry of ``gate_dir`` per row, ``-1`` for an ungated (open) row.
        gate_lo: ``[N]`` lower gate bound per row (None or ``-inf``: unbounded).
        gate_hi: ``[N]`` upper gate bound per row (None or ``+inf``: unbounded).

    Returns:
        A ``RowSteerSpec``.

    Raises:
        ValueError: naming the offending argument and what is wrong with it.
    """
    if not isinstance(hidden, torch.Tensor):
        raise ValueError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D [N, D], got shape {list(hidden.shape)}")
    if hidden.dtype not in HIDDEN_DTYPES:
        raise ValueError(f"hidden must be float32, float16 or bfloat16, got {hidden.dtype}")
    n, d = hidden.shape
    if d > 1 and hidden.stride(1) != 1:
        raise ValueError("hidden rows must be contiguous (stride 1 along D); call .contiguous() first")
    device = hidden.device

    if not isinstance(table, torch.Tensor) or table.dim() != 2:
        raise ValueError(f"table must be a 2-D [V, D] tensor, got "
                         f"{list(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__}")
    v = int(table.shape[0])
    table32 = prepare_vector("table", table, (v, d), device, check_values=validate) if v else torch.zeros(
        (0, d), dtype=torch.float32, device=device)

    index64 = _index_tensor("index", index, n, device)
    gate = _prepare_gate(gate_dir, gate_index, gate_lo, gate_hi, n, d, device, validate)
    if not validate:
        coef32 = _row_tensor("coef", coef, n, device, 0.0)
        lo = _row_tensor("cap_min", cap_min, n, device, float("-inf"))
        hi = _row_tensor("cap_max", cap_max, n, device, float("inf"))
        mon = _check_readout(readout, d, device, check_values=False)
        return RowSteerSpec(table=table32, index=index64, coef=coef32, cap_min=lo, cap_max=hi,
                            has_steer=coef is not None and v > 0,
                            has_cap=(cap_min is not None or cap_max is not None) and v > 0, readout=mon,
                            gate_dir=gate[0], gate_index=gate[1], gate_lo=gate[2], gate_hi=gate[3])
    _check_index_range("index", index64, v, "table")

    coef32 = _row_tensor("coef", coef, n, device, 0.0)
    lo = _row_tensor("cap_min", cap_min, n, device, float("-inf"))
    hi = _row_tensor("cap_max", cap_max, n, device, float("inf"))
    if not bool(torch.isfinite(coef32).all()):
        raise ValueError("coef contains NaN or inf values")
    if bool(lo.isnan().any()) or bool(hi.isnan().any()):
        raise ValueError("cap_min/cap_max contain NaN (use -inf/+inf for an unbounded side)")
    if bool((lo > hi).any()):
        row = int((lo > hi).nonzero()[0])
        raise ValueError(f"cap_min must be <= cap_max in every row; row {row} has {float(lo[row])} > {float(hi[row])}")

    steered = index64 >= 0
    bounded = steered & (torch.isfinite(lo) | torch.isfinite(hi))
    has_cap = bool(bounded.any())
    if has_cap:
        # A clamp along a non-unit direction would move the projection by the wrong amount.
        used = index64[bounded].unique()
        norms = torch.linalg.vector_norm(table32[used], dim=-1)
        worst = int((norms - 1.0).abs().argmax())
        if abs(float(norms[worst]) - 1.0) > UNIT_NORM_TOL:
            raise ValueError(f"table row {int(used[worst])} is used with cap bounds but has norm "
                             f"{float(norms[worst]):.4g}; capped rows need unit vectors")
    has_steer = bool((steered & (coef32 != 0)).any())
    mon = _check_readout(readout, d, device)
    return RowSteerSpec(table=table32, index=index64, coef=coef32, cap_min=lo, cap_max=hi, has_steer=has_steer,
                        has_cap=has_cap, readout=mon, gate_dir=gate[0], gate_index=gate[1], gate_lo=gate[2],
                        gate_hi=gate[3])


def _check_readout(readout: torch.Tensor | None, d: int, device: torch.device,
                   check_values: bool = True) -> torch.Tensor | None:
    if readout is None:
        return None
    if not isinstance(readout, torch.Tensor) or readout.dim() != 2:
        raise ValueError("readout must be a 2-D [K, D] tensor")
    k = readout.shape[0]
    if k == 0 or k > MAX_READOUT_DIRS:
        raise ValueError(f"readout must have 1 to {MAX_READOUT_DIRS} directions, got K={k}")
    return prepare_vector("readout", readout, (k, d), device, check_values=check_values)


def check_gate_out(gate_out: torch.Tensor | None, hidden: torch.Tensor) -> None:
    """Check a caller-owned gate output buffer: a contiguous ``[N]`` bool tensor on ``hidden``'s device."""
    if gate_out is None:
        return
    n = hidden.shape[0]
    if (not isinstance(gate_out, torch.Tensor) or gate_out.dtype != torch.bool or tuple(gate_out.shape) != (n,)
            or gate_out.device != hidden.device or not gate_out.is_contiguous()):
        raise ValueError(f"gate_out must be a contiguous bool tensor of shape [{n}] on {hidden.device}")


def gate_open_torch(h: torch.Tensor, spec: RowSteerSpec) -> torch.Tensor:
    """Which rows' gates are open, from the fp32 rows ``h`` before the edit: ``[N]`` bool.

    Args:
        h: ``[N, D]`` fp32 hidden states as they enter the op.
        spec: A spec with gates (``spec.has_gate``).

    Returns:
        ``[N]`` bool, True where the row is ungated or ``gate_lo <= <h, gate_dir[gi]> <= gate_hi``.
    """
    assert spec.gate_dir is not None and spec.gate_index is not None
    gi = spec.gate_index
    # [N, G] then one gather: G is small, and this avoids an [N, D] gathered copy of the directions.
    g = (h @ spec.gate_dir.T).gather(1, gi.clamp_min(0)[:, None]).squeeze(1)
    return (gi < 0) | ((g >= spec.gate_lo) & (g <= spec.gate_hi))


def allocate_outputs(hidden: torch.Tensor, k: int, inplace: bool,
                     proj_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output buffers every backend writes: ``hidden`` itself (in place) or a new ``[N, D]`` tensor, and
    ``[N, K]`` fp32 projections, or None for K = 0. The projections are left uninitialised (the kernel writes
    every value; no extra fill on the decode path) except for an empty input, where no kernel runs. A caller's
    ``proj_out`` buffer (``[N, K]`` fp32, contiguous) is used as it is: nothing is allocated for an in-place call
    that brings its own read-out buffer (what a captured graph needs)."""
    n, d = hidden.shape
    out = hidden if inplace else torch.empty((n, d), dtype=hidden.dtype, device=hidden.device)
    if not k:
        return out, None
    if proj_out is not None:
        return out, proj_out
    alloc = torch.zeros if n == 0 or d == 0 else torch.empty
    return out, alloc((n, k), dtype=torch.float32, device=hidden.device)


def fp32_working_copy(hidden: torch.Tensor, inplace: bool) -> torch.Tensor:
    """The fp32 tensor the torch paths compute in: ``hidden`` itself when it is fp32 and may be overwritten,
    else the one copy needed."""
    if hidden.dtype == torch.float32:
        return hidden if inplace else hidden.clone()
    return hidden.to(torch.float32)


def write_back(hidden: torch.Tensor, h: torch.Tensor, inplace: bool) -> torch.Tensor:
    """The result of a torch path in ``hidden``'s dtype, written into ``hidden`` when ``inplace``."""
    if h.dtype == hidden.dtype:
        return h  # fp32: h is hidden itself (inplace) or its clone
    if inplace:
        return hidden.copy_(h)
    return h.to(hidden.dtype)


def steer_rows_torch(hidden: torch.Tensor, spec: RowSteerSpec, inplace: bool = True,
                     gate_out: torch.Tensor | None = None,
                     proj_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Apply a validated ``RowSteerSpec`` with plain torch ops (the CPU production path and the reference).

    Args:
        hidden: ``[N, D]`` hidden states, already checked by ``prepare_row_inputs``.
        spec: Output of ``prepare_row_inputs`` for this ``hidden``.
        inplace: Write the result into ``hidden`` instead of a new tensor.
        gate_out: Optional ``[N]`` bool buffer that receives which rows' gates were open (all True without
            gates).
        proj_out: Optional ``[N, K]`` fp32 buffer the read-out is written into (``mm`` with ``out=``).

    Returns:
        ``(updated hidden [N, D] in hidden's dtype, projections [N, K] fp32 or None)``.
    """
    h = fp32_working_copy(hidden, inplace)
    is_open = gate_open_torch(h, spec) if spec.has_gate else None
    if gate_out is not None:
        if is_open is None:
            gate_out.fill_(True)
        else:
            gate_out.copy_(is_open)
    if spec.has_steer or spec.has_cap:
        steered = spec.index >= 0
        if is_open is not None:
            steered = steered & is_open
        # Unsteered rows gather row 0 (or nothing when the table is empty) with a zero weight.
        t = spec.table[spec.index.clamp_min(0)] if spec.table.shape[0] else torch.zeros_like(h)
        if spec.has_steer:
            h.add_(t * torch.where(steered, spec.coef, 0.0)[:, None])
        if spec.has_cap:
            p = (h * t).sum(-1)
            bounded = steered & (torch.isfinite(spec.cap_min) | torch.isfinite(spec.cap_max))
            delta = torch.where(bounded, torch.clamp(p, min=spec.cap_min, max=spec.cap_max) - p, 0.0)
            h.add_(t * delta[:, None])
    proj = None
    if spec.readout is not None:
        proj = h @ spec.readout.T if proj_out is None else torch.mm(h, spec.readout.T, out=proj_out)
    return write_back(hidden, h, inplace), proj


def steer_rows_reference(hidden: torch.Tensor, table: torch.Tensor, index: torch.Tensor,
                         coef: torch.Tensor | None = None, cap_min: torch.Tensor | None = None,
                         cap_max: torch.Tensor | None = None, readout: torch.Tensor | None = None,
                         inplace: bool = True, gate_dir: torch.Tensor | None = None,
                         gate_index: torch.Tensor | None = None, gate_lo: torch.Tensor | None = None,
                         gate_hi: torch.Tensor | None = None,
                         gate_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate then apply the per-row op with torch; same arguments as ``fused_steer_rows``."""
    spec = prepare_row_inputs(hidden, table, index, coef, cap_min, cap_max, readout, gate_dir=gate_dir,
                              gate_index=gate_index, gate_lo=gate_lo, gate_hi=gate_hi)
    check_gate_out(gate_out, hidden)
    return steer_rows_torch(hidden, spec, inplace=inplace, gate_out=gate_out)
