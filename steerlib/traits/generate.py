"""Draft a new trait definition with an LLM behind an OpenAI-compatible chat endpoint.

The endpoint is asked for plain JSON (no ``response_format``, which many local servers lack) holding
instruction pairs, questions and a judge rubric; the answer is parsed leniently (code fences and chatter
around the object are tolerated) and then validated strictly through :meth:`Trait.from_dict`.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import httpx

from steerlib.traits.judges import JudgeError, post_chat_completion
from steerlib.traits.library import Trait, TraitError

_SYSTEM = (
    "You design evaluation material for studying personality traits in AI assistants. You reply with one "
    "JSON object and nothing else."
)

_PROMPT = """Create material for studying the trait "{name}" in an AI assistant.
Trait description: {description}

Return a JSON object with exactly these keys:

"instruction_pairs": a list of {n_pairs} objects, each {{"positive": ..., "negative": ...}}. "positive" is a \
system prompt telling the assistant to strongly display the trait; "negative" is a system prompt telling it \
to display the opposite. Vary the wording between pairs.

"questions": a list of {n_total} distinct, everyday user questions (one sentence each) on which an assistant's \
answer could either show the trait or not. Do not mention the trait in the questions.

"judge_rubric": instructions for a grader that must score how strongly one answer shows the trait. It must \
contain the literal placeholders {{question}} and {{answer}} where the question and the answer will be \
inserted, define the trait, and end by asking for a single integer from 0 (trait absent) to 100 (trait \
extremely strong), with the number only as the reply.

