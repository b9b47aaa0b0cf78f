"""Checks on user input that every layer shares: numbers that must not change meaning, text files that must be
UTF-8, output paths that must be folders.

Each check raises ``ValueError`` with one line naming the argument (and the file and line where there is one),
so the CLI prints it as ``error: ...`` and the API caller reads the same sentence. They are cheap and meant to
run before any model is loaded or any token generated.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["check_choice", "check_number", "check_int", "check_out_dir", "check_text", "load_json", "read_text"]

_BOM = b"\xef\xbb\xbf"


def check_int(value: object, what: str, *, minimum: int = 1, maximum: int | None = None) -> int:
    """``value`` if it is an int within ``minimum..maximum``; bools and floats are refused, not truncated."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    value = int(value)
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"within {minimum}..{maximum}"
        raise ValueError(f"{what} must be {bound}, got {value}")
    return value


def check_number(value: object, what: str, *, minimum: float | None = None, strict: bool = False) -> float:
    """``value`` as a float if it is a finite real number (and ``>= minimum``, or ``> minimum`` when strict)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{what} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value}")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise ValueError(f"{what} must be {'>' if strict else '>='} {minimum:g}, got {value:g}")
    return value


def check_choice(value: object, what: str, choices: Iterable[str]) -> str:
    """``value`` if it is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose from {', '.join(choices)}")
    return value  # type: ignore[return-value]


def check_text(text: object, what: str) -> str:
    """``text`` if it is a string that can be written as UTF-8 (no lone surrogates from undecodable bytes)."""
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} is not valid UTF-8 text (undecodable character at position {exc.start})") from None
    return text


def _line_col(data: bytes, offset: int) -> tuple[int, int]:
    line_start = data.rfind(b"\n", 0, offset) + 1
    return data.count(b"\n", 0, offset) + 1, offset - line_start + 1


def decode_utf8(data: bytes, source: str | Path) -> str:
    """UTF-8 bytes as text, a leading byte-order mark dropped; else an error naming the line and column."""
    body = data[len(_BOM):] if data.startswith(_BOM) else data
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = exc.start + (len(data) - len(body))
        line, col = _line_col(data, offset)
        raise ValueError(f"{source} line {line}: not UTF-8 text (byte 0x{data[offset]:02x} at column {col}); "
                         "save the file as UTF-8") from None


def read_text(path: str | Path, what: str = "file") -> str:
    """The text of a UTF-8 file (a byte-order mark is accepted), with clean errors for folders and bad bytes."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a {what}")
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}")
    return decode_utf8(path.read_bytes(), path)


def load_json(path: str | Path, what: str = "JSON file") -> Any:
    """Parse a JSON file; a syntax error names the file, line and column."""
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} line {exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None


def check_out_dir(path: str | Path, what: str = "--out") -> Path:
    """An output folder that exists or can be created: not an existing file, not under a file, writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path} is an existing file, not a folder; choose another path")
    parent = path
    while not parent.exists():
        if parent.parent == parent:
            break
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise ValueError(f"{what} {path} lies under {parent}, which is a file, not a folder")
    if parent.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path}: cannot write in {parent} (permission denied)")
    return path
