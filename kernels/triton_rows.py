"""Triton implementation of the per-row steer/cap/readout op (see ``rows.py`` for the math).

Importing this module imports triton; the package imports it on first use only. The ``@triton.jit`` decorator
reads ``TRITON_INTERPRET`` when this module is imported: set it before the first triton call to run on CPU
tensors with the interpreter. Each program owns ``BLOCK_M``
rows and streams D in ``BLOCK_D`` chunks. A row's steering vector is gathered from the table by its index, so a
block of rows may mix steered, unsteered and capped rows with different vectors:

* pass 0 (only with gates): ``g = <h, gate_dir[gi]>`` per gated row on the unedited row; a closed row is then
  handled as unsteered (and ``open`` is stored when the caller asked for it);
* pass 1 (only when some row has a bound): ``p = <h + c*t, t>`` per row;
* pass 2: recompute ``h1``, add the clamp correction, store in the row's dtype and accumulate the readout
  projections from the fp32 result with ``tl.dot``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .rows import RowSteerSpec, allocate_outputs

# tl.dot needs every dimension >= 16, so readout blocks are at least 16 rows by 16 directions.
MIN_DOT = 16


def interpreting() -> bool:
    """Whether triton runs in interpreter mode (CPU tensors, numpy execution)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def block_sizes(n_rows: int, width: int, has_mon: bool) -> tuple[int, int, int]:
    """Pick ``(BLOCK_M, BLOCK_D, num_warps)`` for a launch.

    Args:
        n_rows: Number of rows N.
        width: Hidden width D.
        has_mon: Whether readout projections (a tl.dot) are computed.

    Returns:
        Block sizes and warp count.
    """
    d_pow2 = triton.next_power_of_2(width)
    if interpreting():
        # The interpreter pays per op, not per element: few, large blocks are fastest.
        block_m = min(128, max(MIN_DOT, triton.next_power_of_2(n_rows)))
        return block_m, max(MIN_DOT, min(1024, d_pow2)), 1
    if has_mon:
        # 16 rows share each readout chunk, so [K, D] is read from L2 N/16 times rather than N.
        return MIN_DOT, max(MIN_DOT, min(128, d_pow2)), 4
    block_m = min(4, triton.next_power_of_2(n_rows))
    return block_m, max(MIN_DOT, min(1024, d_pow2)), 4


