"""Every causal-LM architecture of the installed transformers, built tiny offline: capture and steering exact.

One session fixture builds and checks them all once (about 40 s on 2 cores); each architecture is its own test
case reading that result, so a failure names the model type. ``docs/architectures.md`` is generated from the same
check by ``scripts/arch_table.py``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from steerlib.core.arch import get_layout
from steerlib.steering.arch_check import SHIFTED_HIDDEN_STATES, ArchResult, check_architecture, tiny_config

MODEL_TYPES = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
TABLE = Path(__file__).resolve().parents[1] / "docs" / "architectures.md"


@pytest.fixture(scope="module")
def results() -> dict[str, ArchResult]:
    torch.set_num_threads(1)
    return {model_type: check_architecture(model_type) for model_type in MODEL_TYPES}


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_architecture(results: dict[str, ArchResult], model_type: str) -> None:
    result = results[model_type]
    if result.status == "skip":
        assert result.reason, "a skipped architecture must say why"
        pytest.skip(result.reason)
    assert result.status == "pass", f"{model_type}: {result.reason}"
    assert result.max_error < 1e-4
    assert bool(result.reason) == (model_type in SHIFTED_HIDDEN_STATES)


def _table_claims() -> tuple[str, set[str]]:
    """The transformers version ``docs/architectures.md`` was generated with, and the model types it says pass."""
    text = TABLE.read_text()
    version = re.search(r"with transformers (\S+?):", text)
    count = re.search(r"^- pass: \*\*(\d+)\*\*", text, re.M)
    claimed = set(re.findall(r"^\| `([^`]+)` \| pass \|", text, re.M))
    assert version and count, f"{TABLE} lost its header (regenerate it with scripts/arch_table.py)"
    assert len(claimed) == int(count.group(1)), f"{TABLE}: the pass count disagrees with its own rows"
    return version.group(1), claimed


def test_the_table_claims_hold(results: dict[str, ArchResult]) -> None:
    """The floor is what the table (and the README) claims: every architecture it lists as passing passes."""
    version, claimed = _table_claims()
    passing = {t for t, r in results.items() if r.status == "pass"}
    if transformers.__version__ == version:
        assert claimed <= passing, f"the table says these pass, but they do not: {sorted(claimed - passing)}"
    assert len(passing) >= len(claimed), (f"only {len(passing)} architectures pass; {TABLE.name} claims "
                                          f"{len(claimed)} (transformers {version})")
    # The families the issue names are among them (MoE, hybrid state-space, vision-language text tower).
    for model_type in ("llama", "gemma3", "qwen3_moe", "mixtral", "deepseek_v3", "gpt2", "bloom", "falcon",
                       "falcon_h1", "jamba", "mpt", "opt", "olmoe", "granitemoe", "phimoe", "starcoder2",
                       "qwen3_next", "bamba", "nemotron_h", "zamba2", "lfm2", "llama4", "mllama", "qwen3_5_moe", "dbrx",
                       "granitemoehybrid"):
        assert model_type in passing, f"{model_type}: {results[model_type].reason}"


def test_vlm_layout_is_the_text_tower() -> None:
    """gemma3 (vision-language): the vision tower has as many blocks as the text model here; the text one is found."""
    model = AutoModelForCausalLM.from_config(tiny_config("gemma3"))
    layout = get_layout(model)
    assert layout.blocks is model.model.language_model.layers
    assert layout.final_norm is model.model.language_model.norm
    assert layout.embedding is model.get_input_embeddings()
    assert len(model.model.vision_tower.encoder.layers) == layout.n_layers


def test_opt_final_norm_registered_before_blocks() -> None:
    model = AutoModelForCausalLM.from_config(tiny_config("opt"))
    assert get_layout(model).final_norm is model.model.decoder.final_layer_norm


def test_errors_name_the_model_type() -> None:
    bert = AutoModelForCausalLM.from_config(tiny_config("bert"))  # an encoder: its blocks sit under .encoder
    with pytest.raises(NotImplementedError, match=r"architecture 'bert' \(BertLMHeadModel\): no list of 3 decoder"):
        get_layout(bert)
    nanochat = AutoModelForCausalLM.from_config(tiny_config("nanochat"))
    with pytest.raises(NotImplementedError, match=r"architecture 'nanochat' \(NanoChatForCausalLM\) is not "
                                                  r"supported: one norm module is applied to the embeddings"):
        get_layout(nanochat)
    with pytest.raises(NotImplementedError, match="has no config"):
        get_layout(torch.nn.Linear(2, 2))
