"""Fused activation-steering kernels: one per-row op that adds a steering vector, caps or ablates a
direction and reads out trait projections in one pass over the hidden states.

This folder sits at the top of the repository (beside ``steerlib/``) and is installed as
``steerlib.kernels`` by the one ``package-dir`` entry in ``pyproject.toml``; the wheel carries its ``.cu`` and
``.cpp`` sources too. It imports nothing from steerlib (an import-linter contract checks that), so the
kernels can be read, tested and benchmarked on their own. The steering plan imports it
(``steerlib/steering/plan.py``).

There is one op, the per-row op (``rows.py``): every token picks a row of a ``[V, D]`` table, a coefficient and
cap bounds. It has three backends: ``torch`` (plain torch, any device; the CPU production path and the
reference), ``triton`` (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``) and ``cuda`` (a CUDA C++ extension
JIT-built on first use). Triton is imported only when the triton backend is used. Entry points:

One op, one naming scheme: every name of the op is ``steer_rows`` with what distinguishes it.

* ``fused_steer_rows``: the checked Python call (values validated unless ``validate=False``);
* ``steer_rows_reference``: the same arguments, validated, computed with plain torch ops (what the tests compare
  every backend against); ``steer_rows_torch`` / ``_triton`` / ``_cuda`` are the backends behind both;
* ``torch.ops.steerlib.steer_rows_`` / ``steer_rows`` (``custom_op.py``; ``steer_rows_`` and ``steer_rows_op``
  here), and ``steer_rows_inline``: the op registered with ``torch.library`` (in place into caller-owned
  buffers / functional) and the same math as inline torch ops, for compiled and captured graphs;
* ``prepare_backend``: the backend is chosen **once per process and device type**, built and loaded there (the
  CUDA extension's nvcc build included), and every ``backend="auto"`` call afterwards runs it. Servers, engines
  and the vLLM worker call it at start, so no build happens inside a forward pass, and a vLLM worker checks with
  its peers that every rank chose the same kernel. ``STEERLIB_KERNEL_BACKEND`` (torch, triton, cuda) forces the
  choice; a forced backend that cannot run, or a CUDA build that fails, is an error, never a silent fallback.

::

    flat = hidden.view(-1, hidden.shape[-1])             # [N, D]
    flat, proj = fused_steer_rows(flat, table, index, coef, readout=dirs)
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
from dataclasses import dataclass
from types import ModuleType

import torch

from . import cuda_steer
from .rows import (
    MAX_READOUT_DIRS,
    RowSteerSpec,
    check_gate_out,
    prepare_row_inputs,
    steer_rows_reference,
    steer_rows_torch,
)

__all__ = [
    "MAX_READOUT_DIRS",
    "RowSteerSpec",
    "BackendChoice",
    "available_backends",
    "chosen_backend",
    "fused_steer_rows",
    "prepare_backend",
    "prepare_row_inputs",
    "steer_rows_",
    "steer_rows_inline",
    "steer_rows_op",
    "steer_rows_reference",
    "steer_rows_torch",
]

BACKENDS = ("auto", "torch", "triton", "cuda")
BACKEND_ENV = "STEERLIB_KERNEL_BACKEND"

log = logging.getLogger("steerlib.kernels")

_triton_module: ModuleType | None = None
_triton_error: str | None = None


def load_triton_rows() -> ModuleType | None:
    """Import the triton backend on first use; None (and the reason remembered) if it fails."""
    global _triton_module, _triton_error
    if _triton_module is None and _triton_error is None:
        if importlib.util.find_spec("triton") is None:
            _triton_error = "triton is not installed (pip install 'steerlib[triton]')"
        else:
            try:
                from . import triton_rows

                _triton_module = triton_rows
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
    itself happens in ``prepare_backend``.

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


@dataclass(frozen=True)
class BackendChoice:
    """The kernel backend this process runs on one device type, chosen once by ``prepare_backend``.

    Attributes:
        device_type: ``"cuda"``, ``"cpu"``...
        name: ``"torch"``, ``"triton"`` or ``"cuda"``.
        requested: what was asked for: ``"auto"`` or a backend name.
        source: where the request came from: ``"argument"``, ``"STEERLIB_KERNEL_BACKEND"`` or ``"default"``.
        reason: why ``name`` was chosen, in words (what a log or a status page shows).
    """

    device_type: str
    name: str
    requested: str
    source: str
    reason: str

    def __str__(self) -> str:
        return f"{self.name} on {self.device_type} ({self.reason}; requested {self.requested} by {self.source})"


_choices: dict[str, BackendChoice] = {}
_choice_lock = threading.Lock()


def _requested(backend: str | None) -> tuple[str, str]:
    """``(requested backend, source)`` from the argument, else the environment, else ``auto``."""
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
        return backend, "argument"
    env = os.environ.get(BACKEND_ENV, "").strip()
    if env:
        if env not in BACKENDS:
            raise ValueError(f"{BACKEND_ENV}={env!r} is not a kernel backend; use one of {', '.join(BACKENDS)}")
        return env, BACKEND_ENV
    return "auto", "default"


def _choose(device: torch.device, requested: str, source: str) -> BackendChoice:
    """Decide and load the backend for ``device``'s type (may build the CUDA extension: seconds to minutes)."""
    def made(name: str, reason: str) -> BackendChoice:
        return BackendChoice(device.type, name, requested, source, reason)

    if requested == "torch":
        return made("torch", "forced")
    if requested == "cuda":
        if device.type != "cuda":
            raise ValueError(f"backend 'cuda' (from {source}) needs a CUDA device, got {device}")
        if cuda_steer.load_extension() is None:
            raise RuntimeError(f"backend 'cuda' (from {source}) is unavailable: {cuda_steer.build_error()}")
        return made("cuda", "forced; extension built and loaded")
    if requested == "triton":
        if not _triton_usable_on(device):
            raise RuntimeError(f"backend 'triton' (from {source}) needs a CUDA device, or CPU with TRITON_INTERPRET=1 "
                               f"set before triton is first used; got {device}")
        if load_triton_rows() is None:
            raise RuntimeError(f"backend 'triton' (from {source}) is unavailable: {_triton_error}")
        return made("triton", "forced")
    # auto: decided from what is installed, never from whether a build happened to succeed, so that identical
    # ranks decide alike; a build that fails is an error for the operator, not a quiet switch on one rank.
    if device.type != "cuda":
        return made("torch", f"no GPU kernel runs on {device.type}")
    if cuda_steer.toolchain_available():
        if cuda_steer.load_extension() is None:
            raise RuntimeError(
                f"building the CUDA steer kernel failed: {cuda_steer.build_error()}. steerlib does not fall back "
                f"on its own (every rank must run the same kernel): fix the CUDA toolchain, or set "
                f"{BACKEND_ENV}=triton (or torch) for every process")
        return made("cuda", "nvcc found; extension built and loaded")
    if load_triton_rows() is not None:
        return made("triton", "no nvcc for the CUDA extension; triton is installed")
    return made("torch", f"no nvcc and no triton ({_triton_error})")


