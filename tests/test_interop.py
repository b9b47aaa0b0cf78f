"""steerlib inside TransformerLens and nnsight: same ops, same logits; same read-out; activations back for extraction.

Tolerances, on the embedded model (fp32, CPU), logits of magnitude ~20:
- nnsight runs the HF model itself, its edits are the same tensor operations: equal to 1e-5.
- TransformerLens's bridge runs its own attention path: unsteered logits already differ from HF's by ~3e-5, so
  the steered comparison allows 2e-4 (read-outs, values up to ~100: 1e-4 relative).
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

from steerlib.core import backends
from steerlib.core.capture import activations_from_hidden, capture_activations, pad_batch, tokenize_pairs
from steerlib.extraction.sweep import mean_difference
from steerlib.interop import edits as interop_edits
from steerlib.interop import nnsight as slnn
from steerlib.interop import transformer_lens as sltl
from steerlib.steering.plan import Condition, SteerOp
from steerlib.steering.steer import ResidualEditor, build_readout

TL_TOL = {"atol": 2e-4, "rtol": 1e-4}
NN_TOL = {"atol": 1e-5, "rtol": 1e-5}
PROMPTS = ["The weather today is very", "I think that"]


@pytest.fixture(scope="module")
def bridge(embedded):
    from transformer_lens.model_bridge import TransformerBridge

    model, tok = embedded
    # The bridge rewires the model it wraps: give it a twin sharing the weights (as a TransformerLens user's own).
    twin = copy.deepcopy(model, {id(t): t for t in (*model.parameters(), *model.buffers())})
    return TransformerBridge.boot_transformers("smollm2", hf_model=twin, tokenizer=tok, device="cpu")


@pytest.fixture(scope="module")
def lm(embedded):
    from nnsight import TransformersModel

    model, tok = embedded
    return TransformersModel(model, tokenizer=tok, task="text-generation")


@pytest.fixture(scope="module")
def batch(embedded):
    """A left-padded batch of two prompts: (ids, mask, position ids)."""
    _, tok = embedded
    encoded = [list(tok(p)["input_ids"]) for p in PROMPTS]
    ids, mask, positions, _ = pad_batch(encoded, tok.pad_token_id or 0, "left")
    return ids, mask, positions


def _vec(seed: int) -> torch.Tensor:
    return torch.randn(576, generator=torch.Generator().manual_seed(seed))


OPS = {
    "add": [SteerOp(layer=10, vector=_vec(0), coef=4.0)],
    "ablate+cap": [SteerOp(layer=12, vector=_vec(1), mode="ablate"),
                   SteerOp(layer=20, vector=_vec(2), mode="cap", cap_min=-1.0, cap_max=1.0)],
    "top layer": [SteerOp(layer=30, vector=_vec(3), coef=3.0)],
    "gated": [SteerOp(layer=15, vector=_vec(4), coef=6.0, when=Condition(_vec(5), above=0.0))],
    "response only": [SteerOp(layer=10, vector=_vec(0), coef=4.0, positions="response")],
}


def _steerlib_logits(model, ids, mask, positions, ops) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        with ResidualEditor(model, ops):
            steered = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    return base, steered


@pytest.mark.parametrize("name", list(OPS))
def test_same_logits_through_transformer_lens_and_nnsight(embedded, bridge, lm, batch, name: str) -> None:
    model, _ = embedded
    ids, mask, positions = batch
    ops = OPS[name]
    base, want = _steerlib_logits(model, ids, mask, positions, ops)
    if name == "response only":
        torch.testing.assert_close(want, base)  # one forward pass is all prompt: nothing to steer
    else:
        assert float((want - base).abs().max()) > 0.5, "the op must move the logits for the comparison to mean much"
    with torch.no_grad():
        tl = bridge.run_with_hooks(ids, attention_mask=mask, position_ids=positions,
                                   fwd_hooks=sltl.fwd_hooks(bridge, ops))
    keep = mask.bool()  # padded positions are not compared: the two attention paths fill them differently
    torch.testing.assert_close(tl[keep], want[keep], **TL_TOL)
    with torch.no_grad(), lm.trace({"input_ids": ids, "attention_mask": mask, "position_ids": positions}):
        slnn.steer_in_trace(lm, ops)
        got = lm.output.logits.save()
    torch.testing.assert_close(getattr(got, "value", got)[keep], want[keep], **NN_TOL)


def test_readout_equals_steerlibs(embedded, bridge, lm, batch) -> None:
    model, _ = embedded
    ids, mask, positions = batch
    traits = {"a": _vec(6), "b": _vec(7)}
    layers = [5, 30]
    ops = [SteerOp(layer=5, vector=_vec(8), coef=2.0)]  # read-out after the edit at the same layer
    ref = build_readout(model, traits, layers)
    with torch.no_grad(), ResidualEditor(model, ops, ref):
        model(input_ids=ids, attention_mask=mask, position_ids=positions)
    tl, nn_ = build_readout(model, traits, layers), build_readout(model, traits, layers)
    with torch.no_grad(), bridge.hooks(fwd_hooks=sltl.fwd_hooks(bridge, ops, tl)):
        bridge(ids, attention_mask=mask, position_ids=positions)
    with torch.no_grad(), lm.trace({"input_ids": ids, "attention_mask": mask, "position_ids": positions}):
        slnn.steer_in_trace(lm, ops, nn_)
    keep = mask.bool()
    for layer in layers:
        want = ref.stacked(layer)
        assert want.shape == (2, ids.shape[1], 2)
        torch.testing.assert_close(tl.stacked(layer)[keep], want[keep], atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(nn_.stacked(layer)[keep], want[keep], **NN_TOL)


def test_activations_from_caches_equal_capture(embedded, bridge, lm) -> None:
    """Activations read in TransformerLens or nnsight, pooled by steerlib, equal capture_activations'."""
    model, tok = embedded
    prompts, responses = ["How are you?", "Hi"], ["Fine, thank you.", "Hello there, friend."]
    layers = [0, 7, 30]
    want = capture_activations(model, tok, prompts, responses, layers, batch_size=2)
    encoded = tokenize_pairs(tok, prompts, responses)  # the token ids and prompt/response split capture uses
    ids, mask, positions, _ = pad_batch([e[0] for e in encoded], tok.pad_token_id or 0, "right")
    with torch.no_grad():
        _, cache = bridge.run_with_cache(ids, attention_mask=mask, position_ids=positions,
                                         names_filter=sltl.hook_names(layers))
    got_tl = sltl.activations_from_cache(cache, mask, want.prompt_lengths)
    with torch.no_grad(), lm.trace({"input_ids": ids, "attention_mask": mask, "position_ids": positions}):
        saved = slnn.save_layers(lm, layers)
    got_nn = slnn.activations_from_saved(saved, mask, want.prompt_lengths)
    labels = torch.tensor([True, False])
    want_vectors = mean_difference(want.pooled["response_mean"], labels)  # [L, D], as extraction computes them
    for got, tol in ((got_tl, 2e-4), (got_nn, 1e-5)):
        assert got.layers == layers and got.response_lengths == want.response_lengths
        for kind in ("prompt_mean", "prompt_last", "response_mean"):
            for layer in layers:
                w = want.at(kind, layer)
                torch.testing.assert_close(got.at(kind, layer), w, atol=tol * float(w.abs().max()), rtol=1e-4)
        vectors = mean_difference(got.pooled["response_mean"], labels)
        torch.testing.assert_close(vectors, want_vectors, atol=tol * float(want_vectors.abs().max()), rtol=1e-4)


