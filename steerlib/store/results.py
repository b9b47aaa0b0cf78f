"""The one resumable results store: an append-only JSONL file with the settings of its run beside it.

Every long job (extraction logs, flag scores, drift scores, the judge cache) writes through ``ResultsStore``,
so they share one durability policy:

- records are appended a whole batch at a time in one write, then flushed and fsynced, so a kill loses at
  most the batch being written;
- a torn *last* line (a kill mid-write) is cut off with a warning and its work redone; a torn line anywhere
  else means the file was damaged after the fact, and is an error naming the file and line;
- the run's settings live in ``<file>.meta.json``; resuming under different settings is refused with a
  message naming each setting that changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import threading
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from steerlib.core.serialize import to_jsonable

__all__ = ["FolderBusy", "ResultsStore", "SettingsChanged", "exclusive_output", "fingerprint_pairs",
           "fingerprint_tensor", "meta_path", "read_records"]


class SettingsChanged(ValueError):
    """A results file was asked to resume under settings other than those it was written with."""


def meta_path(path: str | Path) -> Path:
    """Where the settings of the run that wrote ``path`` are kept."""
    path = Path(path)
    return path.with_name(path.name + ".meta.json")


def fingerprint_pairs(prompts: Sequence[str], responses: Sequence[str]) -> str:
    """A short hash of (prompt, response) texts: what a results file was computed on."""
    data = hashlib.sha256()
    for p, r in zip(prompts, responses, strict=True):
        data.update(p.encode())
        data.update(b"\x00")
        data.update(r.encode())
        data.update(b"\x01")
    return data.hexdigest()[:16]


def fingerprint_tensor(tensor: Tensor) -> str:
    """A short hash of a tensor's float32 values (e.g. the direction a results file was scored on)."""
    return hashlib.sha256(tensor.detach().float().contiguous().cpu().numpy().tobytes()).hexdigest()[:16]


def read_records(path: str | Path, *, repair: bool = False) -> list[dict]:
    """The records of a results file in file order (none if it does not exist).

    Args:
        path: the JSONL file.
        repair: cut off a half-written last line (with a warning) instead of raising.
    """
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    records: list[dict] = []
    pos, number = 0, 0
    while pos < len(data):
        end = data.find(b"\n", pos)
        number += 1
        last = end == -1
        chunk = data[pos:] if last else data[pos:end]
        try:
            if last:  # a line without its newline was cut short by a kill, even if it parses
                raise ValueError("unterminated line")
            if chunk.strip():
                record = json.loads(chunk)
                if not isinstance(record, dict):
                    raise ValueError(f"expected a JSON object, got {type(record).__name__}")
                records.append(record)
        except ValueError as exc:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
            if last and repair:
                warnings.warn(f"{path} line {number}: dropping a half-written line left by an interrupted "
                              "run; its work will be redone", stacklevel=2)
                with path.open("r+b") as f:
                    f.truncate(pos)
                break
            raise ValueError(f"{path} line {number}: corrupt results line ({exc}); the file was damaged "
                             "after it was written: delete it or start a fresh run") from None
        pos = len(data) if last else end + 1
    return records


class ResultsStore:
    """An append-only JSONL results file that resumes only under the settings it was started with.

    Args:
        path: the JSONL file (its folder is created).
        settings: what must match for earlier records to be reused (JSON-able); None checks nothing.
        resume: keep and return earlier records; False starts the file afresh.

    Attributes:
        records: the records already in the file when it was opened, in file order.
    """

    def __init__(self, path: str | Path, settings: Mapping[str, Any] | None = None, *, resume: bool = True):
        self.path = Path(path)
        self.settings = None if settings is None else to_jsonable(dict(settings))
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        meta = meta_path(self.path)
        if not resume or not self.path.exists():
            self.path.write_bytes(b"")
            self._write_meta(meta)
            self.records: list[dict] = []
            return
        if self.settings is not None and meta.is_file():
            self._check_settings(meta)
        elif self.settings is not None:
            self._write_meta(meta)
        self.records = read_records(self.path, repair=True)

    def _write_meta(self, meta: Path) -> None:
        if self.settings is not None:
            meta.write_text(json.dumps(self.settings, indent=2, sort_keys=True))

    def _check_settings(self, meta: Path) -> None:
        try:
            old = json.loads(meta.read_text())
        except ValueError as exc:
            raise ValueError(f"{meta}: unreadable settings file ({exc}); delete it or start a fresh run") from None
        if not isinstance(old, dict):
            raise ValueError(f"{meta}: settings must be a JSON object")
        changed = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in self.settings.items() if old.get(k) != v]
        changed += [f"{k}: {old[k]!r} -> (absent)" for k in old if k not in self.settings]
        if changed:
            raise SettingsChanged(
                f"{self.path} holds results of a run with other settings ({'; '.join(changed)}); start a fresh "
                "run (--fresh / resume=False) or choose another output path"
            )

    def by_key(self, key: str) -> dict[str, dict]:
        """Records indexed by ``str(record[key])``; the last record wins for a repeated key."""
        return {str(r[key]): r for r in self.records}

    def append(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Append a whole batch in one write; it is on disk (fsynced) when this returns. Thread-safe."""
        rows = [dict(r) for r in records]
        if not rows:
            return
        text = "".join(json.dumps(to_jsonable(r), ensure_ascii=False) + "\n" for r in rows)
        with self._lock, self.path.open("ab") as f:
            f.write(text.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
            self.records.extend(rows)


class FolderBusy(ValueError):
    """Another run holds the exclusive lock on an output folder."""


LOCK_FILE = ".steerlib.lock"


@contextlib.contextmanager
def exclusive_output(folder: str | Path, job: str, *, lock_name: str = LOCK_FILE) -> Iterator[Path]:
    """Hold an exclusive lock on an output folder for the whole of a long job; a second job is refused.

    Two runs appending to one ``scores.jsonl`` interleave their records (the resume logic of each trusts what
    it read when it started), so every long job takes this lock before it reads or writes its outputs. The lock
    is an OS file lock (``flock``): it is released when the job ends, also when it is killed, so a stale lock
    file never blocks a later run. The file records who holds it, and the refusal names them.

    Args:
        folder: the output folder (created if missing).
        job: what is running, for the message another run sees (e.g. ``"steerlib flag"``).
        lock_name: the lock file's name inside ``folder`` (one folder can hold several independently locked
            outputs, e.g. ``.inventory.json.lock``).

    Yields:
        The folder.

    Raises:
        FolderBusy: another process (or another job in this process) holds the lock; the message names its
            pid, host and job.
    """
    import fcntl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / lock_name
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderBusy(f"{folder} is in use by another run ({_holder(path)}); wait for it to finish or "
                             "choose another output folder") from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "job": job,
                  "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        yield folder
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def _holder(path: Path) -> str:
    """Who holds a lock, from the record its holder wrote (best effort: it may be mid-write)."""
    try:
        info = json.loads(path.read_text() or "{}")
        return f"{info['job']}, pid {info['pid']} on {info['host']}, since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"
