"""``/v1/completions`` and log-probabilities where the shared service cases do not reach: a server without a
read-out (``max_tokens`` 0 still runs the prompt's one pass), the contract's values, and the wire shapes.

The engine-independent behaviour (steered prompt log-probabilities vs a transformers forward pass, shapes, errors)
is in ``tests/service_cases.py``, run on both engines."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
import torch

pytest.importorskip("fastapi")

from steerlib.serve import AppOptions, BackgroundServer, create_app  # noqa: E402
from steerlib.serve.contract import Sampling, TokenLogprob  # noqa: E402
from steerlib.serve.detok import Reply  # noqa: E402
from steerlib.serve.logprobs import chat_logprobs, completion_logprobs, from_logits  # noqa: E402

PROMPT = "Once upon a time, in a small village,"


@pytest.fixture(scope="module")
def url(embedded) -> Iterator[str]:
    model, tok = embedded
    app = create_app(model, tok, {}, AppOptions(model_name="smol", max_tokens_limit=16, default_max_tokens=4))
    with BackgroundServer(app) as srv:
        yield srv.url


def test_max_tokens_zero_without_a_read_out_runs_the_prompt_once(url, embedded):
    model, tok = embedded
    ids = tok(PROMPT, add_special_tokens=False)["input_ids"]
    body = {"prompt": PROMPT, "max_tokens": 0, "echo": True, "logprobs": 0}
    reply = httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()
    choice = reply["choices"][0]
    assert choice["text"] == PROMPT and choice["finish_reason"] == "length"
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    want = [float(lp[q, ids[q + 1]]) for q in range(len(ids) - 1)]
    assert choice["logprobs"]["token_logprobs"][1:] == pytest.approx(want, abs=1e-4)
    assert reply["usage"]["completion_tokens"] == 0
    # Without echo there is nothing to show: empty text and empty lists.
    plain = httpx.post(f"{url}/v1/completions", json={**body, "echo": False}, timeout=120).json()["choices"][0]
    assert plain["text"] == "" and plain["logprobs"]["tokens"] == []
    streamed = httpx.post(f"{url}/v1/completions", json={**body, "stream": True}, timeout=120).text
    chunks = [json.loads(line[6:]) for line in streamed.splitlines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["text"] for c in chunks) == PROMPT
    assert chunks[-1]["choices"][0]["logprobs"] == choice["logprobs"]


def test_chat_logprobs_stream_in_the_last_chunk_and_without_them_stay_null(url):
    body = {"messages": [{"role": "user", "content": "Name a fruit."}], "max_tokens": 4, "temperature": 0,
            "logprobs": True, "top_logprobs": 1, "n": 2}
    whole = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).json()
    assert whole["choices"][0]["logprobs"] == whole["choices"][1]["logprobs"]  # greedy: both choices alike
    text = httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=120).text
    chunks = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    lasts = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert [c["choices"][0]["logprobs"] for c in lasts] == [whole["choices"][0]["logprobs"]] * 2
    assert all(c["choices"][0]["logprobs"] is None for c in chunks if not c["choices"][0]["finish_reason"])


def test_reply_of_zero_tokens_is_one_closing_pass():
    class Letters:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(97 + i % 26) for i in ids)

    with_readout = Reply(Letters(), Sampling(max_tokens=0), 4, set(), readout=True)
    assert with_readout.closing and not with_readout.done and with_readout.finish == "length"
    assert with_readout.close([1.5]) == ("", [[1.5]]) and with_readout.done
    assert with_readout.readout_pairs() == [(3, [1.5])]  # read at the last prompt token
    without = Reply(Letters(), Sampling(max_tokens=0), 4, set(), readout=False)
    assert without.close(None) is None and without.done and without.text == ""
    with pytest.raises(ValueError, match=r"max_tokens must be >= 0, got -1"):
        Sampling(max_tokens=-1)
    with pytest.raises(ValueError, match=r"logprobs must be in 0\.\.20, got 21"):
        Sampling(max_tokens=1, logprobs=21)


def test_wire_shapes_from_token_logprobs():
    lp = torch.log_softmax(torch.tensor([0.0, 2.0, 1.0, -1.0]), -1)
    entry = from_logits(lp, 2, 2)
    assert entry.token_id == 2 and entry.logprob == pytest.approx(float(lp[2]))
    assert [t for t, _ in entry.top] == [1, 2]
    letters = "wxyz".__getitem__
    legacy = completion_logprobs([None, entry], [0, 2], letters, offset=5)
    assert legacy == {"tokens": ["w", "y"], "token_logprobs": [None, entry.logprob],
                      "top_logprobs": [None, {"x": entry.top[0][1], "y": entry.logprob}], "text_offset": [5, 6]}
    # A token the model rules out (-inf) is reported at OpenAI's floor: JSON has no -inf.
    ruled_out = from_logits(torch.log_softmax(torch.tensor([0.0, float("-inf")]), -1), 1, 2)
    assert ruled_out == TokenLogprob(1, -9999.0, ((0, 0.0), (1, -9999.0)))
    assert json.dumps(completion_logprobs([ruled_out], [1], letters))
    chat = chat_logprobs([entry], letters)["content"][0]
    assert chat["token"] == "y" and chat["bytes"] == [121] and [t["token"] for t in chat["top_logprobs"]] == ["x", "y"]
