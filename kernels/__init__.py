"""Fused activation-steering kernels: add a steering vector, cap/ablate a direction and read out
readout projections in one pass over the hidden states.

This folder sits at the top of the repository (beside ``steerlib/``) and is installed as
``steerlib.kernels`` by the one ``package-dir`` entry in ``pyproject.toml``; the wheel carries its ``.cu`` and
``.cpp`` sources too. It imports nothing from steerlib (an import-linter contract checks that), so the
kernels can be read, tested and benchmarked on their own. The steering layer imports it
(``steerlib/steering/steer.py``)::

    from steerlib.kernels import fused_steer_project

    flat = hidden.view(-1, hidden.shape[-1])
    flat, proj = fused_steer_project(flat, steer_vec=v, alpha=4.0, readout=dirs)

Backends: ``torch`` (plain torch, any device; the CPU production path), ``triton`` (CUDA, or CPU
tensors under ``TRITON_INTERPRET=1``) and ``cuda`` (a CUDA C++ extension JIT-built on first use).
Triton is imported only when the triton backend is used, so the package works without it.

For compiled graphs the op is also registered as ``torch.ops.steerlib.steer_project`` (``steer_project_op``,
functional, with a fake implementation; see ``custom_op.py``), and ``steer_project_inline`` is the same math
as plain torch ops for a compiler to fuse.
"""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType

import torch

from . import cuda_steer
from .reference import (
    MAX_READOUT_DIRS,
    SteerSpec,
    prepare_inputs,
    steer_project_reference,
    steer_project_torch,
)
from .rows import RowSteerSpec, prepare_row_inputs, steer_rows_reference, steer_rows_torch

__all__ = [
    "MAX_READOUT_DIRS",
    "RowSteerSpec",
    "SteerSpec",
    "available_backends",
    "fused_steer_project",
    "fused_steer_rows",
    "prepare_inputs",
    "prepare_row_inputs",
    "steer_project_reference",
    "steer_project_inline",
    "steer_project_op",
    "steer_project_torch",
    "steer_rows_reference",
    "steer_rows_torch",
    "validate_steer_inputs",
]

BACKENDS = ("auto", "torch", "triton", "cuda")

_triton_module: ModuleType | None = None
_triton_rows_module: ModuleType | None = None
_triton_error: str | None = None


def load_triton() -> ModuleType | None:
    """Import the triton backend on first use; None (and the reason remembered) if it fails."""
    global _triton_module, _triton_error
    if _triton_module is None and _triton_error is None:
        if importlib.util.find_spec("triton") is None:
            _triton_error = "triton is not installed (pip install 'steerlib[triton]')"
        else:
            try:
                from . import triton_steer

                _triton_module = triton_steer
            except Exception as exc:  # a broken triton install should not break steering
                _triton_error = f"importing triton failed: {type(exc).__name__}: {exc}"
    return _triton_module


def _triton_interpreting() -> bool:
    """Whether ``TRITON_INTERPRET`` asks triton to interpret kernels on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_usable_on(device: torch.device) -> bool:
    """Whether the triton kernel can run on tensors of ``device``."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and _triton_interpreting()


def available_backends() -> list[str]:
    """Names of the backends usable in this process, besides ``"auto"``.

    ``"cuda"`` is listed when a GPU and nvcc exist and no build attempt has failed; the build
    itself happens on the first call that uses it.

    Returns:
        A list such as ``["torch", "triton", "cuda"]``; ``"torch"`` is always present.
    """
    names = ["torch"]
    if importlib.util.find_spec("triton") is not None and _triton_error is None:
        if torch.cuda.is_available() or _triton_interpreting():
            names.append("triton")
    if cuda_steer.toolchain_available() and cuda_steer.build_error() is None:
        names.append("cuda")
    return names