def prepare_backend(device: torch.device | str, backend: str | None = None, *, group=None) -> BackendChoice:
    """Choose, build and load the kernel backend for ``device``'s type, once per process; call it before serving.

    The first call per device type decides (``backend``, else ``$STEERLIB_KERNEL_BACKEND``, else ``auto``: the
    CUDA extension where nvcc exists, else Triton, else torch on a GPU; torch elsewhere), builds what it needs and
    logs the choice; later calls return it. Every ``backend="auto"`` op call runs the choice (calls under
    autograd stay on torch, the only backend with a backward).

    Args:
        device: a device the model's layers live on.
        backend: force a backend (``"torch"``, ``"triton"``, ``"cuda"``) or ``"auto"``; None reads the environment.
        group: a ``torch.distributed`` process group (a CPU/gloo one) whose ranks must all run the same backend;
            when given and initialised, the ranks exchange their choices and all raise if they differ.

    Returns:
        The ``BackendChoice``.

    Raises:
        ValueError: for an unknown backend name, or ``cuda`` on a non-CUDA device.
        RuntimeError: when a forced backend cannot run here, the CUDA build fails, another backend was already
            chosen for this device type in this process, or ranks chose differently.
    """
    device = torch.device(device)
    requested, source = _requested(backend)
    with _choice_lock:
        choice = _choices.get(device.type)
        if choice is None:
            choice = _choices[device.type] = _choose(device, requested, source)
            log.info("steerlib kernel backend: %s", choice)
        elif requested != "auto" and requested != choice.name:
            raise RuntimeError(f"this process already runs the {choice.name!r} kernel backend on {device.type} "
                               f"({choice}); it cannot switch to {requested!r} (the choice is made once per process)")
    if group is not None:
        _agree_across_ranks(choice, group)
    return choice


