"""The input contract of the single-vector API, the helpers every backend shares, and a plain oracle.

There is one op, the per-row op (``rows.py``, with Triton and CUDA twins); ``fused_steer_project`` validates its
single-vector arguments here (``prepare_inputs``) and then lowers them to per-row calls. The vector checks
(finite, unit norm where a bound needs it) are cached per tensor so that steady-state decoding does not sync.

Single-vector math per row ``h`` with mask ``m`` (1 = steer this row, 0 = leave it)::

    h1   = h + m * alpha * v
    p    = <h1, u>
    h2   = h1 + m * (clamp(p, lo, hi) - p) * u
    proj = h2 @ readout.T

Everything is accumulated in fp32. ``hidden`` is written back in its own dtype, while the
projections are taken from the fp32 ``h2`` *before* it is rounded to that dtype: the read-out
then reflects the exact update rather than bf16 rounding noise (the difference is at most one
ulp of the stored dtype per element), and the kernels can compute it without re-reading memory.
``steer_project_reference`` writes that math out plainly for the tests.
"""

from __future__ import annotations

import math
import threading
import weakref
from dataclasses import dataclass

import torch

MAX_READOUT_DIRS = 16
HIDDEN_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# fp16/bf16 vectors normalised in fp32 then rounded still have norms within ~1e-3 of one.
UNIT_NORM_TOL = 1e-2


@dataclass(frozen=True)
class SteerSpec:
    """Validated, backend-ready arguments: every tensor fp32, contiguous, on ``hidden``'s device.

    Attributes:
        steer: ``[D]`` steering vector or None (no add).
        alpha: Steering coefficient; 0.0 when ``steer`` is None.
        mask: ``[N]`` fp32 row mask or None (every row is steered and capped).
        cap_dir: ``[D]`` unit direction or None (no cap).
        cap_min: Lower clamp bound or None (unbounded).
        cap_max: Upper clamp bound or None (unbounded).
        readout: ``[K, D]`` read-out directions or None.
    """

    steer: torch.Tensor | None
    alpha: float
    mask: torch.Tensor | None
    cap_dir: torch.Tensor | None
    cap_min: float | None
    cap_max: float | None
    readout: torch.Tensor | None

    @property
    def has_cap(self) -> bool:
        """Whether the clamp step does anything (a direction and at least one bound)."""
        return self.cap_dir is not None and (self.cap_min is not None or self.cap_max is not None)

    @property
    def num_readouts(self) -> int:
        """Number of readout directions K (0 when there is no readout)."""
        return 0 if self.readout is None else int(self.readout.shape[0])


def _version_of(t: torch.Tensor) -> int | None:
    """The tensor's in-place version counter, or None for inference tensors (which have none)."""
    return None if t.is_inference() else t._version


class _VectorCache:
    """Remembers vectors already checked (finite, unit norm) and their fp32 copies.

    Steering and readout vectors are reused for every token and layer, and the checks need
    a device->host sync on GPU. Entries are keyed by ``id`` and guarded by a weak reference
    plus the tensor's version counter, so in-place edits or a recycled id force a re-check,
    and an entry disappears with its tensor. Inference-mode tensors have no version counter;
    they are checked once, so an in-place edit made to one inside ``torch.inference_mode``
    is not re-checked (re-checking every call would put a GPU sync in every decode step).
    """

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref, int | None, bool, torch.Tensor | None]] = {}
        self._lock = threading.Lock()

    def get(self, t: torch.Tensor, unit: bool) -> torch.Tensor | None:
        """Return the cached fp32 copy of ``t`` (``t`` itself if it needed none), or None.

        Args:
            t: The user's tensor.
            unit: The caller needs the unit-norm check to have passed too.
        """
        entry = self._entries.get(id(t))
        if entry is None:
            return None
        ref, version, unit_ok, converted = entry
        if ref() is not t or version != _version_of(t) or (unit and not unit_ok):
            return None
        return t if converted is None else converted

    def put(self, t: torch.Tensor, converted: torch.Tensor, unit: bool) -> None:
        """Record that ``t`` passed its checks and that ``converted`` is its fp32 form.

        Args:
            t: The user's tensor.
            converted: Its contiguous fp32 form.
            unit: Whether the unit-norm check was run (and passed).
        """
        key = id(t)

        def _drop(_ref: weakref.ref, key: int = key) -> None:
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None and entry[0] is _ref:
                    del self._entries[key]

        # Storing ``t`` itself would keep it alive forever, so "no conversion" is None.
        stored = None if converted is t else converted
        with self._lock:
            self._entries[key] = (weakref.ref(t, _drop), _version_of(t), unit, stored)


