"""The serving engine captures pooled activations of logged conversations inside vLLM (``VllmEngine.capture``),
on the session's compiled engine (chunked prefill, prefix caching): equal to ``steerlib.core.capture`` within
``|vLLM - HF| <= 2e-3 + 1e-5 |HF|`` per element, while steered rows are served beside it."""

from __future__ import annotations

import pytest
import torch
from vllm_helpers import Collected

from steerlib import format_prompt
from steerlib.core.capture import POOLINGS, capture_activations, tokenize_pairs
from steerlib.serve.engine import Sampling
from steerlib.steering.plan import lower_ops
from steerlib.steering.steer import build_ops

LOGGED = [("How was your week?", "It was wonderful, thank you! I finished a long book and went hiking."),
          ("What do you think about the rain?", "Rain is dreary and it ruins every plan I make."),
          ("Describe the library in a few words.", "")]


def test_the_serving_engine_captures_logged_conversations_like_hf(embedded, vllm_engine, optimism_vectors):
    model, tok = embedded
    assert vllm_engine.capabilities.pooled_capture
    prompts = [format_prompt(tok, q) for q, _ in LOGGED]
    responses = [r or None for _, r in LOGGED]
    encoded = tokenize_pairs(tok, prompts, responses)
    # A steered row in flight beside the capture: its steering must not leak into the captured sums.
    busy = Collected()
    vllm_engine.submit(encoded[0][0][: encoded[0][1]], lower_ops(build_ops(model, optimism_vectors, [12], 8.0)),
                       Sampling(max_tokens=24), busy, steered=True)
    layers = [0, 12, 30]
    got = vllm_engine.capture(encoded, layers)
    assert busy.done.wait(300) and busy.error is None
    ref = capture_activations(model, tok, prompts, responses, layers)
    for kind in POOLINGS:
        want = ref.pooled[kind]
        have = torch.tensor([g[kind] for g in got])
        torch.testing.assert_close(have, want, rtol=1e-5, atol=2e-3, equal_nan=True)
    torch.testing.assert_close(torch.tensor([g["token_norms"] for g in got]), ref.token_norms, rtol=1e-5, atol=2e-3)
    assert [(g["prompt_tokens"], g["response_tokens"]) for g in got] == [
        (p, len(ids) - p) for ids, p in encoded]


def test_capture_refuses_a_prompt_longer_than_the_sample(vllm_engine):
    with pytest.raises(ValueError, match="sample 0: prompt length 5 is more than its 3 tokens"):
        vllm_engine.capture([([1, 2, 3], 5)])
