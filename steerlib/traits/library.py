"""Trait definitions: contrastive system prompts, questions and a judge rubric.

A trait is what a persona vector is extracted for. Each one carries

* instruction pairs: a system prompt that elicits the trait and one that suppresses it; the vector is
  the difference of mean activations between answers generated under the two;
* extraction questions, answered under every instruction pair to collect those activations;
* evaluation questions, kept disjoint from the extraction ones so that steering and monitoring are
  measured on prompts the vector never saw;
* a judge rubric with ``{question}`` and ``{answer}`` slots asking for a 0-100 trait score.

Built-in traits live as JSON in ``steerlib/data/traits``; user traits are JSON files of the same shape.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from steerlib.core.checks import decode_utf8

DEFAULT_COHERENCE_RUBRIC = """You are checking the quality of one answer written by an AI assistant. Ignore whether you \
agree with its opinions, its tone or its values: judge only whether it is coherent language that responds to \
the question.

[QUESTION]
{question}
[/QUESTION]

[ANSWER]
{answer}
[/ANSWER]

Score the answer from 0 to 100:
0 means gibberish, endless repetition or text unrelated to the question;
50 means partly understandable but rambling, broken or only loosely on topic;
100 means clear, fluent and clearly a response to the question.
Reply with the number only, no words."""

# Slots are filled by a single regex pass, not str.format: rubrics may contain other braces (JSON
# examples) and answers may contain "{question}", which a second replace() would substitute again.
_SLOT_RE = re.compile(r"\{(question|answer)\}")
_SLOTS = ("question", "answer")

_FIELDS = (
    "name",
    "description",
    "instruction_pairs",
    "extraction_questions",
    "eval_questions",
    "judge_rubric",
    "coherence_rubric",
    "judge_hint",
)
_REQUIRED = _FIELDS[:6]


class TraitError(ValueError):
    """A trait definition is malformed or cannot be found."""


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def check_trait_name(name: object) -> str:
    """A trait name usable as a file name: letters, digits, ``_`` and ``-`` (no path separators, no ``..``)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise TraitError(f"trait name {name!r} must be 1-64 letters, digits, '_' or '-', starting with a letter "
                         "or digit (it becomes the file name)")
    return name


@dataclass(frozen=True)
class InstructionPair:
    """Two system prompts: ``positive`` elicits the trait, ``negative`` suppresses it."""

    positive: str
    negative: str


def fill_rubric(rubric: str, question: str, answer: str) -> str:
    """Put ``question`` and ``answer`` into a rubric's ``{question}``/``{answer}`` slots.

    Args:
        rubric: template with literal ``{question}`` and ``{answer}`` slots; other braces are left alone.
        question: the user question the answer responds to.
        answer: the model's answer.
    """
    values = {"question": question, "answer": answer}
    return _SLOT_RE.sub(lambda m: values[m.group(1)], rubric)


def check_rubric(rubric: object, what: str = "judge_rubric") -> str:
    """Return ``rubric`` if it is a usable judge prompt, else raise :class:`TraitError`.

    Args:
        rubric: the candidate rubric.
        what: the field name used in error messages.
    """
    if not isinstance(rubric, str) or not rubric.strip():
        raise TraitError(f"field '{what}' must be a non-empty string")
    for slot in _SLOTS:
        if "{" + slot + "}" not in rubric:
            raise TraitError(f"{what} lacks the {{{slot}}} slot")
    # The logprob judges average integer tokens 0..100, so the rubric must ask for that scale.
    if "100" not in rubric:
        raise TraitError(f"{what} must ask for a score from 0 to 100 (it never mentions 100)")
    return rubric


