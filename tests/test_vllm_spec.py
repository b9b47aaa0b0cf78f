"""The vLLM backend's request spec and per-step plan (no vLLM needed: these run in the main environment)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from steerlib.steering.steer import SteerOp
from steerlib.vllm import cache_salt, encode_spec, parse_spec
from steerlib.vllm.core_adapter import StepPlan, interval
from steerlib.vllm.spec import encode_rows

D = 16


def _vec(seed: int) -> torch.Tensor:
    return torch.randn(D, generator=torch.Generator().manual_seed(seed))


def test_spec_round_trip_lowering_and_salt():
    ops = [SteerOp(layer=3, vector=_vec(0), coef=2.5, positions="response"),
           SteerOp(layer=2, vector=_vec(1), mode="cap", cap_min=-1.0, cap_max=0.5)]
    parsed = parse_spec(encode_spec(ops, readout=True), n_layers=4, d_model=D)
    assert parsed.readout and [e.layer for e in parsed.edits] == [3, 2]
    add, cap = parsed.edits
    assert add.positions == "response" and add.lowered.coef == 2.5 and add.lowered.lo == -math.inf
    torch.testing.assert_close(add.lowered.row, ops[0].vector)
    torch.testing.assert_close(cap.lowered.row, ops[1].vector / ops[1].vector.norm())
    assert (cap.lowered.lo, cap.lowered.hi, cap.lowered.coef) == (-1.0, 0.5, 0.0)
    # Salts: by the edits only (the read-out flag reads what is computed anyway), None when nothing is edited.
    assert cache_salt(encode_spec(ops)) == cache_salt(encode_spec(ops, readout=True))
    assert cache_salt(encode_spec(ops)) != cache_salt(encode_spec(ops[:1]))
    assert cache_salt(encode_spec([], readout=True)) is None and cache_salt(None) is None
    assert len(cache_salt(encode_spec(ops))) <= 128 and "/" not in cache_salt(encode_spec(ops))


def test_lowered_rows_travel_unchanged():
    class Edit:
        layer, vector, coef, lo, hi, positions = 2, _vec(2) / _vec(2).norm(), 0.0, 0.0, 0.0, "prompt"

    (e,) = parse_spec(encode_rows([Edit()]), n_layers=4, d_model=D).edits
    assert torch.equal(e.lowered.row, Edit.vector) and (e.lowered.lo, e.lowered.hi) == (0.0, 0.0)


@pytest.mark.parametrize(("spec", "message"), [
    ("{", "steerlib: the steering spec is not JSON"),
    (json.dumps({"edits": [{"layer": 5, "vector": [0.0] * D}]}), "steerlib edit 0: layer must be an int in 1..4"),
    (json.dumps({"edits": [{"layer": 1, "vector": [0.0] * 3}]}), "'vector' must be a name or a list of 16 numbers"),
    (json.dumps({"edits": [{"layer": 1, "vector": "optimistic"}]}), "STEERLIB_VLLM_VECTORS names no folder"),
    (json.dumps({"edits": [{"layer": 1, "vector": [1.0] * D, "mode": "boost"}]}), "mode must be one of"),
    (json.dumps({"edits": [{"layer": 1, "vector": [1.0] * D, "coef": float("nan")}]}), "coef must be a finite"),
    (json.dumps({"edits": [{"layer": 1, "row": [1.0] * D, "lo": 0.0, "hi": 0.0}]}), "needs a unit row"),
    (json.dumps({"edits": [], "extra": 1}), "must be an object with 'edits'"),
])
def test_bad_specs_name_the_problem(spec, message, monkeypatch):
    monkeypatch.delenv("STEERLIB_VLLM_VECTORS", raising=False)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        parse_spec(spec, n_layers=4, d_model=D)


def test_step_plan_fill_and_apply_equal_editing_each_token_by_hand():
    """Three requests (add at all positions, cap on the response, unsteered) flattened with padding."""
    ops = [[SteerOp(layer=2, vector=_vec(3), coef=3.0)],
           [SteerOp(layer=2, vector=_vec(4), mode="cap", cap_max=0.1, positions="response"),
            SteerOp(layer=2, vector=_vec(5), coef=-1.0, positions="prompt")],
           []]
    rows = [parse_spec(encode_spec(o), 4, D).edits if o else [] for o in ops]
    prompt_lens = [5, 3, 4]
    # Request 0 prefills positions 0..2 (a chunk), request 1 decodes positions 2..3, request 2 one token; 2 pads.
    row_of_token = torch.tensor([0, 0, 0, 1, 1, 2, -1, -1])
    position = torch.tensor([0, 1, 2, 2, 3, 7, 0, 0])
    plan = StepPlan([1, 2, 3, 4], D, max_tokens=16, slots=1, capacity=2)
    plan.set_rows(rows, prompt_lens)
    plan.fill(row_of_token, position)
    hidden = torch.randn(8, D, generator=torch.Generator().manual_seed(9))
    expected = hidden.clone()
    for t in range(8):
        r = int(row_of_token[t])
        if r < 0:
            continue
        for e in rows[r]:
            start, end = interval(e.positions, prompt_lens[r])
            if not start <= int(position[t]) < end:
                continue
            h = expected[t] + e.lowered.coef * e.lowered.row
            if math.isfinite(e.lowered.lo) or math.isfinite(e.lowered.hi):
                p = float(h @ e.lowered.row)
                h = h + (min(max(p, e.lowered.lo), e.lowered.hi) - p) * e.lowered.row
            expected[t] = h
    readout = torch.nn.functional.normalize(torch.randn(2, D), dim=-1)
    proj = plan.apply(2, hidden, readout)
    torch.testing.assert_close(hidden, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(proj, hidden @ readout.T, atol=1e-5, rtol=1e-5)
    assert plan.active == {2: 2}
    assert plan.apply(3, hidden.clone(), None) is None  # a layer nobody edits: untouched
