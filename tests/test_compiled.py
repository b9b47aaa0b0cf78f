"""Compiled decoding: the custom op, equivalence with eager steering, and no graph breaks in the decoder.

Compiling the 30-layer embedded model with inductor takes over a minute on CPU, so the embedded-model tests
compile with ``aot_eager`` (dynamo's full graph and AOT functionalisation, the same graph inductor receives)
and inductor itself is exercised on a tiny model.
"""

from __future__ import annotations

import math

import pytest
import torch
from steerlib.kernels import fused_steer_rows, steer_rows_, steer_rows_inline, steer_rows_op
from torch._dynamo.utils import counters

from steerlib import build_ops, build_readout, format_prompt, generate
from steerlib.core.capture import pad_batch
from steerlib.core.compat import cache_keyword
from steerlib.steering.compiled import CompiledSteering, generate_batch
from steerlib.steering.steer import ResidualEditor

QUESTIONS = ["What will the next ten years bring?", "Hi"]
GREEDY = dict(do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=0)


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_custom_op_matches_fused_op_and_passes_opcheck(dtype):
    g = torch.Generator().manual_seed(0)
    n, d, k = 7, 48, 3
    hidden = torch.randn(n, d, generator=g).to(dtype)
    table = torch.cat([torch.zeros(1, d), torch.randn(1, d, generator=g), _unit(torch.randn(1, d, generator=g))])
    index = torch.tensor([1, 0, 2, 1, 2, 0, 1])
    coef = torch.tensor([1.5, 0.0, 0.0, -2.0, 0.0, 0.0, 0.5])
    lo = torch.tensor([-math.inf, -math.inf, -0.5, -math.inf, 0.0, -math.inf, -math.inf])
    hi = torch.tensor([math.inf, math.inf, 0.5, math.inf, 0.0, math.inf, math.inf])
    monitor = torch.randn(k, d, generator=g)
    args = (hidden, table, index, coef, lo, hi, monitor, "torch")
    out, proj, opened = steer_rows_op(*args)
    assert bool(opened.all())  # no gates: every row open
    ref_out, ref_proj = fused_steer_rows(hidden.clone(), table, index, coef, lo, hi, monitor)
    torch.testing.assert_close(out, ref_out, atol=0, rtol=0)
    torch.testing.assert_close(proj, ref_proj, atol=0, rtol=0)
    assert not torch.equal(out.float(), hidden.float())  # the edit did something, on a copy
    inline_out, inline_proj, _ = steer_rows_inline(*args[:-1])
    torch.testing.assert_close(inline_out, ref_out, atol=1e-2 if dtype == torch.bfloat16 else 1e-5, rtol=1e-5)
    torch.testing.assert_close(inline_proj, ref_proj, atol=1e-4, rtol=1e-5)
    empty_out, empty_proj, _ = steer_rows_op(hidden, table, torch.zeros(n, dtype=torch.long), None, None, None,
                                             None, "torch")
    assert empty_proj.shape == (n, 0) and torch.equal(empty_out, hidden) and empty_out is not hidden
    torch.library.opcheck(steer_rows_op, args)
    # The in-place form writes into the caller's buffers and allocates no outputs.
    inplace_hidden, proj_out = hidden.clone(), torch.full((n, k), float("nan"))
    assert steer_rows_(inplace_hidden, table, index, coef, lo, hi, monitor, proj_out, "torch") is None
    torch.testing.assert_close(inplace_hidden, ref_out, atol=0, rtol=0)
    torch.testing.assert_close(proj_out, ref_proj, atol=0, rtol=0)
    torch.library.opcheck(steer_rows_, (hidden.clone(), table, index, coef, lo, hi, monitor, proj_out, "torch"))


def _batch(tok):
    prompts = [format_prompt(tok, q) for q in QUESTIONS]
    encoded = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    ids, mask, _, _ = pad_batch(encoded, tok.pad_token_id or 0, "left")
    return prompts, ids, mask


