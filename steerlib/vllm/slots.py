"""Steering vectors registered once, by content, as vLLM registers LoRA adapters: a store and a slot table.

A request no longer carries its vectors as JSON floats (``4096 x 32`` of them for a 7B-shaped persona spec,
parsed again in every worker). Instead:

* the API process writes each lowered row once to a **content-addressed store** (``VectorStore``: one
  safetensors file per row, named by ``content_key(row)``, the plan's content digest) and sends the request's
  spec with keys only (``steerlib.vllm.spec.encode_rows(..., store=...)``);
* every worker keeps a **slot table** (``SlotTable``) of at most ``capacity`` rows (``--max-steer-vectors``,
  ``additional_config["steerlib_max_vectors"]``): a key missing from it is read from the store on first use into a
  free slot, evicting the least recently used row that no live request uses; a row is pinned while a request
  that uses it is running;
* the API process keeps the same table without rows (``admit``) to refuse, with ``SlotsExhausted``, a request
  that would need a slot when every slot is pinned by requests in flight. Workers only ever see requests the
  API process admitted, so a worker's table cannot overflow.

The store is shared by every engine on a host (``additional_config["steerlib_vector_dir"]``, default
``<steerlib cache>/vllm-vectors``): a key names one content, so two engines writing the same key write the
same bytes (atomically, by rename), and a row is never changed once written.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Container, Hashable, Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

__all__ = ["CAPACITY_KEY", "DEFAULT_CAPACITY", "DIR_KEY", "SlotTable", "SlotsExhausted", "VectorStore",
           "capacity_of", "content_key", "store_of"]

CAPACITY_KEY = "steerlib_max_vectors"
DIR_KEY = "steerlib_vector_dir"
# Rows, not personas: one per (vector, layer) and one per gate direction. 256 rows of a 4096-wide model are 4 MiB.
DEFAULT_CAPACITY = 256
_KEY_CHARS = set("0123456789abcdef")
_KEY_LEN = 24


class SlotsExhausted(RuntimeError):
    """Every slot is pinned by running requests: this request must wait (the server answers 429/400)."""


def content_key(row: Tensor) -> str:
    """The content digest of a ``[D]`` fp32 row: the key a row is stored and slotted under (the same digest the
    plan's ``Edit.key`` is)."""
    data = row.detach().to("cpu", torch.float32).contiguous()
    return hashlib.blake2b(data.numpy().tobytes(), digest_size=_KEY_LEN // 2).hexdigest()


def is_key(value: object) -> bool:
    """Whether ``value`` is written like a content key (24 lowercase hex digits)."""
    return isinstance(value, str) and len(value) == _KEY_LEN and set(value) <= _KEY_CHARS


def capacity_of(additional_config: Mapping | None) -> int:
    """The slot capacity an engine was started with (``additional_config["steerlib_max_vectors"]``)."""
    value = (additional_config or {}).get(CAPACITY_KEY, DEFAULT_CAPACITY)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"steerlib: --max-steer-vectors ({CAPACITY_KEY}) must be an int >= 1, got {value!r}")
    return value


def store_of(additional_config: Mapping | None, cache: int = 0) -> VectorStore:
    """The vector store an engine's API process and workers share (``cache``: rows kept in memory)."""
    folder = (additional_config or {}).get(DIR_KEY)
    if folder is None:
        from steerlib.core.models import cache_root

        folder = cache_root() / "vllm-vectors"
    return VectorStore(folder, cache)


class VectorStore:
    """Rows on disk by content key: ``<folder>/<key[:2]>/<key>.safetensors`` holding one ``[D]`` fp32 tensor."""

    def __init__(self, folder: str | os.PathLike, cache: int = 0):
        self.folder = Path(folder)
        self._known: set[str] = set()  # keys this process wrote or checked (no stat on the hot path)
        self._cache: OrderedDict[str, Tensor] = OrderedDict()  # the last ``cache`` rows read, for repeated specs
        self._cache_size = cache

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def put(self, row: Tensor) -> str:
        """Store ``row`` (once) and return its key."""
        key = content_key(row)
        if key in self._known:
            return key
        path = self.path(key)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            os.close(fd)
            try:
                save_file({"row": row.detach().to("cpu", torch.float32).contiguous()}, tmp)
                os.replace(tmp, path)  # atomic: a reader sees the whole file or none
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        self._known.add(key)
        return key

    def has(self, key: str) -> bool:
        if key in self._known:
            return True
        if is_key(key) and self.path(key).exists():
            self._known.add(key)
            return True
        return False

    def get(self, key: str) -> Tensor:
        """The row stored under ``key``, checked against its digest.

        Raises:
            KeyError: no such key in the store.
            ValueError: the file does not hold the content its name says.
        """
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        if not is_key(key) or not self.path(key).exists():
            raise KeyError(f"steerlib: vector key {key!r} is not in the vector store ({self.folder})")
        row = load_file(str(self.path(key)))["row"]
        if row.ndim != 1 or content_key(row) != key:
            raise ValueError(f"steerlib: the stored vector {key!r} does not match its key (corrupt store?)")
        self._known.add(key)
        if self._cache_size:
            self._cache[key] = row
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return row


class SlotTable:
    """At most ``capacity`` content-keyed rows, least recently used first; a row is pinned by the requests
    (owners) that use it and only unpinned rows are evicted.

    With ``load`` (a worker) each resident key holds its row; ``on_load(slot, row)`` lets a caller mirror a newly
    loaded row into a device table at slot ``slot`` (1..capacity; 0 is the no-edit row). Without ``load`` (the
    API process) the table only counts keys and pins, to admit or refuse requests.
    """

    def __init__(self, capacity: int, load: Callable[[str], Tensor] | None = None,
                 on_load: Callable[[int, Tensor], None] | None = None):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"slot capacity must be an int >= 1, got {capacity!r}")
        self.capacity = capacity
        self._load = load
        self._on_load = on_load
        self._slots: OrderedDict[str, int] = OrderedDict()  # key -> slot, least recently used first
        self._rows: dict[str, Tensor] = {}
        self._free = list(range(capacity, 0, -1))
        self._pins: dict[str, set[Hashable]] = {}  # key -> owners
        self._owned: dict[Hashable, set[str]] = {}  # owner -> keys
        self.loads = 0  # rows read through ``load`` (misses)
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, key: str) -> bool:
        return key in self._slots

    @property
    def owners(self) -> list[Hashable]:
        return list(self._owned)

    def pinned(self) -> int:
        """Resident keys some owner pins."""
        return sum(1 for k in self._slots if self._pins.get(k))

    def slot(self, key: str) -> int:
        return self._slots[key]

    def acquire(self, owner: Hashable, keys: Iterable[str]) -> dict[str, Tensor]:
        """Pin ``keys`` for ``owner``, loading the missing ones into free or evicted slots; all or nothing.

        Returns the rows by key (empty mapping without ``load``).

        Raises:
            SlotsExhausted: the missing keys need more slots than are free or unpinned.
        """
        wanted = list(dict.fromkeys(keys))
        missing = [k for k in wanted if k not in self._slots]
        wanted_set = set(wanted)
        evictable = [k for k in self._slots if not self._pins.get(k) and k not in wanted_set]
        if len(missing) > len(self._free) + len(evictable):
            raise SlotsExhausted(
                f"steerlib: all {self.capacity} steering vector slots (--max-steer-vectors) are pinned by running "
                f"requests and this request needs {len(missing)} more; retry later or start the engine with a "
                "larger --max-steer-vectors")
        loaded = {k: self._load(k) for k in missing} if self._load is not None else {}  # may raise: nothing changed
        for key in missing:
            if not self._free:
                victim = evictable.pop(0)  # least recently used first (the OrderedDict's order)
                self._free.append(self._slots.pop(victim))
                self._rows.pop(victim, None)
                self._pins.pop(victim, None)
                self.evictions += 1
            slot = self._free.pop()
            self._slots[key] = slot
            if key in loaded:
                self._rows[key] = loaded[key]
                self.loads += 1
                if self._on_load is not None:
                    self._on_load(slot, loaded[key])
        for key in wanted:
            self._slots.move_to_end(key)
            self._pins.setdefault(key, set()).add(owner)
        self._owned.setdefault(owner, set()).update(wanted)
        return {k: self._rows[k] for k in wanted} if self._load is not None else {}

    def release(self, owner: Hashable) -> None:
        """Unpin ``owner``'s keys (they stay resident, now evictable)."""
        for key in self._owned.pop(owner, ()):
            owners = self._pins.get(key)
            if owners is not None:
                owners.discard(owner)

    def release_missing(self, live: Container) -> None:
        """Release every owner not in ``live`` (the requests still running)."""
        for owner in [o for o in self._owned if o not in live]:
            self.release(owner)
