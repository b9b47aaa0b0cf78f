"""Model loading, the GGUF cache conversion's skip/atomic logic, and chat formatting."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from steerlib.core import models
from steerlib.core.chat import format_messages, format_prompt
from steerlib.core.models import convert_gguf, load_model, resolve_model_path


def _tiny_llama(vocab_size: int = 256) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab_size,
                                      max_position_embeddings=64, tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(config).eval()


# --- resolve_model_path / load_model -------------------------------------------------------------------------


def test_resolve_missing_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"'.*nope' not found.*local HF model folder"):
        resolve_model_path(tmp_path / "nope")


def test_resolve_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        resolve_model_path(tmp_path)


def test_load_local_folder(tmp_path: Path, embedded) -> None:
    tok = embedded.tokenizer
    folder = tmp_path / "tiny-llama"
    _tiny_llama(len(tok)).save_pretrained(folder)
    no_pad = copy.deepcopy(tok)
    no_pad.pad_token = None
    no_pad.save_pretrained(folder)
    assert resolve_model_path(folder) == (folder, "tiny-llama")

    loaded = load_model(folder, device="cpu")
    model, tokenizer = loaded
    assert loaded.name == "tiny-llama" and loaded.model is model and loaded.tokenizer is tokenizer
    assert not model.training and model.dtype == torch.float32 and model.config.num_hidden_layers == 2
    assert tokenizer.pad_token == tokenizer.eos_token  # filled in when the saved tokenizer has none
    ids = torch.tensor([tokenizer("Hello", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        assert model(ids).logits.shape == (1, ids.shape[1], len(tok))
    assert load_model(str(folder), dtype="bf16", device="cpu").model.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        load_model(folder, dtype="float8")


def test_embedded_cache_is_complete(embedded) -> None:
    folder, name = resolve_model_path(None)
    assert name == "SmolLM2-135M-Instruct" == embedded.name
    assert (folder / "config.json").is_file() and list(folder.glob("*.safetensors"))
    assert not folder.name.startswith(".")
    assert resolve_model_path("embedded") == (folder, name)


# --- convert_gguf: skip and atomic logic with the GGUF loaders stubbed out ------------------------------------


class _StubLoaders:
    """Stands in for AutoModelForCausalLM / AutoTokenizer: 'dequantises' to a tiny Llama, counting calls."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.loads = 0

    def model_from_pretrained(self, folder, gguf_file=None, **_):
        self.loads += 1
        return _tiny_llama()

    def tokenizer_from_pretrained(self, folder, gguf_file=None, **_):
        return self.tokenizer


@pytest.fixture()
def stub(monkeypatch, tmp_path: Path, embedded) -> _StubLoaders:
    loaders = _StubLoaders(embedded.tokenizer)
    model_cls = type("StubAutoModel", (), {
        "from_pretrained": staticmethod(loaders.model_from_pretrained),
        "from_config": staticmethod(AutoModelForCausalLM.from_config),
    })
    tok_cls = type("StubAutoTokenizer", (), {"from_pretrained": staticmethod(loaders.tokenizer_from_pretrained)})
    monkeypatch.setattr(models, "AutoModelForCausalLM", model_cls)
    monkeypatch.setattr(models, "AutoTokenizer", tok_cls)
    monkeypatch.setenv("STEERLIB_CACHE", str(tmp_path / "cache"))
    return loaders


@pytest.fixture()
def gguf(tmp_path: Path) -> Path:
    path = tmp_path / "src" / "tiny.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    return path


def _expected_dir(gguf: Path, tmp_path: Path) -> Path:
    return tmp_path / "cache" / "models" / f"tiny-{models._fingerprint(gguf)}"


