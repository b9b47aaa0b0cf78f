"""The fused steer/cap/readout op registered with ``torch.library``, so ``torch.compile`` can place it.

``torch.ops.steerlib.steer_project`` is a functional op (it never writes into its inputs) with a fake
implementation, so dynamo traces it as one node with known output shapes, inductor calls it as an
extern kernel, and CUDA graphs capture whatever it launches. It dispatches at run time to the torch,
Triton or CUDA implementation, like ``fused_steer_project``.

Unlike ``fused_steer_project`` it does not validate its arguments: validation needs a device->host sync
(finiteness and unit-norm checks), which is forbidden inside a CUDA-graph capture and is a graph break
under dynamo. Check the vectors once with ``validate`` when steering is installed, then call the op on
every forward pass.

Math per row ``h`` with mask ``m``: ``h1 = h + m*alpha*v``; ``p = <h1, u>``;
``h2 = h1 + m*(clamp(p, lo, hi) - p)*u``; ``proj = h2 @ readout.T`` (fp32, taken before rounding).
"""

from __future__ import annotations

import torch

from . import cuda_steer
from .reference import SteerSpec, prepare_inputs, steer_project_torch

OP_NAME = "steerlib::steer_project"


def validate(width: int, device: torch.device, steer_vec: torch.Tensor | None = None,
             cap_dir: torch.Tensor | None = None, cap_min: float | None = None, cap_max: float | None = None,
             readout: torch.Tensor | None = None) -> None:
    """Run the full argument checks of ``fused_steer_project`` once, on a one-row stand-in for hidden.

    Args:
        width: Hidden width D.
        device: Device of the hidden states.
        steer_vec: ``[D]`` steering vector, or None.
        cap_dir: ``[D]`` unit direction, or None.
        cap_min: Lower projection bound, or None.
        cap_max: Upper projection bound, or None.
        readout: ``[K, D]`` read-out directions, or None.

    Raises:
        ValueError: naming the offending argument (see ``prepare_inputs``).
    """
    probe = torch.zeros(1, width, device=device)
    prepare_inputs(probe, steer_vec, 1.0, None, cap_dir, cap_min, cap_max, readout)


def _spec(steer_vec: torch.Tensor | None, alpha: float, row_mask: torch.Tensor | None,
          cap_dir: torch.Tensor | None, cap_min: float | None, cap_max: float | None,
          readout: torch.Tensor | None) -> SteerSpec:
    """A ``SteerSpec`` from already-validated fp32 tensors, with no checks and no host syncs."""
    return SteerSpec(
        steer=steer_vec if steer_vec is not None else None,
        alpha=float(alpha) if steer_vec is not None else 0.0,
        mask=row_mask.to(torch.float32).contiguous() if row_mask is not None else None,
        cap_dir=cap_dir,
        cap_min=cap_min,
        cap_max=cap_max,
        readout=readout,
    )


@torch.library.custom_op(OP_NAME, mutates_args=())
def steer_project(hidden: torch.Tensor, steer_vec: torch.Tensor | None, alpha: float,
                  row_mask: torch.Tensor | None, cap_dir: torch.Tensor | None, cap_min: float | None,
                  cap_max: float | None, readout: torch.Tensor | None,
                  backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Steer, cap and read out ``hidden`` [N, D] into new tensors (see the module docstring for the math).

    Args:
        hidden: ``[N, D]`` fp32/fp16/bf16 with contiguous rows.
        steer_vec: ``[D]`` fp32 steering vector, or None.
        alpha: Steering coefficient.
        row_mask: ``[N]`` float mask (per-row scale of the add and of the cap correction), or None.
        cap_dir: ``[D]`` fp32 unit direction, or None.
        cap_min: Lower bound, or None.
        cap_max: Upper bound, or None.
        readout: ``[K, D]`` fp32 read-out directions, or None.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cuda"``.

    Returns:
        ``(new hidden [N, D] in hidden's dtype, projections [N, K] fp32)``; K = 0 without a readout.
    """
    from . import load_triton, resolve_backend  # deferred: the package imports this module

    spec = _spec(steer_vec, alpha, row_mask, cap_dir, cap_min, cap_max, readout)
    name = resolve_backend(backend, hidden)
    if name == "cuda":
        out, proj = cuda_steer.steer_project_cuda(hidden, spec, inplace=False)
    elif name == "triton":
        triton_backend = load_triton()
        assert triton_backend is not None  # resolve_backend checked it
        out, proj = triton_backend.steer_project_triton(hidden, spec, inplace=False)
    else:
        out, proj = steer_project_torch(hidden, spec, inplace=False)
    if out is hidden:  # fp32 torch path with nothing to do can hand back its input; outputs must not alias
        out = hidden.clone()
    if proj is None:
        proj = hidden.new_empty((hidden.shape[0], 0), dtype=torch.float32)
    return out, proj


@steer_project.register_fake
def _steer_project_fake(hidden, steer_vec, alpha, row_mask, cap_dir, cap_min, cap_max, readout, backend):
    k = 0 if readout is None else readout.shape[0]
    return torch.empty_like(hidden), hidden.new_empty((hidden.shape[0], k), dtype=torch.float32)


def steer_project_inline(hidden: torch.Tensor, steer_vec: torch.Tensor | None, alpha: float,
                         row_mask: torch.Tensor | None, cap_dir: torch.Tensor | None, cap_min: float | None,
                         cap_max: float | None,
                         readout: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The same math as ``steer_project`` in plain, functional torch ops, for a compiler to fuse.

    Inside a compiled graph these ops fuse with the block's own elementwise kernels (the residual add), so
    on a CPU, where there are no CUDA graphs to hide the custom op's Python call, this is the cheaper form.
    Same arguments and returns as ``steer_project`` (less ``backend``), except that the projections are
    None without a readout.
    """
    h = hidden.float()
    if steer_vec is not None:
        shift = alpha * steer_vec
        h = h + (shift if row_mask is None else row_mask[:, None] * shift)
    if cap_dir is not None and (cap_min is not None or cap_max is not None):
        p = h @ cap_dir
        delta = p.clamp(min=cap_min, max=cap_max) - p
        if row_mask is not None:
            delta = delta * row_mask
        h = h + delta[:, None] * cap_dir
    proj = h @ readout.T if readout is not None else None
    return h.to(hidden.dtype), proj
