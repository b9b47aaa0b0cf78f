"""TraitVectors and SteerOp are values: what a caller reads or passed in cannot change them afterwards."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from steerlib import TraitVectors, build_ops
from steerlib.steering.steer import SteerOp

N_POS, WIDTH = 4, 8


def _tv(trait: str = "a", layer: int | None = 2, norms: list[float] | None = None, seed: int = 0) -> TraitVectors:
    g = torch.Generator().manual_seed(seed)
    meta: dict = {"judge": "lexicon", "n_kept": 7}
    if layer is not None:
        meta["recommended_layer"] = layer
    if norms is not None:
        meta["residual_norms"] = norms
    return TraitVectors({"response_mean": torch.randn(N_POS, WIDTH, generator=g)}, "m", trait, metadata=meta)


def test_mutating_what_get_returns_leaves_the_vector_alone():
    tv = _tv()
    before = tv.get(2).clone()  # a view on main: it would change along with the stored vector
    tv.get(2).mul_(5)
    tv.get(2, normalize=True).zero_()
    tv.vectors["response_mean"].mul_(5)
    torch.testing.assert_close(tv.get(2), before, rtol=0, atol=0)


def test_the_callers_tensors_and_dict_are_not_shared():
    table = torch.ones(N_POS, WIDTH)
    meta = {"residual_norms": [1.0] * N_POS}
    tv = TraitVectors({"response_mean": table}, "m", "t", metadata=meta)
    table.mul_(3)
    meta["residual_norms"].append(9.0)
    meta["recommended_layer"] = 99
    assert float(tv.get(1)[0]) == 1.0
    assert tv.metadata["residual_norms"] == [1.0] * N_POS
    assert tv.recommended_layer is None


def test_item_assignment_is_impossible():
    tv = _tv()
    with pytest.raises(TypeError):
        tv.vectors["response_mean"] = torch.zeros(3)  # would have bypassed the shape check
    with pytest.raises(TypeError):
        tv.vectors["new_kind"] = torch.zeros(N_POS, WIDTH)
    with pytest.raises(TypeError):
        tv.metadata["residual_norms"] = [1.0]
    assert tv.metadata["judge"] == "lexicon"  # reads still work
    assert set(tv.vectors) == {"response_mean"}


def test_a_sum_keeps_what_describes_the_model():
    a, b = _tv("a", 2, [1.0, 2.0, 3.0, 4.0]), _tv("b", 2, [3.0, 4.0, 5.0, 6.0], seed=1)
    total = a + b
    assert total.trait == "a+b" and total.method == "combination"
    assert total.recommended_layer == 2
    assert total.metadata["residual_norms"] == [2.0, 3.0, 4.0, 5.0]
    assert total.metadata["combined_from"] == ["a", "b"]
    assert "judge" not in total.metadata  # one extraction's provenance does not describe a sum
    torch.testing.assert_close(total.get(), a.get(2) + b.get(2))
    difference = a - b
    torch.testing.assert_close(difference.get(), a.get(2) - b.get(2))


def test_a_sum_drops_a_disputed_layer_and_keeps_a_single_one():
    assert (_tv("a", 2) + _tv("b", 3)).recommended_layer is None
    assert (_tv("a", None) + _tv("b", 3)).recommended_layer == 3
    only = _tv("a", 2, [1.0, 1.0, 1.0, 1.0]) + _tv("b", 2)
    assert only.metadata["residual_norms"] == [1.0, 1.0, 1.0, 1.0]


def test_relative_coefficients_and_the_default_layer_work_on_a_sum(make_tiny):
    model = make_tiny("llama")
    n_pos, width = model.config.num_hidden_layers + 1, model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    norms = [float(10 + i) for i in range(n_pos)]
    a = TraitVectors({"response_mean": torch.randn(n_pos, width, generator=g)}, "m", "a",
                     metadata={"recommended_layer": 2, "residual_norms": norms})
    b = TraitVectors({"response_mean": torch.randn(n_pos, width, generator=g)}, "m", "b",
                     metadata={"recommended_layer": 2, "residual_norms": norms})
    (op,) = build_ops(model, a + b, None, 0.5, relative=True)
    assert op.layer == 2
    assert float(op.coef * op.vector.norm()) == pytest.approx(0.5 * norms[2], rel=1e-5)


def test_scaling_and_to_keep_metadata_and_copies_survive_pickle():
    tv = _tv("a", 2, [1.0, 2.0, 3.0, 4.0])
    for out in (tv * 2, -tv, tv.to(torch.float64), copy.deepcopy(tv), pickle.loads(pickle.dumps(tv))):
        assert out.recommended_layer == 2 and out.metadata["residual_norms"] == [1.0, 2.0, 3.0, 4.0]
    torch.testing.assert_close(pickle.loads(pickle.dumps(tv)).get(), tv.get(), rtol=0, atol=0)
    torch.testing.assert_close((tv * 2).get(), 2 * tv.get())


def test_steer_op_keeps_its_own_copy_of_the_vector():
    vec = torch.ones(WIDTH)
    op = SteerOp(layer=1, vector=vec, coef=2.0)
    vec.mul_(-4)
    torch.testing.assert_close(op.vector, torch.ones(WIDTH), rtol=0, atol=0)