_VECTORS = _VectorCache()


def prepare_vector(name: str, t: torch.Tensor, shape: tuple[int, ...], device: torch.device,
                    unit: bool = False, check_values: bool = True) -> torch.Tensor:
    """Check one steering/cap/readout tensor and return it as contiguous fp32.

    Args:
        name: Argument name used in error messages.
        t: The user's tensor.
        shape: Expected shape.
        device: ``hidden``'s device.
        unit: Also require every row to have unit L2 norm.
        check_values: Check the values (finite, unit norm) once per tensor version (a host read on a GPU).
            ``False`` checks shape, device and dtype only and reads no device memory: for callers whose values
            were checked on the host when they were written (a steering plan's tables), and for ops that run
            inside a captured graph, where a read back is not allowed.

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
    cached = _VECTORS.get(t, unit)
    if cached is not None:
        return cached
    converted = t.to(torch.float32).contiguous()
    if not bool(torch.isfinite(converted).all()):
        raise ValueError(f"{name} contains NaN or inf values")
    if unit:
        norms = torch.linalg.vector_norm(converted, dim=-1).flatten()
        worst = int((norms - 1.0).abs().argmax())
        if abs(float(norms[worst]) - 1.0) > UNIT_NORM_TOL:
            raise ValueError(f"{name} must have unit L2 norm, got norm {float(norms[worst]):.4g} "
                             f"(normalise it first: v / v.norm())")
    _VECTORS.put(t, converted, unit)
    return converted


def _check_bound(name: str, value: float | None) -> float | None:
    """Reject NaN bounds; infinite bounds are the same as None."""
    if value is None:
        return None
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} is NaN")
    return None if math.isinf(value) else value


def prepare_inputs(hidden: torch.Tensor, steer_vec: torch.Tensor | None = None, alpha: float = 0.0,
                   row_mask: torch.Tensor | None = None, cap_dir: torch.Tensor | None = None,
                   cap_min: float | None = None, cap_max: float | None = None,
                   readout: torch.Tensor | None = None) -> SteerSpec:
    """Validate the arguments of ``fused_steer_project`` and normalise them for any backend.

    Args:
        hidden: ``[N, D]`` fp32/fp16/bf16 hidden states with unit stride along D.
        steer_vec: ``[D]`` vector added as ``alpha * v`` to masked rows, or None.
        alpha: Steering coefficient (ignored when ``steer_vec`` is None).
        row_mask: ``[N]`` bool or numeric row mask, or None for every row.
        cap_dir: ``[D]`` unit direction whose projection is clamped, or None.
        cap_min: Lower bound on the projection, or None.
        cap_max: Upper bound on the projection, or None.
        readout: ``[K, D]`` directions (K <= 16) read out after the update, or None.

    Returns:
        A ``SteerSpec`` with fp32 contiguous tensors on ``hidden``'s device.

    Raises:
        ValueError: naming the offending argument and what is wrong with it.
    """
    if not isinstance(hidden, torch.Tensor):
        raise ValueError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D [N, D] (flatten [B, T, D] with .view(-1, D)), "
                         f"got shape {list(hidden.shape)}")
    if hidden.dtype not in HIDDEN_DTYPES:
        raise ValueError(f"hidden must be float32, float16 or bfloat16, got {hidden.dtype}")
    n, d = hidden.shape
    if d > 1 and hidden.stride(1) != 1:
        raise ValueError("hidden rows must be contiguous (stride 1 along D); call .contiguous() first")
    device = hidden.device

    alpha = float(alpha)
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha}")
    steer = None
    if steer_vec is not None:
        steer = prepare_vector("steer_vec", steer_vec, (d,), device)
    else:
        alpha = 0.0

    mask = None
    if row_mask is not None:
        if not isinstance(row_mask, torch.Tensor):
            raise ValueError(f"row_mask must be a torch.Tensor, got {type(row_mask).__name__}")
        if row_mask.device != device:
            raise ValueError(f"row_mask is on {row_mask.device} but hidden is on {device}")
        if tuple(row_mask.shape) != (n,):
            raise ValueError(f"row_mask must have shape [{n}] (one entry per row of hidden), "
                             f"got {list(row_mask.shape)}")
        if row_mask.is_complex():
            raise ValueError(f"row_mask must be bool or real, got {row_mask.dtype}")
        mask = row_mask.to(torch.float32).contiguous()

    cap_min = _check_bound("cap_min", cap_min)
    cap_max = _check_bound("cap_max", cap_max)
    if cap_min is not None and cap_max is not None and cap_min > cap_max:
        raise ValueError(f"cap_min ({cap_min}) must be <= cap_max ({cap_max})")
    u = None
    if cap_dir is not None:
        u = prepare_vector("cap_dir", cap_dir, (d,), device, unit=True)
    elif cap_min is not None or cap_max is not None:
        raise ValueError("cap_min/cap_max were given but cap_dir is None")

    mon = None
    if readout is not None:
        if not isinstance(readout, torch.Tensor):
            raise ValueError(f"readout must be a torch.Tensor, got {type(readout).__name__}")
        if readout.dim() != 2:
            raise ValueError(f"readout must be 2-D [K, D], got shape {list(readout.shape)} "
                             f"(use readout[None] for a single direction)")
        k = readout.shape[0]
        if k == 0 or k > MAX_READOUT_DIRS:
            raise ValueError(f"readout must have 1 to {MAX_READOUT_DIRS} directions, got K={k}")
        mon = prepare_vector("readout", readout, (k, d), device)

    return SteerSpec(steer=steer, alpha=alpha, mask=mask, cap_dir=u, cap_min=cap_min, cap_max=cap_max,
                     readout=mon)


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


def steer_project_reference(hidden: torch.Tensor, steer_vec: torch.Tensor | None = None, alpha: float = 0.0,
                            row_mask: torch.Tensor | None = None, cap_dir: torch.Tensor | None = None,
                            cap_min: float | None = None, cap_max: float | None = None,
                            readout: torch.Tensor | None = None,
                            inplace: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The single-vector math in plain torch, for tests to compare every backend against.

    Production code never calls this: ``fused_steer_project`` lowers to the per-row op (``rows.py``).

    Args:
        hidden: ``[N, D]`` fp32/fp16/bf16 hidden states.
        steer_vec: ``[D]`` steering vector, or None.
        alpha: Steering coefficient.
        row_mask: ``[N]`` row mask, or None for every row.
        cap_dir: ``[D]`` unit cap/ablation direction, or None.
        cap_min: Lower projection bound, or None.
        cap_max: Upper projection bound, or None.
        readout: ``[K, D]`` read-out directions, or None.
        inplace: Write into ``hidden``.

    Returns:
        ``(updated hidden, projections [N, K] fp32 or None)``.
    """
    spec = prepare_inputs(hidden, steer_vec, alpha, row_mask, cap_dir, cap_min, cap_max, readout)
    # The math written as plainly as possible, with no in-place tricks: an oracle, not a production path.
    h = hidden.float()
    m = spec.mask[:, None] if spec.mask is not None else 1.0
    if spec.steer is not None:
        h = h + m * spec.alpha * spec.steer
    if spec.has_cap:
        p = h @ spec.cap_dir
        h = h + m * (p.clamp(min=spec.cap_min, max=spec.cap_max) - p)[:, None] * spec.cap_dir
    proj = h @ spec.readout.T if spec.readout is not None else None
    if inplace:
        return hidden.copy_(h), proj
    return h.to(hidden.dtype), proj
