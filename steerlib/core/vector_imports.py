"""Vectors made by other tools, read as ``TraitVectors`` with steerlib's layer meaning.

Layer conventions (steerlib layer ``L``: 0 = embeddings, ``L`` = output of block ``L - 1``, the top one before the
final norm; ``output_hidden_states[L]`` below the top):

- **Persona Vectors paper repository** (``{trait}_response_avg_diff.pt`` and friends): one tensor
  ``[n_layers + 1, d_model]`` whose row ``i`` is the difference of means of ``hidden_states[i]``, i.e. the same
  indexing as steerlib: row ``i`` -> layer ``i`` (the last row was read after the final norm, steerlib's top
  layer is before it). Loaded with ``torch.load(..., weights_only=True)``. The file-name
  suffix gives the pooling: ``response_avg_diff`` -> ``response_mean``, ``prompt_avg_diff`` -> ``prompt_mean``,
  ``prompt_last_diff`` -> ``prompt_last``.
- **saklas profiles** (``name.safetensors`` + ``name.json`` sidecar, written by ``saklas.core.profile.save_profile``):
  one float32 ``[d_model]`` tensor per key ``layer_{i}``, where ``i`` indexes ``model.layers`` and saklas steers
  with a forward hook on ``layers[i]``, i.e. the output of block ``i``: ``layer_i`` -> steerlib layer ``i + 1``.
  The vectors are "baked" (saklas multiplies per-layer weights in), so they are used as given.
- **llama.cpp control vectors** (``.gguf``): see ``steerlib.core.gguf_vectors`` (``direction.N`` -> layer ``N + 1``).

``load_foreign(path)`` picks the reader from the file; ``TraitVectors.load`` calls it for these files.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import torch

from steerlib.core.checks import load_json
from steerlib.core.limits import MAX_LAYERS, check_size, check_table
from steerlib.core.vectors import TraitVectors, check_dtype_of, first_nonfinite_row, read_safetensors

Format = Literal["gguf", "persona_vectors", "saklas"]

_PAPER_KINDS = {"response_avg_diff": "response_mean", "prompt_avg_diff": "prompt_mean",
                "prompt_last_diff": "prompt_last"}
_SAKLAS_KEY = re.compile(r"layer_(0|[1-9][0-9]*)")


def detect_format(path: str | Path) -> Format | None:
    """Which foreign format ``path`` holds, or None for steerlib's own files."""
    path = Path(path)
    if path.suffix == ".gguf":
        return "gguf"
    if path.suffix == ".pt":
        return "persona_vectors"
    if path.suffix == ".safetensors" and path.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
        except Exception:  # noqa: BLE001 - not readable as safetensors: the steerlib reader says why, in one line
            return None
        if keys and all(_SAKLAS_KEY.fullmatch(k) for k in keys):
            return "saklas"
    return None


def _model_n_layers(model) -> int | None:
    if model is None:
        return None
    from steerlib.core.arch import get_layout

    return get_layout(model).n_layers


