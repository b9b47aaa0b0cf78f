"""The one residual hook point (``core.hooks.hook_residual``) and the gate in the functional op, which let the
compiled path call the plan like every other path (``SteeringPlan.apply_traced``)."""

from __future__ import annotations

import pytest
import torch
from helpers import mixed_case
from steerlib.kernels import fused_steer_rows, steer_rows_inline, steer_rows_op

from steerlib import Condition, SteerOp, record_residual
from steerlib.core.arch import get_layout
from steerlib.core.hooks import HookHandles, hook_residual
from steerlib.steering.compiled import CompiledSteering
from steerlib.steering.steer import ResidualEditor


def _gates(hidden: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """Gate arguments with every third row ungated and the others' thresholds 0.5 from their own projection,
    alternately below it (open) and above it (closed); and which rows are open."""
    n, d = hidden.shape
    dirs = torch.nn.functional.normalize(torch.randn(2, d, generator=torch.Generator().manual_seed(6)), dim=-1)
    gi = torch.tensor([-1 if r % 3 == 0 else r % 2 for r in range(n)])
    proj = (hidden @ dirs.T).gather(1, gi.clamp_min(0)[:, None]).squeeze(1)
    opened = torch.tensor([r % 3 == 0 or r % 2 == 0 for r in range(n)])
    lo = torch.where(opened, proj - 0.5, proj + 0.5)
    gates = {"gate_dir": dirs, "gate_index": gi, "gate_lo": lo, "gate_hi": torch.full((n,), float("inf"))}
    return gates, opened


def test_the_functional_op_gates_like_the_in_place_op():
    hidden, args = mixed_case(40, 32, 3, torch.float32, seed=5)
    gates, want = _gates(hidden)
    ordered = [args[k] for k in ("table", "index", "coef", "cap_min", "cap_max", "readout")]
    gate_out = torch.zeros(40, dtype=torch.bool)
    ref, ref_proj = fused_steer_rows(hidden.clone(), *ordered, backend="torch", **gates, gate_out=gate_out)
    out, proj, opened = steer_rows_op(hidden, *ordered, "torch", **gates)
    inline, inline_proj, inline_open = steer_rows_inline(hidden, *ordered, **gates)
    assert torch.equal(opened, want) and torch.equal(inline_open, want) and torch.equal(gate_out, want)
    assert 0 < int(want.sum()) < 40  # some rows open, some closed
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    torch.testing.assert_close(proj, ref_proj, atol=0, rtol=0)
    torch.testing.assert_close(inline, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(inline_proj, ref_proj, atol=1e-4, rtol=1e-5)
    torch.library.opcheck(steer_rows_op, (hidden, *ordered, "torch"), dict(gates))


def test_one_hook_point_unwraps_flattens_and_rewraps_at_every_layer(make_tiny):
    """An edit at layer 0 (the first block's input, a pre-hook) equals feeding the edited embeddings; an in-place
    edit at layer L is what capture reads at L; a non-contiguous state is written back."""
    model = make_tiny("llama")
    layout = get_layout(model)
    d = layout.d_model
    ids = torch.tensor([[3, 4, 5, 6], [7, 8, 9, 10]])
    v = torch.randn(d, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        emb = model.get_input_embeddings()(ids)
        want = model(inputs_embeds=emb + v).logits
        handles = HookHandles()
        shapes = []

        def shift(flat, shape, _kwargs):
            shapes.append((tuple(flat.shape), shape))
            return flat + v

        with handles.registering():
            handles.add(hook_residual(layout, 0, shift))
        try:
            got = model(ids).logits
        finally:
            handles.remove()
        assert shapes == [((8, d), (2, 4))]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

        def in_place(flat, _shape, _kwargs):
            flat.mul_(2.0)

        handles.add(hook_residual(layout, 2, in_place))
        try:
            with record_residual(model, [2]) as rec:
                model(ids)
        finally:
            handles.remove()
        with record_residual(model, [2]) as plain:
            model(ids)
        torch.testing.assert_close(rec[2][0], plain[2][0] * 2.0)


@pytest.mark.filterwarnings("ignore:torch._dynamo.config.skip_nnmodule_hook_guards")
@pytest.mark.parametrize("backend", ["torch", "inline"])
def test_the_compiled_path_gates_and_latches_through_the_plan_like_the_eager_editor(make_tiny, backend):
    model = make_tiny("llama")
    d = model.config.hidden_size
    g = torch.Generator().manual_seed(9)
    v, c = torch.randn(d, generator=g), torch.randn(d, generator=g)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad(), record_residual(model, [2]) as rec:
        model(ids)
    p = rec[2][0][0] @ (c / c.norm())
    threshold = float(p.median())  # about half the tokens open
    ops = [SteerOp(2, v, coef=3.0, when=Condition(c, above=threshold, latch=True))]
    with torch.no_grad():
        with ResidualEditor(model, ops):
            eager = model(ids).logits
        with CompiledSteering(model, ops, prompt_lengths=torch.tensor([6]), max_steps=1, backend=backend) as cs:
            compiled = model(ids, position_ids=torch.arange(6)[None]).logits
            latched = cs.plan.latched_edits()
        plain = model(ids).logits
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain, eager, atol=1e-4)
    assert latched == [{0}]  # the gate opened at some token: latched for the row's later passes


def test_the_readout_plan_states_the_pairing_once():
    from steerlib.steering.generation import Generation
    from steerlib.steering.readout import (
        needs_closing,
        paired_position,
        response_values,
        summarize,
        value_index,
    )

    assert [paired_position(5, j) for j in range(3)] == [4, 5, 6]
    assert value_index(torch.tensor([4, 5, 6]), torch.tensor(5)).tolist() == [0, 1, 2]
    assert needs_closing(ended_with_eos=False, reading_out=True) and not needs_closing(True, True)
    assert not needs_closing(False, False)
    values = [0.5, 1.0, 3.0]
    assert response_values(values, 2.0) == [1.0, 3.0, 2.0] and response_values(values[:1]) == []
    assert summarize([*values, 2.0], 7) == {"mean": 2.0, "max": 3.0, "prompt_last": 0.5, "layer": 7, "n_tokens": 3}
    gen = Generation("p", "t", [1, 2], torch.tensor(values)[:, None, None], ("x",), (7,), torch.tensor([[2.0]]))
    assert gen.response_projections().tolist() == [1.0, 3.0, 2.0]
    assert gen.mean_projection() == summarize([*values, 2.0], 7)["mean"]
    assert gen.prompt_last_projection() == 0.5
    only_prompt = Generation("p", "", [], torch.tensor([[[0.5]]]), ("x",), (7,))
    assert only_prompt.response_projections().shape == (0,)
