"""The CUDA per-row kernel launches at every width on every GPU generation it targets (issue 24, finding 7).

A block of T threads whose kernel needs R registers per thread launches only if R * T fits the SM's 65,536
registers. ptxas decides R per architecture; the launcher decides T per row width. Both are read from the
real code here, with nvcc and no GPU: ``nvcc --resource-usage`` for sm_80/90/100/120 (every hidden dtype, read-out
on and off) and the launcher's own block-size function, built into a shared library and called through ctypes.
Before the fix, sm_100/sm_120 gave the fp16/bf16 read-out kernels 80 registers with up to 1024 threads: widths
above 6400 could not launch.
"""

from __future__ import annotations

import pytest
from steerlib.kernels import cuda_steer

pytestmark = pytest.mark.skipif(cuda_steer.find_nvcc() is None, reason="nvcc not found (no CUDA toolkit)")

# Hidden widths of the models people steer (135M .. 70B) and every multiple of 64 between.
WIDTHS = sorted(set(range(576, 8193, 64)) | {576, 896, 2048, 2560, 3072, 3584, 4096, 5120, 7168, 8192})


@pytest.fixture(scope="module")
def resources() -> list[cuda_steer.KernelResources]:
    return cuda_steer.kernel_resources()


@pytest.fixture(scope="module")
def threads() -> dict[int, int]:
    return cuda_steer.launch_threads(WIDTHS)


def test_every_architecture_reports_every_kernel_instance(resources) -> None:
    for arch in cuda_steer.TARGET_ARCHS:
        names = {r.kernel for r in resources if r.arch == arch}
        # fp32 / fp16 / bf16 x read-out off / on
        assert len(names) == 6, (arch, sorted(names))


def test_launch_threads_are_whole_warps_within_block_limits(threads) -> None:
    for width, t in threads.items():
        assert t % 32 == 0 and 32 <= t <= cuda_steer.MAX_THREADS_PER_BLOCK, (width, t)


def test_registers_times_threads_fit_the_sm_at_every_width(resources, threads) -> None:
    worst = max(threads.values())
    too_big = [(r.arch, r.kernel, r.registers, width, t, r.registers_per_block(t))
               for r in resources for width, t in threads.items()
               if r.registers_per_block(t) > cuda_steer.REGISTERS_PER_SM]
    assert too_big == [], f"blocks that cannot launch (arch, kernel, regs, width, threads, regs/block): {too_big[:5]}"
    # The widest rows use the largest block; every instance must fit it, read-out on included.
    assert all(r.registers_per_block(worst) <= cuda_steer.REGISTERS_PER_SM for r in resources)


def test_register_rounding_matches_the_hardware_rule() -> None:
    r = cuda_steer.KernelResources("sm_90", "k", registers=57, spill_bytes=0)
    assert r.registers_per_block(512) == 64 * 512  # 57 rounds up to 64 per thread
    assert r.registers_per_block(100) == 64 * 128  # 100 threads occupy 4 warps
    old = cuda_steer.KernelResources("sm_120", "k", registers=80, spill_bytes=0)
    assert old.registers_per_block(1024) > cuda_steer.REGISTERS_PER_SM  # the launch that failed before
