"""Steering inside vLLM equals steerlib's Hugging Face path (greedy tokens, read-out values).

Every request goes through ``VllmEngine`` (the adapter ``steerlib serve --engine vllm`` uses), so its specs are
the lowered rows the server sends; ``tests/test_vllm_spec.py`` covers the client-side form.
"""

from __future__ import annotations

import json

import pytest
import torch
from vllm_helpers import READOUT_LAYER, TOKEN_BUDGET, Collected, run_rows, streamed_readout

from steerlib import format_prompt
from steerlib.steering.generation import generate
from steerlib.steering.plan import Edit, lower_ops, position_rule
from steerlib.steering.steer import build_ops

LAYERS = [8, 14, 20]
N_TOKENS = 10
# A long shared system prompt: every prompt is longer than the step budget (chunked prefill) and all of them
# share their first blocks (the prefix cache is exercised, and must be kept apart by steering).
SYSTEM = ("You are a helpful assistant for a small town library. You answer questions about opening hours, "
          "book loans, events for children, the reading club and the history of the town in a friendly way. "
          "Keep every answer short, warm and clear, and suggest a book from the shelves whenever it fits.")
QUESTIONS = ["How do you feel about the future?", "What will next year bring?"]


@pytest.fixture(scope="module")
def prompts(embedded):
    _, tok = embedded
    return [format_prompt(tok, q, system=SYSTEM) for q in QUESTIONS]


