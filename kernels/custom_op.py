"""The per-row op registered with ``torch.library``, so compiled graphs and CUDA graphs can hold it.

Two registrations of the one op (``rows.py`` for the math, torch/Triton/CUDA behind it):

* ``torch.ops.steerlib.steer_rows_`` writes into buffers the caller owns: ``hidden`` is updated in place and the
  read-out goes into ``proj_out``. This is what a steering plan calls on every forward pass: nothing is
  allocated for the outputs, and the addresses stay fixed, which is what a captured CUDA graph needs.
* ``torch.ops.steerlib.steer_rows`` is the functional form (new tensors out), for callers that must not write
  into their input (autograd-free graphs that keep the block's output alive, ``opcheck``).

Both have fake implementations, so dynamo traces each as one node with known shapes, inductor calls it as an
extern kernel (mutations are functionalised and written back), and CUDA graphs capture whatever it launches.

Neither validates values: validation reads device memory (a sync), which is forbidden inside a CUDA-graph
capture and a graph break under dynamo. Callers check values once on the host (``steerlib.steering.plan``
does, when a request's steering is lowered) and pass only the shapes and dtypes checked here.

``steer_rows_inline`` is the same math as plain functional torch ops, for a compiler to fuse with the block's
own elementwise kernels (the cheaper form on a CPU, where no CUDA graph hides the op's Python call).
"""

from __future__ import annotations

import torch

from .rows import RowSteerSpec, prepare_row_inputs

LIB = "steerlib"


