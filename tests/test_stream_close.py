"""Closing a stream early stops its decoding thread and removes its hooks before close() returns."""

from __future__ import annotations

import threading

import torch
from helpers import count_hooks

from steerlib import build_ops, build_readout, format_prompt, stream


def _stream_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "steerlib-stream"]


def test_close_after_first_chunk_stops_the_thread_and_removes_hooks(embedded):
    model, tok = embedded
    torch.manual_seed(0)
    v = torch.randn(model.config.hidden_size)
    ops = build_ops(model, v, [4, 12], 2.0)
    readout = build_readout(model, {"v": v}, [12])
    ids = torch.tensor([[1, 2, 3]])
    with torch.inference_mode():
        plain = model(ids).logits
    baseline = count_hooks(model)
    gen = stream(model, tok, format_prompt(tok, "Tell me a long story about the sea."), steering=ops,
                 readout=readout, max_new_tokens=64)
    text, proj = next(gen)
    assert isinstance(text, str) and proj.shape == (1, 1)
    assert count_hooks(model) > baseline  # steering is on while the stream runs
    gen.close()
    assert count_hooks(model) == baseline
    assert _stream_threads() == []
    with torch.inference_mode():  # no edit left behind
        torch.testing.assert_close(model(ids).logits, plain, rtol=0, atol=0)


def test_a_stream_read_to_the_end_still_joins_its_thread(embedded):
    model, tok = embedded
    baseline = count_hooks(model)
    pieces = list(stream(model, tok, format_prompt(tok, "Say hi."), max_new_tokens=4))
    assert 1 <= len(pieces) <= 4
    assert count_hooks(model) == baseline and _stream_threads() == []
