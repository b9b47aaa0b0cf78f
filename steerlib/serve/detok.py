"""Incremental detokenising with stop sequences: which text of a row is final after each new token.

A streamed reply may only send text that cannot change any more: a token can complete a multi-byte UTF-8
character (the decoded text ends in U+FFFD until it does), and the start of a stop sequence must be held back
until it is known not to be one.
"""

from __future__ import annotations

from typing import Any


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
