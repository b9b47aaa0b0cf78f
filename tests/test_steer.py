"""Steering semantics: exact edits against output_hidden_states, positions under KV caching, cleanup, errors."""

from __future__ import annotations

import pytest
import torch

from steerlib import TraitVectors, build_ops, build_readout, format_prompt, generate, steer, stream
from steerlib.steering.steer import SteerOp

LAYER = 12


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture(scope="module")
def setup(embedded):
    model, tok = embedded
    torch.manual_seed(0)
    v = torch.randn(model.config.hidden_size)
    ids = tok(format_prompt(tok, "Tell me about the sea."), return_tensors="pt", add_special_tokens=False)
    # transformers installs its own output-recording hooks on first use of output_hidden_states: count after.
    _hidden(model, ids["input_ids"])
    return model, tok, v, ids["input_ids"]


def _hidden(model, ids):
    with torch.inference_mode():
        return model(ids, output_hidden_states=True).hidden_states


def test_add_matches_hidden_states_plus_vector(setup):
    model, _, v, ids = setup
    plain = _hidden(model, ids)
    with steer(model, v, LAYER, coef=2.5):
        steered = _hidden(model, ids)
    torch.testing.assert_close(steered[LAYER], plain[LAYER] + 2.5 * v, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(steered[LAYER - 1], plain[LAYER - 1])
    assert not torch.allclose(steered[LAYER + 1], plain[LAYER + 1])


def test_nested_contexts_add_up(setup):
    model, _, v, ids = setup
    with steer(model, v, LAYER, coef=3.0):
        once = _hidden(model, ids)[LAYER]
    n = _hooks(model)
    with steer(model, v, LAYER, coef=1.0), steer(model, v, LAYER, coef=2.0):
        assert _hooks(model) == n + 4
        twice = _hidden(model, ids)[LAYER]
    torch.testing.assert_close(once, twice, atol=1e-4, rtol=1e-5)
    assert _hooks(model) == n


def test_ablate_and_cap(setup):
    model, _, v, ids = setup
    u = v / v.norm()
    with steer(model, v, LAYER, mode="ablate"):
        ablated = _hidden(model, ids)[LAYER]
    assert (ablated @ u).abs().max() < 1e-3
    with steer(model, v, LAYER, mode="cap", cap=(-0.5, 0.5)):
        capped = _hidden(model, ids)[LAYER]
    proj = capped @ u
    assert proj.max() <= 0.5 + 1e-3 and proj.min() >= -0.5 - 1e-3
    plain = _hidden(model, ids)[LAYER] @ u
    inside = (plain > -0.5) & (plain < 0.5)
    torch.testing.assert_close(proj[inside], plain[inside], atol=1e-4, rtol=1e-5)


def test_response_positions_under_kv_cache(setup):
    """With caching, "response" steers exactly the generated tokens: check against a plain forward."""
    model, tok, v, ids = setup
    u = v / v.norm()
    monitor = build_readout(model, {"v": v}, [LAYER])
    prompt = tok.decode(ids[0])
    ops = build_ops(model, v, LAYER, coef=3.0, positions="response")
    out = generate(model, tok, [prompt], steering=ops, readout=monitor, max_new_tokens=6)[0]
    recorded = monitor.stacked(LAYER)[0, :, 0]  # every position fed: prompt, then one per generated token
    # generate() ends with one pass over the last token (its own read-out), so every token's position is read.
    full = torch.cat([ids[0], torch.tensor(out.token_ids)])
    plain = (_hidden(model, full[None])[LAYER][0] @ u)[: recorded.shape[0]]
    n_prompt = ids.shape[1]
    torch.testing.assert_close(recorded[:n_prompt], plain[:n_prompt], atol=1e-3, rtol=1e-4)
    shift = 3.0 * v.norm()
    torch.testing.assert_close(recorded[n_prompt:], plain[n_prompt:] + shift, atol=1e-3, rtol=1e-4)

    ops = build_ops(model, v, LAYER, coef=3.0, positions="prompt")
    generate(model, tok, [prompt], steering=ops, readout=monitor, max_new_tokens=3)
    recorded = monitor.stacked(LAYER)[0, :, 0]
    plain_prompt = _hidden(model, ids)[LAYER][0] @ u
    torch.testing.assert_close(recorded[:n_prompt], plain_prompt + shift, atol=1e-3, rtol=1e-4)


def test_monitor_rises_when_steering_toward_trait(setup):
    model, tok, v, _ = setup
    monitor = build_readout(model, {"v": v}, [LAYER])
    prompts = [format_prompt(tok, "What is your favourite colour?")]
    base = generate(model, tok, prompts, readout=monitor, max_new_tokens=8)[0].mean_projection()
    ops = build_ops(model, v, LAYER, coef=2.0)
    steered = generate(model, tok, prompts, steering=ops, readout=monitor, max_new_tokens=8)[0].mean_projection()
    assert steered > base + 1.0


def test_stream_pairs_tokens_with_projections(setup):
    model, tok, v, _ = setup
    monitor = build_readout(model, {"v": v}, [LAYER, LAYER + 2])
    prompt = format_prompt(tok, "Say hello.")
    n = _hooks(model)
    pieces = list(stream(model, tok, prompt, readout=monitor, max_new_tokens=5))
    batch = generate(model, tok, [prompt], readout=monitor, max_new_tokens=5)[0]
    assert "".join(p for p, _ in pieces).strip() == batch.text
    assert all(proj.shape == (2, 1) for _, proj in pieces)
    torch.testing.assert_close(pieces[0][1][0, 0], batch.projections[0, 0, 0], atol=1e-4, rtol=1e-4)
    assert _hooks(model) == n


def test_hooks_removed_when_body_raises(setup):
    model, _, v, ids = setup
    before = _hidden(model, ids)[-1]
    n = _hooks(model)
    with pytest.raises(RuntimeError, match="boom"), steer(model, v, LAYER, coef=5.0):
        raise RuntimeError("boom")
    assert _hooks(model) == n
    torch.testing.assert_close(_hidden(model, ids)[-1], before)


def test_hooks_removed_when_generation_raises(setup, monkeypatch):
    model, tok, v, _ = setup
    n = _hooks(model)
    ops = build_ops(model, v, LAYER, coef=1.0)

    def broken(*args, **kwargs):
        raise RuntimeError("generation failed")

    monkeypatch.setattr(model, "generate", broken)
    with pytest.raises(RuntimeError, match="generation failed"):
        generate(model, tok, ["hi"], steering=ops, max_new_tokens=2)
    assert _hooks(model) == n


def test_relative_coefficient_uses_recorded_norm(setup):
    model, _, v, ids = setup
    n_pos = model.config.num_hidden_layers + 1
    norms = [10.0] * n_pos
    tv = TraitVectors({"response_mean": v.repeat(n_pos, 1)}, "m", "t", metadata={"residual_norms": norms})
    plain = _hidden(model, ids)[LAYER]
    with steer(model, tv, LAYER, coef=0.5, relative=True):
        steered = _hidden(model, ids)[LAYER]
    added = (steered - plain)[0, 0]
    assert abs(float(added.norm()) - 5.0) < 1e-2
    with pytest.raises(ValueError, match="typical residual norm"):
        build_ops(model, v, LAYER, coef=0.5, relative=True)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"vectors": torch.randn(575), "layers": LAYER}, "width 575"),
        ({"vectors": torch.full((576,), float("nan")), "layers": LAYER}, "NaN"),
        ({"vectors": torch.randn(576), "layers": 31}, "out of range"),
        ({"vectors": torch.randn(576), "layers": 0}, "out of range"),
        ({"vectors": torch.randn(576), "layers": LAYER, "mode": "flip"}, "unknown steering mode"),
        ({"vectors": torch.randn(576), "layers": LAYER, "positions": "middle"}, "unknown positions"),
        ({"vectors": torch.randn(576), "layers": None}, "no layers given"),
        ({"vectors": torch.zeros(576), "layers": LAYER}, "all zeros"),
    ],
)
def test_bad_input_errors(setup, kwargs, message):
    model = setup[0]
    n = _hooks(model)
    with pytest.raises(ValueError, match=message):
        with steer(model, **kwargs):
            pass
    assert _hooks(model) == n


def test_loaded_vectors_of_wrong_model_rejected(setup, tmp_path):
    model = setup[0]
    tv = TraitVectors({"response_mean": torch.randn(5, 64)}, "tiny", "t", metadata={"recommended_layer": 2})
    tv.save(tmp_path / "v")
    with pytest.raises(ValueError, match="width 64"):
        with steer(model, tmp_path / "v"):
            pass


def test_steer_op_validation():
    with pytest.raises(ValueError, match="needs cap_min"):
        SteerOp(layer=3, vector=torch.ones(4), mode="cap")


def test_hook_handles_register_all_or_none():
    from torch import nn

    from steerlib.core.hooks import HookHandles

    module = nn.Linear(2, 2)
    handles = HookHandles()
    with pytest.raises(RuntimeError, match="third registration failed"):
        with handles.registering():
            handles.add(module.register_forward_hook(lambda *a: None))
            handles.add(module.register_forward_pre_hook(lambda *a: None))
            raise RuntimeError("third registration failed")
    assert len(handles) == 0 and not module._forward_hooks and not module._forward_pre_hooks
    with handles.registering():
        handles.add(module.register_forward_hook(lambda *a: None))
    assert len(module._forward_hooks) == 1
    handles.remove()
    assert not module._forward_hooks
