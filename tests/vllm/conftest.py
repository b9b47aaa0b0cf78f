"""One vLLM engine per test session (tests/vllm runs in .venv-vllm; `make test` runs it there).

The engine runs the embedded model with vLLM's torch.compile (Dynamo trace into the graph, eager backend to
keep the start short), prefix caching on and a token budget of 64 per step, so every prompt longer than that
is prefilled in chunks: each test below is therefore also a chunked-prefill and prefix-cache test.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")

TOKEN_BUDGET = 64


@pytest.fixture(scope="session")
def vllm_engine(embedded):
    """A started ``vllm.LLM`` on the embedded model's folder, with steerlib's worker extension."""
    pytest.importorskip("vllm")
    from vllm import LLM

    from steerlib.core.models import resolve_model_path
    from steerlib.vllm.worker import IDENTITY

    path, _ = resolve_model_path(None)
    llm = LLM(model=str(path), dtype="float32", max_model_len=512, max_num_batched_tokens=TOKEN_BUDGET,
              max_num_seqs=16, enable_prefix_caching=True, compilation_config={"backend": "eager"},
              additional_config={"steerlib": IDENTITY}, seed=0,
              worker_extension_cls="steerlib.vllm.worker.SteerlibWorkerExtension")
    yield llm
    llm.llm_engine.engine_core.shutdown()
