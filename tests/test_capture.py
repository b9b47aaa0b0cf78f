"""capture_activations on the embedded model: backends agree with unpadded ``output_hidden_states``."""

from __future__ import annotations

import contextlib

import pytest
import torch
from helpers import count_hooks, residual_states
from torch import Tensor, nn

from steerlib.core import backends
from steerlib.core.arch import get_layout
from steerlib.core.capture import POOLINGS, capture_activations, record_residual
from steerlib.core.chat import format_prompt
from steerlib.core.hooks import StopForward
from steerlib.core.models import load_model

BACKENDS = ("torch", "transformer_lens", "nnsight")
LAYERS = [0, 1, 15, 29, 30]
RESPONSES = ["I am fine, thanks for asking.", None, "Once upon a time, far away.", "Yes.", None]


def _token_ids(tokenizer, text: str | None) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


@pytest.fixture(scope="module")
def samples(embedded) -> tuple[list[str], list[str | None]]:
    """Five samples of mixed lengths, some with a chat template, two without a response."""
    tok = embedded.tokenizer
    prompts = [format_prompt(tok, "How are you?"), "Hi", format_prompt(tok, "Tell me a story.", system="Be brief."),
               "Is the sky blue on a clear day?", "Name a colour"]
    return prompts, RESPONSES


@pytest.fixture(scope="module")
def reference(embedded, samples) -> list[tuple[tuple[Tensor, ...], int]]:
    """Per sample, unpadded: (all hidden states [1, seq, d], prompt length)."""
    model, tok = embedded
    out = []
    for prompt, response in zip(*samples, strict=True):
        p_ids = _token_ids(tok, prompt)
        hs = residual_states(model, torch.tensor([p_ids + _token_ids(tok, response)]))
        out.append((tuple(h.float() for h in hs), len(p_ids)))
    return out


def _close(got: Tensor, want: Tensor, scale: Tensor) -> None:
    # Residual magnitudes reach ~2e4 at middle layers (attention-sink token), so the tolerance scales with them.
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(scale) + 1e-5)


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_match_unpadded(embedded, samples, reference, backend: str, padding_side: str) -> None:
    model, tok = embedded
    prompts, responses = samples
    acts = capture_activations(model, tok, prompts, responses, LAYERS, backend=backend, batch_size=3,
                               padding_side=padding_side, keep_tokens=True)
    assert acts.layers == LAYERS and len(acts) == len(prompts) and acts.meta["backend"] == backend
    for kind in POOLINGS:
        assert acts.pooled[kind].shape == (len(prompts), len(LAYERS), 576)
    for i, (hs, p_len) in enumerate(reference):
        seq_len = hs[0].shape[1]
        assert acts.prompt_lengths[i] == p_len and acts.response_lengths[i] == seq_len - p_len
        assert acts.tokens is not None and acts.tokens[i].shape == (len(LAYERS), seq_len, 576)
        for j, layer in enumerate(LAYERS):
            h = hs[layer][0]
            scale = h.abs().max()
            _close(acts.pooled["prompt_mean"][i, j], h[:p_len].mean(0), scale)
            _close(acts.pooled["prompt_last"][i, j], h[p_len - 1], scale)
            _close(acts.tokens[i][j], h, scale)
            if responses[i] is None:
                assert torch.isnan(acts.pooled["response_mean"][i, j]).all()
            else:
                _close(acts.pooled["response_mean"][i, j], h[p_len:].mean(0), scale)
        assert torch.equal(acts.at("prompt_last", 15)[i], acts.pooled["prompt_last"][i, 2])


def test_all_layers_default_and_batch_size_invariance(embedded, samples) -> None:
    model, tok = embedded
    prompts, responses = samples
    one = capture_activations(model, tok, prompts, responses, batch_size=1)
    many = capture_activations(model, tok, prompts, responses, batch_size=16, padding_side="right")
    assert one.layers == list(range(31)) and one.tokens is None
    for kind in POOLINGS:
        torch.testing.assert_close(one.pooled[kind], many.pooled[kind], rtol=1e-4, atol=5e-2, equal_nan=True)


def test_activations_at_errors(embedded) -> None:
    model, tok = embedded
    acts = capture_activations(model, tok, ["Hi"], layers=[2])
    with pytest.raises(ValueError, match="unknown pooling"):
        acts.at("max", 2)
    with pytest.raises(ValueError, match="layer 3 was not captured"):
        acts.at("prompt_mean", 3)