def _run(hidden: torch.Tensor, table: torch.Tensor, index: torch.Tensor, coef: torch.Tensor | None,
         cap_min: torch.Tensor | None, cap_max: torch.Tensor | None, readout: torch.Tensor | None,
         backend: str, inplace: bool, gate_dir: torch.Tensor | None = None, gate_index: torch.Tensor | None = None,
         gate_lo: torch.Tensor | None = None, gate_hi: torch.Tensor | None = None,
         gate_out: torch.Tensor | None = None,
         proj_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dispatch one call to the backend that runs here (shapes checked, values trusted)."""
    from . import resolve_backend, run_rows  # deferred: the package imports this module

    spec: RowSteerSpec = prepare_row_inputs(hidden, table, index, coef, cap_min, cap_max, readout, validate=False,
                                            gate_dir=gate_dir, gate_index=gate_index, gate_lo=gate_lo,
                                            gate_hi=gate_hi)
    return run_rows(resolve_backend(backend, hidden), hidden, spec, inplace=inplace, gate_out=gate_out,
                    proj_out=proj_out)


@torch.library.custom_op(f"{LIB}::steer_rows_", mutates_args=("hidden", "proj_out", "gate_out"))
def steer_rows_(hidden: torch.Tensor, table: torch.Tensor, index: torch.Tensor, coef: torch.Tensor | None,
                cap_min: torch.Tensor | None, cap_max: torch.Tensor | None, readout: torch.Tensor | None,
                proj_out: torch.Tensor | None, backend: str, gate_dir: torch.Tensor | None = None,
                gate_index: torch.Tensor | None = None, gate_lo: torch.Tensor | None = None,
                gate_hi: torch.Tensor | None = None, gate_out: torch.Tensor | None = None) -> None:
    """Steer ``hidden`` [N, D] in place, one table row per token, and write the read-out into ``proj_out``.

    Args:
        hidden: ``[N, D]`` fp32/fp16/bf16, contiguous rows; updated in place.
        table: ``[V, D]`` fp32 vectors (row 0 all zeros by the plan's convention: "no edit").
        index: ``[N]`` int64 table row per token (``-1`` also means none).
        coef: ``[N]`` fp32 coefficient per token, or None (no add).
        cap_min: ``[N]`` fp32 lower bound per token (``-inf``: none), or None (no cap).
        cap_max: ``[N]`` fp32 upper bound per token (``+inf``: none), or None.
        readout: ``[K, D]`` fp32 read-out directions, or None.
        proj_out: ``[N, K]`` fp32 buffer for the read-out (required with ``readout``).
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cuda"``.
        gate_dir: ``[G, D]`` fp32 unit condition directions, or None (no gates; see ``rows.py``).
        gate_index: ``[N]`` int64 entry of ``gate_dir`` per token (``-1``: ungated).
        gate_lo: ``[N]`` fp32 lower gate bound per token.
        gate_hi: ``[N]`` fp32 upper gate bound per token.
        gate_out: ``[N]`` bool buffer receiving which tokens' gates were open, or None.
    """
    if readout is not None and (proj_out is None or proj_out.dtype != torch.float32
                                or not proj_out.is_contiguous() or proj_out.device != hidden.device
                                or tuple(proj_out.shape) != (hidden.shape[0], readout.shape[0])):
        raise ValueError(f"steer_rows_ was given a readout but no proj_out buffer (a contiguous fp32 "
                         f"[{hidden.shape[0]}, {readout.shape[0]}] tensor on {hidden.device})")
    # The backends write the read-out straight into proj_out: nothing is allocated for it (graph-safe).
    _run(hidden, table, index, coef, cap_min, cap_max, readout, backend, inplace=True, gate_dir=gate_dir,
         gate_index=gate_index, gate_lo=gate_lo, gate_hi=gate_hi, gate_out=gate_out, proj_out=proj_out)


@steer_rows_.register_fake
def _steer_rows_inplace_fake(hidden, table, index, coef, cap_min, cap_max, readout, proj_out, backend,
                             gate_dir=None, gate_index=None, gate_lo=None, gate_hi=None, gate_out=None):
    return None


@torch.library.custom_op(f"{LIB}::steer_rows", mutates_args=())
def steer_rows(hidden: torch.Tensor, table: torch.Tensor, index: torch.Tensor, coef: torch.Tensor | None,
               cap_min: torch.Tensor | None, cap_max: torch.Tensor | None, readout: torch.Tensor | None,
               backend: str, gate_dir: torch.Tensor | None = None, gate_index: torch.Tensor | None = None,
               gate_lo: torch.Tensor | None = None,
               gate_hi: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The functional form of ``steer_rows_``: returns ``(new hidden [N, D], projections [N, K], open [N] bool)``,
    K = 0 without a read-out, ``open`` all True without gates. Same arguments, less the output buffers."""
    n = hidden.shape[0]
    opened = torch.ones(n, dtype=torch.bool, device=hidden.device)
    out, proj = _run(hidden, table, index, coef, cap_min, cap_max, readout, backend, inplace=False,
                     gate_dir=gate_dir, gate_index=gate_index, gate_lo=gate_lo, gate_hi=gate_hi,
                     gate_out=opened if gate_dir is not None else None)
    if out is hidden:  # outputs of a functional op must not alias its inputs
        out = hidden.clone()
    if proj is None:
        proj = hidden.new_empty((n, 0), dtype=torch.float32)
    return out, proj, opened


@steer_rows.register_fake
def _steer_rows_fake(hidden, table, index, coef, cap_min, cap_max, readout, backend, gate_dir=None, gate_index=None,
                     gate_lo=None, gate_hi=None):
    k = 0 if readout is None else readout.shape[0]
    n = hidden.shape[0]
    return (torch.empty_like(hidden), hidden.new_empty((n, k), dtype=torch.float32),
            hidden.new_empty((n,), dtype=torch.bool))


def steer_rows_inline(hidden: torch.Tensor, table: torch.Tensor, index: torch.Tensor, coef: torch.Tensor | None,
                      cap_min: torch.Tensor | None, cap_max: torch.Tensor | None, readout: torch.Tensor | None,
                      gate_dir: torch.Tensor | None = None, gate_index: torch.Tensor | None = None,
                      gate_lo: torch.Tensor | None = None, gate_hi: torch.Tensor | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The per-row math in plain functional torch ops (see ``rows.py``), gate included: ``(new hidden,
    projections or None without a read-out, open [N] bool)``."""
    h = hidden.float()
    if gate_dir is not None and gate_index is not None:
        # The gate reads the state entering the edit; a closed row is treated as index -1 (unedited).
        g = (h @ gate_dir.T).gather(1, gate_index.clamp_min(0)[:, None]).squeeze(1)
        opened = (gate_index < 0) | ((g >= gate_lo) & (g <= gate_hi))
        index = torch.where(opened, index, -1)
    else:
        opened = torch.ones(h.shape[0], dtype=torch.bool, device=h.device)
    t = table[index.clamp_min(0)] * (index >= 0)[:, None]
    if coef is not None:
        h = h + coef[:, None] * t
    if cap_min is not None or cap_max is not None:
        p = (h * t).sum(-1)
        clamped = p
        if cap_min is not None:
            clamped = torch.maximum(clamped, cap_min)
        if cap_max is not None:
            clamped = torch.minimum(clamped, cap_max)
        h = h + (clamped - p)[:, None] * t
    proj = h @ readout.T if readout is not None else None
    return h.to(hidden.dtype), proj, opened