def load_persona_vectors(path: str | Path, *, model=None, trait: str | None = None,
                         model_name: str = "unknown") -> TraitVectors:
    """Load a Persona Vectors paper ``.pt`` file (``[n_layers + 1, d_model]``, row i = ``hidden_states[i]``).

    Args:
        path: the ``.pt`` file, e.g. ``evil_response_avg_diff.pt``.
        model: optional HF model to check width and depth against.
        trait: trait name (default: the file name before the pooling suffix).
        model_name: the model the vectors came from (the file does not say).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no vector file at {path}")
    try:
        table = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle errors have many types; report them in one line
        raise ValueError(f"{path}: cannot load as a tensor with weights_only=True ({type(exc).__name__}: {exc})") from None
    if not isinstance(table, torch.Tensor) or table.ndim != 2:
        shape = tuple(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__
        raise ValueError(f"{path}: expected a tensor [n_layers + 1, d_model], got {shape}")
    check_dtype_of(table, path)
    check_table(table.shape[0], table.shape[1], path, "the tensor")
    check_size(table.shape[0] - 1, "row count - 1 (blocks)", path, MAX_LAYERS)
    bad = first_nonfinite_row(table)
    if bad is not None:
        raise ValueError(f"{path}: row {bad} (layer {bad}) contains NaN or inf values")
    stem = path.stem
    kind, name = "response_mean", stem
    for suffix, k in _PAPER_KINDS.items():
        if stem.endswith("_" + suffix):
            kind, name = k, stem[: -len(suffix) - 1]
    n_layers = _model_n_layers(model)
    if n_layers is not None and table.shape[0] != n_layers + 1:
        raise ValueError(f"{path}: {table.shape[0]} rows, but the model needs n_layers + 1 = {n_layers + 1} "
                         "(row i = hidden_states[i], row 0 = embeddings)")
    tv = TraitVectors(vectors={kind: table.float()}, model_name=model_name, trait=trait or name,
                      method="persona_vectors_import", metadata={"source": "persona vectors .pt", "path": str(path)})
    if model is not None:
        tv.check_model(model)
    return tv


def load_saklas_profile(path: str | Path, *, model=None, n_layers: int | None = None,
                        trait: str | None = None) -> TraitVectors:
    """Load a saklas profile (``layer_{i}`` tensors = output of block ``i`` -> steerlib layer ``i + 1``).

    Args:
        path: the profile's ``.safetensors`` (its ``.json`` sidecar, if present, supplies provenance).
        model: optional HF model; fixes the depth and checks width.
        n_layers: number of blocks when no model is given (default: the deepest profile layer + 1).
        trait: trait name (default: the sidecar's ``concept``/``name`` or the file stem).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no saklas profile at {path}")
    tensors = read_safetensors(path)
    blocks: dict[int, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if not _SAKLAS_KEY.fullmatch(key):
            raise ValueError(f"{path}: key {key!r} is not a saklas profile key layer_<i>")
        block = check_size(int(key.removeprefix("layer_")), f"the layer index of {key}", path,
                           MAX_LAYERS - 1)
        if tensor.ndim != 1 or tensor.shape[0] == 0:
            raise ValueError(f"{path}: {key} has shape {tuple(tensor.shape)}, expected [d_model]")
        check_dtype_of(tensor, path, key)
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{path}: {key} (steerlib layer {block + 1}) contains NaN or inf values")
        blocks[block] = tensor.float()
    if not blocks:
        raise ValueError(f"{path}: no layer_<i> tensors")
    widths = {t.shape[0] for t in blocks.values()}
    if len(widths) != 1:
        raise ValueError(f"{path}: layers have different widths {sorted(widths)}")
    if n_layers is not None:
        check_size(n_layers, "n_layers", path, MAX_LAYERS, minimum=1)
    n_layers = _model_n_layers(model) or n_layers or max(blocks) + 1
    if max(blocks) + 1 > n_layers:
        raise ValueError(f"{path}: layer_{max(blocks)} is block {max(blocks)}, past the model's {n_layers} blocks")
    width = widths.pop()
    check_table(n_layers + 1, width, path, "the layer tensors")
    table = torch.zeros(n_layers + 1, width)
    for block, tensor in blocks.items():
        table[block + 1] = tensor
    info, provenance = _saklas_sidecar(path.with_suffix(".json"))
    name = trait or provenance.get("concept") or provenance.get("name") or path.stem
    layers = sorted(b + 1 for b in blocks)
    metadata = {"source": "saklas profile", "path": str(path), "layers": layers, "saklas": info}
    if len(layers) == 1:
        metadata["recommended_layer"] = layers[0]
    tv = TraitVectors(vectors={"response_mean": table}, model_name=provenance.get("model_id", "unknown"),
                      trait=str(name), method="saklas_import", metadata=metadata)
    if model is not None:
        tv.check_model(model)
    return tv


def _saklas_sidecar(sidecar: Path) -> tuple[dict, dict]:
    """The sidecar's JSON object and its ``provenance`` object (empty when absent); other shapes name the file."""
    if not sidecar.is_file():
        return {}, {}
    info = load_json(sidecar, "saklas sidecar")
    if not isinstance(info, dict):
        raise ValueError(f"{sidecar}: a saklas sidecar must be a JSON object, got {type(info).__name__}")
    provenance = info.get("provenance", {})
    if not isinstance(provenance, dict):
        raise ValueError(f"{sidecar}: provenance must be a JSON object, got {type(provenance).__name__}")
    for key in ("concept", "name", "model_id"):
        if key in provenance and not isinstance(provenance[key], str):
            raise ValueError(f"{sidecar}: provenance.{key} must be a string, got {type(provenance[key]).__name__}")
    return info, provenance


def load_foreign(path: str | Path, *, model=None) -> TraitVectors | None:
    """Read ``path`` if it is a foreign format (GGUF control vector, paper ``.pt``, saklas profile), else None."""
    fmt = detect_format(path)
    if fmt == "gguf":
        from steerlib.core.gguf_vectors import read_control_vector

        return read_control_vector(path, model=model)
    if fmt == "persona_vectors":
        return load_persona_vectors(path, model=model)
    if fmt == "saklas":
        return load_saklas_profile(path, model=model)
    return None