def test_compiled_generate_matches_eager_tokens_and_projections(embedded):
    model, tok = embedded
    torch.manual_seed(0)
    v = torch.randn(model.config.hidden_size) * 0.5
    ops = build_ops(model, v, [10, 15], -6.0, positions="response") + build_ops(model, v, 20, mode="ablate")
    monitor = build_readout(model, {"a": v, "b": torch.randn(model.config.hidden_size)}, [10, 20])
    prompts = [format_prompt(tok, q) for q in QUESTIONS]
    eager = generate(model, tok, prompts, steering=ops, readout=monitor, max_new_tokens=6)
    plain = generate(model, tok, prompts, max_new_tokens=6)
    before = counters["stats"]["unique_graphs"]
    compiled = generate(model, tok, prompts, steering=ops, readout=monitor, max_new_tokens=6,
                        compile={"backend": "aot_eager"})
    assert counters["stats"]["unique_graphs"] > before  # the decode step really went through dynamo
    assert not counters["graph_break"]
    for e, c, p in zip(eager, compiled, plain, strict=True):
        assert c.token_ids == e.token_ids
        torch.testing.assert_close(c.projections, e.projections, atol=1e-4, rtol=1e-4)
        assert c.projections.shape == (len(c.token_ids), 2, 2)
        # Response-only steering leaves the prefill alone: the first token is the unsteered one.
        assert c.token_ids[0] == p.token_ids[0]
    assert any(c.token_ids != p.token_ids for c, p in zip(compiled, plain, strict=True))


