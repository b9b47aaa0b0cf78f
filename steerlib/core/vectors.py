"""``TraitVectors``: per-layer trait directions that know where they came from.

Saved as a safetensors file (one tensor per pooling kind, shape [n_layers + 1, d_model]) beside a JSON file
of metadata (model, trait, method, counts, judge, thresholds, recommended layer, library version).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from steerlib.core.checks import load_json
from steerlib.core.serialize import to_jsonable
from steerlib.core.version import __version__

WEIGHTS_FILE = "vectors.safetensors"
META_FILE = "vectors.json"


def check_dtype(tensor: Tensor, name: str) -> Tensor:
    """Refuse integer, boolean and complex tensors: a direction is real and floating point."""
    if tensor.is_complex() or not tensor.is_floating_point():
        raise ValueError(f"{name} must hold real floating-point values, got dtype {str(tensor.dtype).removeprefix('torch.')}")
    return tensor


def _check_norms(norms: object, n_positions: int) -> None:
    # Relative coefficients index these by layer: a short list would fail (or mislead) only when used.
    if norms is not None and (not isinstance(norms, list | tuple) or len(norms) != n_positions):
        got = len(norms) if isinstance(norms, list | tuple) else type(norms).__name__
        raise ValueError(f"residual_norms must list one norm per residual layer ({n_positions}), got {got}")


def check_vector(vector: Tensor, d_model: int | None = None, name: str = "vector") -> Tensor:
    """Validate a single direction: 1-D, finite, non-zero, of the expected width."""
    if not isinstance(vector, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(vector).__name__}")
    check_dtype(vector, name)
    if vector.ndim != 1:
        raise ValueError(f"{name} must be 1-D [d_model], got shape {tuple(vector.shape)}")
    if d_model is not None and vector.shape[0] != d_model:
        raise ValueError(f"{name} has width {vector.shape[0]} but the model's residual stream has width {d_model}")
    if not torch.isfinite(vector).all():
        raise ValueError(f"{name} contains NaN or inf values")
    if float(vector.norm()) == 0.0:
        raise ValueError(f"{name} is all zeros")
    return vector


def _clone(tensor: Tensor) -> Tensor:
    return tensor.clone()


class _ReadOnly(Mapping):
    """A mapping nobody can change through this object: no item assignment, and every read is a copy.

    Copies keep what ``TraitVectors`` holds out of reach of in-place edits (``tv.get(L).mul_(5)``,
    ``tv.metadata["residual_norms"].append(...)``); the tables are a few hundred KB at most, so a copy per read
    costs nothing next to a forward pass. Module-level so that it pickles (Ray workers receive vectors).
    """

    __slots__ = ("_data", "_copy")

    def __init__(self, data: Mapping[str, Any], copy_value: Callable[[Any], Any]):
        self._data = {k: copy_value(v) for k, v in data.items()}  # our own copy: the caller's dict may change
        self._copy = copy_value

    def __getitem__(self, key: str) -> Any:
        return self._copy(self._data[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._data!r})"

    def __getstate__(self) -> tuple:
        return self._data, self._copy

    def __setstate__(self, state: tuple) -> None:
        self._data, self._copy = state


def _mean_norms(parts: list[list[float] | None]) -> list[float] | None:
    known = [p for p in parts if p is not None]
    if not known:
        return None
    return [sum(values) / len(known) for values in zip(*known, strict=True)]


def _paths(path: str | Path) -> tuple[Path, Path]:
    path = Path(path)
    if path.suffix == ".safetensors":
        return path, path.with_suffix(".json")
    return path / WEIGHTS_FILE, path / META_FILE


@dataclass(frozen=True)
class TraitVectors:
    """Trait directions for every residual-stream layer of one model.

    A value, not a container: it keeps its own copies of the tensors and metadata it is given, ``vectors`` and
    ``metadata`` are read-only mappings whose every read (and every ``get``) returns a fresh copy, and the
    algebra (``+``, ``-``, ``*``, ``to``) returns new objects. Mutating what you read cannot change the object.

    Attributes:
        vectors: pooling kind -> tensor [n_layers + 1, d_model] (row L is layer L; row 0 = embeddings).
        model_name: name of the model the vectors were extracted from.
        trait: trait name.
        method: how they were made ("mean_diff", "probe", "pca", or anything a user sets).
        metadata: free-form provenance (counts kept/dropped, judge, thresholds, sweep, residual norms...).
    """

    vectors: Mapping[str, Tensor]
    model_name: str
    trait: str
    method: str = "mean_diff"
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.vectors, Mapping) or not self.vectors:
            raise ValueError("TraitVectors needs at least one pooling kind")
        for kind, tensor in self.vectors.items():
            if not isinstance(tensor, Tensor):
                raise ValueError(f"{kind!r} vectors must be a torch.Tensor, got {type(tensor).__name__}")
            check_dtype(tensor, f"{kind!r} vectors")
        if not isinstance(self.metadata, Mapping):
            raise ValueError(f"metadata must be a mapping, got {type(self.metadata).__name__}")
        # Frozen in fact, not only on the surface: detached copies that no caller holds a reference to.
        object.__setattr__(self, "vectors", _ReadOnly(
            {k: v.detach() for k, v in self.vectors.items()}, _clone))
        object.__setattr__(self, "metadata", _ReadOnly(self.metadata, copy.deepcopy))
        shapes = {tuple(v.shape) for v in self._tables.values()}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ValueError(f"all vectors must share one shape [n_layers + 1, d_model], got {shapes}")
        if self.n_positions < 2:
            raise ValueError(f"vectors of shape {next(iter(shapes))} cover no block: TraitVectors hold one row per "
                             "residual layer [n_layers + 1, d_model] (row 0 = embeddings)")
        _check_norms(self.metadata.get("residual_norms"), self.n_positions)

    @property
    def _tables(self) -> dict[str, Tensor]:
        """The stored tensors themselves, for reads inside this class that copy only what they hand out."""
        return self.vectors._data  # type: ignore[attr-defined]

    @property
    def n_positions(self) -> int:
        return next(iter(self._tables.values())).shape[0]

    @property
    def d_model(self) -> int:
        return next(iter(self._tables.values())).shape[1]

    @property
    def recommended_layer(self) -> int | None:
        return self.metadata.get("recommended_layer")

    @property
    def default_kind(self) -> str:
        return "response_mean" if "response_mean" in self.vectors else next(iter(self.vectors))

    def layer_norm(self, layer: int) -> float | None:
        """Typical residual-stream norm at ``layer`` as measured at extraction, if recorded."""
        norms = self.metadata.get("residual_norms")
        return None if norms is None else float(norms[layer])

    def get(self, layer: int | None = None, kind: str | None = None, *, normalize: bool = False) -> Tensor:
        """A copy of the [d_model] direction at one layer (default: the recommended layer)."""
        kind = kind or self.default_kind
        if kind not in self.vectors:
            raise ValueError(f"no {kind!r} vectors here; available: {sorted(self.vectors)}")
        if layer is None:
            layer = self.recommended_layer
            if layer is None:
                raise ValueError("no layer given and these vectors have no recommended layer")
        if not -self.n_positions <= layer < self.n_positions:
            raise ValueError(f"layer {layer} is out of range: these vectors cover layers 0..{self.n_positions - 1}")
        vec = self._tables[kind][layer]
        return vec / vec.norm().clamp_min(1e-12) if normalize else vec.clone()

    # -- algebra: new objects, never in place ---------------------------------------------------------
    def _map(self, fn, method: str | None = None) -> TraitVectors:
        return replace(self, vectors={k: fn(v) for k, v in self._tables.items()}, method=method or self.method,
                       metadata=self.metadata)  # copied again by the new object

    def __mul__(self, scale: float) -> TraitVectors:
        return self._map(lambda v: v * scale)

    __rmul__ = __mul__

    def __neg__(self) -> TraitVectors:
        return self._map(lambda v: -v)

    def __add__(self, other: TraitVectors) -> TraitVectors:
        """The sum, as a new ``TraitVectors`` (method ``"combination"``, trait ``"a+b"``).

        What the sum keeps of the metadata: what describes the model rather than one trait's extraction.
        ``residual_norms`` (so relative coefficients still work) is the mean of the operands' norms (either
        one's if only one has them); ``recommended_layer`` (the default layer) is kept when the operands agree
        or only one has one, and dropped when they disagree (pass a layer then). ``combined_from`` lists the
        operands' traits. Judge counts, thresholds and sweeps describe one extraction and are not kept.
        """
        if not isinstance(other, TraitVectors):
            return NotImplemented
        if other.vectors.keys() != self.vectors.keys() or other.d_model != self.d_model \
                or other.n_positions != self.n_positions:
            raise ValueError("can only add TraitVectors with the same kinds, layers and width")
        metadata: dict[str, Any] = {"combined_from": [self.trait, other.trait]}
        norms = _mean_norms([self.metadata.get("residual_norms"), other.metadata.get("residual_norms")])
        if norms is not None:
            metadata["residual_norms"] = norms
        layers = {tv.recommended_layer for tv in (self, other)} - {None}
        if len(layers) == 1:
            metadata["recommended_layer"] = layers.pop()
        return replace(self, vectors={k: v + other._tables[k] for k, v in self._tables.items()},
                       trait=f"{self.trait}+{other.trait}", method="combination", metadata=metadata)

    def __sub__(self, other: TraitVectors) -> TraitVectors:
        return self + (-other)

    def to(self, *args, **kwargs) -> TraitVectors:
        return self._map(lambda v: v.to(*args, **kwargs))

    # -- persistence ---------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write ``vectors.safetensors`` + ``vectors.json`` into folder ``path`` (or ``x.safetensors`` + ``x.json``)."""
        weights, meta = _paths(path)
        weights.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.float().contiguous().cpu() for k, v in self._tables.items()}, str(weights))
        info = {"model": self.model_name, "trait": self.trait, "method": self.method,
                "n_layers": self.n_positions - 1, "d_model": self.d_model, "library_version": __version__,
                **self.metadata}
        meta.write_text(json.dumps(to_jsonable(info), indent=2))
        return weights

    @classmethod
    def load(cls, path: str | Path, *, model=None, model_name: str | None = None) -> TraitVectors:
        """Load vectors saved by ``save``; with ``model`` given, check that width and depth match it.

        Files of other tools (llama.cpp ``.gguf``, the paper's ``.pt``, saklas profiles) are read by
        ``steerlib.core.loading.load_vectors``, the one loader for every path.
        """
        weights, meta = _paths(path)
        if not weights.is_file():
            raise FileNotFoundError(f"no trait vectors at {path} (expected {weights})")
        try:
            vectors = load_file(str(weights))
        except Exception as exc:  # safetensors raises its own error types for truncated or foreign files
            size = weights.stat().st_size
            detail = "the file is empty" if size == 0 else f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
            raise ValueError(f"{weights}: not a readable safetensors file ({detail}); re-extract or re-save the "
                             "vectors") from None
        if not vectors:
            raise ValueError(f"{weights}: the file holds no tensors")
        info = load_json(meta, "vectors metadata file") if meta.exists() else {}
        if not isinstance(info, dict):
            raise ValueError(f"{meta}: vector metadata must be a JSON object, got {type(info).__name__}")
        for key, value in vectors.items():
            if not torch.isfinite(value).all():
                raise ValueError(f"{weights}: tensor {key!r} contains NaN or inf values")
        rows = {v.shape[0] for v in vectors.values() if v.ndim == 2}
        if len(rows) == 1:
            try:
                _check_norms(info.get("residual_norms"), rows.pop())
            except ValueError as exc:
                raise ValueError(f"{meta}: {exc}") from None
        try:
            tv = cls(
                vectors=vectors,
                model_name=info.pop("model", "unknown"),
                trait=info.pop("trait", weights.stem),
                method=info.pop("method", "unknown"),
                metadata={k: v for k, v in info.items() if k not in ("n_layers", "d_model")},
            )
        except ValueError as exc:
            raise ValueError(f"{weights}: {exc}") from None
        if model is not None:
            tv.check_model(model)
        if model_name is not None and tv.model_name != model_name:
            raise ValueError(f"{weights} was extracted from {tv.model_name!r}, not {model_name!r}")
        return tv

    def check_model(self, model) -> None:
        from steerlib.core.arch import get_layout

        layout = get_layout(model)
        if self.d_model != layout.d_model:
            raise ValueError(
                f"trait vectors for {self.trait!r} have width {self.d_model} but the model's residual stream has "
                f"width {layout.d_model} (extracted from {self.model_name!r})"
            )
        if self.n_positions != layout.n_positions:
            raise ValueError(
                f"trait vectors cover {self.n_positions - 1} blocks but the model has {layout.n_layers} "
                f"(extracted from {self.model_name!r})"
            )


VectorSource = TraitVectors | Tensor | str | Path
"""Anything that names trait directions: TraitVectors, a [d_model] or [n_layers + 1, d_model] tensor, or a path."""
