"""JIT loader and launcher for the CUDA C++ kernel (``steer_cuda.cu`` + ``steer_binding.cpp``).

The extension is built with ``torch.utils.cpp_extension.load`` by ``steerlib.kernels.prepare_backend`` (called
when a server, engine or vLLM worker starts, never inside a forward pass), and only where a CUDA GPU and nvcc both
exist; torch caches the build across processes. A failed build is remembered, not retried, and turned into a
clear error by ``prepare_backend``: no caller silently falls back to another kernel (ranks of one model must all
run the same one).
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from .rows import RowSteerSpec, allocate_outputs

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
        except Exception as exc:  # remembered: prepare_backend reports it as one clear error
            _build_error = f"{type(exc).__name__}: {exc}"
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


# What every architecture the kernel targets gives one block: registers per SM (and so per block), the most
# threads per block, and the granularity registers are allocated in (per thread, 256 per warp).
REGISTERS_PER_SM = 65536
MAX_THREADS_PER_BLOCK = 1024
REGISTER_ALLOCATION_UNIT = 8
TARGET_ARCHS = ("sm_80", "sm_90", "sm_100", "sm_120")

_PTXAS_ENTRY = re.compile(r"Compiling entry function '(?P<name>[^']+)' for '(?P<arch>sm_\d+a?)'")
_PTXAS_USED = re.compile(r"Used (?P<regs>\d+) registers")
_PTXAS_SPILL = re.compile(r"(?P<stores>\d+) bytes spill stores, (?P<loads>\d+) bytes spill loads")


@dataclass(frozen=True)
class KernelResources:
    """What ptxas gave one compiled instance of the per-row kernel on one architecture.

    Attributes:
        arch: e.g. ``"sm_90"``.
        kernel: the (mangled) kernel name; one instance per hidden dtype and read-out on/off.
        registers: registers per thread.
        spill_bytes: bytes of register spill stores (0 when everything fits in registers).
    """

    arch: str
    kernel: str
    registers: int
    spill_bytes: int

    def registers_per_block(self, threads: int) -> int:
        """Registers a block of ``threads`` threads takes, rounded as the hardware allocates them."""
        unit = REGISTER_ALLOCATION_UNIT
        return -(-self.registers // unit) * unit * (-(-threads // 32) * 32)


def kernel_resources(archs: tuple[str, ...] = TARGET_ARCHS, nvcc: str | None = None) -> list[KernelResources]:
    """Compile ``steer_cuda.cu`` for ``archs`` with ``nvcc --resource-usage`` and parse what ptxas reports.

    Needs nvcc only (no GPU). One nvcc run for all architectures.

    Raises:
        RuntimeError: without nvcc, when nvcc fails, or when an architecture reports no kernel.
    """
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    gencode = [f"-gencode=arch=compute_{a[3:]},code={a}" for a in archs]
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run([nvcc, "--resource-usage", "-std=c++17", "-O3", *gencode, "-c", str(CUDA_SOURCE),
                                 "-o", str(Path(tmp) / "steer_cuda.o")], capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"nvcc failed:\n{result.stdout}\n{result.stderr}")
    found: list[KernelResources] = []
    entry: tuple[str, str] | None = None
    spill = 0
    for line in (result.stdout + result.stderr).splitlines():
        if m := _PTXAS_ENTRY.search(line):
            entry, spill = (m["arch"], m["name"]), 0
        elif (m := _PTXAS_SPILL.search(line)) and entry is not None:
            spill = int(m["stores"])
        elif (m := _PTXAS_USED.search(line)) and entry is not None:
            found.append(KernelResources(entry[0], entry[1], int(m["regs"]), spill))
            entry = None
    missing = [a for a in archs if not any(r.arch == a for r in found)]
    if missing:
        raise RuntimeError(f"ptxas reported no kernel for {', '.join(missing)}:\n{result.stdout}\n{result.stderr}")
    return found


def launch_threads(widths: list[int], nvcc: str | None = None) -> dict[int, int]:
    """The block size the CUDA launcher picks for each row width, asked of the compiled launcher itself.

    The launcher's host code is built into a small shared library (no GPU needed: nothing is launched) and its
    ``steer_rows_cuda_threads`` is called through ctypes, so the answer is the code's, not a copy of its rule.
    """
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    with tempfile.TemporaryDirectory() as tmp:
        lib_path = Path(tmp) / "steer_threads.so"
        result = subprocess.run([nvcc, "-shared", "-Xcompiler", "-fPIC", "-std=c++17", "-arch=sm_80",
                                 str(CUDA_SOURCE), "-o", str(lib_path)], capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            raise RuntimeError(f"nvcc failed:\n{result.stdout}\n{result.stderr}")
        lib = ctypes.CDLL(str(lib_path))
        fn = lib.steer_rows_cuda_threads
        fn.argtypes, fn.restype = [ctypes.c_int64], ctypes.c_int
        return {w: int(fn(w)) for w in widths}