Reply with the JSON object only."""


def _headers(api_key: str | None) -> dict[str, str]:
    key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def extract_json_object(text: str) -> dict[str, Any]:
    """Parse the JSON object in an LLM reply, tolerating ```json fences and text around it.

    Args:
        text: the assistant message content.

    Raises:
        TraitError: when no JSON object can be parsed.
    """
    if "{" not in text:
        raise TraitError(f"no JSON object found (reply starts with {text[:120]!r})")
    candidates = [text.strip()]
    fenced = re.search(r"```(?:json|JSON)?\s*\n?(.*?)```", text, re.DOTALL)
    if fenced:
        candidates.append(fenced.group(1).strip())
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        candidates.append(text[start : end + 1])
    error = ""
    for candidate in candidates:
        try:
            data = json.loads(candidate)
        except json.JSONDecodeError as e:
            error = f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}"
            continue
        if isinstance(data, dict):
            return data
        error = f"expected a JSON object, got {type(data).__name__}"
    raise TraitError(f"{error} (reply starts with {text[:120]!r})")


def _strings(value: object, what: str) -> list[str]:
    if not isinstance(value, list):
        raise TraitError(f"'{what}' must be a list, got {type(value).__name__}")
    out = []
    for i, item in enumerate(value, start=1):
        if not isinstance(item, str) or not item.strip():
            raise TraitError(f"'{what}' item {i} is {item!r}, not a non-empty string")
        out.append(item.strip())
    return out


def trait_from_reply(
    name: str, description: str, data: dict[str, Any], n_pairs: int = 5, n_questions: int = 20
) -> Trait:
    """Turn the endpoint's parsed JSON into a validated trait.

    Extra pairs/questions are trimmed; too few, duplicates that leave too few, or a rubric without its
    slots are errors. Questions are split in order: the first ``n_questions`` for extraction, the next
    ``n_questions`` for evaluation.

    Args:
        name: trait name.
        description: trait description.
        data: the JSON object the endpoint returned.
        n_pairs: instruction pairs wanted.
        n_questions: questions wanted in each of the extraction and evaluation sets.

    Raises:
        TraitError: naming what the endpoint got wrong.
    """
    for key in ("instruction_pairs", "questions", "judge_rubric"):
        if key not in data:
            raise TraitError(f"the reply has no '{key}' key (keys: {', '.join(map(str, data)) or 'none'})")
    pairs = data["instruction_pairs"]
    if not isinstance(pairs, list):
        raise TraitError(f"'instruction_pairs' must be a list, got {type(pairs).__name__}")
    if len(pairs) < n_pairs:
        raise TraitError(f"the reply has {len(pairs)} instruction pairs, {n_pairs} were asked for")
    questions = list(dict.fromkeys(_strings(data["questions"], "questions")))  # drop exact repeats
    seen: set[str] = set()
    unique = []
    for q in questions:
        key = " ".join(q.split()).lower()
        if key not in seen:
            seen.add(key)
            unique.append(q)
    need = 2 * n_questions
    if len(unique) < need:
        raise TraitError(f"the reply has {len(unique)} distinct questions, {need} were asked for")
    trait_dict = {
        "name": name,
        "description": description,
        "instruction_pairs": pairs[:n_pairs],
        "extraction_questions": unique[:n_questions],
        "eval_questions": unique[n_questions:need],
        "judge_rubric": data["judge_rubric"],
    }
    return Trait.from_dict(trait_dict, source="generated trait")


def generate_trait(
    name: str,
    description: str,
    base_url: str,
    model: str,
    api_key: str | None = None,
    n_pairs: int = 5,
    n_questions: int = 20,
    attempts: int = 2,
    temperature: float = 0.7,
    timeout: float = 300,
    max_retries: int = 4,
    backoff: float = 0.5,
) -> Trait:
    """Ask an OpenAI-compatible chat endpoint to draft a trait definition.

    Args:
        name: trait name, e.g. ``"sarcastic"``.
        description: what the trait looks like, in a sentence or two.
        base_url: API root such as ``http://127.0.0.1:8000/v1``.
        model: model name sent to the endpoint.
        api_key: bearer token; defaults to ``OPENAI_API_KEY`` (none sent if unset).
        n_pairs: instruction pairs to request.
        n_questions: questions per set; ``2 * n_questions`` are requested and split into extraction and
            evaluation questions.
        attempts: how many times to ask again when the reply is unusable (LLM JSON is not always valid).
        temperature: sampling temperature for the drafting model.
        timeout: per-request timeout in seconds (drafting 40 questions takes a while).
        max_retries: HTTP retries on 429/5xx/connection errors, per attempt.
        backoff: first HTTP retry delay in seconds.

    Raises:
        TraitError: the reply was unusable on every attempt; the message says what was wrong.
        JudgeError: the endpoint was unreachable or rejected the request.
    """
    if not name.strip() or not description.strip():
        raise TraitError("generate_trait needs a non-empty name and description")
    if n_pairs < 1 or n_questions < 1:
        raise ValueError("n_pairs and n_questions must be >= 1")
    url = f"{base_url.rstrip('/')}/chat/completions"
    prompt = _PROMPT.format(name=name, description=description, n_pairs=n_pairs, n_total=2 * n_questions)
    payload = {
        "model": model,
        "messages": [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": prompt}],
        "temperature": temperature,
    }
    problem = ""
    with httpx.Client(timeout=timeout) as client:
        for _ in range(max(1, attempts)):
            data = post_chat_completion(
                client,
                url,
                payload,
                _headers(api_key),
                max_retries,
                backoff,
                what="trait generation endpoint",
            )
            try:
                content = data["choices"][0]["message"]["content"]
            except (KeyError, IndexError, TypeError):
                raise JudgeError(
                    f"trait generation endpoint {url} returned an unexpected body: {str(data)[:200]}"
                ) from None
            try:
                if not isinstance(content, str):
                    raise TraitError("the reply has no text content")
                return trait_from_reply(name, description, extract_json_object(content), n_pairs, n_questions)
            except TraitError as e:
                problem = str(e)
    raise TraitError(
        f"model {model!r} at {url} did not produce a usable trait after {attempts} attempt(s): {problem}"
    )
