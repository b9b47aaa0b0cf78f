"""Residual-stream activations of a corpus at one layer, on disk as memory-mapped arrays, written resumably.

A cache folder holds ``acts.f32`` ([n_tokens, d_model] float32), ``tokens.i32`` (each row's token id),
``samples.i32`` (each row's corpus sample) and ``cache.json`` (the settings and how far harvesting got). Rows are
appended one chunk of samples at a time and ``cache.json`` is replaced after each chunk, so an interrupted harvest
resumes where the last complete chunk ended; a folder made under other settings (model weights, layer, corpus,
skipped positions) is refused instead of mixed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from steerlib.core.arch import get_layout
from steerlib.core.capture import capture_activations, tokenize_pairs
from steerlib.core.checks import check_int, load_json
from steerlib.sae.corpus import Sample, corpus_digest
from steerlib.steering.calibration import model_identity

__all__ = ["ActivationCache", "CacheSettings", "harvest", "write_rows"]

META = "cache.json"
_FILES = {"acts": ("acts.f32", np.float32), "tokens": ("tokens.i32", np.int32), "samples": ("samples.i32", np.int32)}


@dataclass(frozen=True)
class CacheSettings:
    """What the cached numbers depend on; a resume must match every field."""

    model: str  # model_identity's weight fingerprint
    layer: int
    d_model: int
    corpus: str  # corpus_digest
    n_samples: int
    skip_first: int  # leading positions of each sequence left out (the first token's norm dwarfs the rest)


class ActivationCache:
    """A finished (or partial) cache folder opened for reading: ``acts`` [n_tokens, d_model] is a read-only memmap."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        meta_path = self.folder / META
        if not meta_path.is_file():
            raise FileNotFoundError(f"no activation cache at {self.folder} (expected {META})")
        meta = load_json(meta_path, "activation cache metadata")
        self.settings = CacheSettings(**meta["settings"])
        self.n_tokens = int(meta["n_tokens"])
        self.done_samples = int(meta["done_samples"])
        d = self.settings.d_model
        self.acts = _memmap(self.folder / _FILES["acts"][0], np.float32, (self.n_tokens, d))
        self.tokens = _memmap(self.folder / _FILES["tokens"][0], np.int32, (self.n_tokens,))
        self.samples = _memmap(self.folder / _FILES["samples"][0], np.int32, (self.n_tokens,))

    @property
    def complete(self) -> bool:
        return self.done_samples == self.settings.n_samples

    def rows(self, index: np.ndarray | slice) -> torch.Tensor:
        """Activations of the given rows as a float32 tensor [n, d_model] (a copy)."""
        return torch.from_numpy(np.array(self.acts[index], dtype=np.float32))


def _memmap(path: Path, dtype, shape: tuple[int, ...]) -> np.ndarray:
    if shape[0] == 0:
        return np.zeros(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=shape)


def _write_meta(folder: Path, settings: CacheSettings, done: int, n_tokens: int) -> None:
    tmp = folder / (META + ".tmp")
    tmp.write_text(json.dumps({"settings": asdict(settings), "done_samples": done, "n_tokens": n_tokens}, indent=2))
    os.replace(tmp, folder / META)


def _check_resume(folder: Path, settings: CacheSettings) -> tuple[int, int]:
    meta_path = folder / META
    if not meta_path.is_file():
        if folder.exists() and any(folder.iterdir()):
            raise ValueError(f"{folder}: the folder is not empty and holds no activation cache; use an empty folder")
        return 0, 0
    meta = load_json(meta_path, "activation cache metadata")
    old = meta.get("settings", {})
    for key, value in asdict(settings).items():
        if old.get(key) != value:
            raise ValueError(f"{folder}: this cache was made with {key}={old.get(key)!r}, not {value!r}; use another "
                             "folder (or delete this one) to cache under other settings")
    return int(meta["done_samples"]), int(meta["n_tokens"])


