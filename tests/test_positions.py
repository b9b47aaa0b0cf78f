"""Prompt/response split: found by the cache's type, not a keyword's name, and an error when it cannot be told."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from steerlib import build_ops, build_readout, format_prompt, generate, steer
from steerlib.core.compat import CACHE_KEYWORDS, cache_keyword, past_length
from steerlib.steering.steer import _PositionTracker

LAYER = 12


def _cache_with(n_tokens: int) -> DynamicCache:
    cache = DynamicCache()
    k = torch.zeros(1, 2, n_tokens, 8)
    cache.update(k, k.clone(), 0)
    return cache


@pytest.mark.parametrize("keyword", CACHE_KEYWORDS)
def test_tracker_reads_either_keyword_spelling(keyword):
    tracker = _PositionTracker()
    ids = torch.ones(1, 1, dtype=torch.long)
    tracker.pre_hook(None, (), {"input_ids": ids, keyword: _cache_with(5), "use_cache": True})
    assert tracker.past_len == 5 and not tracker.in_prompt()
    assert tracker.applies("response") and not tracker.applies("prompt") and tracker.applies("all")
    tracker.pre_hook(None, (), {"input_ids": torch.ones(1, 7, dtype=torch.long), keyword: DynamicCache()})
    assert tracker.past_len == 0 and tracker.applies("prompt") and not tracker.applies("response")


def test_tracker_finds_cache_under_an_unknown_keyword_or_position():
    tracker = _PositionTracker()
    tracker.pre_hook(None, (torch.ones(1, 1, dtype=torch.long), _cache_with(3)), {})
    assert tracker.past_len == 3
    tracker.pre_hook(None, (), {"input_ids": torch.ones(1, 1, dtype=torch.long), "kv_state": _cache_with(4)})
    assert tracker.past_len == 4


def test_tracker_refuses_to_guess():
    tracker = _PositionTracker()
    # generate(use_cache=False) re-feeds the whole sequence: prompt and response cannot be told apart.
    tracker.pre_hook(None, (), {"input_ids": torch.ones(1, 9, dtype=torch.long), "use_cache": False})
    with pytest.raises(RuntimeError, match="cannot tell prompt from response"):
        tracker.applies("response")
    assert tracker.applies("all")
    # A decode step whose cache travels in a form steerlib does not know: positions run past the pass.
    tracker.pre_hook(None, (), {"input_ids": torch.ones(1, 1, dtype=torch.long),
                                "position_ids": torch.tensor([[12]]), "use_cache": True})
    with pytest.raises(RuntimeError, match="cannot tell prompt from response"):
        tracker.applies("prompt")
    # A plain forward with position ids of its own length is a prefill.
    tracker.pre_hook(None, (), {"input_ids": torch.ones(1, 4, dtype=torch.long),
                                "position_ids": torch.arange(4)[None]})
    assert tracker.applies("prompt")


def test_past_length_from_cache_position():
    assert past_length((), {"cache_position": torch.tensor([6, 7])}) == 6


def test_installed_transformers_cache_keyword_is_known(embedded):
    model, _ = embedded
    assert cache_keyword(model) in CACHE_KEYWORDS
    assert cache_keyword(model.model) in CACHE_KEYWORDS


def test_response_steering_changes_tokens_and_leaves_prompt_readout(embedded):
    """Under the installed transformers: "response" edits generated tokens only, "prompt" the prefill only."""
    model, tok = embedded
    torch.manual_seed(0)
    v = torch.randn(model.config.hidden_size)
    v = 8.0 * v / v.norm()
    prompt = format_prompt(tok, "Tell me about the sea.")
    monitor = build_readout(model, {"v": v}, [LAYER])
    plain = generate(model, tok, [prompt], readout=monitor, max_new_tokens=12)[0]
    ops = build_ops(model, v, LAYER, coef=20.0, positions="response")
    steered = generate(model, tok, [prompt], steering=ops, readout=monitor, max_new_tokens=12)[0]
    assert steered.token_ids != plain.token_ids
    # The last prompt token's read-out is taken in the prefill: untouched by response-only steering.
    assert steered.prompt_last_projection() == pytest.approx(plain.prompt_last_projection(), abs=1e-3)
    assert steered.mean_projection() > plain.mean_projection() + 100.0
    ops = build_ops(model, v, LAYER, coef=4.0, positions="prompt")
    prompt_only = generate(model, tok, [prompt], steering=ops, readout=monitor, max_new_tokens=12)[0]
    assert prompt_only.prompt_last_projection() == pytest.approx(plain.prompt_last_projection() + 4.0 * 8.0, abs=1e-2)


def test_response_positions_with_generate_without_cache_raise(embedded):
    model, tok = embedded
    ids = tok(format_prompt(tok, "Hi"), return_tensors="pt", add_special_tokens=False)
    v = torch.randn(model.config.hidden_size)
    before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    with pytest.raises(RuntimeError, match="cannot tell prompt from response"):
        with steer(model, v, LAYER, coef=1.0, positions="response"):
            model.generate(**ids, max_new_tokens=2, use_cache=False, do_sample=False)
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == before
