"""The first release's names: served with a DeprecationWarning, and no alias shadows the monitoring package."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import steerlib
from steerlib.steering import steer as steer_mod
from steerlib.steering.generation import generate
from steerlib.steering.steer import TraitReadout, build_readout, read_out


def test_monitoring_subpackage_is_reachable_as_an_attribute():
    # A fresh interpreter: which of the two meanings of steerlib.monitoring wins depends on import order.
    code = ("import steerlib.monitoring.drift, steerlib\n"
            "from steerlib import monitoring\n"
            "assert monitoring is steerlib.monitoring\n"
            "print(steerlib.monitoring.drift.DriftMonitor.__name__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "DriftMonitor"


@pytest.mark.parametrize(("module", "old", "new"), [
    (steerlib, "Monitor", TraitReadout),
    (steerlib, "build_monitor", build_readout),
    (steer_mod, "Monitor", TraitReadout),
    (steer_mod, "build_monitor", build_readout),
    (steer_mod, "monitoring", read_out),
])
def test_old_names_warn_and_resolve_to_the_new_ones(module, old, new):
    with pytest.warns(DeprecationWarning, match=rf"\.{old} is deprecated.*use .*{new.__name__}"):
        assert getattr(module, old) is new


def test_old_names_are_not_advertised():
    for old in ("Monitor", "build_monitor", "monitoring"):
        assert old not in steerlib.__all__
    assert {"TraitReadout", "build_readout", "read_out"} <= set(steerlib.__all__)


def test_unknown_names_still_raise_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'Monitr'"):
        steerlib.Monitr  # noqa: B018
    with pytest.raises(AttributeError, match="no attribute 'Monitr'"):
        steer_mod.Monitr  # noqa: B018


def test_calling_the_monitoring_package_reads_out_with_a_warning(make_tiny):
    model = make_tiny("llama")
    readout = build_readout(model, {"v": torch.ones(model.config.hidden_size)}, [2])
    with pytest.warns(DeprecationWarning, match=r"steerlib\.monitoring\(model, readout\) is deprecated"):
        ctx = steerlib.monitoring(model, readout)
    with torch.no_grad(), ctx:
        model(torch.tensor([[5, 6, 7]]))
    assert readout.stacked(2).shape == (1, 3, 1)


def test_generate_monitor_keyword_warns_and_still_reads_out(embedded):
    model, tok = embedded
    readout = build_readout(model, {"v": torch.ones(model.config.hidden_size)}, [3])
    prompt = steerlib.format_prompt(tok, "Hi")
    with pytest.warns(DeprecationWarning, match=r"monitor= is deprecated.*use readout="):
        old = generate(model, tok, [prompt], monitor=readout, max_new_tokens=2)[0]
    new = generate(model, tok, [prompt], readout=readout, max_new_tokens=2)[0]
    assert old.projections is not None
    torch.testing.assert_close(old.projections, new.projections)
    with pytest.raises(ValueError, match="pass readout= only"):
        generate(model, tok, [prompt], readout=readout, monitor=readout, max_new_tokens=2)
