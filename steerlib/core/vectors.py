"""``TraitVectors``: per-layer trait directions that know where they came from.

Saved as a safetensors file (one tensor per pooling kind, shape [n_layers + 1, d_model]) beside a JSON file
of metadata (model, trait, method, counts, judge, thresholds, recommended layer, library version).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

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


def _paths(path: str | Path) -> tuple[Path, Path]:
    path = Path(path)
    if path.suffix == ".safetensors":
        return path, path.with_suffix(".json")
    return path / WEIGHTS_FILE, path / META_FILE


@dataclass(frozen=True)
class TraitVectors:
    """Trait directions for every residual-stream layer of one model.

    Attributes:
        vectors: pooling kind -> tensor [n_layers + 1, d_model] (row L is layer L; row 0 = embeddings).
        model_name: name of the model the vectors were extracted from.
        trait: trait name.
        method: how they were made ("mean_diff", "probe", "pca", or anything a user sets).
        metadata: free-form provenance (counts kept/dropped, judge, thresholds, sweep, residual norms...).
    """

    vectors: dict[str, Tensor]
    model_name: str
    trait: str
    method: str = "mean_diff"
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.vectors:
            raise ValueError("TraitVectors needs at least one pooling kind")
        for kind, tensor in self.vectors.items():
            check_dtype(tensor, f"{kind!r} vectors")
        shapes = {tuple(v.shape) for v in self.vectors.values()}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ValueError(f"all vectors must share one shape [n_layers + 1, d_model], got {shapes}")
        if self.n_positions < 2:
            raise ValueError(f"vectors of shape {next(iter(shapes))} cover no block: TraitVectors hold one row per "
                             "residual layer [n_layers + 1, d_model] (row 0 = embeddings)")
        _check_norms(self.metadata.get("residual_norms"), self.n_positions)

    @property
    def n_positions(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    @property
    def d_model(self) -> int:
        return next(iter(self.vectors.values())).shape[1]

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
        """The [d_model] direction at one layer (default: the recommended layer)."""
        kind = kind or self.default_kind
        if kind not in self.vectors:
            raise ValueError(f"no {kind!r} vectors here; available: {sorted(self.vectors)}")
        if layer is None:
            layer = self.recommended_layer
            if layer is None:
                raise ValueError("no layer given and these vectors have no recommended layer")
        if not -self.n_positions <= layer < self.n_positions:
            raise ValueError(f"layer {layer} is out of range: these vectors cover layers 0..{self.n_positions - 1}")
        vec = self.vectors[kind][layer]
        return vec / vec.norm().clamp_min(1e-12) if normalize else vec

    # -- algebra: new objects, never in place ---------------------------------------------------------
    def _map(self, fn, method: str | None = None) -> TraitVectors:
        return replace(self, vectors={k: fn(v) for k, v in self.vectors.items()}, method=method or self.method,
                       metadata=dict(self.metadata))

    def __mul__(self, scale: float) -> TraitVectors:
        return self._map(lambda v: v * scale)

    __rmul__ = __mul__

    def __neg__(self) -> TraitVectors:
        return self._map(lambda v: -v)

    def __add__(self, other: TraitVectors) -> TraitVectors:
        if not isinstance(other, TraitVectors):
            return NotImplemented
        if other.vectors.keys() != self.vectors.keys() or other.d_model != self.d_model:
            raise ValueError("can only add TraitVectors with the same kinds and width")
        return replace(self, vectors={k: v + other.vectors[k] for k, v in self.vectors.items()},
                       trait=f"{self.trait}+{other.trait}", method="combination", metadata={})

    def __sub__(self, other: TraitVectors) -> TraitVectors:
        return self + (-other)

    def to(self, *args, **kwargs) -> TraitVectors:
        return self._map(lambda v: v.to(*args, **kwargs))

    # -- persistence ---------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write ``vectors.safetensors`` + ``vectors.json`` into folder ``path`` (or ``x.safetensors`` + ``x.json``)."""
        weights, meta = _paths(path)
        weights.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().float().contiguous().cpu() for k, v in self.vectors.items()}, str(weights))
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
