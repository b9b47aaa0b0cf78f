"""Shared fixtures: the embedded model (once per session) and tiny random models of each architecture.

Plain helpers and constants live in ``helpers.py``: test modules import from there, never from here.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable

import pytest
import torch
from helpers import (
    HEAVIEST_FILES,
    OPTIMISTIC_REPLIES,
    PESSIMISTIC_REPLIES,
    QUICK_QUESTIONS,
    FakeTokenizer,
    build_tiny,
    deprecations_from_steerlib,
)
from transformers import PreTrainedModel

from steerlib.core.models import LoadedModel, load_model

# tests/in_vllm runs in the vLLM environment (.venv-vllm, `make test` runs it there); elsewhere it is not collected.
collect_ignore = [] if importlib.util.find_spec("vllm") is not None else ["in_vllm"]

# The tests run small batches, where extra intra-op threads gain little, and on a shared or busy machine
# OpenMP threads spinning against other processes slow them down several-fold. OMP_NUM_THREADS overrides.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The heaviest files first (``helpers.HEAVIEST_FILES``), every other file after them in its usual order; each
    file's tests stay together and in their order (the sort is stable)."""
    rank = {name: i for i, name in enumerate(HEAVIEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(autouse=True)
def _strict_deprecations():
    """With STEERLIB_STRICT_DEPRECATIONS=1 (``make canary`` sets it), a test fails when steerlib's own calls use
    an API its dependencies have deprecated (see ``helpers.deprecations_from_steerlib``): the newest releases
    warn before they remove."""
    if os.environ.get("STEERLIB_STRICT_DEPRECATIONS") != "1":
        yield
        return
    with deprecations_from_steerlib() as found:
        yield
    if found:
        pytest.fail("steerlib calls deprecated API:\n" + "\n".join(dict.fromkeys(found)), pytrace=False)

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
