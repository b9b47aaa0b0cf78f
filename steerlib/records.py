"""Append-only JSONL logs that make long jobs resumable.

Each record is one line written and flushed as soon as it exists; a job that is killed loses at most the
line being written, which ``read`` skips (a torn last line), so rerunning it redoes only missing work.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable
from pathlib import Path


class JsonlLog:
    """Records keyed by a field (default ``"id"``), appended to ``path``."""

    def __init__(self, path: str | Path, key: str = "id"):
        self.path = Path(path)
        self.key = key
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def read(self) -> dict[str, dict]:
        """All complete records, last one wins per key."""
        records: dict[str, dict] = {}
        if not self.path.exists():
            return records
        with self.path.open() as f:
            lines = f.read().split("\n")
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                # A line torn by a killed run: its work is simply redone.
                warnings.warn(f"{self.path} line {n}: incomplete record skipped", stacklevel=2)
                continue
            records[str(record[self.key])] = record
        return records

    def append(self, records: Iterable[dict]) -> None:
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        if not lines:
            return
        with self.path.open("ab+") as f:
            end = f.seek(0, os.SEEK_END)
            if end > 0:
                f.seek(end - 1)
                if f.read(1) != b"\n":  # finish a torn line so the new records start clean
                    lines = "\n" + lines
            f.write(lines.encode())
            f.flush()
            os.fsync(f.fileno())