def test_convert_then_skip(stub: _StubLoaders, gguf: Path, tmp_path: Path) -> None:
    folder, name = resolve_model_path(gguf)
    assert name == "tiny" and folder == _expected_dir(gguf, tmp_path)
    assert (folder / "config.json").is_file() and stub.loads == 1
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temp folder left behind
    assert resolve_model_path(gguf) == (folder, "tiny") and stub.loads == 1  # cached: no second conversion
    loaded = load_model(folder, device="cpu")
    torch.testing.assert_close(loaded.model.model.embed_tokens.weight, _tiny_llama().model.embed_tokens.weight)


def test_half_written_folder_is_not_used(stub: _StubLoaders, gguf: Path, tmp_path: Path) -> None:
    target = _expected_dir(gguf, tmp_path)
    target.mkdir(parents=True)
    (target / "model.safetensors").write_bytes(b"truncated")  # killed before config.json was written
    leftover = target.parent / f".{target.name}-abc123"  # temp folder of an interrupted run
    leftover.mkdir()
    (leftover / "config.json").write_text("{}")
    folder = convert_gguf(gguf)
    assert folder == target and stub.loads == 1
    assert (folder / "config.json").is_file()
    assert load_model(folder, device="cpu").model.config.num_hidden_layers == 2


def test_failed_conversion_leaves_nothing(stub: _StubLoaders, gguf: Path, tmp_path: Path, monkeypatch) -> None:
    def broken_save(self, *args, **kwargs):
        (Path(args[0]) / "config.json").write_text("{}")  # partially written, then the run dies
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", broken_save)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(gguf)
    models_dir = _expected_dir(gguf, tmp_path).parent
    assert list(models_dir.iterdir()) == []


def test_explicit_out_dir_with_config_is_reused(stub: _StubLoaders, gguf: Path, tmp_path: Path) -> None:
    out = tmp_path / "done"
    out.mkdir()
    (out / "config.json").write_text("{}")
    assert convert_gguf(gguf, out) == out and stub.loads == 0


# --- chat formatting ----------------------------------------------------------------------------------------


def test_format_prompt(embedded) -> None:
    tok = embedded.tokenizer
    default = format_prompt(tok, "Hi")
    custom = format_prompt(tok, "Hi", system="Be brief.")
    assert default.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert "<|im_start|>system\n" in default and "Be brief." not in default
    assert custom.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert custom.endswith("<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="user message must be a string, got int"):
        format_prompt(tok, 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="system prompt must be a string"):
        format_prompt(tok, "Hi", system=["x"])  # type: ignore[arg-type]


def test_no_chat_template(embedded) -> None:
    bare = copy.deepcopy(embedded.tokenizer)
    bare.chat_template = None
    with pytest.raises(ValueError, match="has no chat template"):
        format_prompt(bare, "Hi")
    with pytest.raises(ValueError, match="has no chat template"):
        format_messages(bare, [{"role": "user", "content": "Hi"}])


def test_format_messages(embedded) -> None:
    tok = embedded.tokenizer
    prompt, response = format_messages(tok, [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ])
    assert prompt == format_prompt(tok, "Hi", system="Be brief.") and response == "Hello!"
    prompt, response = format_messages(tok, [{"role": "user", "content": "Hi"}])
    assert prompt == format_prompt(tok, "Hi") and response is None
    multi, reply = format_messages(tok, [
        {"role": "user", "content": "One"}, {"role": "assistant", "content": "Two"},
        {"role": "user", "content": "Three"}, {"role": "assistant", "content": "Four"},
    ])
    assert reply == "Four" and "Two" in multi and "Four" not in multi and multi.endswith("assistant\n")


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([], "non-empty list"),
        ("Hi", "non-empty list"),
        ([{"role": "assistant", "content": "Only a reply"}], "response but no prompt"),
        ([{"role": "user"}], "message 0 must be a dict with 'role' and 'content'"),
        (["Hi"], "message 0 must be a dict"),
        ([{"role": "user", "content": None}], "message 0 content must be a string"),
    ],
)
def test_format_messages_errors(embedded, messages, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        format_messages(embedded.tokenizer, messages)
