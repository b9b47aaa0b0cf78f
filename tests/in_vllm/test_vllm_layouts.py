"""Every vLLM layout is steered right or refused at start (``steerlib.vllm.layout``'s table, one test per row).

Tensor parallel 3 (eager) and pipeline parallel 2 (compiled: vLLM 0.32's CPU build cannot run PP eager) run a
mixed steered batch and give what steerlib's Hugging Face path gives for each row: greedy tokens equal, read-out
within 1e-3 (the bar ``test_vllm_steering.py`` holds one worker to, so a layout equals one worker too, without a
third engine start for the reference). The read-out layer (20) and two of the steered layers (20, 24) live on the
second pipeline stage, the others on the first, so under PP each stage must steer its own layers and the read-out
must come from the stage that owns it. One engine per layout, started in turn (each stopped before the next).
The refusals fail before any worker starts (steerlib's engine builder) or, for ``LLM(...)`` / ``vllm serve``
users, in the worker before the weights load.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
from vllm_helpers import TOKEN_BUDGET, own_core, run_rows, streamed_readout

from steerlib import format_prompt
from steerlib.steering.generation import generate
from steerlib.steering.plan import lower_ops
from steerlib.steering.steer import build_ops
from steerlib.vllm.layout import BIND_ENV, UnsupportedLayout, bound_cores, one_process

READOUT_AT = 20  # on the second stage under pipeline parallel 2 (stages hold layers 1-15 and 16-30)
N_TOKENS = 8
QUESTIONS = ["How do you feel about the future of your town?", "What will the next ten years bring?"]
SYSTEM = ("You are a helpful assistant for a small town library. You answer questions about opening hours, "
          "book loans, events for children, the reading club and the history of the town in a friendly way. "
          "Keep every answer short, warm and clear, and suggest a book from the shelves whenever it fits.")
# name -> vLLM engine arguments beside the shared ones.
LAYOUTS = {
    "tp3": {"tensor_parallel_size": 3, "enforce_eager": True},
    "pp2": {"pipeline_parallel_size": 2, "enforce_eager": False},
}
WALL: dict[str, float] = {}


def _args(**layout):
    from steerlib.core.models import resolve_model_path
    from steerlib.serve.vllm_engine import engine_args

    path, _ = resolve_model_path(None)
    eager = layout.pop("enforce_eager", True)
    return engine_args(str(path), max_batch=16, max_model_len=512, enforce_eager=eager,
                       extra={"max_num_batched_tokens": TOKEN_BUDGET, "seed": 0, **layout})


@pytest.fixture(scope="module")
def batch(embedded, optimism_vectors):
    """A mixed batch: add / ablate / cap / prompt-only on layers of both stages, and unsteered rows."""
    model, tok = embedded
    tv = optimism_vectors
    configs = {
        "add": build_ops(model, tv, [8, 14, 20], 6.0),
        "ablate-response": build_ops(model, tv, [14, 24], mode="ablate", positions="response"),
        "cap": build_ops(model, tv, [8, 20], mode="cap", cap=(-1.0, 0.5)),
        "add-prompt": build_ops(model, tv, 24, 8.0, positions="prompt"),
        "none": [],
    }
    prompts = [format_prompt(tok, q, system=SYSTEM) for q in QUESTIONS]
    ids = [list(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    assert all(len(x) > TOKEN_BUDGET for x in ids)  # prefilled in chunks
    return [(f"{name}/{i}", prompts[i], x, ops) for name, ops in configs.items() for i, x in enumerate(ids)]


def _run_layout(name, embedded, optimism_vectors, batch):
    """Start one engine of this layout, run the batch, stop it: label -> (token ids, read-out values)."""
    from steerlib.core.models import eos_ids
    from steerlib.serve.vllm_engine import VllmEngine
    from steerlib.steering.steer import build_readout

    model, tok = embedded
    readout = build_readout(model, {"optimistic": optimism_vectors}, READOUT_AT)
    engine = VllmEngine(_args(**LAYOUTS[name]), tok, readout=readout, max_batch=16, eos_ids=eos_ids(model, tok))
    t0 = time.monotonic()
    engine.start()  # several ranks: bound_cores binds them at start
    try:
        done = run_rows(engine, [(x, lower_ops(ops)) for _, _, x, ops in batch], N_TOKENS)
    finally:
        engine.stop()
    WALL[name] = time.monotonic() - t0
    assert BIND_ENV not in os.environ  # the core binding was for this engine's start only
    print(f"\n{name}: start + batch + stop {WALL[name]:.0f} s")
    return {label: (row.token_ids, torch.tensor([v[0] for v in got.values]))
            for (label, _, _, _), (row, got) in zip(batch, done, strict=True)}


@pytest.fixture(scope="module")
def reference(embedded, optimism_vectors, batch):
    """Each row alone through steerlib's Hugging Face path: tokens and the values a server streams for them."""
    from steerlib.core.models import eos_ids
    from steerlib.steering.steer import build_readout

    model, tok = embedded
    readout = build_readout(model, {"optimistic": optimism_vectors}, READOUT_AT)
    eos = eos_ids(model, tok)
    out = {}
    for label, prompt, _, ops in batch:
        hf = generate(model, tok, [prompt], steering=ops, readout=readout, max_new_tokens=N_TOKENS, batch_size=1)[0]
        out[label] = (hf.token_ids, streamed_readout(hf, READOUT_AT, eos))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp3", "pp2"])