def resolve_backend(backend: str, hidden: torch.Tensor) -> str:
    """Turn the requested backend into the one that will run, or explain why it cannot.

    Args:
        backend: One of ``BACKENDS``.
        hidden: The hidden states (device and autograd state matter).

    Returns:
        ``"torch"``, ``"triton"`` or ``"cuda"``.
    """
    device = hidden.device
    # The kernels have no backward; torch ops do, so autograd callers stay on torch.
    needs_grad = hidden.requires_grad and torch.is_grad_enabled()
    if backend == "torch":
        return "torch"
    if backend == "auto":
        if device.type != "cuda" or needs_grad:
            return "torch"
        if cuda_steer.load_extension() is not None:
            return "cuda"
        if not _triton_interpreting() and load_triton() is not None:
            return "triton"
        return "torch"
    if needs_grad:
        raise RuntimeError(f"backend={backend!r} has no autograd support; hidden requires grad "
                           f"(use torch.no_grad() or backend='torch')")
    if backend == "cuda":
        if device.type != "cuda":
            raise ValueError(f"backend='cuda' needs CUDA tensors, but hidden is on {device}")
        if cuda_steer.load_extension() is None:
            raise RuntimeError(f"backend='cuda' is unavailable: {cuda_steer.build_error()}")
        return "cuda"
    # backend == "triton". The device check comes first: importing the kernel module freezes
    # the interpreter choice, so it must not happen while TRITON_INTERPRET is unset on CPU.
    if not _triton_usable_on(device):
        raise RuntimeError(f"backend='triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set "
                           f"before triton is first used; hidden is on {device}")
    if load_triton() is None:
        raise RuntimeError(f"backend='triton' is unavailable: {_triton_error}")
    return "triton"


