"""JIT loader and launcher for the CUDA C++ kernel (``steer_cuda.cu`` + ``steer_binding.cpp``).

The extension is built with ``torch.utils.cpp_extension.load`` the first time it is needed,
and only where a CUDA GPU and nvcc both exist; torch caches the build across processes. A
failed build is remembered (and warned about once) so callers fall back without retrying.
"""

from __future__ import annotations

import os
import shutil
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch

from .reference import allocate_outputs
from .rows import RowSteerSpec

KERNEL_DIR = Path(__file__).resolve().parent
CUDA_SOURCE = KERNEL_DIR / "steer_cuda.cu"
BINDING_SOURCE = KERNEL_DIR / "steer_binding.cpp"
_EXTENSION_NAME = "steerlib_steer_cuda"

_lock = threading.Lock()
_extension: ModuleType | None = None
_build_error: str | None = None


def find_nvcc() -> str | None:
    """Path of nvcc: ``$CUDA_HOME/bin/nvcc`` (as torch resolves it), else the one on PATH."""
    try:
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception:  # pragma: no cover - torch builds without cpp_extension support
        CUDA_HOME = None
    if CUDA_HOME:
        candidate = Path(CUDA_HOME) / "bin" / "nvcc"
        if candidate.exists():
            return str(candidate)
    return shutil.which("nvcc")


def toolchain_available() -> bool:
    """Whether the extension could be built here: a CUDA GPU, a CUDA torch and nvcc."""
    return torch.cuda.is_available() and torch.version.cuda is not None and find_nvcc() is not None


def build_error() -> str | None:
    """The error from the last failed build attempt, if any."""
    return _build_error


def load_extension() -> ModuleType | None:
    """Build (or fetch from torch's cache) and import the extension.

    Returns:
        The extension module, or None when there is no toolchain or the build failed.
    """
    global _extension, _build_error
    if _extension is not None or _build_error is not None:
        return _extension
    with _lock:
        if _extension is not None or _build_error is not None:
            return _extension
        if not toolchain_available():
            _build_error = "no CUDA GPU, CUDA build of torch or nvcc"
            return None
        try:
            from torch.utils.cpp_extension import load

            _extension = load(
                name=_EXTENSION_NAME,
                sources=[str(BINDING_SOURCE), str(CUDA_SOURCE)],
                extra_cflags=["-O3"],
                # No --use_fast_math: the clamp and projections should match the reference.
                extra_cuda_cflags=["-O3", "-lineinfo"],
                verbose=os.environ.get("STEERLIB_VERBOSE_BUILD", "0") == "1",
            )
        except Exception as exc:  # a broken toolchain must not take the caller down
            _build_error = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"steerlib: building the CUDA steer kernel failed, falling back ({_build_error})",
                          RuntimeWarning, stacklevel=2)
    return _extension


def steer_rows_cuda(hidden: torch.Tensor, spec: RowSteerSpec, inplace: bool = True,
                    gate_out: torch.Tensor | None = None,
                    proj_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the per-row op (``rows.py``) with the CUDA extension.

    Args:
        hidden: ``[N, D]`` CUDA hidden states.
        spec: Output of ``prepare_row_inputs`` for this ``hidden``.
        inplace: Write the result into ``hidden`` instead of a new tensor.
        gate_out: Optional ``[N]`` bool buffer that receives which rows' gates were open.

    Returns:
        ``(updated hidden [N, D], projections [N, K] fp32 or None)``.

    Raises:
        RuntimeError: if the extension is unavailable (see ``build_error()``).
    """
    ext = load_extension()
    if ext is None:
        raise RuntimeError(f"CUDA steer kernel unavailable: {_build_error}")
    n, d = hidden.shape
    k = spec.num_readouts
    out, proj = allocate_outputs(hidden, k, inplace, proj_out)
    if n == 0 or d == 0:
        return out, proj
    if gate_out is not None and not spec.has_gate:
        gate_out.fill_(True)  # no gates: every row is open
    ext.steer_rows(hidden, out, spec.table, spec.index, spec.coef, spec.cap_min, spec.cap_max, spec.has_cap,
                   spec.readout, proj, spec.gate_dir, spec.gate_index, spec.gate_lo, spec.gate_hi,
                   gate_out if spec.has_gate else None)
    return out, proj
