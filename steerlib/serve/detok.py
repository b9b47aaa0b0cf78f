"""Incremental detokenising with stop sequences: which text of a row is final after each new token.

A streamed reply may only send text that cannot change any more: a token can complete a multi-byte UTF-8
character (the decoded text ends in U+FFFD until it does), and the start of a stop sequence must be held back
until it is known not to be one.

``Reply`` builds on it what both serving engines decide the same way: when a row ends and why, and which read-out
value belongs to which token.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from steerlib.serve.contract import Sampling, summarize_projections
from steerlib.steering.readout import needs_closing, paired_position

__all__ = ["Reply", "TextStream"]


class TextStream:
    """One row's reply text as tokens arrive.

    Args:
        tokenizer: decodes token ids (``skip_special_tokens=True``).
        stop: stop sequences; the reply ends before the first one generated.
    """

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = stop
        self.sent = 0  # characters already handed out
        self.text = ""  # the reply so far (final once ``push`` says so)

    def push(self, ids: list[int], final: bool) -> tuple[str, bool]:
        """Decode the reply ``ids`` so far; return ``(new final text, hit a stop sequence)``.

        Args:
            ids: every generated token of the reply (without an EOS token).
            final: no more tokens will come (EOS or the length limit), so nothing is held back.
        """
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        stopped = False
        if self.stop:
            start = max(0, self.sent - max(len(x) for x in self.stop))
            hits = [i for i in (text.find(x, start) for x in self.stop) if i >= 0]
            if hits:
                text = text[:min(hits)]
                stopped = final = True
        upto = len(text)
        if not final:
            if text.endswith("\ufffd"):
                upto = len(text.rstrip("\ufffd"))
            for x in self.stop:  # hold back a tail that could be the start of a stop sequence
                for k in range(min(len(x) - 1, upto), 0, -1):
                    if text[:upto].endswith(x[:k]):
                        upto -= k
                        break
        upto = max(upto, self.sent)
        delta = text[self.sent:upto]
        self.text = text if final else text[:upto]
        self.sent = upto
        return delta, stopped


class Reply:
    """One row's reply as its tokens arrive: the one place every engine decides text, finish and read-out pairing.

    * **Text**: ``TextStream`` (UTF-8 hold-back, stop sequences); an end-of-sequence token ends the reply and is
      not part of its text.
    * **Finish**: ``"eos"``, ``"stop_sequence"``, ``"length"`` (``max_tokens``) or ``"cancelled"``; clients see
      ``contract.public_finish`` of it.
    * **Read-out pairing**: the value paired with generated token ``i`` is read at absolute position
      ``prompt_len - 1 + i`` (the position whose output produced it), so ``values[0]`` is the last prompt
      token's and ``values[j]`` response token ``j - 1``'s. An EOS token's value is the last response token's
      own (kept, not streamed). A reply that ends otherwise lacks its last token's own value: the engine runs one
      **closing pass** over that token (``closing`` is True until ``close`` takes its value), which is streamed
      with empty text.

    Args:
        tokenizer: decodes token ids.
        sampling: the row's ``max_tokens`` and ``stop`` sequences.
        prompt_len: tokens in the prompt.
        eos_ids: tokens that end the reply (empty: generate ``max_tokens`` whatever comes).
        readout: the engine reads projections out (closing passes are needed only then).
    """

    def __init__(self, tokenizer: Any, sampling: Sampling, prompt_len: int, eos_ids: Collection[int], *,
                 readout: bool):
        self.stream = TextStream(tokenizer, sampling.stop)
        self.max_tokens = sampling.max_tokens
        self.prompt_len = prompt_len
        self.eos_ids = eos_ids
        self.readout = readout
        self.tokens: list[int] = []  # generated so far, EOS included
        self.values: list[list[float]] = []  # values[i] read at position(i)
        self.unsent: list[list[float]] = []
        self.finish: str | None = None
        self.closing = False
        if self.max_tokens == 0:
            # Nothing to generate, but the prompt still needs its one pass: its last token's read-out, and its
            # log-probabilities (``echo``). That pass is this reply's closing pass.
            self.finish, self.closing = "length", True

    def position(self, i: int) -> int:
        """The absolute position whose forward pass produced generated token ``i`` (and whose read-out pairs
        with it)."""
        return paired_position(self.prompt_len, i)

    @property
    def text(self) -> str:
        return self.stream.text

    @property
    def done(self) -> bool:
        """Finished, with nothing more to read."""
        return self.finish is not None and not self.closing

    def push(self, token: int, values: list[float] | None) -> tuple[str, list[list[float]]] | None:
        """Take the next generated token and the read-out of the pass that produced it.

        Returns:
            ``(text, values)`` to stream (text final so far, values of the tokens it covers), or None when
            nothing is ready to send.
        """
        if self.finish is not None:
            raise RuntimeError(f"the reply already ended ({self.finish}); no token can follow")
        is_eos = token in self.eos_ids
        self.tokens.append(token)
        if values is not None:
            self.values.append(values)
            if not is_eos:
                self.unsent.append(values)
        final = is_eos or len(self.tokens) >= self.max_tokens
        delta, stopped = self.stream.push(self.tokens[:-1] if is_eos else self.tokens, final)
        self.finish = "eos" if is_eos else ("stop_sequence" if stopped else ("length" if final else None))
        self.closing = self.finish is not None and needs_closing(is_eos, self.readout)
        if delta or (self.finish is not None and self.unsent):
            out, self.unsent = self.unsent, []
            return delta, out
        return None

    def close(self, values: list[float] | None) -> tuple[str, list[list[float]]] | None:
        """Take the closing pass's read-out (the last token's own; None without a read-out); returns the event to
        stream (None: nothing to stream)."""
        if not self.closing:
            raise RuntimeError("no closing pass is pending for this reply")
        self.closing = False
        if values is not None:
            self.values.append(values)
        out, self.unsent = [*self.unsent, *([values] if values is not None else [])], []
        return ("", out) if out else None

    def cut_short(self) -> None:
        """The engine ended the row first (e.g. its own length limit): the reply ends as it is, at ``length``
        unless it had ended already, and without a closing read-out."""
        self.finish, self.closing = self.finish or "length", False

    def cancel(self) -> None:
        """The client went away: the reply ends as it is."""
        self.finish, self.closing = "cancelled", False

    def readout_pairs(self) -> list[tuple[int, list[float]]]:
        """``(position, values)`` for every read-out taken, in order."""
        return [(self.position(i), v) for i, v in enumerate(self.values)]

    def summaries(self, names: Sequence[str], layer: int | None) -> dict[str, dict[str, Any]]:
        """Per trait, the response's summary (``contract.summarize_projections``)."""
        return {name: summarize_projections([v[k] for v in self.values], layer) for k, name in enumerate(names)}
