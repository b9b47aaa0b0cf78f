"""Reading (prompt, response) samples from finetuning data files, with line-numbered errors.

Two layouts are understood:

* JSONL with a chat ``messages`` list: the last message must be the assistant's and is the response; all
  messages before it are the prompt (formatted with the tokenizer's chat template);
* JSONL or CSV with ``prompt`` and ``response`` fields (optional ``system``): the prompt becomes one user
  turn of the chat template.

Every malformed line (bad JSON, missing fields, wrong types, empty response) is reported with its file and
line number: either raised as ``ValueError("train.jsonl line 7: ...")`` or, with ``on_error="skip"``, warned
about and returned in ``problems``. No line is dropped silently.
"""

from __future__ import annotations

import csv
import io
import json
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from steerlib.core.chat import format_messages
from steerlib.core.checks import decode_utf8

__all__ = [
    "ROLES",
    "BadRecord",
    "Problem",
    "ReadResult",
    "Sample",
    "check_messages",
    "read_jsonl_records",
    "read_samples",
    "report_problem",
]

ROLES = ("system", "user", "assistant", "tool")
OnError = Literal["raise", "skip"]
_JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class Sample:
    """One training sample.

    Attributes:
        index: position among the file's valid samples (0-based); stable while the file is unchanged.
        line: 1-based line of the file it came from.
        messages: the prompt part as chat messages (everything before the response).
        response: the assistant's response text.
        meta: the record's other fields (ids, labels...), kept for reports.
    """

    index: int
    line: int
    messages: tuple[Mapping[str, str], ...]
    response: str
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def user(self) -> str:
        """Text of the last user message (for display)."""
        for m in reversed(self.messages):
            if m["role"] == "user":
                return m["content"]
        return self.messages[-1]["content"]

    def prompt_text(self, tokenizer) -> str:
        """The prompt formatted with the tokenizer's chat template, ending with the generation prompt."""
        prompt, _ = format_messages(tokenizer, [dict(m) for m in self.messages])
        return prompt


@dataclass(frozen=True)
class Problem:
    """A line that could not be read."""

    path: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{Path(self.path).name} line {self.line}: {self.message}"


@dataclass
class ReadResult:
    """Samples read from a file plus the problems met (empty unless ``on_error="skip"``).

    Unpacks as ``samples, problems = read_samples(...)``.
    """

    samples: list[Sample]
    problems: list[Problem]
    path: Path

    def __iter__(self) -> Iterator:
        return iter((self.samples, self.problems))

    def __len__(self) -> int:
        return len(self.samples)


