"""``make_judge``: a spec string ("lexicon", "self", "openai:<model>", "auto") to a judge."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from steerlib.traits.judges.base import Judge, JudgeError
from steerlib.traits.judges.llm import LLMJudge
from steerlib.traits.judges.local import LexiconJudge
from steerlib.traits.judges.self_judge import SelfJudge
from steerlib.traits.library import Trait, load_trait

__all__ = ["SPECS_HELP", "make_judge"]

_LLM_KW = {
    "api_key",
    "min_mass",
    "concurrency",
    "max_retries",
    "backoff",
    "timeout",
    "cache_dir",
    "top_logprobs",
}
_SELF_KW = {"min_mass", "batch_size", "system", "answer_prefix", "format_fn", "use_cache"}
_FACTORY_KW = {"base_url", "judge_model"}
SPECS_HELP = "'lexicon', 'lexicon:optimistic', 'lexicon:pessimistic', 'self', 'openai:<model>' or 'auto'"


def _base_url(kw: Mapping[str, Any]) -> str | None:
    return (
        kw.get("base_url") or os.environ.get("STEERLIB_JUDGE_BASE_URL") or os.environ.get("OPENAI_BASE_URL")
    )


def make_judge(
    spec: str,
    trait: Trait | str,
    model: Any = None,
    tokenizer: Any = None,
    rubric: str | None = None,
    **kw: Any,
) -> Judge:
    """Build a judge from a spec string.

    Args:
        spec: ``"lexicon"`` (polarity from the trait's ``judge_hint``), ``"lexicon:optimistic"``,
            ``"lexicon:pessimistic"``, ``"self"`` (``model``/``tokenizer`` judge themselves),
            ``"openai:<model>"`` (an OpenAI-compatible endpoint) or ``"auto"`` (the trait's ``judge_hint``,
            else ``openai`` when a base URL is configured).
        trait: the trait (or its name) whose rubric the LLM judges use.
        model: local model for ``"self"``.
        tokenizer: its tokenizer.
        rubric: rubric override, e.g. ``trait.coherence_rubric`` for coherence scoring.
        **kw: ``base_url`` (else ``STEERLIB_JUDGE_BASE_URL``, then ``OPENAI_BASE_URL``), ``judge_model``
            (model for ``"auto"``/``"openai"``; else ``STEERLIB_JUDGE_MODEL``) and the judges' own options
            (``api_key``, ``min_mass``, ``concurrency``, ``cache_dir``, ``batch_size``, ...). Options for
            other judge kinds are ignored, so callers can pass one set for any spec.

    Raises:
        JudgeError: unknown spec or missing configuration, saying what to pass instead.
    """
    unknown = set(kw) - _LLM_KW - _SELF_KW - _FACTORY_KW
    if unknown:
        raise TypeError(f"make_judge got unexpected options: {', '.join(sorted(unknown))}")
    trait = load_trait(trait)
    spec = (spec or "").strip()
    kind, _, arg = spec.partition(":")
    kind = kind.lower()

    if kind == "auto":
        hint = (trait.judge_hint or "").strip()
        if hint and hint.partition(":")[0].lower() != "auto" and rubric in (None, trait.judge_rubric):
            return make_judge(hint, trait, model, tokenizer, rubric, **kw)
        if _base_url(kw):
            return make_judge("openai", trait, model, tokenizer, rubric, **kw)
        what = "coherence" if rubric not in (None, trait.judge_rubric) else f"trait '{trait.name}'"
        raise JudgeError(
            f"no judge configured for {what}: pass 'openai:<model>' and set STEERLIB_JUDGE_BASE_URL to an "
            "OpenAI-compatible endpoint (e.g. http://127.0.0.1:8000/v1), or pass 'self' to let the local "
            "model judge itself"
        )

    if kind == "lexicon":
        if rubric not in (None, trait.judge_rubric):
            raise JudgeError(
                "a lexicon judge only measures sentiment; it cannot apply a rubric such as coherence"
            )
        polarity = arg
        if not polarity:
            hint = trait.judge_hint or ""
            if not hint.startswith("lexicon:"):
                raise JudgeError(
                    f"trait '{trait.name}' has no lexicon polarity; pass 'lexicon:optimistic' or "
                    "'lexicon:pessimistic', or use an LLM judge ('openai:<model>' or 'self')"
                )
            polarity = hint.partition(":")[2]
        return LexiconJudge(polarity)

    if kind == "self":
        if model is None or tokenizer is None:
            raise JudgeError("judge 'self' needs the loaded model and tokenizer")
        opts = {k: v for k, v in kw.items() if k in _SELF_KW}
        return SelfJudge(model, tokenizer, rubric or trait.judge_rubric, **opts)

    if kind == "openai":
        name = arg or kw.get("judge_model") or os.environ.get("STEERLIB_JUDGE_MODEL")
        if not name:
            raise JudgeError(
                "which judge model? pass 'openai:<model>' (e.g. openai:gpt-4.1-mini) or set STEERLIB_JUDGE_MODEL"
            )
        base_url = _base_url(kw)
        if not base_url:
            if not (kw.get("api_key") or os.environ.get("OPENAI_API_KEY")):
                raise JudgeError(
                    f"judge 'openai:{name}' needs an endpoint: pass base_url or set STEERLIB_JUDGE_BASE_URL "
                    "(or OPENAI_BASE_URL), e.g. http://127.0.0.1:8000/v1, or set OPENAI_API_KEY to use "
                    "api.openai.com"
                )
            base_url = "https://api.openai.com/v1"
        opts = {k: v for k, v in kw.items() if k in _LLM_KW}
        return LLMJudge(base_url, name, rubric or trait.judge_rubric, **opts)

    raise JudgeError(f"unknown judge {spec!r}; use {SPECS_HELP}")

