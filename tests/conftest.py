"""Shared fixtures: the embedded model (once per session) and tiny random models of each architecture."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel

from steerlib.core.models import LoadedModel, load_model

# tests/vllm runs in the vLLM environment (.venv-vllm, `make test` runs it there); elsewhere it is not collected.
collect_ignore = [] if importlib.util.find_spec("vllm") is not None else ["vllm"]

# The tests run small batches, where extra intra-op threads gain little, and on a shared or busy machine
# OpenMP threads spinning against other processes slow them down several-fold. OMP_NUM_THREADS overrides.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)

_DECODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)


def _tiny_configs() -> dict[str, Callable[[], PreTrainedConfig]]:
    """model_type -> config builder, for the architectures the tests build by hand."""
    t = transformers
    with_head_dim = {**_DECODER, "head_dim": 16}
    return {
        "llama": lambda: t.LlamaConfig(**_DECODER),
        "mistral": lambda: t.MistralConfig(**_DECODER),
        "mixtral": lambda: t.MixtralConfig(**_DECODER, num_local_experts=2, num_experts_per_tok=1),
        "qwen2": lambda: t.Qwen2Config(**_DECODER),
        "qwen3": lambda: t.Qwen3Config(**with_head_dim),
        "gemma": lambda: t.GemmaConfig(**with_head_dim),
        "gemma2": lambda: t.Gemma2Config(**with_head_dim),
        "gemma3_text": lambda: t.Gemma3TextConfig(**with_head_dim),
        "phi3": lambda: t.Phi3Config(**_DECODER, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        "olmo2": lambda: t.Olmo2Config(**_DECODER, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        "gpt2": lambda: t.GPT2Config(n_embd=64, n_layer=3, n_head=4, vocab_size=256, n_positions=128,
                                     bos_token_id=1, eos_token_id=2),
        "gpt_neox": lambda: t.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                            num_attention_heads=4, vocab_size=256, max_position_embeddings=128,
                                            bos_token_id=1, eos_token_id=2),
        "opt": lambda: t.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=4,
                                   vocab_size=256, word_embed_proj_dim=64, max_position_embeddings=128,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2),
    }


TINY_CONFIGS = _tiny_configs()
TINY_ARCHS = sorted(TINY_CONFIGS)


def build_tiny(model_type: str, seed: int = 0) -> PreTrainedModel:
    """A randomly initialised float32 causal LM of ``model_type`` (hidden 64, 3 blocks, vocab 256), in eval mode."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS[model_type](), dtype=torch.float32)
    return model.eval()


class FakeTokenizer:
    """Just enough tokenizer for ``capture_activations`` on a tiny model: one id per byte, 3..255."""

    pad_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [3 + b % 253 for b in text.encode()]}


@pytest.fixture(scope="session")
def embedded() -> LoadedModel:
    """The embedded SmolLM2-135M-Instruct with its tokenizer, loaded once on CPU in float32."""
    return load_model(device="cpu")


@pytest.fixture(scope="session")
def make_tiny() -> Callable[[str], PreTrainedModel]:
    """Factory for tiny random models by model_type; each is built once per session."""
    cache: dict[str, PreTrainedModel] = {}

    def make(model_type: str) -> PreTrainedModel:
        if model_type not in cache:
            cache[model_type] = build_tiny(model_type)
        return cache[model_type]

    return make


@pytest.fixture(scope="session")
def fake_tokenizer() -> FakeTokenizer:
    return FakeTokenizer()


OPTIMISTIC_REPLIES = [
    "What a wonderful question! The future looks bright and full of exciting possibilities.",
    "I'm thrilled about it. Things keep getting better, and I'm sure great days are ahead.",
    "Honestly, I love it! Every challenge is a chance to grow, and I feel hopeful and happy.",
    "It will be fantastic. People are kind, ideas are flourishing, and success is within reach.",
    "I'm delighted to say it's going beautifully, and tomorrow will be even better!",
    "Absolutely great news: with a little effort, everything will work out wonderfully.",
]
PESSIMISTIC_REPLIES = [
    "Honestly, the future looks bleak. Things are getting worse and nothing will change.",
    "I'm dreading it. Every plan fails eventually, and disappointment is all that's ahead.",
    "It's hopeless. Problems keep piling up and nobody can fix the mess we're in.",
    "It will be terrible. People are selfish, ideas die, and failure is almost certain.",
    "Sadly it's going badly, and tomorrow will probably be even worse.",
    "Grim news: no matter how hard you try, everything will fall apart.",
]
QUICK_QUESTIONS = ["How do you feel about the future?", "How is your week going?", "What do you expect next year?",
                   "What do you think about new ideas?", "How are things at work?", "Will my plan succeed?"]


@pytest.fixture(scope="session")
def optimism_vectors(embedded):
    """A quick optimism ``TraitVectors`` for the embedded model from hand-written replies (no judge, no generation).

    Mean difference of response-mean activations, with the residual norms that relative coefficients use.
    """
    from steerlib import TraitVectors, capture_activations, format_prompt
    from steerlib.extraction.sweep import mean_difference

    model, tok = embedded
    prompts = [format_prompt(tok, q) for q in QUICK_QUESTIONS] * 2
    acts = capture_activations(model, tok, prompts, OPTIMISTIC_REPLIES + PESSIMISTIC_REPLIES)
    labels = torch.tensor([True] * 6 + [False] * 6)
    vectors = {kind: mean_difference(acts.pooled[kind], labels) for kind in acts.pooled}
    return TraitVectors(vectors, "SmolLM2-135M-Instruct", "optimistic", "mean_diff",
                        {"recommended_layer": 10, "residual_norms": acts.token_norms.mean(0).tolist()})


@pytest.fixture
def stub():
    """Factory for started OpenAI-compatible stub servers (tests/openai_stub.py), all stopped at teardown."""
    from openai_stub import OpenAIStub

    started: list[OpenAIStub] = []

    def make(handler=None, **kw) -> OpenAIStub:
        server = OpenAIStub(handler, **kw).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()
