"""Log-probabilities: taken from an engine's logits, and written in OpenAI's two wire shapes.

* ``from_logits``: the HF engine's ``TokenLogprob`` for one position (its own logits, steering applied).
* ``from_vllm``: the same value from vLLM's per-position ``{token id: Logprob}`` dictionaries.
* ``completion_logprobs``: the legacy completions object (``tokens``, ``token_logprobs``, ``top_logprobs``,
  ``text_offset``), where an unpredicted first prompt token (``echo``) has ``null`` entries.
* ``chat_logprobs``: the chat object (``{"content": [{token, logprob, bytes, top_logprobs}]}``).

Both engines hand the routes the same ``TokenLogprob`` values, so the two wire shapes are written here once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from steerlib.serve.contract import TokenLogprob

__all__ = ["chat_logprobs", "completion_logprobs", "from_logits", "from_vllm", "prompt_entries"]

# OpenAI's JSON has no -inf; a token the model rules out entirely is reported at this floor (vLLM does the same).
_FLOOR = -9999.0


def _finite(x: float) -> float:
    return max(float(x), _FLOOR)


def from_logits(logprobs: Tensor, token: int, k: int) -> TokenLogprob:
    """``token``'s entry from one position's log-probabilities ``[V]`` (already ``log_softmax``-ed, float32)."""
    top: tuple[tuple[int, float], ...] = ()
    if k > 0:
        values, ids = torch.topk(logprobs, k)
        top = tuple((int(i), _finite(v)) for i, v in zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprob(int(token), _finite(logprobs[token]), top)


def prompt_entries(logits: Tensor, next_ids: Sequence[int], k: int) -> list[TokenLogprob]:
    """Entries for the tokens ``next_ids[j]`` predicted by positions ``logits[j]`` (``[n, V]`` raw logits)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    return [from_logits(lp[j], t, k) for j, t in enumerate(next_ids)]


def from_vllm(position: Mapping[int, Any], token: int, k: int) -> TokenLogprob:
    """One position of vLLM's output (``{token id: Logprob(logprob, rank, ...)}``; the chosen token and the top k)."""
    ranked = sorted(((int(t), lp) for t, lp in position.items() if lp.rank is not None and lp.rank <= k),
                    key=lambda item: item[1].rank)
    return TokenLogprob(int(token), _finite(position[token].logprob), tuple((t, _finite(lp.logprob))
                                                                            for t, lp in ranked))


def completion_logprobs(entries: Sequence[TokenLogprob | None], token_ids: Sequence[int],
                        decode: Callable[[int], str], offset: int = 0) -> dict[str, list]:
    """OpenAI's legacy completions ``logprobs`` object for ``token_ids`` (an entry None: the first prompt token).

    ``top_logprobs`` maps token text to log-probability for the top k and the token itself (so up to k + 1
    entries, as OpenAI documents); ``text_offset`` is each token's character offset in the answer's text, counted
    from ``offset``.
    """
    tokens, values, tops, offsets = [], [], [], []
    at = offset
    for entry, tid in zip(entries, token_ids, strict=True):
        text = decode(tid)
        tokens.append(text)
        offsets.append(at)
        at += len(text)
        if entry is None:
            values.append(None)
            tops.append(None)
            continue
        values.append(entry.logprob)
        top = {decode(t): lp for t, lp in entry.top}
        top.setdefault(text, entry.logprob)
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(entries: Sequence[TokenLogprob], decode: Callable[[int], str]) -> dict[str, list]:
    """OpenAI's chat ``logprobs`` object: ``{"content": [{token, logprob, bytes, top_logprobs: [...]}]}``."""

    def item(tid: int, lp: float) -> dict[str, Any]:
        text = decode(tid)
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                        for e in entries]}
