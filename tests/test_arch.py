"""Architecture layouts: depth/width discovery and hook recordings equal ``output_hidden_states``."""

from __future__ import annotations

import contextlib

import pytest
import torch
import transformers
from helpers import TINY_ARCHS, residual_states
from torch import nn

from steerlib.core.arch import get_layout
from steerlib.core.capture import capture_activations
from steerlib.core.hooks import StopForward, check_layers, record_residual


def _ids(batch: int = 2, seq: int = 7) -> torch.Tensor:
    return torch.randint(3, 256, (batch, seq), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("model_type", TINY_ARCHS)
def test_layout_shape(make_tiny, model_type: str) -> None:
    model = make_tiny(model_type)
    layout = get_layout(model)
    assert model.config.model_type == model_type
    assert layout.n_layers == 3
    assert layout.d_model == 64
    assert layout.n_positions == 4
    assert layout.body is not None


@pytest.mark.parametrize("model_type", TINY_ARCHS)
def test_record_residual_matches_hidden_states(make_tiny, model_type: str) -> None:
    model = make_tiny(model_type)
    ids = _ids()
    with torch.no_grad():
        want = model(ids, output_hidden_states=True).hidden_states
        assert len(want) == 4
        with record_residual(model, [0, 2, 3]) as records:
            model(ids)
    residual = residual_states(model, ids)
    for layer in (0, 2, 3):
        assert len(records[layer]) == 1
        torch.testing.assert_close(records[layer][0], residual[layer], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(records[2][0], want[2], rtol=1e-5, atol=1e-6)
    # The top layer is the last block's output before the final norm; transformers reports it after the norm.
    with torch.no_grad():
        torch.testing.assert_close(get_layout(model).final_norm(records[3][0]), want[3], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_type", TINY_ARCHS)
def test_capture_on_tiny_left_padding(make_tiny, fake_tokenizer, model_type: str) -> None:
    """Left-padded, length-sorted batches pool the same as each sample run alone."""
    model = make_tiny(model_type)
    prompts, responses = ["abc", "hello there", "x"], ["de", None, "yz!"]
    acts = capture_activations(model, fake_tokenizer, prompts, responses, [1, 3], batch_size=3)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        ids = fake_tokenizer(p)["input_ids"] + (fake_tokenizer(r)["input_ids"] if r else [])
        hs = residual_states(model, torch.tensor([ids]))
        for j, layer in enumerate((1, 3)):
            torch.testing.assert_close(acts.pooled["prompt_mean"][i, j], hs[layer][0, : len(p)].mean(0),
                                       rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(acts.pooled["prompt_last"][i, j], hs[layer][0, len(p) - 1],
                                       rtol=1e-4, atol=1e-5)
    assert torch.isnan(acts.pooled["response_mean"][1]).all()


def test_stop_after_last_on_tiny(make_tiny) -> None:
    model = make_tiny("llama")
    calls = []
    handle = get_layout(model).blocks[2].register_forward_hook(lambda *_: calls.append(1))
    try:
        with torch.no_grad(), record_residual(model, 1, stop_after_last=True) as records:
            with contextlib.suppress(StopForward):
                model(_ids())
    finally:
        handle.remove()
    assert calls == [] and len(records[1]) == 1


class _FooConfig:
    model_type = "foo"


class _FooModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.config = _FooConfig()
        self.layers = nn.ModuleList([nn.Linear(4, 4)])


def test_unsupported_plain_module() -> None:
    with pytest.raises(NotImplementedError, match="'foo'.*_FooModel"):
        get_layout(_FooModel())
    with pytest.raises(NotImplementedError, match="Linear has no config"):
        get_layout(nn.Linear(2, 2))


def test_unsupported_bert() -> None:
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=64)
    bert = transformers.BertModel(config)
    with pytest.raises(NotImplementedError, match=r"'bert' \(BertModel\): no list of 1 decoder blocks"):
        get_layout(bert)


def test_unsupported_opt_with_projection() -> None:
    """OPT-350m style models change width at both ends, so no single d_model fits: refuse clearly."""
    config = transformers.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                    vocab_size=256, word_embed_proj_dim=32, max_position_embeddings=64)
    model = transformers.OPTForCausalLM(config)
    with pytest.raises(NotImplementedError, match="'opt' .*embedding width 32 differs from hidden size 64"):
        get_layout(model)


def test_check_layer(make_tiny) -> None:
    layout = get_layout(make_tiny("llama"))
    assert layout.check_layer(0) == 0
    assert layout.check_layer(3) == 3
    assert layout.check_layer(-1) == 3
    assert layout.check_layer(-4) == 0
    for bad in (4, -5, 100):
        with pytest.raises(ValueError, match=rf"layer {bad} is out of range.*from 0 to 3"):
            layout.check_layer(bad)
    with pytest.raises(ValueError, match="from 1 to 3"):
        layout.check_layer(0, allow_embeddings=False)
    for bad in (1.0, True, "2"):
        with pytest.raises(ValueError, match="layer must be an int"):
            layout.check_layer(bad)  # type: ignore[arg-type]


def test_check_layers(make_tiny) -> None:
    layout = get_layout(make_tiny("gpt2"))
    assert check_layers(layout, None) == [0, 1, 2, 3]
    assert check_layers(layout, 2) == [2]
    assert check_layers(layout, [3, -1, 0]) == [0, 3]
    with pytest.raises(ValueError, match="no layers selected"):
        check_layers(layout, [])