def _decode_step_inputs(model, ids, mask):
    """A prefill into a static cache, then the inputs of the first decode step (as generate builds them)."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + 4)
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    key = cache_keyword(model)
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **{key: cache})
    step_mask = torch.cat([mask, torch.ones(len(ids), 1, dtype=mask.dtype)], dim=1)
    return {"input_ids": out.logits[:, -1:].argmax(-1), "attention_mask": step_mask,
            "position_ids": positions[:, -1:] + 1, "use_cache": True, key: cache}


def _mixed_ops(model, vecs):
    """Two response-only adds at one layer (merged into a per-row shift), a cap, and a 2-trait monitor."""
    n = model.config.num_hidden_layers
    ops = (build_ops(model, vecs[0], n // 3, 4.0, positions="response")
           + build_ops(model, vecs[1], n // 3, 2.0, positions="response")
           + build_ops(model, vecs[2], n - 1, mode="cap", cap=(-1.0, 1.0)))
    return ops, build_readout(model, {"a": vecs[0], "b": vecs[2]}, [n // 3, n - 1, n])


def test_no_graph_breaks_in_decoder_with_compiled_steering(embedded):
    model, tok = embedded
    torch.manual_seed(1)
    ops, monitor = _mixed_ops(model, [torch.randn(model.config.hidden_size) for _ in range(3)])
    _, ids, mask = _batch(tok)
    step = _decode_step_inputs(model, ids, mask)
    row_coefs = torch.tensor([[4.0, 0.0, 1.0], [0.0, 2.0, 1.0]])
    with torch.inference_mode(), torch._dynamo.config.patch(skip_nnmodule_hook_guards=False), \
            CompiledSteering(model, ops, monitor, prompt_lengths=mask.sum(1), max_steps=4, row_coefs=row_coefs) as cs:
        explained = torch._dynamo.explain(model)(**step)
        assert explained.graph_break_count == 0, explained.break_reasons
        assert explained.graph_count == 1
        assert float(cs.buffer[1].abs().sum()) > 0  # the traced decode step wrote read-out step 1
        assert float(cs.buffer[2:].abs().sum()) == 0


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_eager_editor_breaks_the_graph_and_compiled_steering_does_not(make_tiny, arch):
    """The same explain check that passes above sees the eager editor's Python prefill/decode decision."""
    model = make_tiny(arch)
    g = torch.Generator().manual_seed(3)
    ops, monitor = _mixed_ops(model, [torch.randn(model.config.hidden_size, generator=g) for _ in range(3)])
    ids = torch.randint(3, 256, (2, 6), generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    counts = {}
    # The eager half is the slow one (every break restarts tracing); one architecture shows it.
    for name in ("eager", "compiled") if arch == "llama" else ("compiled",):
        step = _decode_step_inputs(model, ids, mask)
        editor = (ResidualEditor(model, ops, monitor) if name == "eager" else
                  CompiledSteering(model, ops, monitor, prompt_lengths=mask.sum(1), max_steps=4,
                                   backend="auto" if arch == "llama" else "inline"))
        with torch.inference_mode(), torch._dynamo.config.patch(skip_nnmodule_hook_guards=False), editor:
            counts[name] = torch._dynamo.explain(model)(**step).graph_break_count
    assert counts.get("eager", 1) > 0
    assert counts["compiled"] == 0


def test_per_row_vectors_under_inductor_match_eager_rows(make_tiny):
    """Two rows, each steered by its own vector in one batch, compiled by inductor, equal each row alone eagerly."""
    model = make_tiny("llama")
    d = model.config.hidden_size
    g = torch.Generator().manual_seed(2)
    a, b, c = (torch.randn(d, generator=g) * 3 for _ in range(3))
    # Two adds at layer 2 become one per-row shift; the cap at layer 3 runs the custom op under inductor.
    ops = build_ops(model, a, 2, 1.0) + build_ops(model, b, 2, 1.0) + build_ops(model, c, 3, mode="cap",
                                                                                  cap=(-0.5, 0.5))
    monitor = build_readout(model, {"a": a, "b": b}, [2, 3])
    ids = torch.randint(3, 256, (2, 5), generator=g)
    mask = torch.ones_like(ids)
    kwargs = dict(GREEDY, max_new_tokens=5, min_new_tokens=5)
    with torch.inference_mode():
        plain = model.generate(input_ids=ids, **kwargs)[:, 5:]
        # Compiled unsteered first: the steered call below must not reuse this graph without its hooks.
        plain_compiled, _ = generate_batch(model, ids, mask, kwargs)
        new, readout = generate_batch(model, ids, mask, kwargs, steering=ops, readout=monitor,
                                      row_coefs=torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]))
    for row, row_ops in ((0, [ops[0], ops[2]]), (1, ops[1:])):
        with torch.inference_mode(), ResidualEditor(model, row_ops, monitor):
            out = model.generate(input_ids=ids[row:row + 1], **kwargs)
            eager_proj = torch.stack(
                [torch.stack([r[0, -1] for r in monitor.records[layer]]) for layer in monitor.layers], dim=1)
        assert new[row].tolist() == out[0, 5:].tolist()
        # The last step is the closing pass over the last token (its own read-out); the others pair with tokens.
        assert readout.shape[1] == new.shape[1] + 1
        torch.testing.assert_close(readout[row, :-1], eager_proj, atol=1e-4, rtol=1e-4)
    assert not torch.equal(plain, new)
    assert torch.equal(plain_compiled, plain)


def test_bad_row_coefs_and_missing_position_ids(make_tiny):
    model = make_tiny("llama")
    ops = build_ops(model, torch.ones(model.config.hidden_size), 2, 1.0)
    with pytest.raises(ValueError, match=r"row_coefs must have shape \[batch, n_ops\] = \[2, 1\], got \[2, 2\]"):
        CompiledSteering(model, ops, prompt_lengths=torch.tensor([3, 3]), max_steps=2, row_coefs=torch.ones(2, 2))
    with pytest.raises(ValueError, match="row_coefs contains NaN"):
        CompiledSteering(model, ops, prompt_lengths=torch.tensor([3, 3]), max_steps=2,
                         row_coefs=torch.tensor([[1.0], [float("nan")]]))
    hidden = torch.zeros(2, 1, model.config.hidden_size)
    rotary = model.model.rotary_emb(hidden, torch.zeros(1, 1, dtype=torch.long))
    with pytest.warns(RuntimeWarning, match="skip_nnmodule_hook_guards is True"), \
            CompiledSteering(model, ops, prompt_lengths=torch.tensor([3, 3]), max_steps=2), \
            pytest.raises(RuntimeError, match="decoder block 1 was called without position_ids"):
        model.model.layers[1](hidden, position_embeddings=rotary)
