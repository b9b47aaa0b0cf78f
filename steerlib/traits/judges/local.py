"""Judges that need no model: VADER sentiment for optimistic/pessimistic, and any Python callable."""

from __future__ import annotations

import math
from collections.abc import Callable

from steerlib.traits.judges.base import MAX_SCORE, MIN_SCORE, BaseJudge, JudgeError

__all__ = ["CallableJudge", "LexiconJudge"]


class LexiconJudge(BaseJudge):
    """VADER sentiment as a 0-100 optimism (or pessimism) score; the question is ignored.

    Args:
        polarity: ``"optimistic"`` maps VADER's compound score c in [-1, 1] to ``(c + 1) * 50``;
            ``"pessimistic"`` to ``100 - (c + 1) * 50``.
    """

    POLARITIES = ("optimistic", "pessimistic")

    def __init__(self, polarity: str = "optimistic") -> None:
        if polarity not in self.POLARITIES:
            raise JudgeError(
                f"lexicon polarity must be one of {', '.join(self.POLARITIES)}, got {polarity!r}"
            )
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError as e:  # pragma: no cover - a declared dependency
            raise JudgeError("the lexicon judge needs the vaderSentiment package") from e
        self.polarity = polarity
        self._analyzer = SentimentIntensityAnalyzer()

    def __repr__(self) -> str:
        return f"LexiconJudge(polarity={self.polarity!r})"

    def score(self, question: str, answer: str) -> float | None:
        """Sentiment of ``answer`` on 0..100 (50 is neutral, also for empty answers)."""
        compound = float(self._analyzer.polarity_scores(answer)["compound"])
        value = (compound + 1.0) * 50.0
        return 100.0 - value if self.polarity == "pessimistic" else value


class CallableJudge(BaseJudge):
    """Wrap ``fn(question, answer) -> float | None`` as a judge, checking its range.

    Args:
        fn: any callable; NaN results become None.
        name: label used in ``repr``.
    """

    def __init__(self, fn: Callable[[str, str], float | None], name: str | None = None) -> None:
        if not callable(fn):
            raise TypeError(f"CallableJudge needs a callable, got {type(fn).__name__}")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", type(fn).__name__)

    def __repr__(self) -> str:
        return f"CallableJudge({self.name})"

    def score(self, question: str, answer: str) -> float | None:
        value = self.fn(question, answer)
        if value is None:
            return None
        value = float(value)
        if math.isnan(value):
            return None
        if not MIN_SCORE <= value <= MAX_SCORE:
            raise JudgeError(f"judge {self.name} returned {value}, outside [0, 100]")
        return value


# -- local model as judge -------------------------------------------------------------------------


