"""The kernel backend is chosen once per process, reported, honoured when forced, and the same on every rank.

A vLLM server with tensor parallelism runs one process per rank; if ``auto`` could pick the CUDA extension on
one rank and fall back to Triton on another (a build that failed there), the ranks would drift apart. So the
choice is made once (``prepare_backend``, called at start), a failed build is an error instead of a fallback,
and ranks that chose differently refuse to start.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from steerlib.kernels import cuda_steer, prepare_backend, steer_rows_reference

from steerlib import kernels


@pytest.fixture(autouse=True)
def fresh_choice(monkeypatch):
    """Each test starts as a new process would: nothing chosen, no backend forced by the environment."""
    monkeypatch.setattr(kernels, "_choices", {})
    monkeypatch.delenv(kernels.BACKEND_ENV, raising=False)


def test_the_choice_is_made_once_and_reported(caplog) -> None:
    with caplog.at_level(logging.INFO, logger="steerlib.kernels"):
        first = prepare_backend("cpu")
        again = prepare_backend(torch.device("cpu"))
    assert first is again
    assert (first.name, first.requested, first.source) == ("torch", "auto", "default")
    assert kernels.chosen_backend("cpu") is first
    reports = [r.getMessage() for r in caplog.records if r.name == "steerlib.kernels"]
    assert reports == [f"steerlib kernel backend: {first}"]
    assert "torch on cpu" in reports[0]


def test_a_backend_forced_by_the_environment_is_honoured(monkeypatch) -> None:
    monkeypatch.setenv(kernels.BACKEND_ENV, "torch")
    choice = prepare_backend("cpu")
    assert (choice.name, choice.requested, choice.source) == ("torch", "torch", kernels.BACKEND_ENV)


def test_a_bad_environment_value_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setenv(kernels.BACKEND_ENV, "fast")
    with pytest.raises(ValueError, match=r"STEERLIB_KERNEL_BACKEND='fast' is not a kernel backend; use one of auto, "):
        prepare_backend("cpu")


def test_a_forced_backend_that_cannot_run_here_fails_at_start(monkeypatch) -> None:
    with pytest.raises(ValueError, match=r"backend 'cuda' \(from argument\) needs a CUDA device, got cpu"):
        prepare_backend("cpu", "cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv(kernels.BACKEND_ENV, "triton")
    with pytest.raises(RuntimeError, match=r"backend 'triton' \(from STEERLIB_KERNEL_BACKEND\) needs a CUDA device"):
        prepare_backend("cpu")
    assert kernels.chosen_backend("cpu") is None


def test_the_choice_cannot_change_later_in_the_process() -> None:
    prepare_backend("cpu", "torch")
    assert prepare_backend("cpu", "auto").name == "torch"
    with pytest.raises(RuntimeError, match=r"already runs the 'torch' kernel backend on cpu .* cannot switch to "
                                           r"'triton' \(the choice is made once per process\)"):
        prepare_backend("cpu", "triton")


def test_a_failed_cuda_build_is_an_error_not_a_triton_fallback(monkeypatch) -> None:
    # What a GPU rank whose nvcc build breaks sees (no GPU is needed to decide: the toolchain and build are faked).
    monkeypatch.setattr(cuda_steer, "toolchain_available", lambda: True)
    monkeypatch.setattr(cuda_steer, "load_extension", lambda: None)
    monkeypatch.setattr(cuda_steer, "build_error", lambda: "CalledProcessError: nvcc exited with 1")
    with pytest.raises(RuntimeError, match=r"^building the CUDA steer kernel failed: CalledProcessError: nvcc exited "
                                           r"with 1\. steerlib does not fall back on its own"):
        prepare_backend(torch.device("cuda"))
    assert kernels.chosen_backend("cuda") is None
    # The way out is explicit and the same for every rank.
    monkeypatch.setenv(kernels.BACKEND_ENV, "torch")
    assert prepare_backend(torch.device("cuda")).name == "torch"


def test_auto_calls_without_nvcc_on_a_gpu_take_triton_then_torch(monkeypatch) -> None:
    monkeypatch.setattr(cuda_steer, "toolchain_available", lambda: False)
    monkeypatch.setattr(kernels, "load_triton_rows", lambda: object())
    assert prepare_backend(torch.device("cuda")).name == "triton"
    monkeypatch.setattr(kernels, "_choices", {})
    monkeypatch.setattr(kernels, "load_triton_rows", lambda: None)
    assert prepare_backend(torch.device("cuda")).name == "torch"


# Triton interprets kernels on CPU only when TRITON_INTERPRET is set before it is first imported (make test sets it).
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@pytest.mark.skipif(not INTERPRETING, reason="needs TRITON_INTERPRET=1 from the start (make test sets it)")
def test_auto_op_calls_run_the_chosen_backend(monkeypatch) -> None:
    if kernels.load_triton_rows() is None:
        pytest.skip("triton does not import here")
    prepare_backend("cpu", "triton")
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(6, 64, generator=gen)
    table = torch.randn(3, 64, generator=gen)
    index = torch.tensor([0, 1, 2, -1, 1, 0])
    coef = torch.linspace(-2, 2, 6)
    assert kernels.resolve_backend("auto", hidden) == "triton"
    ran = []
    real = kernels.run_rows
    monkeypatch.setattr(kernels, "run_rows", lambda name, *a, **k: ran.append(name) or real(name, *a, **k))
    got = hidden.clone()
    torch.ops.steerlib.steer_rows_(got, table, index, coef, None, None, None, None, "auto")
    want, _ = steer_rows_reference(hidden.clone(), table, index, coef)
    assert ran == ["triton"]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # Under autograd every call stays on torch, the one backend with a backward.
    assert kernels.resolve_backend("auto", hidden.clone().requires_grad_()) == "torch"


_RANK_SCRIPT = textwrap.dedent("""
    import os, sys
    import torch.distributed as dist
    from steerlib.kernels import prepare_backend
    dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=2)
    try:
        choice = prepare_backend("cpu", os.environ["WANT"], group=dist.group.WORLD)
        print("OK", choice.name)
    except RuntimeError as exc:
        print("REFUSED", exc)
    finally:
        dist.destroy_process_group()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_ranks(wants: tuple[str, str]) -> list[str]:
    port = str(_free_port())
    procs = []
    for rank, want in enumerate(wants):
        env = dict(os.environ, RANK=str(rank), WANT=want, MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
        env.pop(kernels.BACKEND_ENV, None)
        procs.append(subprocess.Popen([sys.executable, "-c", _RANK_SCRIPT], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err
        outs.append(out.strip().splitlines()[-1])
    return outs


def test_ranks_that_chose_different_backends_refuse_to_start() -> None:
    pytest.importorskip("triton")
    same = _run_two_ranks(("torch", "auto"))
    assert same == ["OK torch", "OK torch"]
    differ = _run_two_ranks(("torch", "triton"))
    expected = ("REFUSED ranks chose different steering kernel backends (rank 0: torch on cpu, rank 1: triton on "
                "cpu); set STEERLIB_KERNEL_BACKEND to the same value for every process")
    assert differ == [expected, expected]
