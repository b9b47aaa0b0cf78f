"""The engine contract without a server: the shared reply logic (text, finish, read-out pairing), the frozen
per-request value ``on_finish`` gets, and both engines implementing one protocol (tiny model, no vLLM needed)."""

from __future__ import annotations

import dataclasses
import logging
import threading

import pytest
import torch

from steerlib.serve.contract import (
    Completion,
    FinishedRequest,
    Sampling,
    ServingEngine,
    public_finish,
    summarize_projections,
)
from steerlib.serve.detok import Reply
from steerlib.serve.engine import Engine
from steerlib.steering.plan import lower_ops
from steerlib.steering.steer import build_ops, build_readout

EOS = 2


class CharTokenizer:
    """Token ``i`` decodes to one letter (``a`` + i mod 26); ``EOS`` is special and decodes to nothing."""

    pad_token_id = 0

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join("" if i == EOS and skip_special_tokens else chr(97 + i % 26) for i in ids)


def _reply(max_tokens=4, stop=(), readout=True, prompt_len=5):
    return Reply(CharTokenizer(), Sampling(max_tokens=max_tokens, stop=stop), prompt_len, {EOS}, readout=readout)


def test_reply_pairs_each_value_with_the_position_that_produced_its_token():
    reply = _reply(max_tokens=3)
    events = [reply.push(t, [float(10 + i)]) for i, t in enumerate([7, 8, 9])]
    # The third token reaches max_tokens: the reply waits for the closing pass (the last token's own read-out).
    assert [e[0] for e in events] == ["h", "i", "j"] and reply.finish == "length" and reply.closing
    assert not reply.done
    assert reply.close([13.0]) == ("", [[13.0]]) and reply.done
    assert reply.readout_pairs() == [(4, [10.0]), (5, [11.0]), (6, [12.0]), (7, [13.0])]  # prompt_len - 1 + i
    summary = reply.summaries(["t"], layer=3)["t"]
    assert summary == summarize_projections([10.0, 11.0, 12.0, 13.0], 3)
    assert summary["prompt_last"] == 10.0 and summary["mean"] == 12.0 and summary["n_tokens"] == 3
    assert public_finish(reply.finish) == "length"


def test_reply_at_eos_keeps_its_value_unsent_and_needs_no_closing_pass():
    reply = _reply(max_tokens=10)
    assert reply.push(7, [1.0]) == ("h", [[1.0]])
    assert reply.push(EOS, [2.0]) is None  # nothing to send: EOS has no text and its value is not streamed
    assert reply.finish == "eos" and reply.done and reply.text == "h" and reply.tokens == [7, EOS]
    assert reply.summaries(["t"], None)["t"]["mean"] == 2.0  # EOS's value is the last response token's own
    assert public_finish(reply.finish) == "stop"
    with pytest.raises(RuntimeError, match=r"the reply already ended \(eos\); no token can follow"):
        reply.push(7, [0.0])


def test_reply_stop_sequence_cuts_the_text_and_closes_like_length():
    reply = _reply(max_tokens=10, stop=("fg",))
    out = [reply.push(t, [float(t)]) for t in (3, 4, 5, 6)]  # d e f g
    assert reply.finish == "stop_sequence" and reply.text == "de" and reply.closing
    assert "".join(e[0] for e in out if e) == "de"  # "f" was held back as a possible stop start
    assert public_finish(reply.finish) == "stop"
    no_readout = _reply(max_tokens=1, readout=False)
    no_readout.push(5, None)
    assert no_readout.done and not no_readout.closing
    with pytest.raises(RuntimeError, match="no closing pass is pending"):
        no_readout.close([0.0])
    short = _reply(max_tokens=5)
    short.push(5, [1.0])
    short.cut_short()  # the engine stopped first: the reply ends at length, with what it has
    assert short.done and short.finish == "length" and short.summaries(["t"], None)["t"]["n_tokens"] == 0
    with pytest.raises(ValueError, match=r"unknown finish reason 'odd'; expected one of"):
        public_finish("odd")


