"""One vLLM engine per test session (tests/in_vllm runs in .venv-vllm; `make test` runs it there).

The engine is steerlib's serving adapter (``VllmEngine`` over vLLM's AsyncLLM) on the embedded model, with
vLLM's torch.compile on (the hooks are traced into the compiled graph; torch's inductor cache keeps the compiled
graphs, so only the first run on a machine pays for compiling: see ``VLLM_USE_AOT_COMPILE`` below), prefix caching
on and a token budget of 64 per step: every prompt longer than that is prefilled in chunks, so each test below is
also a chunked-prefill and prefix-cache test. The same engine serves the HTTP test of ``steerlib serve --engine
vllm``. Under pytest-xdist (``make test-vllm``) the tests that use it are one work unit (``vllm_helpers.work_unit``),
so it starts on one worker only.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
# vLLM 0.32's CPU build saves an AOT-compiled model (~/.cache/vllm/torch_compile_cache/torch_aot_compile) that it
# cannot load back ("Compiling model again due to a load failure ... 'function' object has no attribute
# 'finalize_loading'": its CPU backend is plain inductor, not vLLM's serializable one), so every compiled start
# compiled again: the session's engine took 136 s to start on a quiet 2-core machine. Without AOT compilation
# vLLM compiles through torch.compile, whose inductor and AOTAutograd caches (/tmp/torchinductor_$USER) do
# load: 119 s the first time, 52 s from then on (eager: 35 s). The same graphs run; only their caching differs.
# Inherited by every engine the tests start (the session's, pipeline parallel 2's, `vllm serve`'s).
os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")

from vllm_helpers import READOUT_LAYER, SESSION_GROUP, TOKEN_BUDGET, own_core, unit_rank, work_unit


def pytest_xdist_make_scheduler(config, log):
    """``--dist loadgroup`` over ``vllm_helpers.work_unit``'s units, heaviest first (the collection's order, see
    ``pytest_collection_modifyitems``). xdist 3.8 groups ``xdist_group`` marks by appending the group to
    ``item._nodeid``, which pytest 9 no longer reads (a node's id is ``item._id``): its loadgroup sends every test
    alone, and two workers would each start the session's engine."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    config.option.loadscopereorder = False  # keep the collection's order: by weight, not by number of tests

    class EngineUnits(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return EngineUnits(config, log)


def pytest_collection_modifyitems(items) -> None:
    """A test on the session's engine outside its work unit would start a second engine on another worker.
    The heaviest work units first (``vllm_helpers.HEAVIEST_UNITS``); the sort is stable, so each file's tests
    keep their order."""
    stray = [item.nodeid for item in items
             if "vllm_engine" in getattr(item, "fixturenames", ()) and work_unit(item.nodeid) != SESSION_GROUP]
    if stray:
        raise pytest.UsageError(f"list these tests in vllm_helpers.ON_SESSION_ENGINE: {', '.join(stray)}")
    items.sort(key=lambda item: unit_rank(item.nodeid))


@pytest.fixture(scope="session")
def readout(embedded, optimism_vectors):
    from steerlib.steering.steer import build_readout

    return build_readout(embedded.model, {"optimistic": optimism_vectors}, READOUT_LAYER)


@pytest.fixture(scope="session")
def vllm_engine(embedded, readout):
    """A started ``VllmEngine`` (compiled, chunked prefill, prefix caching) with the optimism read-out."""
    pytest.importorskip("vllm")
    from steerlib.core.models import eos_ids, resolve_model_path
    from steerlib.serve.vllm_engine import VllmEngine, engine_args

    model, tok = embedded
    path, _ = resolve_model_path(None)
    # STEERLIB_VLLM_TEST_EAGER=1 skips compiling (a quick iteration while developing; make test compiles).
    args = engine_args(str(path), max_batch=16, max_model_len=512,
                       enforce_eager=os.environ.get("STEERLIB_VLLM_TEST_EAGER") == "1",
                       extra={"max_num_batched_tokens": TOKEN_BUDGET, "seed": 0})
    engine = VllmEngine(args, tok, readout=readout, max_batch=16, eos_ids=eos_ids(model, tok))
    with own_core():
        engine.start()
    yield engine
    engine.stop()
