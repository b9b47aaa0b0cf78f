"""The continuous-batching engine without HTTP: chunked prefill beside decoding rows, per-row positions, and
agreement with ``steerlib.generate`` under ``steer``'s hooks."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from helpers import count_hooks

from steerlib.core.chat import format_prompt
from steerlib.core.models import eos_ids
from steerlib.serve.engine import Engine, EngineStopped, RowFailed, Sampling
from steerlib.steering.generation import generate
from steerlib.steering.plan import lower_ops
from steerlib.steering.steer import build_ops

pytestmark = pytest.mark.slow

MAX_TOKENS = 12


class _Collector:
    """A sink that counts tokens and keeps the completion."""

    def __init__(self) -> None:
        self.tokens = 0
        self.done = threading.Event()
        self.result = None
        self.cond = threading.Condition()

    def __call__(self, item: tuple) -> None:
        with self.cond:
            if item[0] == "token":
                self.tokens += 1
            elif item[0] in ("done", "error"):
                self.result = item[1]
                self.done.set()
            self.cond.notify_all()

    def wait_tokens(self, n: int) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: self.tokens >= n or self.done.is_set(), 60)


def test_chunked_prefill_beside_decoding_rows_equals_generate(embedded):
    model, tok = embedded
    vec = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    vec = vec / vec.norm() * 12.0
    configs = {
        "plain": [],
        "prompt-only": build_ops(model, vec, 10, 1.0, positions="prompt"),
        "response-only": build_ops(model, vec, 12, -1.0, positions="response"),
    }
    prompts = {name: format_prompt(tok, q) for name, q in zip(
        configs, ["Tell me about the ocean.", "What makes a good friend?", "Describe your ideal weekend."],
        strict=True)}
    expected = {name: generate(model, tok, [prompts[name]], steering=ops, max_new_tokens=MAX_TOKENS,
                               temperature=0)[0].text for name, ops in configs.items()}
    assert expected["prompt-only"] != generate(model, tok, [prompts["prompt-only"]], max_new_tokens=MAX_TOKENS,
                                               temperature=0)[0].text, "the test vector must change the text"

    engine = Engine(model, tok, eos_ids=eos_ids(model, tok), prefill_chunk=7)  # prompts take several steps
    engine.start()
    try:
        sinks = {name: _Collector() for name in configs}

        def submit(name: str) -> None:
            ids = tok(prompts[name], add_special_tokens=False)["input_ids"]
            assert len(ids) > 3 * engine.prefill_chunk
            engine.submit(ids, lower_ops(configs[name]),
                          Sampling(MAX_TOKENS), sinks[name], steered=bool(configs[name]))

        submit("plain")
        sinks["plain"].wait_tokens(2)  # the others arrive while it decodes
        submit("prompt-only")
        submit("response-only")
        for s in sinks.values():
            assert s.done.wait(120)
    finally:
        engine.stop()
    for name, s in sinks.items():
        assert s.result.text.strip() == expected[name], name
    plain_steps = {step for step, _ in sinks["plain"].result.steps}
    late_steps = {step for step, _ in sinks["prompt-only"].result.steps}
    assert plain_steps & late_steps, "the late rows never decoded beside the first"
    stats = engine.stats()
    assert stats["mixed_steps"] >= 3  # several prompt chunks were fed beside a decoding row
    assert stats["prefill_tokens"] == sum(len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts.values())


def test_engine_rejects_bad_options(embedded):
    model, tok = embedded
    with pytest.raises(ValueError, match="prefill_chunk must be >= 1"):
        Engine(model, tok, prefill_chunk=0)
    with pytest.raises(ValueError, match="max_batch must be >= 1"):
        Engine(model, tok, max_batch=0)


def _ids(tok, question: str) -> list[int]:
    return tok(format_prompt(tok, question), add_special_tokens=False)["input_ids"]


def _solo(engine: Engine, ids: list[int], sampling: Sampling) -> str:
    sink = _Collector()
    engine.submit(ids, [], sampling, sink, steered=False)
    assert sink.done.wait(120)
    return sink.result.text


def test_one_failing_row_fails_alone_and_tiny_temperatures_are_greedy(embedded, monkeypatch):
    """A row whose sampling fails gets its own error; the rows beside it finish with their solo text. A
    temperature of 1e-40 (once NaN probabilities that failed the whole step) samples the greedy token."""
    model, tok = embedded
    engine = Engine(model, tok, eos_ids=eos_ids(model, tok))
    engine.start()
    try:
        questions = ["Name a color.", "Name a fruit.", "Name a city."]
        ids = [_ids(tok, q) for q in questions]
        solo = [_solo(engine, x, Sampling(8)) for x in ids]
        real_sample = engine._sample

        def sample(row, logits):
            if row.prompt_ids == ids[1]:
                raise RuntimeError("boom")
            return real_sample(row, logits)

        monkeypatch.setattr(engine, "_sample", sample)
        sinks = [_Collector() for _ in ids]
        with engine.hold():  # all three join the same steps
            engine.submit(ids[0], [], Sampling(8, temperature=1e-40, seed=1), sinks[0], steered=False)
            engine.submit(ids[1], [], Sampling(8), sinks[1], steered=False)
            engine.submit(ids[2], [], Sampling(8), sinks[2], steered=False)
        for s in sinks:
            assert s.done.wait(120)
    finally:
        engine.stop()
    assert isinstance(sinks[1].result, RowFailed) and "boom" in str(sinks[1].result)
    assert sinks[0].result.text == solo[0] and sinks[2].result.text == solo[2]
    assert engine.stats()["failed"] == 1


def test_every_admitted_row_ends_and_stop_is_bounded(embedded):
    """A row cancelled while queued still gets its one ending; stop() ends running and queued rows at once."""
    model, tok = embedded
    hooks_before = count_hooks(model)  # transformers' own output-capturing hooks may be there already
    engine = Engine(model, tok, eos_ids=eos_ids(model, tok), max_batch=1)
    engine.start()
    ids = _ids(tok, "Tell me a long story about the sea.")
    queued = _Collector()
    with engine.hold():
        row = engine.submit(ids, [], Sampling(4), queued, steered=False)
        row.cancelled.set()
    assert queued.done.wait(30)
    assert queued.result.finish_reason == "cancelled" and queued.result.completion_tokens == 0
    running, waiting = _Collector(), _Collector()
    engine.submit(ids, [], Sampling(400), running, steered=False)
    running.wait_tokens(1)
    engine.submit(ids, [], Sampling(400), waiting, steered=False)  # max_batch=1: it queues
    started = time.monotonic()
    engine.stop(timeout=30)
    assert time.monotonic() - started < 30
    for sink in (running, waiting):
        assert sink.done.is_set() and isinstance(sink.result, EngineStopped)
    assert count_hooks(model) == hooks_before  # the lifetime hooks are gone
