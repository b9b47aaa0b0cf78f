"""The one way from a path or an object to trait vectors, the one layer default, and one direction per layer.

Every command and API call that takes vectors goes through ``load_vectors``: steerlib's own folders and
``.safetensors`` files, llama.cpp control vectors (``.gguf``), the Persona Vectors paper's ``.pt`` tables, saklas
profiles, a single-direction ``.pt``, or an already loaded ``TraitVectors`` / tensor.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from steerlib.core.arch import get_layout
from steerlib.core.vector_imports import load_foreign
from steerlib.core.vectors import TraitVectors, VectorSource, check_dtype, check_vector, first_nonfinite_row

__all__ = ["load_vectors", "pick_layer", "resolve_vector"]


def load_vectors(source: VectorSource, model=None) -> TraitVectors | Tensor:
    """The one way from a path (or an object) to vectors; with ``model`` given, check they fit it.

    Args:
        source: a saved TraitVectors folder or ``.safetensors`` file, a ``.pt`` tensor file, or an already
            loaded TraitVectors / tensor (returned as is, after the model check).
        model: when given, the vectors' width (and for TraitVectors and 2-D tensors, depth) must match it.

    Returns:
        TraitVectors, or a tensor of shape [d_model] or [n_layers + 1, d_model].
    """
    if isinstance(source, str | Path) and str(source).startswith("sae:"):  # an SAE latent (core.sae_format)
        from steerlib.core.sae_format import latent_vectors

        source = latent_vectors(str(source), model)
    if isinstance(source, str | Path):
        path = Path(source)
        try:
            source = _load_path(path, model)
        except ValueError as exc:  # every message about a file names it, once
            raise ValueError(str(exc) if str(path) in str(exc) else f"{path}: {exc}") from None
    if isinstance(source, TraitVectors):
        if model is not None and source.method == "sae_latent":  # read without a model: re-read at its depth
            from steerlib.core.sae_format import latent_vectors

            source = latent_vectors(f"sae:{source.metadata['path']}#{source.metadata['latent']}", model)
        if model is not None:
            source.check_model(model)
        return source
    if not isinstance(source, Tensor):
        raise ValueError(f"cannot use {type(source).__name__} as trait vectors")
    _check_tensor(source, "trait vectors")
    if model is not None:
        layout = get_layout(model)
        if source.shape[-1] != layout.d_model:
            raise ValueError(f"vector width {source.shape[-1]} does not match the model's residual width "
                             f"{layout.d_model}")
        if source.ndim == 2 and source.shape[0] != layout.n_positions:
            raise ValueError(f"vectors have {source.shape[0]} rows but the model has {layout.n_positions} "
                             f"residual layers (embeddings + {layout.n_layers} blocks)")
    return source


def _load_path(path: Path, model) -> TraitVectors | Tensor:
    if path.suffix == ".pt":
        if not path.is_file():
            raise FileNotFoundError(f"no vector file at {path}")
        try:
            tensor = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle, zip and torch errors of a damaged or foreign file
            # (torch's own message is many lines of advice about weights_only; the type says enough)
            raise ValueError(f"{path}: not a torch tensor file that loads safely ({type(exc).__name__}); "
                             "save a plain tensor with torch.save(tensor, path)") from None
        if not isinstance(tensor, Tensor):
            raise ValueError(f"{path} does not hold a tensor (found {type(tensor).__name__})")
        _check_tensor(tensor, str(path))
        # A single direction stays a tensor; a [n_layers + 1, d_model] table is the paper's format.
        return tensor if tensor.ndim == 1 else load_foreign(path, model=model)
    return load_foreign(path, model=model) or TraitVectors.load(path)


def _check_tensor(tensor: Tensor, name: str) -> Tensor:
    check_dtype(tensor, name)
    if tensor.ndim not in (1, 2) or tensor.shape[-1] == 0:
        raise ValueError(f"{name} must be a [d_model] or [n_layers + 1, d_model] tensor, got shape "
                         f"{tuple(tensor.shape)}")
    if tensor.ndim == 1 and not torch.isfinite(tensor).all():
        raise ValueError(f"{name} contains NaN or inf values")
    bad = first_nonfinite_row(tensor) if tensor.ndim == 2 else None
    if bad is not None:
        raise ValueError(f"{name} contains NaN or inf values at layer {bad} (row {bad})")
    return tensor


def pick_layer(vectors: VectorSource | None, layer: int | None) -> int:
    """``layer`` if given, else the vectors' recommended layer, else a clear error."""
    if layer is not None:
        return layer
    if isinstance(vectors, TraitVectors) and vectors.recommended_layer is not None:
        return int(vectors.recommended_layer)
    raise ValueError("no layers given and the vectors have no recommended layer: pass a layer")


def resolve_vector(
    source: VectorSource, layer: int, *, kind: str | None = None, d_model: int | None = None
) -> Tensor:
    """One [d_model] direction at ``layer`` from anything ``load_vectors`` accepts."""
    source = load_vectors(source)
    if isinstance(source, TraitVectors):
        vec = source.get(layer, kind)
    elif source.ndim == 2:
        if not -source.shape[0] <= layer < source.shape[0]:
            raise ValueError(f"layer {layer} is out of range: the vector tensor has {source.shape[0]} rows "
                             f"(layers 0..{source.shape[0] - 1})")
        vec = source[layer]
    else:
        vec = source
    return check_vector(vec.detach(), d_model, name=f"vector for layer {layer}")