@dataclass(frozen=True)
class Trait:
    """A character trait with everything needed to extract, steer and evaluate its persona vector.

    Args:
        name: short identifier, e.g. ``"optimistic"``.
        description: one or two sentences saying what the trait looks like in an answer.
        instruction_pairs: contrastive system prompts (``positive`` elicits, ``negative`` suppresses).
        extraction_questions: questions answered under each pair to build the vector.
        eval_questions: held-out questions for steering/monitoring evaluation; disjoint from extraction.
        judge_rubric: judge prompt with ``{question}``/``{answer}`` slots asking for a 0-100 score.
        coherence_rubric: judge prompt for answer coherence (same slots); a generic one by default.
        judge_hint: judge spec that suits this trait without an LLM (e.g. ``"lexicon:optimistic"``).
    """

    name: str
    description: str
    instruction_pairs: tuple[InstructionPair, ...]
    extraction_questions: tuple[str, ...]
    eval_questions: tuple[str, ...]
    judge_rubric: str
    coherence_rubric: str = DEFAULT_COHERENCE_RUBRIC
    judge_hint: str | None = field(default=None)

    def __post_init__(self) -> None:
        # Direct construction gets the same semantic checks as loading from a file.
        _check_semantics(self)

    # -- rubric helpers ---------------------------------------------------------------------------

    def judge_prompt(self, question: str, answer: str) -> str:
        """The trait rubric filled with ``question`` and ``answer``."""
        return fill_rubric(self.judge_rubric, question, answer)

    def coherence_prompt(self, question: str, answer: str) -> str:
        """The coherence rubric filled with ``question`` and ``answer``."""
        return fill_rubric(self.coherence_rubric, question, answer)

    # -- (de)serialisation ------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str | None = None) -> Trait:
        """Build and validate a trait from its JSON form.

        Args:
            data: the decoded JSON object.
            source: file name (or other origin) to put in front of error messages.

        Raises:
            TraitError: naming the offending field (and ``source`` when given).
        """
        try:
            return cls._from_dict(data)
        except TraitError as e:
            raise TraitError(f"{source}: {e}" if source else str(e)) from None

    @classmethod
    def _from_dict(cls, data: Mapping[str, Any]) -> Trait:
        if not isinstance(data, Mapping):
            raise TraitError(f"a trait must be a JSON object, got {_type_name(data)}")
        for key in _REQUIRED:
            if key not in data:
                raise TraitError(f"missing field '{key}'")
        unknown = sorted(set(data) - set(_FIELDS))
        if unknown:
            raise TraitError(f"unknown field '{unknown[0]}' (known fields: {', '.join(_FIELDS)})")
        name = _text(data["name"], "name")
        description = _text(data["description"], "description")
        pairs = _pairs(data["instruction_pairs"])
        extraction = _questions(data["extraction_questions"], "extraction_questions")
        evaluation = _questions(data["eval_questions"], "eval_questions")
        rubric = check_rubric(data["judge_rubric"], "judge_rubric")
        coherence = data.get("coherence_rubric")
        coherence = (
            DEFAULT_COHERENCE_RUBRIC if coherence is None else check_rubric(coherence, "coherence_rubric")
        )
        hint = data.get("judge_hint")
        if hint is not None:
            hint = _text(hint, "judge_hint")
        return cls(
            name=name,
            description=description,
            instruction_pairs=pairs,
            extraction_questions=extraction,
            eval_questions=evaluation,
            judge_rubric=rubric,
            coherence_rubric=coherence,
            judge_hint=hint,
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON form; ``coherence_rubric`` is left out when it is the default."""
        out: dict[str, Any] = {
            "name": self.name,
            "description": self.description,
            "instruction_pairs": [
                {"positive": p.positive, "negative": p.negative} for p in self.instruction_pairs
            ],
            "extraction_questions": list(self.extraction_questions),
            "eval_questions": list(self.eval_questions),
            "judge_rubric": self.judge_rubric,
        }
        if self.coherence_rubric != DEFAULT_COHERENCE_RUBRIC:
            out["coherence_rubric"] = self.coherence_rubric
        if self.judge_hint is not None:
            out["judge_hint"] = self.judge_hint
        return out

    def to_json(self) -> str:
        """The JSON text written by :meth:`save`."""
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str | None = None) -> Trait:
        """Parse JSON text into a trait; syntax errors report the line and column.

        Args:
            text: the JSON document.
            source: file name to put in front of error messages.
        """
        prefix = f"{source}: " if source else ""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise TraitError(f"{prefix}invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        return cls.from_dict(data, source=source)

    @classmethod
    def load(cls, path: str | Path) -> Trait:
        """Read and validate a trait JSON file.

        Args:
            path: the file to read.
        """
        path = Path(path)
        try:
            text = decode_utf8(path.read_bytes(), path)  # a byte-order mark is accepted
        except FileNotFoundError:
            raise TraitError(f"trait file {path} not found") from None
        except ValueError as e:  # not UTF-8: the message names the line
            raise TraitError(str(e)) from None
        except OSError as e:
            raise TraitError(f"{path}: cannot read trait file ({e.strerror})") from None
        return cls.from_json(text, source=str(path))

    def save(self, path: str | Path) -> Path:
        """Write the trait as JSON (parent folders are created) and return the path.

        Args:
            path: destination file.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json(), encoding="utf-8")
        return path


# -- built-in library -----------------------------------------------------------------------------


def _builtin_dir() -> Any:
    return resources.files("steerlib").joinpath("data", "traits")


