"""Registered vectors on vLLM: requests carry content keys, each worker's slot table holds at most
``--max-steer-vectors`` rows (LRU, pinned while a request runs), a request that needs a slot when every slot is
pinned is refused with 429; and gates/latches steer on vLLM exactly as on the HF engine.

One engine for this module, eager (what is tested here does not depend on compilation) and with a capacity of 6
rows, so that a handful of requests fills the table. Its last test stops it deliberately and checks that the
shutdown logs no error.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest
import torch
from vllm_helpers import Collected, own_core, run_rows

from steerlib import format_prompt
from steerlib.steering.generation import generate
from steerlib.steering.plan import Condition, SteerOp, lower_ops

CAPACITY = 6
N_TOKENS = 8
QUESTIONS = ["How do you feel about the future?", "What will next year bring?"]


@pytest.fixture(scope="module")
def slots_engine(embedded):
    pytest.importorskip("vllm")
    from steerlib.core.models import eos_ids, resolve_model_path
    from steerlib.serve.vllm_engine import VllmEngine, engine_args

    model, tok = embedded
    path, _ = resolve_model_path(None)
    args = engine_args(str(path), max_batch=4, max_model_len=256, enforce_eager=True, max_steer_vectors=CAPACITY,
                       extra={"seed": 0})
    assert args["additional_config"]["steerlib_max_vectors"] == CAPACITY
    engine = VllmEngine(args, tok, max_batch=4, eos_ids=eos_ids(model, tok))
    with own_core():
        engine.start()
    yield engine
    if engine.alive:  # the module's last test stops it on purpose
        engine.stop()


@pytest.fixture(scope="module")
def prompts(embedded):
    _, tok = embedded
    return [format_prompt(tok, q) for q in QUESTIONS]


def _ids(tok, prompt):
    return list(tok(prompt, add_special_tokens=False)["input_ids"])


def _hf(model, tok, prompt, ops, n=N_TOKENS):
    return generate(model, tok, [prompt], steering=ops, max_new_tokens=n, batch_size=1)[0].token_ids


def _status(engine) -> dict:
    """The worker's slot table counters (``collective_rpc`` on the engine's own loop)."""
    call = engine._llm.collective_rpc("steerlib_status")
    return asyncio.run_coroutine_threadsafe(call, engine._loop).result(60)[0]["slots"]


def test_gated_and_latched_steering_matches_hf(slots_engine, embedded, optimism_vectors, prompts):
    model, tok = embedded
    v14, v10 = optimism_vectors.get(14), optimism_vectors.get(10)
    # Projections on the unit direction at layer 14 run ~5..40 on these prompts: a gate at 15 opens on some
    # tokens only; a latched one stays open from the first of them.
    configs = {
        "gate": [SteerOp(layer=14, vector=v14, coef=6.0, when=Condition(v14, above=15.0))],
        "gate-latch": [SteerOp(layer=14, vector=v14, coef=6.0, when=Condition(v14, above=15.0, latch=True))],
        "cap-gated-latch": [SteerOp(layer=14, vector=v14, mode="cap", cap_max=2.0, positions="response",
                                    when=Condition(v14, above=20.0, latch=True))],
        "gate-below-l10": [SteerOp(layer=10, vector=v10, coef=-5.0, when=Condition(v10, below=0.0, latch=True))],
    }
    rows = [(_ids(tok, p), lower_ops(ops)) for ops in configs.values() for p in prompts]
    got = [row.token_ids for row, _ in run_rows(slots_engine, rows, N_TOKENS)]
    expected = [_hf(model, tok, p, ops) for ops in configs.values() for p in prompts]
    labels = [f"{n}/{i}" for n in configs for i in range(len(prompts))]
    mismatched = [lab for lab, g, e in zip(labels, got, expected, strict=True) if g != e]
    assert not mismatched, mismatched
    # Not vacuous: the gates change the text, and differently from the ungated edit.
    plain = [_hf(model, tok, p, []) for p in prompts]
    full = [_hf(model, tok, p, [SteerOp(layer=14, vector=v14, coef=6.0)]) for p in prompts]
    for name in ("gate", "gate-latch"):
        k = list(configs).index(name) * len(prompts)
        assert any(expected[k + i] not in (plain[i], full[i]) for i in range(len(prompts))), name
    assert expected[2:4] != expected[0:2]  # latching changes what a per-token gate does


def test_requests_carry_keys_and_more_vectors_than_slots_rotate_through_lru(slots_engine, embedded, prompts):
    model, tok = embedded
    g = torch.Generator().manual_seed(7)
    vectors = [torch.nn.functional.normalize(torch.randn(model.config.hidden_size, generator=g), dim=0) * 8.0
               for _ in range(16)]
    ops = [[SteerOp(layer=10, vector=v, coef=1.0)] for v in vectors]
    before = _status(slots_engine)
    got = []
    for wave in range(4):  # 4 rows in flight at a time, 16 distinct rows through 6 slots
        rows = [(_ids(tok, prompts[i % 2]), lower_ops(ops[4 * wave + i])) for i in range(4)]
        done = run_rows(slots_engine, rows, N_TOKENS)
        got += [row.token_ids for row, _ in done]
        spec = json.loads(done[0][0].spec)
        assert isinstance(spec["edits"][0]["row"], str) and len(done[0][0].spec) < 300  # a key, not 576 floats
    expected = [_hf(model, tok, prompts[i % 2], ops[i]) for i in range(16)]
    assert [i for i in range(16) if got[i] != expected[i]] == []
    after = _status(slots_engine)
    assert after["capacity"] == CAPACITY and after["resident"] <= CAPACITY
    assert after["loads"] - before["loads"] == 16 and after["evictions"] - before["evictions"] >= 16 - CAPACITY
    # A worker unpins the rows of finished requests at its next step: after one more (unsteered) row, none is.
    run_rows(slots_engine, [(_ids(tok, prompts[0]), [])], 2)
    assert _status(slots_engine)["pinned"] == 0


def test_a_request_needing_a_slot_while_every_slot_is_pinned_gets_429(slots_engine, embedded, prompts):
    from steerlib.serve.engine import QueueFull, Sampling
    from steerlib.serve.runs import engine_api_error

    model, tok = embedded
    g = torch.Generator().manual_seed(11)
    d = model.config.hidden_size
    # A long row pinning all 6 slots (six small edits at six layers), then a row that needs one more vector.
    holder_ops = [SteerOp(layer=4 + i, vector=torch.randn(d, generator=g) * 0.05, coef=1.0) for i in range(CAPACITY)]
    extra_ops = [SteerOp(layer=3, vector=torch.randn(d, generator=g) * 0.05, coef=1.0)]
    holder = Collected()
    row = slots_engine.submit(_ids(tok, prompts[0]), lower_ops(holder_ops), Sampling(max_tokens=120), holder,
                              steered=True)
    deadline = time.monotonic() + 120
    while not row.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert row.started and not holder.done.is_set()
    refused = Collected()
    slots_engine.submit(_ids(tok, prompts[1]), lower_ops(extra_ops), Sampling(max_tokens=4), refused, steered=True)
    assert refused.done.wait(60) and isinstance(refused.error, QueueFull)
    err = engine_api_error(refused.error)
    assert err.status == 429 and "all 6 steering vector slots (--max-steer-vectors) are pinned" in err.message
    assert holder.done.wait(300) and holder.error is None
    # Once the holder finished its slots are free again: the same request now runs.
    (_, again), = run_rows(slots_engine, [(_ids(tok, prompts[1]), lower_ops(extra_ops))], 4)
    assert again.completion is not None


def test_a_plain_vllm_client_sends_floats_once_and_the_api_process_registers_them(slots_engine, embedded,
                                                                                     optimism_vectors, prompts):
    """What `vllm serve` with the plugin does with a client's spec (vectors inline, a latched gate): the API
    process checks it, writes its rows to the store and rewrites it to keys; the worker loads them once."""
    from vllm import SamplingParams

    from steerlib.vllm.spec import SPEC_KEY, encode_spec

    model, tok = embedded
    v = optimism_vectors.get(12)
    ops = [SteerOp(layer=12, vector=v * 0.97, coef=5.0, when=Condition(v * 1.01, above=10.0, latch=True))]
    params = SamplingParams(max_tokens=N_TOKENS, temperature=0.0,
                            extra_args={SPEC_KEY: encode_spec(ops)})  # floats, as any HTTP client writes them

    async def ask() -> list[int]:
        last = None
        async for out in slots_engine._llm.generate({"prompt_token_ids": _ids(tok, prompts[0])}, params, "client"):
            last = out
        return list(last.outputs[0].token_ids)

    before = _status(slots_engine)
    got = asyncio.run_coroutine_threadsafe(ask(), slots_engine._loop).result(300)
    assert got == _hf(model, tok, prompts[0], ops)
    assert _status(slots_engine)["loads"] - before["loads"] == 2  # the edit's row and its gate direction


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_a_deliberate_shutdown_logs_no_error(slots_engine, embedded, prompts, capfd, monkeypatch):
    """The module's last test stops its engine: serve a request, stop, and nothing at ERROR in the loggers
    (vLLM's do not propagate) or on stderr.

    ``AsyncLLM.shutdown`` first tears down the engine core client (its output task, cancelled, hands the output
    handler an ``EngineDeadError``), then cancels the output handler. Whether the handler sees the error first is
    a race that a busy machine loses (as ``scripts/bench_vllm.py`` did); the handler's cancellation is delayed
    here so that the race is lost every time.
    """
    import vllm.v1.engine.async_llm as async_llm

    def late(task, cancel=async_llm.cancel_task_threadsafe):
        time.sleep(0.5)
        cancel(task)

    monkeypatch.setattr(async_llm, "cancel_task_threadsafe", late)
    _, tok = embedded
    run_rows(slots_engine, [(_ids(tok, prompts[0]), [])], max_tokens=4)
    capfd.readouterr()  # what came before is not the subject
    handler = _Records()
    loggers = [logging.getLogger(), logging.getLogger("vllm"), logging.getLogger("steerlib")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        slots_engine.stop()
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    assert not slots_engine.alive
    errors = [f"{r.name}: {r.getMessage()}" for r in handler.records if r.levelno >= logging.ERROR]
    assert errors == []
    err = capfd.readouterr().err
    assert "ERROR" not in err and "Traceback" not in err, err[-3000:]
