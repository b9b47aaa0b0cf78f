"""The continuous-batching engine without HTTP: chunked prefill beside decoding rows, per-row positions, and
agreement with ``steerlib.generate`` under ``steer``'s hooks."""

from __future__ import annotations

import threading

import pytest
import torch

from steerlib.core.chat import format_prompt
from steerlib.serve.engine import Engine, Sampling, edits_from_ops, eos_ids
from steerlib.steering.generation import generate
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
            engine.submit(ids, edits_from_ops(configs[name], [("v", 0, op.layer) for op in configs[name]]),
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