def test_backends_leave_model_untouched() -> None:
    """No backend may leave hooks, swapped modules or a changed attention implementation behind.

    Uses its own fresh copy of the embedded model: the shared one has already been through every backend.
    """
    model, tok = load_model(device="cpu")
    ids = torch.tensor([_token_ids(tok, "The weather today is")])
    with torch.no_grad():
        before = model(ids).logits
    hooks, modules = count_hooks(model), [type(m) for m in model.modules()]
    attn = model.config._attn_implementation
    try:
        for backend in ("transformer_lens", "nnsight", "torch"):
            capture_activations(model, tok, ["Hello", "Hi there"], ["Yes", None], [3, 30], backend=backend)
            assert count_hooks(model) == hooks, backend
            assert [type(m) for m in model.modules()] == modules, backend
            assert model.config._attn_implementation == attn, backend
            with torch.no_grad():
                assert torch.equal(model(ids).logits, before), backend
    finally:
        backends._wrappers.pop(model, None)  # the nnsight wrapper holds the model: free it


def test_hooks_removed_when_body_raises(embedded) -> None:
    model, tok = embedded
    ids = torch.tensor([_token_ids(tok, "Count the hooks")])
    with torch.no_grad():
        before = model(ids).logits
    hooks = count_hooks(model)
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad():
        with record_residual(model, None) as records:
            model(ids)
            assert count_hooks(model) == hooks + 31
            raise RuntimeError("boom")
    assert len(records[0]) == 1
    assert count_hooks(model) == hooks
    # An uncaught StopForward (stop_after_last without suppress) also leaves no hooks behind.
    with pytest.raises(StopForward), torch.no_grad(), record_residual(model, 5, stop_after_last=True):
        model(ids)
    assert count_hooks(model) == hooks
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def _count_calls(module: nn.Module) -> tuple[list[int], object]:
    calls: list[int] = []
    return calls, module.register_forward_hook(lambda *_: calls.append(1))


def test_stop_after_last_skips_later_blocks(embedded) -> None:
    model, tok = embedded
    layout = get_layout(model)
    ids = torch.tensor([_token_ids(tok, "Stop early please")])
    calls, handle = _count_calls(layout.blocks[-1])
    head_calls, head_handle = _count_calls(model.lm_head)
    try:
        with torch.no_grad(), record_residual(model, [2, 4], stop_after_last=True) as records:
            with contextlib.suppress(StopForward):
                model(ids)
        assert calls == [] and head_calls == []
        assert len(records[2]) == len(records[4]) == 1
        capture_activations(model, tok, ["Hello"], layers=[3], backend="torch")
        assert calls == [] and head_calls == []
        capture_activations(model, tok, ["Hello"], layers=[30], backend="torch")  # the last block: lm_head skipped
        assert calls == [1] and head_calls == []
    finally:
        handle.remove()
        head_handle.remove()
    with torch.no_grad():
        want = model(ids, output_hidden_states=True).hidden_states[4]
    torch.testing.assert_close(records[4][0], want, rtol=1e-5, atol=1e-4)


def test_to_cpu_records(embedded) -> None:
    model, tok = embedded
    ids = torch.tensor([_token_ids(tok, "Where do you live?")])
    device = next(model.parameters()).device
    with torch.no_grad(), record_residual(model, [0, 30], to_cpu=True) as on_cpu:
        model(ids.to(device))
        model(ids.to(device))
    assert all(len(r) == 2 and all(t.device.type == "cpu" for t in r) for r in on_cpu.values())
    assert not any(t.requires_grad for r in on_cpu.values() for t in r)
    with torch.no_grad(), record_residual(model, [0], to_cpu=False) as on_device:
        model(ids.to(device))
    assert on_device[0][0].device == device


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layers": [31]}, r"layer 31 is out of range.*from 0 to 30"),
        ({"layers": [-32]}, r"layer -32 is out of range"),
        ({"layers": []}, "no layers selected"),
        ({"prompts": []}, "empty prompt list"),
        ({"prompts": "Hello"}, "single string"),
        ({"prompts": [""], "responses": ["orphan reply"]}, "prompt 0 is empty"),
        ({"prompts": ["ok", 7]}, "prompt 1 must be a string"),
        ({"prompts": ["ok"], "responses": [b"bytes"]}, "response 0 must be a string"),
        ({"prompts": ["a", "b"], "responses": ["x"]}, "2 prompts but 1 responses"),
        ({"backend": "jax"}, "unknown backend 'jax'"),
        ({"padding_side": "middle"}, "padding side"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
    ],
)
def test_bad_inputs(embedded, kwargs: dict, message: str) -> None:
    model, tok = embedded
    args = {"prompts": ["Hello"], **kwargs}
    with pytest.raises(ValueError, match=message):
        capture_activations(model, tok, **args)