def _ids(tok, prompts):
    return [list(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]


def _edits(ops):
    return lower_ops(ops)


def _hf(model, tok, prompt, ops, readout=None):
    return generate(model, tok, [prompt], steering=ops, readout=readout, max_new_tokens=N_TOKENS, batch_size=1)[0]


def _configs(model, tv):
    """name -> SteerOps: add, ablate and cap at three layers, each at prompt / response / all positions."""
    out = {}
    for positions in ("all", "prompt", "response"):
        out[f"add-{positions}"] = build_ops(model, tv, LAYERS, 6.0, positions=positions)
        out[f"ablate-{positions}"] = build_ops(model, tv, LAYERS, mode="ablate", positions=positions)
        out[f"cap-{positions}"] = build_ops(model, tv, LAYERS, mode="cap", cap=(-1.0, 0.5), positions=positions)
    return out


def test_every_mode_and_position_matches_hf_in_one_mixed_batch(vllm_engine, embedded, optimism_vectors, prompts):
    model, tok = embedded
    configs = _configs(model, optimism_vectors)
    ids = _ids(tok, prompts)
    assert all(len(x) > TOKEN_BUDGET for x in ids)  # longer than the step budget: prefilled in chunks
    names = list(configs)
    # Every (config, prompt) pair plus the unsteered rows, all in flight together.
    rows = [(x, _edits(configs[n])) for n in names for x in ids] + [(x, []) for x in ids]
    got = [row.token_ids for row, _ in run_rows(vllm_engine, rows, N_TOKENS)]
    expected = [_hf(model, tok, p, configs[n]).token_ids for n in names for p in prompts]
    expected += [_hf(model, tok, p, []).token_ids for p in prompts]
    labels = [f"{n}/{i}" for n in names for i in range(len(ids))] + [f"none/{i}" for i in range(len(ids))]
    mismatched = [lab for lab, g, e in zip(labels, got, expected, strict=True) if g != e]
    assert not mismatched, mismatched
    # The edits change the text where they apply (the comparison would be vacuous otherwise).
    plain = expected[-len(ids):]
    for name in ("add-all", "add-prompt", "add-response", "cap-all"):
        k = names.index(name) * len(ids)
        assert any(expected[k + i] != plain[i] for i in range(len(ids))), name


def test_mixed_batch_equals_each_request_alone(vllm_engine, embedded, optimism_vectors, prompts):
    model, tok = embedded
    tv = optimism_vectors
    five = [build_ops(model, tv, 10, 4.0), build_ops(model, tv, [6, 12], -5.0, positions="response"),
            build_ops(model, tv, 16, mode="ablate"), build_ops(model, tv, [10, 20], mode="cap", cap=(None, 0.0)),
            build_ops(model, tv, 4, 8.0, positions="prompt")]
    edits = [_edits(ops) for ops in five] + [[]]
    ids = _ids(tok, prompts)[0]
    together = [row.token_ids for row, _ in run_rows(vllm_engine, [(ids, e) for e in edits], N_TOKENS)]
    alone = [run_rows(vllm_engine, [(ids, e)], N_TOKENS)[0][0].token_ids for e in edits]
    assert together == alone
    assert len({tuple(x) for x in together}) >= 4  # distinct configs give distinct texts


def test_readout_matches_hf(vllm_engine, embedded, optimism_vectors, readout, prompts):
    model, tok = embedded
    ops = build_ops(model, optimism_vectors, 10, 4.0)
    ids = _ids(tok, prompts)
    for steer_ops in (ops, []):
        done = run_rows(vllm_engine, [(x, _edits(steer_ops)) for x in ids], N_TOKENS)
        for p, (row, got) in zip(prompts, done, strict=True):
            hf = _hf(model, tok, p, steer_ops, readout)
            assert row.token_ids == hf.token_ids
            expect = streamed_readout(hf, READOUT_LAYER, vllm_engine.eos_ids)
            torch.testing.assert_close(torch.tensor([v[0] for v in got.values]), expect, atol=1e-3, rtol=0)
            summary = got.completion.trait_projections["optimistic"]
            assert summary["n_tokens"] == len(hf.response_projections(layer=READOUT_LAYER))
            assert summary["mean"] == pytest.approx(hf.mean_projection(layer=READOUT_LAYER), abs=1e-3)
            assert summary["prompt_last"] == pytest.approx(hf.prompt_last_projection(layer=READOUT_LAYER), abs=1e-3)


def test_prefix_cache_is_kept_apart_by_steering(vllm_engine, embedded, optimism_vectors, prompts):
    """Steered and unsteered requests share a long prefix; whoever fills the cache, each equals its solo text."""
    model, tok = embedded
    ids = _ids(tok, prompts)[1]
    up, down = (build_ops(model, optimism_vectors, LAYERS, c, positions="prompt") for c in (6.0, -6.0))
    first = run_rows(vllm_engine, [(ids, _edits(up))])[0][0].token_ids  # fills the cache with steered blocks
    plain = run_rows(vllm_engine, [(ids, [])])[0][0].token_ids
    again = [row.token_ids for row, _ in run_rows(vllm_engine, [(ids, _edits(down)), (ids, []), (ids, _edits(up))])]
    assert first == again[2] == _hf(model, tok, prompts[1], up).token_ids
    assert again[0] == _hf(model, tok, prompts[1], down).token_ids
    assert plain == again[1] == _hf(model, tok, prompts[1], []).token_ids
    assert first != plain


def test_a_bad_spec_is_refused_before_the_worker_and_the_engine_keeps_serving(vllm_engine, embedded, prompts):
    from steerlib.serve.engine import Sampling
    from steerlib.vllm import SPEC_KEY

    _, tok = embedded
    ids = _ids(tok, prompts)[0]

    bad = Edit(99, "bad", torch.ones(576), 1.0, float("-inf"), float("inf"), position_rule("all"))  # no layer 99
    got = Collected()
    vllm_engine.submit(ids, [bad], Sampling(max_tokens=2), got, steered=True)
    assert got.done.wait(120)
    assert got.error is not None and "layer must be an int in 1..30" in str(got.error)
    assert SPEC_KEY == "steerlib"
    assert len(run_rows(vllm_engine, [(ids, [])], 3)[0][0].token_ids) == 3
    assert json.loads(json.dumps(vllm_engine.stats()))["engine"] == "vllm"