def write_rows(folder: str | Path, acts: torch.Tensor, layer: int, *, source: str = "array") -> ActivationCache:
    """A cache of activations made elsewhere ([n, d_model]: synthetic data, another tool's capture)."""
    folder = Path(folder)
    if acts.ndim != 2 or acts.shape[0] == 0:
        raise ValueError(f"activations must be [n_tokens, d_model] with n_tokens >= 1, got {tuple(acts.shape)}")
    settings = CacheSettings(model=source, layer=layer, d_model=int(acts.shape[1]), corpus=source, n_samples=1,
                             skip_first=0)
    _check_resume(folder, settings)
    folder.mkdir(parents=True, exist_ok=True)
    n = int(acts.shape[0])
    data = {"acts": acts.detach().float().cpu().numpy(), "tokens": np.zeros(n, np.int32),
            "samples": np.zeros(n, np.int32)}
    for key, (name, dtype) in _FILES.items():
        (folder / name).write_bytes(np.ascontiguousarray(data[key], dtype=dtype).tobytes())
    _write_meta(folder, settings, 1, n)
    return ActivationCache(folder)


def harvest(model, tokenizer, samples: Sequence[Sample], layer: int, folder: str | Path, *, chunk: int = 64,
            batch_size: int = 16, skip_first: int = 1, max_tokens: int | None = None,
            progress: bool = False) -> ActivationCache:
    """Cache every token's residual activation at ``layer`` for ``samples`` (resuming a partial cache).

    Args:
        model, tokenizer: the model to read (through ``steerlib.core.capture``, the one capture path).
        samples: the corpus.
        layer: steerlib layer (1..n_layers).
        folder: the cache folder (created; an existing cache of the same settings is resumed).
        chunk: samples per write (a resume repeats at most one chunk).
        batch_size: samples per forward pass.
        skip_first: leading positions of each sequence not cached.
        max_tokens: stop after this many cached tokens (rounded up to a chunk).
        progress: show a progress bar.
    """
    if not samples:
        raise ValueError("the corpus is empty: nothing to cache")
    check_int(chunk, "chunk")
    check_int(skip_first, "skip_first", minimum=0)
    layout = get_layout(model)
    layer = layout.check_layer(layer, allow_embeddings=False)
    folder = Path(folder)
    settings = CacheSettings(model=model_identity(model)["weights"], layer=layer, d_model=layout.d_model,
                             corpus=corpus_digest(samples), n_samples=len(samples), skip_first=skip_first)
    done, n_tokens = _check_resume(folder, settings)
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {"acts": layout.d_model * 4, "tokens": 4, "samples": 4}
    handles = {}
    for key, (name, _) in _FILES.items():
        path = folder / name
        path.touch()
        with path.open("r+b") as f:  # drop rows a crash wrote after the last recorded chunk
            f.truncate(n_tokens * sizes[key])
        handles[key] = path.open("ab")
    bar = tqdm(total=len(samples), initial=done, desc=f"harvest layer {layer}", unit="sample", disable=not progress)
    try:
        while done < len(samples) and (max_tokens is None or n_tokens < max_tokens):
            part = samples[done : done + chunk]
            prompts = [s.prompt for s in part]
            responses = [s.response for s in part]
            acts = capture_activations(model, tokenizer, prompts, responses, [layer], batch_size=batch_size,
                                       keep_tokens=True)
            encoded = tokenize_pairs(tokenizer, prompts, responses)
            for i, (ids, _) in enumerate(encoded):
                rows = acts.tokens[i][0, skip_first:].numpy().astype(np.float32)  # [seq - skip, D]
                handles["acts"].write(rows.tobytes())
                handles["tokens"].write(np.asarray(ids[skip_first:], dtype=np.int32).tobytes())
                handles["samples"].write(np.full(len(rows), done + i, dtype=np.int32).tobytes())
                n_tokens += len(rows)
            for f in handles.values():
                f.flush()
                os.fsync(f.fileno())
            done += len(part)
            _write_meta(folder, settings, done, n_tokens)
            bar.update(len(part))
            bar.set_postfix(tokens=n_tokens)
    finally:
        bar.close()
        for f in handles.values():
            f.close()
    if done == 0:
        _write_meta(folder, settings, done, n_tokens)
    return ActivationCache(folder)
