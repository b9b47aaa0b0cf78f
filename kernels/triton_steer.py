"""Triton implementation of the fused steer/cap/readout op.

Importing this module imports triton, so the package only imports it on first use. The
``@triton.jit`` decorator reads ``TRITON_INTERPRET`` when this module is imported: set it
before the first triton call to run on CPU tensors with the interpreter.

Each program owns ``BLOCK_M`` rows and streams D in ``BLOCK_D`` chunks:

* pass 1 (only with a cap): accumulate ``p = <h + m*alpha*v, u>`` per row;
* pass 2: recompute ``h1``, add the clamp correction, store the row in its own dtype and
  accumulate the readout projections from the fp32 result with a small ``tl.dot``.

The second read of a row block usually hits L2, since the block is only a few KiB per row.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .reference import SteerSpec, allocate_outputs

# tl.dot needs every dimension >= 16, so readout blocks are at least 16 rows by 16 directions.
MIN_DOT = 16


@triton.jit
def _steer_project_kernel(
    h_ptr, out_ptr, steer_ptr, mask_ptr, cap_ptr, mon_ptr, proj_ptr,
    n_rows, width, stride_h, stride_o, n_mon,
    alpha, cap_lo, cap_hi,
    HAS_STEER: tl.constexpr, HAS_MASK: tl.constexpr, HAS_CAP: tl.constexpr,
    HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, HAS_MON: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    # int64 offsets: rows * stride overflows int32 beyond ~2^31 elements.
    rows64 = rows.to(tl.int64)
    h_rows = h_ptr + rows64[:, None] * stride_h
    o_rows = out_ptr + rows64[:, None] * stride_o

    if HAS_MASK:
        m = tl.load(mask_ptr + rows, mask=row_ok, other=0.0)
        shift = m * alpha
    else:
        m = tl.full((BLOCK_M,), 1.0, tl.float32)
        shift = m * alpha

    # Pass 1: projection of the steered row on the cap direction.
    scale = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if HAS_CAP:
        p = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for d0 in range(0, width, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            col_ok = cols < width
            h = tl.load(h_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            h = h.to(tl.float32)
            if HAS_STEER:
                v = tl.load(steer_ptr + cols, mask=col_ok, other=0.0)
                h = h + shift[:, None] * v[None, :]
            u = tl.load(cap_ptr + cols, mask=col_ok, other=0.0)
            p += tl.sum(h * u[None, :], axis=1)
        c = p
        if HAS_LO:
            c = tl.maximum(c, cap_lo)
        if HAS_HI:
            c = tl.minimum(c, cap_hi)
        scale = (c - p) * m

    # Pass 2: apply the update, store, and read out the readout directions from fp32.
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for d0 in range(0, width, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < width
        ok = row_ok[:, None] & col_ok[None, :]
        h = tl.load(h_rows + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        if HAS_STEER:
            v = tl.load(steer_ptr + cols, mask=col_ok, other=0.0)
            h = h + shift[:, None] * v[None, :]
        if HAS_CAP:
            u = tl.load(cap_ptr + cols, mask=col_ok, other=0.0)
            h = h + scale[:, None] * u[None, :]
        tl.store(o_rows + cols[None, :], h.to(out_ptr.dtype.element_ty), mask=ok)
        if HAS_MON:
            w = tl.load(mon_ptr + ks[:, None] * width + cols[None, :],
                        mask=(ks < n_mon)[:, None] & col_ok[None, :], other=0.0)
            # "ieee": full fp32 products; tf32 would lose ~3 digits on the read-out.
            acc += tl.dot(h, tl.trans(w), input_precision="ieee")
    if HAS_MON:
        tl.store(proj_ptr + rows64[:, None] * n_mon + ks[None, :], acc,
                 mask=row_ok[:, None] & (ks < n_mon)[None, :])


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


def steer_project_triton(hidden: torch.Tensor, spec: SteerSpec,
                         inplace: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the fused op with the Triton kernel.

    Args:
        hidden: ``[N, D]`` hidden states (CUDA, or CPU under ``TRITON_INTERPRET=1``).
        spec: Output of ``prepare_inputs`` for this ``hidden``.
        inplace: Write the result into ``hidden`` instead of a new tensor.

    Returns:
        ``(updated hidden [N, D], projections [N, K] fp32 or None)``.
    """
    n, d = hidden.shape
    k = spec.num_readouts
    out, proj = allocate_outputs(hidden, k, inplace)
    if n == 0 or d == 0:
        return out, proj

    block_m, block_d, num_warps = block_sizes(n, d, k > 0)
    # Unused pointer arguments still need a tensor; the constexpr flags keep them unread.
    dummy = out
    grid = (triton.cdiv(n, block_m),)
    _steer_project_kernel[grid](
        hidden, out,
        spec.steer if spec.steer is not None else dummy,
        spec.mask if spec.mask is not None else dummy,
        spec.cap_dir if spec.cap_dir is not None else dummy,
        spec.readout if spec.readout is not None else dummy,
        proj if proj is not None else dummy,
        n, d, hidden.stride(0), out.stride(0), k,
        spec.alpha,
        spec.cap_min if spec.cap_min is not None else 0.0,
        spec.cap_max if spec.cap_max is not None else 0.0,
        HAS_STEER=spec.steer is not None and spec.alpha != 0.0,
        HAS_MASK=spec.mask is not None,
        HAS_CAP=spec.has_cap,
        HAS_LO=spec.cap_min is not None,
        HAS_HI=spec.cap_max is not None,
        HAS_MON=k > 0,
        BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_K=max(MIN_DOT, triton.next_power_of_2(max(k, 1))),
        num_warps=num_warps,
    )
    return out, proj