class BadRecord(ValueError):
    """A malformed record; readers turn it into a ``Problem`` carrying file and line."""


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _text(value: object, what: str, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise BadRecord(f"{what} must be a string, got {_type_name(value)}")
    if not allow_empty and not value.strip():
        raise BadRecord(f"{what} is empty")
    return value


def check_messages(messages: object) -> list[dict[str, str]]:
    """Validate a chat ``messages`` list (roles, string contents) and return plain ``{role, content}`` dicts.

    Raises:
        ValueError: naming the first bad message (callers add the file and line).
    """
    if not isinstance(messages, list) or not messages:
        raise BadRecord(f"'messages' must be a non-empty list, got {_type_name(messages)}")
    checked = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadRecord(f"message {i} must be an object with 'role' and 'content', got {_type_name(m)}")
        for key in ("role", "content"):
            if key not in m:
                raise BadRecord(f"message {i} has no '{key}'")
        role = m["role"]
        if role not in ROLES:
            raise BadRecord(f"message {i} has unknown role {role!r}; expected one of {ROLES}")
        content = _text(m["content"], f"message {i} content", allow_empty=True)
        checked.append({"role": role, "content": content})
    return checked


def _from_messages(messages: object) -> tuple[tuple[dict[str, str], ...], str]:
    checked = check_messages(messages)
    if checked[-1]["role"] != "assistant":
        last = checked[-1]["role"]
        raise BadRecord(f"the last message must be the assistant's response, got role {last!r}")
    if len(checked) < 2:
        raise BadRecord("the messages hold a response but no prompt before it")
    response = _text(checked[-1]["content"], "the assistant response")
    return tuple(checked[:-1]), response


def _from_fields(record: Mapping[str, Any]) -> tuple[tuple[dict[str, str], ...], str]:
    missing = [k for k in ("prompt", "response") if k not in record]
    if missing:
        raise BadRecord(
            f"missing field(s) {', '.join(repr(k) for k in missing)}: each record needs either 'messages' or "
            "'prompt' and 'response'"
        )
    prompt = _text(record["prompt"], "'prompt'")
    response = _text(record["response"], "'response'")
    system = record.get("system")
    messages: list[dict[str, str]] = []
    if system not in (None, ""):
        messages.append({"role": "system", "content": _text(system, "'system'")})
    messages.append({"role": "user", "content": prompt})
    return tuple(messages), response


def _parse_record(record: object) -> tuple[tuple[dict[str, str], ...], str, dict]:
    if not isinstance(record, dict):
        raise BadRecord(f"expected a JSON object, got {_type_name(record)}")
    if "messages" in record:
        messages, response = _from_messages(record["messages"])
        meta = {k: v for k, v in record.items() if k != "messages"}
    else:
        messages, response = _from_fields(record)
        meta = {k: v for k, v in record.items() if k not in ("prompt", "response", "system")}
    return messages, response, meta


def _jsonl_lines(path: Path) -> Iterator[tuple[int, object | BadRecord]]:
    # Read as bytes and decode line by line: a line that is not UTF-8 is a bad record with its line number
    # (skippable like any other), and a byte-order mark before the first line is accepted.
    with path.open("rb") as f:
        for number, data in enumerate(f, start=1):
            if number == 1 and data.startswith(_BOM):
                data = data[len(_BOM):]
            try:
                raw = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield number, BadRecord(f"not UTF-8 text (byte 0x{data[exc.start]:02x} at column {exc.start + 1})")
                continue
            if not raw.strip():  # blank lines separate nothing and hold no sample
                continue
            try:
                yield number, json.loads(raw)
            except json.JSONDecodeError as exc:
                yield number, BadRecord(f"invalid JSON ({exc.msg} at column {exc.colno})")


def _csv_rows(path: Path) -> Iterator[tuple[int, object | BadRecord]]:
    text = decode_utf8(path.read_bytes(), path.name)  # a whole CSV is one text: a bad byte names its line
    with io.StringIO(text, newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            return
        header = [h.strip() for h in header]
        missing = [k for k in ("prompt", "response") if k not in header]
        if missing:
            raise ValueError(
                f"{path.name} line 1: CSV header lacks column(s) {', '.join(repr(k) for k in missing)} "
                f"(found {header})"
            )
        start = reader.line_num + 1
        for row in reader:
            # line_num is the last physical line read; a quoted field may span several lines.
            number, start = start, reader.line_num + 1
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                yield number, BadRecord(f"expected {len(header)} columns, got {len(row)}")
                continue
            yield number, dict(zip(header, row, strict=True))


def read_jsonl_records(
    path: str | Path, *, on_error: OnError = "raise"
) -> tuple[list[tuple[int, dict]], list[Problem]]:
    """Parse a JSONL file into (line number, object) pairs, reporting bad JSON with line numbers."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a JSONL file")
    if not path.is_file():
        raise FileNotFoundError(f"no JSONL file at {path}")
    records, problems = [], []
    for number, item in _jsonl_lines(path):
        if not isinstance(item, BadRecord) and not isinstance(item, dict):
            item = BadRecord(f"expected a JSON object, got {_type_name(item)}")
        if isinstance(item, BadRecord):
            report_problem(Problem(str(path), number, str(item)), on_error, problems)
            continue
        records.append((number, item))
    return records, problems


def report_problem(problem: Problem, on_error: OnError, problems: list[Problem]) -> None:
    """Raise the problem as ``ValueError`` (on_error="raise") or warn and record it ("skip")."""
    if on_error == "raise":
        raise ValueError(str(problem))
    warnings.warn(f"skipping {problem}", stacklevel=3)
    problems.append(problem)


def read_samples(path: str | Path, *, on_error: OnError = "raise") -> ReadResult:
    """Read training samples from a JSONL (``messages`` or ``prompt``/``response``) or CSV file.

    Args:
        path: ``.jsonl``/``.ndjson``/``.json`` (one JSON object per line) or ``.csv`` with a header row.
        on_error: "raise" stops at the first malformed line with ``ValueError("<file> line N: ...")``;
            "skip" warns, leaves the line out and lists it in ``ReadResult.problems``.

    Returns:
        ``ReadResult`` with ``samples`` (indices 0..n-1 over valid samples) and ``problems``.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a data file")
    if not path.is_file():
        raise FileNotFoundError(f"no data file at {path}")
    suffix = path.suffix.lower()
    if suffix in _JSONL_SUFFIXES:
        rows = _jsonl_lines(path)
    elif suffix == ".csv":
        rows = _csv_rows(path)
    else:
        raise ValueError(f"{path.name}: unsupported file type {suffix!r}; use .jsonl or .csv")
    samples: list[Sample] = []
    problems: list[Problem] = []
    for number, item in rows:
        try:
            if isinstance(item, BadRecord):
                raise item
            messages, response, meta = _parse_record(item)
        except BadRecord as exc:
            report_problem(Problem(str(path), number, str(exc)), on_error, problems)
            continue
        samples.append(Sample(index=len(samples), line=number, messages=messages, response=response,
                              meta=meta))
    if not samples and not problems:
        raise ValueError(f"{path.name}: no samples found (the file is empty)")
    return ReadResult(samples=samples, problems=problems, path=path)


def as_samples(samples: Sequence[Sample] | ReadResult | str | Path, what: str = "samples to score") -> list[Sample]:
    """A list of ``Sample`` from a file path, a ``ReadResult`` or a sequence; indices must be unique."""
    if isinstance(samples, str | Path):
        samples = read_samples(samples)
    if isinstance(samples, ReadResult):
        samples = samples.samples
    samples = list(samples)
    if not samples:
        raise ValueError(f"no {what}")
    seen = set()
    for s in samples:
        if not isinstance(s, Sample):
            raise ValueError(f"samples must be steerlib.store.samples.Sample objects, got {type(s).__name__}")
        if s.index in seen:
            raise ValueError(f"two samples share index {s.index}; indices identify samples in the results "
                             "file")
        seen.add(s.index)
    return samples