def chosen_backend(device_type: str) -> BackendChoice | None:
    """The choice ``prepare_backend`` made for ``device_type`` in this process, or None yet."""
    return _choices.get(device_type)


def _agree_across_ranks(choice: BackendChoice, group) -> None:
    """Every rank of ``group`` must have chosen the same backend (one exchange, at start)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) <= 1:
        return
    names: list[str | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(names, f"{choice.name} on {choice.device_type}", group=group)
    if len(set(names)) > 1:
        ranks = ", ".join(f"rank {i}: {n}" for i, n in enumerate(names))
        raise RuntimeError(f"ranks chose different steering kernel backends ({ranks}); set {BACKEND_ENV} to the "
                           "same value for every process")


def resolve_backend(backend: str, hidden: torch.Tensor) -> str:
    """Turn the requested backend into the one that will run, or explain why it cannot.

    Args:
        backend: One of ``BACKENDS``. ``"auto"`` is the process's choice for ``hidden``'s device type
            (``prepare_backend``; made on first use if nothing prepared it).
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
        if needs_grad:
            return "torch"
        choice = _choices.get(device.type)
        return (choice or prepare_backend(device)).name
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
    if load_triton_rows() is None:
        raise RuntimeError(f"backend='triton' is unavailable: {_triton_error}")
    return "triton"


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
    gate_dir: torch.Tensor | None = None,
    gate_index: torch.Tensor | None = None,
    gate_lo: torch.Tensor | None = None,
    gate_hi: torch.Tensor | None = None,
    gate_out: torch.Tensor | None = None,
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
        backend: ``"auto"`` (the process's choice, see ``prepare_backend``: on CUDA tensors the cuda extension
            where nvcc exists, else triton, else torch; CPU: torch), ``"torch"``, ``"triton"`` or ``"cuda"``.
        validate: Check the per-row values (one host read of the small per-row tensors). Pass ``False`` only
            with values checked on the host already: then no device memory is read before the launch, which
            keeps GPU decode steps free of syncs (see ``rows.prepare_row_inputs``).
        gate_dir: ``[G, D]`` unit condition directions, or None (no gates). A gated row is edited only when
            ``gate_lo[row] <= <h, gate_dir[gate_index[row]]> <= gate_hi[row]`` on the row before its edit.
        gate_index: ``[N]`` entry of ``gate_dir`` per row, ``-1`` for an ungated (open) row.
        gate_lo: ``[N]`` lower gate bound per row (None or ``-inf``: unbounded).
        gate_hi: ``[N]`` upper gate bound per row (None or ``+inf``: unbounded).
        gate_out: ``[N]`` bool buffer that receives which rows' gates were open, or None.

    Returns:
        ``(updated hidden [N, D] in hidden's dtype, projections [N, K] float32 or None)``.

    Raises:
        ValueError: for malformed inputs (shapes, devices, index out of range, NaN coefficients or bounds,
            non-unit vectors used with a bound).
        RuntimeError: when an explicitly requested backend cannot run here.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    spec = prepare_row_inputs(hidden, table, index, coef, cap_min, cap_max, readout, validate=validate,
                              gate_dir=gate_dir, gate_index=gate_index, gate_lo=gate_lo, gate_hi=gate_hi)
    check_gate_out(gate_out, hidden)
    return run_rows(resolve_backend(backend, hidden), hidden, spec, inplace=inplace, gate_out=gate_out)


def run_rows(name: str, hidden: torch.Tensor, spec: RowSteerSpec, *, inplace: bool,
             gate_out: torch.Tensor | None,
             proj_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run prepared per-row inputs on the backend ``name`` (from ``resolve_backend``): the one dispatch. With
    ``proj_out`` (``[N, K]`` fp32 contiguous) the read-out is written there and nothing is allocated for it."""
    if name == "cuda":
        return cuda_steer.steer_rows_cuda(hidden, spec, inplace=inplace, gate_out=gate_out, proj_out=proj_out)
    if name == "triton":
        rows_backend = load_triton_rows()
        assert rows_backend is not None  # resolve_backend checked triton
        return rows_backend.steer_rows_triton(hidden, spec, inplace=inplace, gate_out=gate_out, proj_out=proj_out)
    return steer_rows_torch(hidden, spec, inplace=inplace, gate_out=gate_out, proj_out=proj_out)


# Registered last: the custom op's body resolves backends through the functions above.
from .custom_op import steer_rows as steer_rows_op  # noqa: E402
from .custom_op import steer_rows_, steer_rows_inline  # noqa: E402