def test_finished_request_is_a_frozen_copy():
    steering = [{"vector": "v", "coef": 2.0}]
    projections = {"t": {"mean": 1.0}}
    c = Completion(text="x", completion_tokens=1, prompt_tokens=2, finish_reason="stop",
                   trait_projections=projections, steps=[[1, 1]], queue_ms=0.0, ttft_ms=None)
    tokens, values = [5], [1.0, 2.0]
    done = FinishedRequest.build(request_id="r", prompt_ids=[1, 2], token_ids=tokens, readout=[(1, values)],
                                 edits=[], steered=True, steering=steering, completion=c)
    tokens.append(6)
    values.append(3.0)
    steering[0]["coef"] = 9.0
    projections["t"]["mean"] = 5.0
    assert done.token_ids == (5,) and done.readout == ((1, (1.0, 2.0)),)
    assert done.steering[0]["coef"] == 2.0 and done.trait_projections == {"t": {"mean": 1.0}}
    assert done.usage == {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}
    with pytest.raises(dataclasses.FrozenInstanceError):
        done.steered = False  # type: ignore[misc]


@pytest.fixture(scope="module")
def tiny(make_tiny):
    return make_tiny("llama")


def test_both_engines_implement_the_protocol(tiny):
    from steerlib.serve.vllm_engine import VllmEngine  # importing it needs no vLLM; starting it does

    hf = Engine(tiny, CharTokenizer(), eos_ids={EOS})
    vllm = VllmEngine({"model": "unused"}, CharTokenizer(), eos_ids={EOS})
    for engine in (hf, vllm):
        assert isinstance(engine, ServingEngine)
        assert engine.stats()["engine"] == engine.capabilities.name
        assert engine.stats()["finish_callback_errors"] == 0
    assert (hf.capabilities.name, vllm.capabilities.name) == ("hf", "vllm")
    assert hf.capabilities.batch_steps and not vllm.capabilities.batch_steps


def test_on_finish_gets_a_finished_request_and_a_failing_callback_is_logged_and_counted(tiny, caplog):
    vec = torch.randn(tiny.config.hidden_size, generator=torch.Generator().manual_seed(0))
    readout = build_readout(tiny, {"t": vec}, 2)
    engine = Engine(tiny, CharTokenizer(), readout=readout, eos_ids=set())
    got: list[FinishedRequest] = []
    engine.on_finish = got.append
    edits = lower_ops(build_ops(tiny, vec, 1, 3.0))
    ended = threading.Event()
    events: list[tuple] = []

    def sink(item: tuple) -> None:
        events.append(item)
        if item[0] in ("done", "error"):
            ended.set()

    engine.start()
    try:
        row = engine.submit([5, 6, 7], edits, Sampling(max_tokens=3), sink, steered=True)
        row.meta_steering = [{"vector": "t", "layer": 1, "coef": 3.0}]
        assert ended.wait(60)
        ended.clear()

        def broken(_done: FinishedRequest) -> None:
            raise KeyError("boom")

        engine.on_finish = broken
        with caplog.at_level(logging.ERROR, logger="steerlib.serve"):
            engine.submit([5, 6], [], Sampling(max_tokens=2), sink, steered=False)
            assert ended.wait(60)
    finally:
        engine.stop()
    [done] = got
    assert done.edits == tuple(edits) and done.steered and done.steering == ({"vector": "t", "layer": 1, "coef": 3.0},)
    assert done.prompt_ids == (5, 6, 7) and len(done.token_ids) == 3 and done.finish_reason == "length"
    # Four read-outs (last prompt token, then each response token's own, the last from the closing pass), at
    # the positions that produced them; the streamed values are the same numbers.
    assert [p for p, _ in done.readout] == [2, 3, 4, 5]
    streamed = [v for e in events[:events.index(next(e for e in events if e[0] == "done"))] if e[0] == "token"
                for v in e[2]]
    assert [tuple(v) for v in streamed] == [v for _, v in done.readout]
    assert done.trait_projections["t"]["mean"] == pytest.approx(sum(v[0] for _, v in done.readout[1:]) / 3)
    assert [e[0] for e in events].count("done") == 2  # the failing callback did not fail its request
    assert engine.stats()["finish_callback_errors"] == 1
    assert any(r.levelno == logging.ERROR and "on_finish callback failed" in r.getMessage() for r in caplog.records)