def list_traits() -> list[str]:
    """Names of the built-in traits, sorted."""
    return sorted(
        entry.name[: -len(".json")] for entry in _builtin_dir().iterdir() if entry.name.endswith(".json")
    )


def load_trait(name_or_path: str | Path | Trait) -> Trait:
    """Load a built-in trait by name, or a trait JSON file by path.

    Args:
        name_or_path: a built-in name such as ``"optimistic"`` (case-insensitive), a path to a JSON file,
            or an already-built :class:`Trait` (returned unchanged, so callers can accept either).

    Raises:
        TraitError: unknown name, missing file or invalid contents.
    """
    if isinstance(name_or_path, Trait):
        return name_or_path
    text = str(name_or_path)
    path = Path(text)
    # An existing file wins, so a local "optimistic.json" is never shadowed by the built-in.
    if path.is_file():
        return Trait.load(path)
    builtins = list_traits()
    key = text.strip().lower()
    if key in builtins:
        entry = _builtin_dir().joinpath(f"{key}.json")
        return Trait.from_json(entry.read_text(encoding="utf-8"), source=f"built-in trait {key}.json")
    if text.endswith(".json") or "/" in text or "\\" in text:
        raise TraitError(f"trait file {text} not found")
    raise TraitError(
        f"unknown trait '{text}'; built-in traits are: {', '.join(builtins)} (or pass a JSON file)"
    )


# -- validation helpers ---------------------------------------------------------------------------


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _text(value: object, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise TraitError(f"field '{what}' must be a non-empty string (got {value!r})")
    return value


def _questions(value: object, what: str) -> tuple[str, ...]:
    msg = f"field '{what}' must be a list of non-empty strings"
    if not isinstance(value, Sequence) or isinstance(value, str | bytes):
        raise TraitError(f"{msg} (got {_type_name(value)})")
    if not value:
        raise TraitError(f"field '{what}' is empty")
    seen: set[str] = set()
    for i, q in enumerate(value, start=1):
        if not isinstance(q, str) or not q.strip():
            raise TraitError(f"{msg} (item {i} is {q!r})")
        key = _norm(q)
        if key in seen:
            raise TraitError(f"field '{what}' repeats question {q!r} (item {i})")
        seen.add(key)
    return tuple(value)


def _pairs(value: object) -> tuple[InstructionPair, ...]:
    msg = 'field \'instruction_pairs\' must be a list of {"positive": ..., "negative": ...} objects'
    if not isinstance(value, Sequence) or isinstance(value, str | bytes):
        raise TraitError(f"{msg} (got {_type_name(value)})")
    if not value:
        raise TraitError("field 'instruction_pairs' is empty")
    pairs = []
    for i, item in enumerate(value, start=1):
        if isinstance(item, Mapping):
            pos, neg = item.get("positive"), item.get("negative")
        elif isinstance(item, Sequence) and not isinstance(item, str) and len(item) == 2:
            pos, neg = item  # [positive, negative] shorthand
        else:
            raise TraitError(f"{msg} (item {i} is {item!r})")
        for side, text in (("positive", pos), ("negative", neg)):
            if not isinstance(text, str) or not text.strip():
                raise TraitError(f"field 'instruction_pairs' item {i} needs a non-empty '{side}' string")
        pairs.append(InstructionPair(positive=pos, negative=neg))
    return tuple(pairs)


def _norm(question: str) -> str:
    return " ".join(question.split()).lower()


def _check_semantics(trait: Trait) -> None:
    """Checks that hold however the trait was built (cross-field rules, rubric slots)."""
    if not trait.instruction_pairs:
        raise TraitError("field 'instruction_pairs' is empty")
    for i, pair in enumerate(trait.instruction_pairs, start=1):
        if not isinstance(pair, InstructionPair):
            raise TraitError(f"field 'instruction_pairs' item {i} must be an InstructionPair")
        if pair.positive.strip() == pair.negative.strip():
            raise TraitError(
                f"field 'instruction_pairs' item {i} has identical positive and negative prompts"
            )
    if not trait.extraction_questions:
        raise TraitError("field 'extraction_questions' is empty")
    if not trait.eval_questions:
        raise TraitError("field 'eval_questions' is empty")
    extraction = {_norm(q) for q in trait.extraction_questions}
    for q in trait.eval_questions:
        if _norm(q) in extraction:
            raise TraitError(f"question {q!r} appears in both extraction_questions and eval_questions")
    check_rubric(trait.judge_rubric, "judge_rubric")
    check_rubric(trait.coherence_rubric, "coherence_rubric")
