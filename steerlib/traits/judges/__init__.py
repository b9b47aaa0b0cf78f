"""Judges score how strongly an answer shows a trait, on a 0-100 scale.

Every judge has one interface: ``score(question, answer) -> float | None`` (None when the judge cannot
commit to a number) and ``score_many(pairs)``. Implementations:

* :class:`LLMJudge`: an OpenAI-compatible ``/chat/completions`` endpoint. As in the Persona Vectors paper
  the score is not the sampled token but the probability-weighted mean over the integer tokens among the
  top logprobs of a single generated token, which is smoother and cheaper than sampling.
* :class:`SelfJudge`: the same logprob method run on a local Hugging Face causal LM.
* :class:`LexiconJudge`: VADER sentiment, offline, for optimistic/pessimistic demos.
* :class:`CallableJudge`: wraps any Python function.

:func:`make_judge` turns a spec string (``"lexicon"``, ``"self"``, ``"openai:<model>"``, ``"auto"``) into one.
"""

from steerlib.traits.judges.base import (
    BaseJudge,
    Judge,
    JudgeError,
    describe_judge,
    integer_value,
    weighted_score,
)
from steerlib.traits.judges.factory import SPECS_HELP, make_judge
from steerlib.traits.judges.llm import LLMJudge, post_chat_completion
from steerlib.traits.judges.local import CallableJudge, LexiconJudge
from steerlib.traits.judges.self_judge import SelfJudge

__all__ = [
    "SPECS_HELP",
    "BaseJudge",
    "CallableJudge",
    "Judge",
    "JudgeError",
    "LLMJudge",
    "LexiconJudge",
    "SelfJudge",
    "describe_judge",
    "integer_value",
    "make_judge",
    "post_chat_completion",
    "weighted_score",
]
