"""Steering inside vLLM equals steerlib's Hugging Face path (greedy tokens, read-out values)."""

from __future__ import annotations

import json

import pytest
import torch

from steerlib import format_prompt
from steerlib.steering.generation import generate
from steerlib.steering.steer import build_ops, build_readout
from steerlib.vllm import SPEC_KEY, cache_salt, encode_spec, parse_spec

LAYERS = [8, 14, 20]
N_TOKENS = 10
# A long shared system prompt: every prompt is longer than the 64-token step budget (chunked prefill) and
# all of them share their first blocks (the prefix cache is exercised, and must be kept apart by steering).
SYSTEM = ("You are a helpful assistant for a small town library. You answer questions about opening hours, "
          "book loans, events for children, the reading club and the history of the town in a friendly way.")
QUESTIONS = ["How do you feel about the future?", "What will next year bring?"]


@pytest.fixture(scope="module")
def prompts(embedded):
    _, tok = embedded
    return [format_prompt(tok, q, system=SYSTEM) for q in QUESTIONS]


def _configs(model, tv):
    """name -> SteerOps: add, ablate and cap at three layers, each at prompt / response / all positions."""
    out = {}
    for positions in ("all", "prompt", "response"):
        out[f"add-{positions}"] = build_ops(model, tv, LAYERS, 6.0, positions=positions)
        out[f"ablate-{positions}"] = build_ops(model, tv, LAYERS, mode="ablate", positions=positions)
        out[f"cap-{positions}"] = build_ops(model, tv, LAYERS, mode="cap", cap=(-1.0, 0.5), positions=positions)
    return out


