"""API misuse and shared state (issue 21, classes 5, 9 and 10).

- ``steer``/``build_readout`` given a float, a string or an empty list of layers, or a vector on the meta device,
  fail at the call with one line (not a TypeError from deep inside hook installation or generation);
- every long job (extract, flag, monitor, shiftcheck, inventory) takes an exclusive lock on its output before
  loading a model: a second run on the same output is refused, naming the holder's pid and host, and a holder
  killed with SIGKILL leaves no stale lock;
- while one thread is inside ``steer()``, an unsteered forward pass from another thread raises instead of
  silently coming out steered.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import count_hooks

import steerlib.core.models as models
from steerlib.commands.extract import extract_file
from steerlib.commands.flag import flag_file
from steerlib.commands.inventory import inventory_file
from steerlib.commands.monitor import monitor_file
from steerlib.commands.shiftcheck import shiftcheck_file
from steerlib.core.vectors import TraitVectors
from steerlib.steering.steer import build_ops, build_readout, steer
from steerlib.steering.thread_guard import ForeignThreadForward
from steerlib.store.results import FolderBusy, exclusive_output

IDS = torch.randint(3, 256, (1, 6), generator=torch.Generator().manual_seed(3))


@pytest.fixture
def tiny(make_tiny):
    return make_tiny("llama")  # 3 blocks, width 64


@pytest.fixture
def vec() -> TraitVectors:
    table = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    return TraitVectors({"response_mean": table}, "tiny", "optimistic", metadata={"recommended_layer": 2})


# -- class 5: API misuse fails at the call, in one line -----------------------------------------------------

MISUSE = [
    ("steer layers=22.0", lambda m, v: steer(m, v, layers=22.0).__enter__(),
     r"^layers must be ints, got 22\.0 \(float\)$"),
    ("steer layers='2'", lambda m, v: steer(m, v, layers="2").__enter__(), r"^layers must be ints, got '2' \(str\)$"),
    ("steer layers=[2, 2.5]", lambda m, v: steer(m, v, layers=[2, 2.5]).__enter__(),
     r"^layers must be ints, got 2\.5 \(float\)$"),
    ("build_ops layers=True", lambda m, v: build_ops(m, v, layers=True), r"^layers must be ints, got True \(bool\)$"),
    ("build_readout layers=[]", lambda m, v: build_readout(m, {"o": v}, layers=[]),
     r"^read-out layers is empty: nothing would be steered or read out"),
    ("build_readout layers=2.0", lambda m, v: build_readout(m, {"o": v}, layers=2.0),
     r"^read-out layers must be ints, got 2\.0 \(float\)$"),
    ("build_readout layers=object()", lambda m, v: build_readout(m, {"o": v}, layers=object()),
     r"^read-out layers must be an int or a list of ints"),
    ("steer meta vector", lambda m, v: steer(m, torch.ones(64, device="meta"), layers=2).__enter__(),
     r"on the meta device"),
    ("build_readout meta vectors", lambda m, v: build_readout(m, {"o": v.to("meta")}, layers=[2]),
     r"on the meta device"),
]


@pytest.mark.parametrize(("name", "call", "pattern"), MISUSE, ids=[c[0] for c in MISUSE])
def test_api_misuse_is_one_line(name, call, pattern, tiny, vec):
    before = count_hooks(tiny)  # transformers installs output-capturing hooks of its own, once
    with pytest.raises(ValueError, match=pattern):
        call(tiny, vec)
    assert count_hooks(tiny) == before  # nothing was left installed on the model


# -- class 9: one run per output folder -------------------------------------------------------------------


def _job_calls(root: Path, vectors_path: Path) -> dict:
    out = root / "out"
    return {
        "extract": (out, ".steerlib.lock", lambda: extract_file("optimistic", out)),
        "flag": (out, ".steerlib.lock", lambda: flag_file(root / "data.jsonl", vectors_path, out_dir=out)),
        "monitor": (out, ".steerlib.lock", lambda: monitor_file(root / "log.jsonl", [vectors_path], out_dir=out)),
        "shiftcheck": (out, ".steerlib.lock", lambda: shiftcheck_file(vectors_path, out)),
        "inventory": (out, ".inv.json.lock", lambda: inventory_file({"o": str(vectors_path)}, out=out / "inv.json")),
    }


@pytest.fixture
def saved(tmp_path, vec) -> Path:
    vec.save(tmp_path / "vectors")
    # valid inputs, so that once the lock is free a job gets as far as loading its model
    (tmp_path / "data.jsonl").write_text('{"prompt": "Hi", "response": "Hello"}\n')
    (tmp_path / "log.jsonl").write_text('{"messages": [{"role": "user", "content": "Hi"}, '
                                        '{"role": "assistant", "content": "Hello"}]}\n')
    return tmp_path / "vectors"


@pytest.fixture
def no_model(monkeypatch):
    def tripwire(*_a, **_k):
        raise AssertionError("a model was loaded although the output folder is locked")

    monkeypatch.setattr(models, "load_model", tripwire)


@pytest.mark.parametrize("job", ["extract", "flag", "monitor", "shiftcheck", "inventory"])
def test_second_run_on_a_locked_output_is_refused(job, tmp_path, saved, no_model):
    folder, lock_name, call = _job_calls(tmp_path, saved)[job]
    with exclusive_output(folder, "steerlib test-holder", lock_name=lock_name):
        with pytest.raises(FolderBusy) as info:
            call()
    message = str(info.value)
    assert f"{folder} is in use by another run (steerlib test-holder, pid {os.getpid()} on {socket.gethostname()}" \
        in message and "\n" not in message
    # released: the same job now gets past the lock (and reaches the model load, which the tripwire stops)
    with pytest.raises(AssertionError, match="a model was loaded"):
        call()


def test_lock_held_by_another_process_names_it_and_dies_with_it(tmp_path, saved, no_model):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom steerlib.store.results import exclusive_output\n"
         f"with exclusive_output({str(out)!r}, 'steerlib flag'):\n    print('held', flush=True)\n    time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderBusy, match=rf"\(steerlib flag, pid {holder.pid} on {socket.gethostname()}, since "):
            flag_file(tmp_path / "data.jsonl", saved, out_dir=out)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # a killed holder leaves the lock file behind but not the lock
    assert (out / ".steerlib.lock").exists()
    with pytest.raises(AssertionError, match="a model was loaded"):
        extract_file("optimistic", out)


# -- class 10: model-global hooks ---------------------------------------------------------------------------


def _forward_in_thread(model) -> tuple[torch.Tensor | None, BaseException | None]:
    result: dict = {}

    def run():
        try:
            with torch.no_grad():
                result["logits"] = model(IDS).logits
        except BaseException as exc:  # noqa: BLE001 - handed back to the test thread
            result["error"] = exc

    thread = threading.Thread(target=run, name="unsteered-worker")
    thread.start()
    thread.join(30)
    return result.get("logits"), result.get("error")


def test_unsteered_forward_from_another_thread_inside_steer_raises(tiny, vec):
    with torch.no_grad():
        plain = tiny(IDS).logits
    with steer(tiny, vec, layers=2, coef=8.0):
        with torch.no_grad():
            steered = tiny(IDS).logits  # the owner thread is steered
        logits, error = _forward_in_thread(tiny)
    assert not torch.allclose(steered, plain, atol=1e-4)
    assert logits is None and isinstance(error, ForeignThreadForward)
    assert "thread 'unsteered-worker' ran this model while thread 'MainThread' is inside steer()" in str(error)
    logits, error = _forward_in_thread(tiny)  # after the block: unsteered, from any thread
    assert error is None and torch.allclose(logits, plain, atol=1e-6)


def test_threads_any_lets_a_streamer_thread_through_steered(tiny, vec):
    with torch.no_grad():
        plain = tiny(IDS).logits
    with steer(tiny, vec, layers=2, coef=8.0, threads="any"):
        logits, error = _forward_in_thread(tiny)
    assert error is None and not torch.allclose(logits, plain, atol=1e-4)
    with pytest.raises(ValueError, match="unknown threads 'all'"):
        steer(tiny, vec, layers=2, threads="all").__enter__()


def test_second_thread_entering_steer_is_refused(tiny, vec):
    errors: list[BaseException] = []

    def other():
        try:
            with steer(tiny, vec, layers=2, coef=-8.0):
                pass
        except BaseException as exc:  # noqa: BLE001 - handed back to the test thread
            errors.append(exc)

    with steer(tiny, vec, layers=2, coef=8.0), steer(tiny, vec, layers=3, coef=1.0):  # nested: one guard
        assert len(tiny._forward_pre_hooks) == 1
        thread = threading.Thread(target=other, name="second-steerer")
        thread.start()
        thread.join(30)
    assert len(errors) == 1 and isinstance(errors[0], ForeignThreadForward)
    assert "thread 'second-steerer' entered steer() on a model that thread 'MainThread' is steering" in str(errors[0])
    assert not tiny._forward_pre_hooks


def test_thread_guard_is_removed_when_the_body_raises(tiny, vec):
    with pytest.raises(RuntimeError, match="boom"), steer(tiny, vec, layers=2):
        raise RuntimeError("boom")
    time.sleep(0)
    assert not tiny._forward_pre_hooks
    _, error = _forward_in_thread(tiny)
    assert error is None
