"""What every judge is: the 0-100 scale, the ``Judge`` interface, and reading a score from probabilities."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol, runtime_checkable

__all__ = ["MAX_SCORE", "MIN_SCORE", "BaseJudge", "Judge", "JudgeError", "describe_judge", "integer_value",
           "weighted_score"]

MIN_SCORE, MAX_SCORE = 0, 100
class JudgeError(RuntimeError):
    """A judge could not be built or could not reach its backend."""


@runtime_checkable
class Judge(Protocol):
    """Anything that scores (question, answer) pairs on 0..100; None means "no confident score"."""

    def score(self, question: str, answer: str) -> float | None: ...

    def score_many(self, pairs: Sequence[tuple[str, str]], progress: bool = False) -> list[float | None]: ...


def describe_judge(judge: object) -> str | None:
    """How a judge is recorded in run settings and metadata: its repr, which names its kind and polarity."""
    return None if judge is None else repr(judge)


class BaseJudge:
    """Default ``score_many``: a plain loop over ``score`` with an optional progress bar."""

    def score(self, question: str, answer: str) -> float | None:
        raise NotImplementedError

    def score_many(self, pairs: Sequence[tuple[str, str]], progress: bool = False) -> list[float | None]:
        """Score each (question, answer) pair in order.

        Args:
            pairs: (question, answer) tuples.
            progress: show a tqdm progress bar.
        """
        items: Iterable[tuple[str, str]] = pairs
        if progress:
            from tqdm.auto import tqdm

            items = tqdm(pairs, desc=type(self).__name__, unit="answer")
        return [self.score(q, a) for q, a in items]


# -- the logprob scoring rule ---------------------------------------------------------------------


def integer_value(token: str) -> int | None:
    """The integer 0..100 a token spells (surrounding whitespace ignored), else None.

    Only canonical spellings count ("7", " 42", "100"), not "007", "+5", "½" or "٣": those are not what a
    judge asked for "a number from 0 to 100" means.
    """
    text = token.strip()
    if not text or not text.isascii() or not text.isdigit():
        return None
    if len(text) > 1 and text[0] == "0":
        return None
    value = int(text)
    return value if MIN_SCORE <= value <= MAX_SCORE else None


def weighted_score(probs: Mapping[int, float], min_mass: float = 0.25) -> float | None:
    """Probability-weighted mean of integer scores, normalised by the mass they carry.

    Args:
        probs: probability of each integer score (need not sum to 1: the rest went to other tokens).
        min_mass: below this total probability on integers the judge is not answering with a number
            (refusing, rambling), so no score is returned.

    Returns:
        The mean score in [0, 100], or None when the integer mass is below ``min_mass``.
    """
    mass = float(sum(probs.values()))
    if mass <= 0 or mass < min_mass:
        return None
    return float(sum(value * p for value, p in probs.items()) / mass)


