"""HF paths on GPU without a GPU: per-device plans (``device_map="auto"``) and static addresses for compiled decoding.

Two devices are faked on CPU in two ways: ``meta`` (placement only: where each tensor is allocated) and
``cpu`` vs ``cpu:0``, which torch treats as two distinct device keys while both compute for real, so the numbers
of a model split over "two devices" can be compared with the unsplit one.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import build_tiny

from steerlib.core.arch import get_layout
from steerlib.steering import compiled as compiled_module
from steerlib.steering.compiled import CompiledSteering
from steerlib.steering.devices import DevicePlans, layer_devices, plan_tensors
from steerlib.steering.plan import Condition, SteeringPlan, SteerOp, lower_ops
from steerlib.steering.steer import build_readout

CPU, CPU0, META = torch.device("cpu"), torch.device("cpu", 0), torch.device("meta")
D = 64


def _ops(n_layers: int, seed: int = 0) -> list[SteerOp]:
    """An add gated with a latch at layer 1, a response-only add at layer 2 and a cap at the last layer."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(D, generator=g)
    return [SteerOp(1, v, coef=3.0, when=Condition(torch.randn(D, generator=g), above=-2.0, latch=True)),
            SteerOp(2, torch.randn(D, generator=g), coef=-2.0, positions="response"),
            SteerOp(n_layers, v, mode="cap", cap_min=-0.25, cap_max=0.25)]


def test_layer_devices_follow_the_blocks_and_accelerates_execution_device() -> None:
    model = build_tiny("llama")
    layout = get_layout(model)
    assert layer_devices(layout) == {1: CPU, 2: CPU, 3: CPU}
    layout.blocks[2].to("meta")
    layout.blocks[1]._hf_hook = SimpleNamespace(execution_device=1)  # what accelerate sets on an offloaded block
    assert layer_devices(layout) == {1: CPU, 2: torch.device("cuda", 1), 3: META}


def test_each_layers_plan_tensors_live_on_that_layers_device() -> None:
    plans = DevicePlans(D, {1: CPU, 2: CPU, 3: META}, max_tokens=8)
    rows = [lower_ops(_ops(3)), lower_ops(_ops(3, seed=1)[1:])]
    plans.set_rows(rows, [3, 4])
    plans.fill(torch.tensor([0, 0, 1, 1]), torch.tensor([2, 3, 3, 4]))
    assert set(plans.plans) == {CPU, META}
    for layer, device in ((1, CPU), (2, CPU), (3, META)):
        plan = plans.for_layer(layer)
        tensors = plan_tensors(plan)
        assert tensors and {t.device for t in tensors} == {device}, layer
        assert layer in plan.layers and plan.layers[layer].table.device == device
    # Nothing is shared between the devices' plans.
    ptrs = [{t.data_ptr() for t in plan_tensors(p) if t.device.type == "cpu"} for p in plans.plans.values()]
    assert ptrs[1] == set()  # meta tensors have no storage
    with pytest.raises(ValueError, match=r"layer 4 is not one of this model's layers 1\.\.3"):
        plans.for_layer(4)


def test_a_split_plan_steers_and_latches_as_one_plan() -> None:
    torch.manual_seed(0)
    rows = [lower_ops(_ops(3)), [], lower_ops(_ops(3, seed=1))]
    prompt_lens = [3, 2, 4]
    row_of_token = torch.tensor([0, 0, 1, 2, 2, 2])
    position = torch.tensor([2, 3, 1, 2, 3, 4])
    single = SteeringPlan(D, CPU, max_tokens=8)
    split = DevicePlans(D, {1: CPU, 2: CPU0, 3: CPU0}, max_tokens=8)
    readout = torch.nn.functional.normalize(torch.randn(2, D), dim=-1)
    for plan in (single, split):
        plan.set_rows(rows, prompt_lens)
    assert len(split.plans) == 2 and split.for_layer(1) is not split.for_layer(2)
    for step in range(2):  # the second pass sees the gate latched by the first
        single.fill(row_of_token, position + step)
        split.fill(row_of_token, position + step)
        for layer in (1, 2, 3):
            hidden = torch.randn(6, D)
            want_h, got_h = hidden.clone(), hidden.clone()
            want_p = single.apply(layer, want_h, readout if layer == 3 else None)
            got_p = split.apply(layer, got_h, readout if layer == 3 else None)
            torch.testing.assert_close(got_h, want_h, atol=0, rtol=0)
            if layer == 3:
                torch.testing.assert_close(got_p, want_p, atol=0, rtol=0)
    assert split.latched_edits() == single.latched_edits()
    assert any(split.latched_edits()), "the gated edit should have latched for some row"


