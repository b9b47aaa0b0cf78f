"""The one steering plan: methods lower themselves, positions are intervals, per-token arguments match a hand
computation, and a new method added in one place steers every path."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from steerlib.steering.compiled import CompiledSteering
from steerlib.steering.plan import (
    METHODS,
    NO_END,
    Condition,
    Lowered,
    PlanCapacity,
    SteeringMethod,
    SteeringPlan,
    SteerOp,
    lower_ops,
    register_method,
    unit,
)
from steerlib.steering.steer import ResidualEditor


def test_builtin_methods_lower_to_the_per_row_arguments():
    v = torch.tensor([3.0, 4.0])
    add, ablate, cap = lower_ops([SteerOp(1, v, "add", coef=2.0), SteerOp(1, v, "ablate"),
                                  SteerOp(1, v, "cap", cap_min=-1.0)])
    assert torch.equal(add.row, v) and (add.coef, add.lo, add.hi) == (2.0, -math.inf, math.inf)
    assert torch.allclose(ablate.row, v / 5) and (ablate.coef, ablate.lo, ablate.hi) == (0.0, 0.0, 0.0)
    assert (cap.coef, cap.lo, cap.hi) == (0.0, -1.0, math.inf)
    assert ablate.key == cap.key != add.key  # the same unit vector shares one table entry


def test_steer_op_keeps_its_own_copy_and_rejects_bad_specs():
    v = torch.ones(4)
    op = SteerOp(2, v, coef=1.0)
    v.mul_(5)
    assert torch.equal(op.vector, torch.ones(4))
    with pytest.raises(ValueError, match="unknown steering mode 'push'"):
        SteerOp(2, v, "push")
    with pytest.raises(ValueError, match="mode 'cap' needs cap_min and/or cap_max"):
        SteerOp(2, v, "cap")
    with pytest.raises(ValueError, match="unknown positions 'middle'"):
        SteerOp(2, v, positions="middle")


def test_token_args_follow_the_prompt_rule_per_row():
    """Row 0 adds on response tokens, row 1 caps on prompt tokens, row 2 is unsteered; prompts of 3, 2, 4."""
    d = 4
    v, u = torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 2.0, 0, 0])
    add, cap = lower_ops([SteerOp(5, v, coef=3.0, positions="response"),
                          SteerOp(5, u, "cap", cap_min=-1.0, cap_max=1.0, positions="prompt")])
    plan = SteeringPlan(d, "cpu")
    plan.set_rows([[add], [cap], []], [3, 2, 4])
    # A chunk of positions 1..3 for every row.
    rows = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    pos = torch.tensor([1, 2, 3, 1, 2, 3, 1, 2, 3])
    args = plan.token_args(rows, pos)
    assert args["index"].tolist() == [[0, 0, 1, 2, 0, 0, 0, 0, 0]]
    assert args["coef"].tolist() == [[0, 0, 3.0, 0, 0, 0, 0, 0, 0]]
    assert args["lo"][0, 3].item() == -1.0 and args["hi"][0, 3].item() == 1.0
    assert math.isinf(args["lo"][0, 4].item())
    assert torch.equal(plan.layers[5].table[0], torch.zeros(d))  # row 0: no edit
    # fill writes the same values into the preallocated buffers, in place.
    before = plan.buffers(5)[0]["index"].data_ptr()
    plan.fill(rows, pos)
    assert plan.buffers(5)[0]["index"].data_ptr() == before
    assert plan.buffers(5)[0]["index"][:9].tolist() == args["index"][0].tolist()
    hidden = torch.randn(9, d)
    expected = hidden.clone()
    expected[2] += 3.0 * v
    expected[3, 1] = expected[3, 1].clamp(-1.0, 1.0)
    plan.apply(5, hidden)
    torch.testing.assert_close(hidden, expected)


def test_fixed_plan_refuses_to_grow():
    plan = SteeringPlan(2, "cpu", capacity=PlanCapacity(layers=(1,), rows=2, tokens=4, table_rows=2))
    (a,), (b,) = lower_ops([SteerOp(1, torch.tensor([1.0, 0.0]))]), lower_ops([SteerOp(1, torch.tensor([0.0, 1.0]))])
    with pytest.raises(ValueError, match="layer 1 needs 3 table rows but the plan holds 2"):
        plan.set_rows([[a], [b]], [1, 1])
    plan.set_rows([[a]], [1])
    with pytest.raises(ValueError, match="a forward pass of 5 tokens exceeds the plan's 4 tokens"):
        plan.fill(torch.zeros(5, dtype=torch.long), torch.arange(5))
    with pytest.raises(ValueError, match="row 0 makes more than 2 edits at layer 1; the plan holds 2 per layer"):
        plan.set_rows([[a, a, a]], [1])
    with pytest.raises(ValueError, match="got 3 rows but the plan holds 2"):
        plan.set_rows([[], [], []], [1, 1, 1])
    with pytest.raises(ValueError, match=r"layer 3 is not one the plan can edit \(1..1\)"):
        plan.set_rows([lower_ops([SteerOp(3, torch.ones(2))])], [1])
    assert NO_END > 2**40


def _mixed_rows(d: int, gen: torch.Generator) -> tuple[list[list], list[int]]:
    """Five rows: add (response), ablate + add at one layer, a cap (prompt), a gated latching add, nothing."""
    v, u, w, c = (torch.randn(d, generator=gen) for _ in range(4))
    rows = [
        lower_ops([SteerOp(2, v, coef=3.0, positions="response")]),
        lower_ops([SteerOp(2, u, "ablate"), SteerOp(2, v, coef=-2.0), SteerOp(3, w, coef=1.5)]),
        lower_ops([SteerOp(3, u, "cap", cap_min=-0.5, cap_max=0.5, positions="prompt")]),
        lower_ops([SteerOp(3, w, coef=4.0, when=Condition(c, above=0.0, latch=True))]),
        [],
    ]
    return rows, [3, 2, 4, 3, 2]


def test_fixed_plan_equals_the_growing_plan_and_never_moves_its_tensors():
    """Same rows, same passes: a fixed plan edits exactly as the growing one (gates and latches included), and
    every tensor it owns keeps its address through new rows, new vectors, read-outs and passes of any size."""
    d = 8
    gen = torch.Generator().manual_seed(0)
    rows, prompts = _mixed_rows(d, gen)
    fixed = SteeringPlan(d, "cpu", capacity=PlanCapacity(layers=(1, 2, 3, 4), rows=6, tokens=32, slots=2,
                                                         table_rows=4, gate_rows=2, readout_dirs=3))
    before = {k: t.data_ptr() for k, t in fixed.tensors().items()}
    readout = torch.randn(2, d, generator=gen)
    fixed.set_readout(readout)
    grow = SteeringPlan(d, "cpu")
    # Growing plans have no slot limit: give the growing plan the same edits.
    for plan in (fixed, grow):
        plan.set_rows(rows, prompts)
    assert fixed.active_layers == {2, 3} == set(grow.layers)
    opened = False
    for step, (n_per_row, pos0) in enumerate([(4, 0), (1, 4), (1, 5)]):
        row_of_token = torch.arange(len(rows)).repeat_interleave(n_per_row)
        position = (torch.arange(n_per_row) + pos0).repeat(len(rows))
        h0 = torch.randn(len(row_of_token), d, generator=gen) * 2
        outs = []
        for plan in (fixed, grow):
            plan.fill(row_of_token, position)
            h = h0.clone()
            proj = None
            for layer in (1, 2, 3, 4):
                got = plan.apply(layer, h, readout if layer == 3 and plan is grow else None)
                if layer == 3:
                    proj = got
            outs.append((h, proj))
        torch.testing.assert_close(outs[0][0], outs[1][0])
        torch.testing.assert_close(outs[0][1][:, :2], outs[1][1])
        assert torch.equal(outs[0][1][:, 2], torch.zeros(len(row_of_token)))  # unused read-out direction
        opened = opened or bool(fixed.latched_edits()[3])
        assert fixed.latched_edits() == grow.latched_edits(), step
    assert opened  # the latch was exercised
    # New rows (the gated row moves to row 0), new vectors: same addresses, latches follow their row.
    latched_before = fixed.latched_edits()[3]
    fixed.set_rows([rows[3], lower_ops([SteerOp(4, torch.randn(d, generator=gen))])], [3, 2],
                   moved_from=[3, None])
    assert fixed.latched_edits() == [latched_before, set()]
    fixed.fill(torch.zeros(32, dtype=torch.long), torch.arange(32))
    fixed.apply(4, torch.randn(32, d, generator=gen))
    assert {k: t.data_ptr() for k, t in fixed.tensors().items()} == before


def test_fixed_plan_reuses_a_vector_already_in_its_table():
    d = 4
    v, w = torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 1.0, 0, 0])
    plan = SteeringPlan(d, "cpu", capacity=PlanCapacity(layers=(1,), rows=2, tokens=4, table_rows=3))
    (a,), (b,) = lower_ops([SteerOp(1, v)]), lower_ops([SteerOp(1, w)])
    plan.set_rows([[a]], [1])
    assert torch.equal(plan.layers[1].table[1], v)
    plan.write_row(1, 2, torch.full((d,), 7.0), key="other")
    plan.set_rows([[b], [a]], [1, 1])  # a stays in row 1; b takes the row no vector of this batch needs
    assert torch.equal(plan.layers[1].table[1], v) and torch.equal(plan.layers[1].table[2], w)
    assert plan.tensors()["param.entry"][:2, :2].tolist() == [[2, 1], [0, 0]]
    with pytest.raises(ValueError, match=r"table row 0 is outside 1..2 \(row 0 is .no edit.\)"):
        plan.write_row(1, 0, v)


@register_method
@dataclass(frozen=True)
class Pin(SteeringMethod):
    """A toy method added in one place: set the projection on the unit direction to exactly ``value``."""

    name: ClassVar[str] = "pin"
    strength: ClassVar[str | None] = "value"
    value: float = 0.0

    def lower(self, vector):
        return Lowered(unit(vector), 0.0, self.value, self.value)


@pytest.mark.filterwarnings("ignore:torch._dynamo.config.skip_nnmodule_hook_guards")
def test_a_new_method_added_in_one_place_steers_the_eager_and_compiled_paths(make_tiny):
    assert "pin" in METHODS
    model = make_tiny("llama")
    d = model.config.hidden_size
    v = torch.randn(d, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([[5, 6, 7, 8]])
    op = SteerOp(2, v, "pin", coef=2.5)
    with torch.no_grad():
        plain = model(ids).logits
        with ResidualEditor(model, [op]):
            out = model(ids, output_hidden_states=True)  # the eager edit is in place: the recorded state shows it
        torch.testing.assert_close(out.hidden_states[2][0] @ unit(v), torch.full((4,), 2.5), atol=1e-4, rtol=1e-5)
        with CompiledSteering(model, [op], prompt_lengths=torch.tensor([4]), max_steps=1):
            compiled = model(ids, position_ids=torch.arange(4)[None]).logits
    torch.testing.assert_close(compiled, out.logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain, out.logits, atol=1e-3)