def test_hook_names_and_layers() -> None:
    assert sltl.hook_names([0, 1, 30]) == ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post",
                                           "blocks.29.hook_resid_post"]
    assert [sltl.layer_of(n) for n in sltl.hook_names([0, 1, 30])] == [0, 1, 30]
    with pytest.raises(ValueError, match=r"'ln_final.hook_out' is not a residual-stream hook point"):
        sltl.layer_of("ln_final.hook_out")


def test_bad_input(bridge) -> None:
    with pytest.raises(ValueError, match=r"steering layer 31 is out of range 1\.\.30"):
        sltl.fwd_hooks(bridge, [SteerOp(layer=31, vector=_vec(0))])
    with pytest.raises(ValueError, match="latching gates and marker positions need steer()"):
        sltl.fwd_hooks(bridge, [SteerOp(layer=3, vector=_vec(0), when=Condition(_vec(1), above=0.0, latch=True))])
    with pytest.raises(ValueError, match="ops must be SteerOp objects"):
        sltl.fwd_hooks(bridge, [_vec(0)])
    with pytest.raises(ValueError, match="the cache holds no residual hook point"):
        sltl.activations_from_cache({"ln_final.hook_out": torch.zeros(1, 2, 576)}, torch.ones(1, 2), [1])
    with pytest.raises(ValueError, match=r"prompt length 3 of row 0 is outside 1\.\.2"):
        activations_from_hidden({4: torch.zeros(1, 3, 8)}, torch.tensor([[0, 1, 1]]), [3])
    assert interop_edits.ForeignEdits(8, 2).layers == []


def test_missing_extra_names_it(monkeypatch) -> None:
    monkeypatch.setattr(backends, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"transformer-lens is not installed: pip install 'steerlib\[interop\]'"):
        sltl.fwd_hooks(object())
    with pytest.raises(ImportError, match=r"nnsight is not installed: pip install 'steerlib\[interop\]'"):
        slnn.steer_in_trace(object())


def test_core_needs_neither_library_at_import() -> None:
    """transformer-lens and nnsight are an extra: importing core, steering, extraction or the interop modules
    loads neither (they are imported when a backend or an interop function is used)."""
    code = ("import sys, importlib, pkgutil, steerlib.core as c\n"
            "for m in pkgutil.iter_modules(c.__path__): importlib.import_module('steerlib.core.' + m.name)\n"
            "import steerlib.steering.steer, steerlib.extraction.extract\n"
            "import steerlib.interop.transformer_lens, steerlib.interop.nnsight\n"
            "print(sorted(m for m in ('transformer_lens', 'nnsight') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