def test_compiled_steering_split_over_two_devices_equals_one_device(monkeypatch) -> None:
    model = build_tiny("llama")
    ops = _ops(3)
    readout = build_readout(model, {"a": torch.randn(D), "b": torch.randn(D)}, [1, 3])
    ids = torch.tensor([[5, 9, 11, 4], [7, 3, 8, 2]])
    positions = torch.arange(4).expand(2, 4)
    prompt_lengths = torch.tensor([3, 2])

    def run() -> tuple[torch.Tensor, torch.Tensor, CompiledSteering]:
        with torch.no_grad(), torch._dynamo.config.patch(skip_nnmodule_hook_guards=False), CompiledSteering(model, ops, readout, prompt_lengths=prompt_lengths, max_steps=3) as cs:
            logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits
        return logits, cs.buffer.clone(), cs

    want_logits, want_buffer, one = run()
    assert len(one.plans.plans) == 1
    monkeypatch.setattr(compiled_module, "layer_devices", lambda layout, default: {1: CPU, 2: CPU0, 3: CPU0})
    got_logits, got_buffer, two = run()
    assert len(two.plans.plans) == 2 and set(two.buffers) == {CPU, CPU0}
    torch.testing.assert_close(got_logits, want_logits, atol=0, rtol=0)
    torch.testing.assert_close(got_buffer, want_buffer, atol=0, rtol=0)
    assert float(got_buffer.abs().sum()) > 0
    unsteered = model(input_ids=ids, position_ids=positions, use_cache=False).logits
    assert not torch.allclose(unsteered, got_logits)


def test_compiled_decode_graph_reads_plan_tensors_at_static_addresses() -> None:
    """What ``mode="reduce-overhead"`` needs: every tensor the traced step reads, other than the step's own inputs,
    is marked static and keeps its address across steps (no new tensors per step, nothing rebound); the ones the
    step mutates (latch state, read-out buffer) are among them, and their mutation takes effect.

    Checked in a fresh interpreter: which inputs dynamo lifts, and how it marks them, depends on process-wide
    dynamo state that earlier compiles in the same test worker leave behind (seen once under pytest-xdist)."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_devices; "
            "test_devices.check_static_addresses()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]


def check_static_addresses() -> None:
    """The body of the test above (run in its own process)."""
    model = build_tiny("llama")
    ops = _ops(3)
    readout = build_readout(model, {"a": torch.randn(D)}, [2, 3])
    calls: list[list[tuple[int, object]]] = []

    def recording_backend(gm, example_inputs):
        def run(*args):
            calls.append([(a.data_ptr(), getattr(a, "_dynamo_static_input_type", None))
                          for a in args if isinstance(a, torch.Tensor)])
            return gm.forward(*args)
        return run

    ids = torch.tensor([[5], [7]])
    with torch.no_grad(), torch._dynamo.config.patch(skip_nnmodule_hook_guards=False), \
            CompiledSteering(model, ops, readout, prompt_lengths=torch.tensor([3, 4]), max_steps=4) as cs:
        compiled = torch.compile(model, backend=recording_backend, fullgraph=True)
        for p in (4, 5, 6):  # three decode steps of one graph
            compiled(input_ids=ids, position_ids=torch.full((2, 1), p), use_cache=False)
        static = cs.static_tensors()
        latched = cs.plans.latched_edits()
    torch._dynamo.reset()
    assert len(calls) == 3 and len({len(c) for c in calls}) == 1
    assert all(getattr(t, "_dynamo_static_input_type", None) is not None for t in static)
    step_inputs = [[ptr for ptr, kind in c if kind is None] for c in calls]
    assert [len(s) for s in step_inputs] == [2, 2, 2]  # input_ids and position_ids, nothing else per step
    fixed = [[ptr for ptr, kind in c if kind is not None] for c in calls]
    assert fixed[0] == fixed[1] == fixed[2]
    static_ptrs = {t.data_ptr() for t in static}
    read = static_ptrs & set(fixed[0])
    # The graph reads the steering tables, per-row parameters, latch state, prompt lengths, read-out directions and
    # the read-out buffer, all from the static set.
    assert cs.buffer.data_ptr() in read
    assert {t.data_ptr() for t in plan_tensors(cs.plans.first) if t.dim() == 2 and t.shape[1] == D} & read
    # Mutations inside the graph landed in place: positions 4..6 are read-out steps 2..4 of row 0 (prompt 3) and
    # 1..3 of row 1 (prompt 4); the gate latched.
    written = (cs.buffer.abs().sum(dim=(2, 3)) > 0).T.tolist()
    assert written == [[False, False, True, True, True], [False, True, True, True, False]]
    assert latched[0] == {0} or latched[1] == {0}


def test_the_engine_keeps_each_layers_plan_and_read_out_on_that_layers_device() -> None:
    from steerlib.serve.engine import Engine

    model = build_tiny("llama")
    readout = build_readout(model, {"a": torch.randn(D)}, [3])
    get_layout(model).blocks[2].to("meta")  # layer 3 "on another device" (placement only: nothing runs here)
    engine = Engine(model, object(), readout=readout)
    assert engine.layer_devices == {1: CPU, 2: CPU, 3: META}
    assert engine.plan.for_layer(1).device == CPU and engine.plan.for_layer(3).device == META
    assert engine.readout_dirs.device == META