def fused_steer_project(
    hidden: torch.Tensor,
    steer_vec: torch.Tensor | None = None,
    alpha: float = 0.0,
    row_mask: torch.Tensor | None = None,
    cap_dir: torch.Tensor | None = None,
    cap_min: float | None = None,
    cap_max: float | None = None,
    readout: torch.Tensor | None = None,
    inplace: bool = True,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Steer, cap and readout hidden states in one pass.

    Per row ``h`` with mask ``m``: ``h1 = h + m*alpha*v``; ``p = <h1, u>``;
    ``h2 = h1 + m*(clamp(p, cap_min, cap_max) - p)*u``; ``proj = h2 @ readout.T``. Math is fp32;
    ``hidden`` keeps its dtype, and ``proj`` is computed from the fp32 ``h2`` before it is rounded
    to that dtype (so it can differ from ``out.float() @ readout.T`` by rounding of ``out``).

    Args:
        hidden: ``[N, D]`` fp32/fp16/bf16 with contiguous rows (flatten ``[B, T, D]`` first).
        steer_vec: ``[D]`` steering vector, or None for no addition (``alpha`` is then ignored).
        alpha: Steering coefficient.
        row_mask: ``[N]`` bool or float mask of rows to steer and cap; None means every row.
            Read-out projections are returned for every row regardless.
        cap_dir: ``[D]`` unit vector whose projection is clamped; required with a bound.
        cap_min: Lower bound on the projection; None leaves it unbounded.
        cap_max: Upper bound; ``cap_min = cap_max = 0`` ablates ``cap_dir``.
        readout: ``[K, D]`` read-out directions, ``K <= 16``, or None.
        inplace: Update ``hidden`` in place (the returned tensor is ``hidden``); else a new tensor.
        backend: ``"auto"`` (CUDA tensors: cuda extension, else triton, else torch; CPU: torch),
            ``"torch"``, ``"triton"`` or ``"cuda"``.

    Returns:
        ``(updated hidden [N, D] in hidden's dtype, projections [N, K] float32 or None)``.

    Raises:
        ValueError: for malformed inputs (shapes, devices, dtypes, non-finite vectors, K > 16).
        RuntimeError: when an explicitly requested backend cannot run here.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    spec = prepare_inputs(hidden, steer_vec, alpha, row_mask, cap_dir, cap_min, cap_max, readout)
    name = resolve_backend(backend, hidden)
    if name == "cuda":
        return cuda_steer.steer_project_cuda(hidden, spec, inplace=inplace)
    if name == "triton":
        triton_backend = load_triton()
        assert triton_backend is not None  # resolve_backend checked it
        return triton_backend.steer_project_triton(hidden, spec, inplace=inplace)
    return steer_project_torch(hidden, spec, inplace=inplace)


def _load_triton_rows() -> ModuleType | None:
    """Import the per-row triton kernel on first use (None when triton itself is unusable)."""
    global _triton_rows_module
    if _triton_rows_module is None and load_triton() is not None:
        from . import triton_rows

        _triton_rows_module = triton_rows
    return _triton_rows_module


def fused_steer_rows(
    hidden: torch.Tensor,
    table: torch.Tensor,
    index: torch.Tensor,
    coef: torch.Tensor | None = None,
    cap_min: torch.Tensor | None = None,
    cap_max: torch.Tensor | None = None,
    readout: torch.Tensor | None = None,
    inplace: bool = True,
    backend: str = "auto",
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Steer each row with its own vector, coefficient and cap bounds, and read out readouts, in one pass.

    Per row ``h`` with ``i = index[row]`` (``-1``: leave the row alone): ``t = table[i]``,
    ``h1 = h + coef[row] * t``; for a row with a finite bound ``p = <h1, t>`` and
    ``h2 = h1 + (clamp(p, cap_min[row], cap_max[row]) - p) * t`` (``t`` must be unit there); then
    ``proj = h2 @ readout.T`` for every row. See ``steerlib.kernels.rows`` for the conventions.

    Args:
        hidden: ``[N, D]`` fp32/fp16/bf16 with contiguous rows.
        table: ``[V, D]`` steering vectors (raw for additions, unit for caps and ablations).
        index: ``[N]`` int32/int64 table entry per row, ``-1`` for none.
        coef: ``[N]`` coefficient per row (None: 0).
        cap_min: ``[N]`` lower projection bound per row (None or ``-inf``: unbounded).
        cap_max: ``[N]`` upper bound per row (None or ``+inf``: unbounded); ``0, 0`` ablates.
        readout: ``[K, D]`` read-out directions, ``K <= 16``, or None.
        inplace: Update ``hidden`` in place (the returned tensor is ``hidden``); else a new tensor.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cuda"`` (as for ``fused_steer_project``).
        validate: Check the per-row values (one host read of the small per-row tensors). Pass ``False`` only
            with values checked on the host already: then no device memory is read before the launch, which
            keeps GPU decode steps free of syncs (see ``rows.prepare_row_inputs``).

    Returns:
        ``(updated hidden [N, D] in hidden's dtype, projections [N, K] float32 or None)``.

    Raises:
        ValueError: for malformed inputs (shapes, devices, index out of range, NaN coefficients or bounds,
            non-unit vectors used with a bound).
        RuntimeError: when an explicitly requested backend cannot run here.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    spec = prepare_row_inputs(hidden, table, index, coef, cap_min, cap_max, readout, validate=validate)
    name = resolve_backend(backend, hidden)
    if name == "cuda":
        return cuda_steer.steer_rows_cuda(hidden, spec, inplace=inplace)
    if name == "triton":
        rows_backend = _load_triton_rows()
        assert rows_backend is not None  # resolve_backend checked triton
        return rows_backend.steer_rows_triton(hidden, spec, inplace=inplace)
    return steer_rows_torch(hidden, spec, inplace=inplace)


# Registered last: the custom op's body resolves backends through the functions above.
from .custom_op import steer_project as steer_project_op  # noqa: E402
from .custom_op import steer_project_inline  # noqa: E402
from .custom_op import validate as validate_steer_inputs  # noqa: E402