def test_parallel_layout_equals_the_hf_path(layout, reference, embedded, optimism_vectors, batch):
    got = _run_layout(layout, embedded, optimism_vectors, batch)
    wrong_tokens = [label for label in reference if got[label][0] != reference[label][0]]
    assert not wrong_tokens, wrong_tokens
    for label, (_, values) in reference.items():
        assert values.shape == got[label][1].shape and values.shape[0] >= N_TOKENS, label
        torch.testing.assert_close(got[label][1], values, atol=1e-3, rtol=0, msg=label)
    # The steering changes the text (else the comparison would be vacuous), on both stages' layers.
    for name in ("add", "add-prompt"):
        assert any(reference[f"{name}/{i}"][0] != reference[f"none/{i}"][0] for i in range(len(QUESTIONS))), name


def test_core_binding_is_set_for_the_start_only():
    env: dict[str, str] = {}
    with bound_cores(3, env) as value:
        assert env == {BIND_ENV: value} and value.count("|") == 2
    assert env == {}
    with bound_cores(1, env) as value:
        assert value is None and env == {}
    # A batch job's single worker: every allowed core, none kept back for vLLM's scheduler process.
    with bound_cores(1, env, whole_machine=True) as value:
        assert value == ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
        assert env == {BIND_ENV: value, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    assert env == {}
    # ... and runs in this process (no engine-core or worker process), unless the user chose otherwise.
    args: dict = {}
    with one_process(1, args, env) as done:
        assert done and args == {"distributed_executor_backend": "uni"}
        assert env == {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    assert env == {}
    for world, chosen, user_env in ((3, {}, {}), (1, {"distributed_executor_backend": "mp"}, {}),
                                    (1, {}, {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"})):
        with one_process(world, dict(chosen), dict(user_env)) as done:
            assert not done
    env = {BIND_ENV: "0|0|1"}  # the user's binding is kept
    with bound_cores(3, env) as value:
        assert value is None
    assert env == {BIND_ENV: "0|0|1"}


def test_each_test_worker_binds_its_one_rank_engines_to_a_core_of_its_own(monkeypatch):
    cores = sorted(os.sched_getaffinity(0))
    env: dict[str, str] = {}
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    with own_core(env) as value:  # one test process: vLLM's own binding
        assert value is None and env == {}
    for k in range(3):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", f"gw{k}")
        with own_core(env) as value:
            assert env == {BIND_ENV: str(cores[k % len(cores)])} and value == env[BIND_ENV]
        assert env == {}
    env = {BIND_ENV: "0"}  # the caller's binding is kept
    with own_core(env) as value:
        assert value is None
    assert env == {BIND_ENV: "0"}


# -- refusals -------------------------------------------------------------------------------------------------
NGRAM = {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3}
REFUSED = {
    "data-parallel": ({"data_parallel_size": 2},
                      "data parallel (2 engines): each engine's trait read-outs stay in its own workers"),
    "speculative": ({"speculative_config": NGRAM}, "speculative decoding: a step verifies several draft tokens"),
    "pp-eager-on-cpu": ({"pipeline_parallel_size": 2, "enforce_eager": True},
                        "pipeline parallel with compilation off on vLLM's CPU build"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_before_any_worker_starts(name, embedded):
    from steerlib.serve.vllm_engine import VllmEngine

    layout, message = REFUSED[name]
    engine = VllmEngine(_args(**layout), embedded.tokenizer)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="vLLM failed to start") as info:
        engine.start()
    assert "steerlib cannot steer this vLLM layout: " + message in str(info.value)
    assert time.monotonic() - t0 < 60  # the config check, not a model load (which takes minutes here)
    assert not engine.alive


@pytest.fixture
def resolved():
    """vLLM's resolved config of a one-worker engine (what the rule set reads), no engine started."""
    from steerlib.vllm.layout import start_config

    return start_config(_args())


def test_one_worker_layout_passes(resolved):
    from steerlib.vllm.layout import check_layout

    check_layout(resolved)  # the reference layout: nothing refused


@pytest.mark.parametrize("name, change, message", [
    # vLLM's CPU build turns DBO off (and refuses V2 without Triton) while resolving; a GPU build keeps them,
    # so the rule is checked on the resolved config as a GPU build leaves it.
    ("dbo", lambda c: setattr(c.parallel_config, "enable_dbo", True), "dual-batch overlap (micro-batching)"),
    ("context-parallel", lambda c: setattr(c.parallel_config, "decode_context_parallel_size", 3),
     "context (sequence) parallel: a rank holds a slice of the step's tokens"),
])
def test_gpu_only_layouts_are_refused(name, change, message, resolved):
    from steerlib.vllm.layout import check_layout

    change(resolved)
    with pytest.raises(UnsupportedLayout, match="steerlib cannot steer this vLLM layout") as info:
        check_layout(resolved)
    assert message in str(info.value)


def test_v2_runner_is_refused(resolved, monkeypatch):
    from vllm.config import VllmConfig

    from steerlib.vllm.layout import check_layout

    monkeypatch.setattr(VllmConfig, "use_v2_model_runner", property(lambda self: True))
    with pytest.raises(UnsupportedLayout, match="vLLM's V2 model runner: steerlib reads the V1 runner's"):
        check_layout(resolved)


def test_cpu_build_refuses_v2_itself(monkeypatch):
    """Where vLLM itself refuses V2 (no Triton on its CPU build), the refusal is vLLM's, while resolving."""
    from steerlib.vllm.layout import start_config

    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(ValueError, match="Model Runner V2 requires Triton"):
        start_config(_args())


def test_vllm_refuses_tensor_parallel_2_on_this_model():
    """The embedded model has 9 attention heads: vLLM itself refuses TP=2, while resolving."""
    from steerlib.vllm.layout import start_config

    with pytest.raises(ValueError, match=r"attention heads \(9\) must be divisible by tensor parallel size \(2\)"):
        start_config(_args(tensor_parallel_size=2))


def test_plugin_refuses_in_the_worker_before_the_weights_load(resolved):
    """``LLM(...)`` / ``vllm serve`` start without steerlib's builder: the plugin's wrapper of the worker's
    ``load_model`` runs the same check first (a worker that got past it would fail on this stand-in, which
    has no model runner)."""
    from types import SimpleNamespace

    from vllm.v1.worker.gpu_worker import Worker

    from steerlib.vllm.plugin import register

    register()
    resolved.parallel_config.data_parallel_size = 2
    with pytest.raises(UnsupportedLayout, match="data parallel \\(2 engines\\)"):
        Worker.load_model(SimpleNamespace(vllm_config=resolved))