def _vllm_tokens(llm, prompt_ids, specs):
    from vllm import SamplingParams

    params = [SamplingParams(max_tokens=N_TOKENS, temperature=0.0, extra_args={SPEC_KEY: s} if s else None)
              for s in specs]
    inputs = [{"prompt_token_ids": ids, **({"cache_salt": cache_salt(s)} if cache_salt(s) else {})}
              for ids, s in zip(prompt_ids, specs, strict=True)]
    outs = llm.generate(inputs, params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _hf_tokens(model, tok, prompt, ops):
    return generate(model, tok, [prompt], steering=ops, max_new_tokens=N_TOKENS, batch_size=1)[0].token_ids


def _ids(tok, prompts):
    return [list(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]


def test_every_mode_and_position_matches_hf_in_one_mixed_batch(vllm_engine, embedded, optimism_vectors, prompts):
    model, tok = embedded
    configs = _configs(model, optimism_vectors)
    ids = _ids(tok, prompts)
    assert all(len(x) > 64 for x in ids)  # longer than the step budget: prefilled in chunks
    names = list(configs)
    specs = [encode_spec(configs[n]) for n in names]
    # Every (config, prompt) pair plus unsteered rows, all in one vLLM batch.
    batch_ids = [x for _ in names for x in ids] + ids
    batch_specs = [s for s in specs for _ in ids] + [None] * len(ids)
    got = _vllm_tokens(vllm_engine, batch_ids, batch_specs)
    expected = [_hf_tokens(model, tok, p, configs[n]) for n in names for p in prompts]
    expected += [_hf_tokens(model, tok, p, []) for p in prompts]
    labels = [f"{n}/{i}" for n in names for i in range(len(ids))] + [f"none/{i}" for i in range(len(ids))]
    mismatched = [lab for lab, g, e in zip(labels, got, expected, strict=True) if g != e]
    assert not mismatched, mismatched
    # The edits change the text (the test would pass vacuously otherwise).
    plain = expected[-len(ids):]
    assert sum(expected[names.index("add-all") * len(ids) + i] != plain[i] for i in range(len(ids))) > 0
    assert sum(expected[names.index("add-response") * len(ids) + i] != plain[i] for i in range(len(ids))) > 0


def test_mixed_batch_equals_each_request_alone(vllm_engine, embedded, optimism_vectors, prompts):
    model, tok = embedded
    tv = optimism_vectors
    five = [build_ops(model, tv, 10, 4.0), build_ops(model, tv, [6, 12], -5.0, positions="response"),
            build_ops(model, tv, 16, mode="ablate"), build_ops(model, tv, [10, 20], mode="cap", cap=(None, 0.0)),
            build_ops(model, tv, 4, 8.0, positions="prompt")]
    specs = [encode_spec(ops) for ops in five] + [None]
    ids = _ids(tok, prompts)[:1] * len(specs)
    together = _vllm_tokens(vllm_engine, ids, specs)
    alone = [_vllm_tokens(vllm_engine, ids[:1], [s])[0] for s in specs]
    assert together == alone
    assert len({tuple(x) for x in together}) >= 4  # distinct configs give distinct texts


def test_readout_matches_hf(vllm_engine, embedded, optimism_vectors, prompts):
    from vllm import SamplingParams

    model, tok = embedded
    layer = 12
    readout = build_readout(model, {"optimistic": optimism_vectors}, layer)
    dirs = readout.directions[layer].tolist()
    assert vllm_engine.collective_rpc("steerlib_configure_readout", args=(layer, dirs)) == [True]
    ops = build_ops(model, optimism_vectors, 10, 4.0)
    ids = _ids(tok, prompts)
    for steer_ops in (ops, []):
        spec = encode_spec(steer_ops, readout=True)
        params = SamplingParams(max_tokens=N_TOKENS, temperature=0.0, extra_args={SPEC_KEY: spec})
        inputs = [{"prompt_token_ids": x, **({"cache_salt": cache_salt(spec)} if cache_salt(spec) else {})}
                  for x in ids]
        outs = vllm_engine.generate(inputs, [params] * len(ids), use_tqdm=False)
        got = vllm_engine.collective_rpc("steerlib_pop_readouts", args=([o.request_id for o in outs],))[0]
        for p, o in zip(prompts, outs, strict=True):
            hf = generate(model, tok, [p], steering=steer_ops, readout=readout, max_new_tokens=N_TOKENS,
                          batch_size=1)[0]
            assert list(o.outputs[0].token_ids) == hf.token_ids
            values = got[o.request_id]
            first = len(o.prompt_token_ids) - 1
            ours = torch.tensor([values[first + i][0] for i in range(len(hf.token_ids))])
            torch.testing.assert_close(ours, hf.token_projections().float(), atol=1e-3, rtol=0)
    vllm_engine.collective_rpc("steerlib_configure_readout", args=(None, None))


def test_prefix_cache_is_kept_apart_by_steering(vllm_engine, embedded, optimism_vectors, prompts):
    """Steered and unsteered requests share a long prefix; run in every order, each equals its solo text."""
    model, tok = embedded
    ids = _ids(tok, prompts)[1]
    steered = encode_spec(build_ops(model, optimism_vectors, LAYERS, 6.0, positions="prompt"))
    other = encode_spec(build_ops(model, optimism_vectors, LAYERS, -6.0, positions="prompt"))
    vllm_engine.reset_prefix_cache()
    first = _vllm_tokens(vllm_engine, [ids], [steered])[0]  # fills the cache with steered blocks
    plain = _vllm_tokens(vllm_engine, [ids], [None])[0]
    again = _vllm_tokens(vllm_engine, [ids, ids, ids], [other, None, steered])
    expected = [_hf_tokens(model, tok, prompts[1], build_ops(model, optimism_vectors, LAYERS, c, positions="prompt"))
                for c in (6.0, -6.0)]
    assert first == expected[0] and again[2] == expected[0]
    assert again[0] == expected[1]
    assert plain == again[1] == _hf_tokens(model, tok, prompts[1], [])
    assert first != plain


def test_bad_spec_is_refused_before_the_worker(vllm_engine, embedded, prompts):
    from vllm import SamplingParams

    _, tok = embedded
    bad = json.dumps({"edits": [{"layer": 99, "vector": [0.0] * 576}]})
    with pytest.raises(Exception, match="layer must be an int in 1..30"):
        vllm_engine.generate([{"prompt_token_ids": _ids(tok, prompts)[0]}],
                             SamplingParams(max_tokens=2, extra_args={SPEC_KEY: bad}), use_tqdm=False)
    # The engine still serves.
    assert len(_vllm_tokens(vllm_engine, _ids(tok, prompts)[:1], [None])[0]) == N_TOKENS


def test_spec_round_trip_and_salt(embedded, optimism_vectors):
    model, _ = embedded
    ops = build_ops(model, optimism_vectors, [3, 9], 2.5, positions="response")
    parsed = parse_spec(encode_spec(ops), 30, 576)
    assert [e.layer for e in parsed.edits] == [3, 9]
    assert all(e.positions == "response" and e.lowered.coef == 2.5 for e in parsed.edits)
    torch.testing.assert_close(parsed.edits[0].lowered.row, ops[0].vector.float())
    assert cache_salt(encode_spec(ops)) != cache_salt(encode_spec(build_ops(model, optimism_vectors, [3, 9], 2.0)))
    assert cache_salt(encode_spec([], readout=True)) is None
    with pytest.raises(ValueError, match="steerlib edit 0: mode must be one of"):
        parse_spec(json.dumps({"edits": [{"layer": 3, "vector": [0.1] * 576, "mode": "boost"}]}), 30, 576)
