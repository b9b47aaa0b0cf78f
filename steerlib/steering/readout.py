"""The read-out plan, beside the steering plan: which position's projection pairs with which token, which values
a response keeps, when a closing pass is needed, and the response's summary. Every path that reads out (``generate``
and ``Generation``, the compiled path's buffer, both serving engines' replies, ``steerlib monitor``) states the
pairing through these functions and nowhere else.

The rule, for a row whose prompt has ``P`` tokens:

* the forward pass at absolute position ``p`` produces the token at ``p + 1``; its read-out **pairs with the token
  it produced**. So value ``j`` of a response is read at position ``P - 1 + j``: value 0 at the last prompt token
  (the paper's pre-generation predictor), value ``j >= 1`` at generated token ``j - 1``'s own position;
* the token sampled last is never fed by decoding, so its own position has no read-out unless one more pass is
  run over it, the **closing pass**; it is needed when the response did not end with an end-of-sequence token (an
  EOS token's paired value was read at the last response token already, and an EOS is no response token);
* a response's summary is over its tokens' own read-outs, values ``1..``: ``mean`` and ``max``, with
  ``prompt_last`` (value 0) and ``n_tokens`` beside them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor

T = TypeVar("T")


def paired_position(prompt_len: int, j: int) -> int:
    """The absolute position whose read-out is value ``j`` of a response (``P - 1 + j``)."""
    return prompt_len - 1 + j


def value_index(position: T, prompt_len: T) -> T:
    """The inverse of ``paired_position``: which value of the response the read-out at ``position`` is (works on
    ints and on tensors inside compiled graphs)."""
    return position - prompt_len + 1  # type: ignore[operator,return-value]


def needs_closing(ended_with_eos: bool, reading_out: bool) -> bool:
    """Whether a finished response needs the closing pass over its last token (see the module docstring)."""
    return bool(reading_out) and not ended_with_eos


def response_values(values: Any, closing: Any = None) -> Any:
    """A response's own values: ``values[1:]`` (value 0 is the last prompt token's) and the closing pass's.
    ``values`` is a sequence (a list comes back) or a 1-D tensor (a tensor comes back)."""
    rest = values[1:]
    if isinstance(rest, Tensor):
        return rest if closing is None else torch.cat([rest, torch.as_tensor(closing).reshape(1).to(rest)])
    return [*rest, *([] if closing is None else [closing])]


def summarize(values: Sequence[float], layer: int | None) -> dict[str, Any]:
    """One trait's summary of a response from its paired values (closing value included, when there was one):
    ``mean`` and ``max`` over the response tokens, ``prompt_last`` at the last prompt token."""
    response = response_values(values)
    return {"mean": sum(response) / len(response) if response else None,
            "max": max(response) if response else None,
            "prompt_last": values[0] if values else None, "layer": layer, "n_tokens": len(response)}