@triton.jit
def _steer_rows_kernel(
    h_ptr, out_ptr, table_ptr, index_ptr, coef_ptr, lo_ptr, hi_ptr, mon_ptr, proj_ptr,
    gdir_ptr, gidx_ptr, glo_ptr, ghi_ptr, gout_ptr,
    n_rows, width, stride_h, stride_o, n_mon,
    HAS_STEER: tl.constexpr, HAS_CAP: tl.constexpr, HAS_MON: tl.constexpr,
    HAS_GATE: tl.constexpr, GATE_OUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    h_rows = h_ptr + rows64[:, None] * stride_h
    o_rows = out_ptr + rows64[:, None] * stride_o

    idx = tl.load(index_ptr + rows, mask=row_ok, other=-1)
    steered = (idx >= 0) & row_ok
    if HAS_GATE:
        # The gate reads the row before this op touches it; a closed row becomes an unsteered one.
        gi = tl.load(gidx_ptr + rows, mask=row_ok, other=-1)
        gated = (gi >= 0) & row_ok
        g_rows = gdir_ptr + tl.where(gated, gi, 0).to(tl.int64)[:, None] * width
        g = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for d0 in range(0, width, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            col_ok = cols < width
            h = tl.load(h_rows + cols[None, :], mask=gated[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
            u = tl.load(g_rows + cols[None, :], mask=gated[:, None] & col_ok[None, :], other=0.0)
            g += tl.sum(h * u, axis=1)
        g_lo = tl.load(glo_ptr + rows, mask=gated, other=float("-inf"))
        g_hi = tl.load(ghi_ptr + rows, mask=gated, other=float("inf"))
        is_open = (gi < 0) | ((g >= g_lo) & (g <= g_hi))
        steered = steered & is_open
        if GATE_OUT:
            tl.store(gout_ptr + rows, is_open.to(tl.uint8), mask=row_ok)
    # Unsteered rows read table row 0 under a false mask, so no address is ever out of range.
    t_rows = table_ptr + tl.where(steered, idx, 0).to(tl.int64)[:, None] * width
    c = tl.load(coef_ptr + rows, mask=steered, other=0.0)

    scale = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if HAS_CAP:
        lo = tl.load(lo_ptr + rows, mask=steered, other=float("-inf"))
        hi = tl.load(hi_ptr + rows, mask=steered, other=float("inf"))
        p = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for d0 in range(0, width, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            col_ok = cols < width
            h = tl.load(h_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
            t = tl.load(t_rows + cols[None, :], mask=steered[:, None] & col_ok[None, :], other=0.0)
            if HAS_STEER:
                h = h + c[:, None] * t
            p += tl.sum(h * t, axis=1)
        clamped = tl.minimum(tl.maximum(p, lo), hi)
        bounded = steered & ((lo > float("-inf")) | (hi < float("inf")))
        scale = tl.where(bounded, clamped - p, 0.0)

    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for d0 in range(0, width, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < width
        ok = row_ok[:, None] & col_ok[None, :]
        h = tl.load(h_rows + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        if HAS_STEER or HAS_CAP:
            t = tl.load(t_rows + cols[None, :], mask=steered[:, None] & col_ok[None, :], other=0.0)
            if HAS_STEER:
                h = h + c[:, None] * t
            if HAS_CAP:
                h = h + scale[:, None] * t
        tl.store(o_rows + cols[None, :], h.to(out_ptr.dtype.element_ty), mask=ok)
        if HAS_MON:
            w = tl.load(mon_ptr + ks[:, None] * width + cols[None, :],
                        mask=(ks < n_mon)[:, None] & col_ok[None, :], other=0.0)
            acc += tl.dot(h, tl.trans(w), input_precision="ieee")
    if HAS_MON:
        tl.store(proj_ptr + rows64[:, None] * n_mon + ks[None, :], acc,
                 mask=row_ok[:, None] & (ks < n_mon)[None, :])


def steer_rows_triton(hidden: torch.Tensor, spec: RowSteerSpec, inplace: bool = True,
                      gate_out: torch.Tensor | None = None,
                      proj_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the per-row op with the Triton kernel.

    Args:
        hidden: ``[N, D]`` hidden states (CUDA, or CPU under ``TRITON_INTERPRET=1``).
        spec: Output of ``prepare_row_inputs`` for this ``hidden``.
        inplace: Write the result into ``hidden`` instead of a new tensor.
        gate_out: Optional ``[N]`` bool buffer that receives which rows' gates were open.
        proj_out: Optional ``[N, K]`` fp32 contiguous buffer the read-out is written into (else a new tensor).

    Returns:
        ``(updated hidden [N, D], projections [N, K] fp32 or None)``.
    """
    n, d = hidden.shape
    k = spec.num_readouts
    out, proj = allocate_outputs(hidden, k, inplace, proj_out)
    if n == 0 or d == 0:
        return out, proj
    if gate_out is not None and not spec.has_gate:
        gate_out.fill_(True)  # no gates: every row is open
    block_m, block_d, num_warps = block_sizes(n, d, k > 0)
    dummy = out
    table = spec.table if spec.table.shape[0] else dummy
    gate_out_u8 = gate_out.view(torch.uint8) if gate_out is not None and spec.has_gate else None
    grid = (triton.cdiv(n, block_m),)
    _steer_rows_kernel[grid](
        hidden, out, table, spec.index, spec.coef, spec.cap_min, spec.cap_max,
        spec.readout if spec.readout is not None else dummy,
        proj if proj is not None else dummy,
        spec.gate_dir if spec.gate_dir is not None else dummy,
        spec.gate_index if spec.gate_index is not None else spec.index,
        spec.gate_lo if spec.gate_lo is not None else spec.coef,
        spec.gate_hi if spec.gate_hi is not None else spec.coef,
        gate_out_u8 if gate_out_u8 is not None else spec.index,
        n, d, hidden.stride(0), out.stride(0), k,
        HAS_STEER=spec.has_steer, HAS_CAP=spec.has_cap, HAS_MON=k > 0,
        HAS_GATE=spec.has_gate, GATE_OUT=gate_out_u8 is not None,
        BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_K=max(MIN_DOT, triton.next_power_of_2(max(k, 1))),
        num_warps=num_warps,
    )
    return out, proj
