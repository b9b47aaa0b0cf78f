"""Sparse autoencoders in SAELens's folder format: read, write, encode, decode, and latents as vectors.

The format (what ``sae_lens.SAE.load_from_disk`` reads, so SAELens, its dashboards and Neuronpedia's tools load
the folders steerlib writes, and steerlib uses published SAEs on disk unchanged):

- ``cfg.json``: ``d_in``, ``d_sae``, ``architecture`` ("topk", or "standard" for a ReLU SAE), ``k`` (topk),
  ``dtype``, ``device``, ``apply_b_dec_to_input``, ``normalize_activations``, ``reshape_activations``,
  ``metadata`` (``hook_name``, ``model_name``, ...);
- ``sae_weights.safetensors``: ``W_enc`` [d_in, d_sae], ``W_dec`` [d_sae, d_in], ``b_enc`` [d_sae],
  ``b_dec`` [d_in].

The definition, for an activation ``x`` [.., d_in]: ``pre = (x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc``;
"topk" keeps the ``k`` largest entries of ``pre`` (through a ReLU) and zeroes the rest, "standard" is
``relu(pre)``; the reconstruction is ``f @ W_dec + b_dec``.

Layer names: steerlib layer ``L`` (``output_hidden_states[L]``, the output of block ``L - 1``) is hook
``model.layers.{L-1}`` (an HF module's output), TransformerLens's ``blocks.{L-1}.hook_resid_post`` or
``blocks.{L}.hook_resid_pre``. A latent is a direction like any vector: ``sae:<folder>#<id>`` names decoder row
``id`` at the SAE's layer wherever vectors are accepted (``steerlib.core.loading.load_vectors``).

This module lives in ``core`` because the one vector loader reads it; training and analysis are in
``steerlib.sae``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from steerlib.core.checks import load_json
from steerlib.core.vectors import TraitVectors, check_dtype_of, read_safetensors

__all__ = ["CFG_FILE", "WEIGHTS_FILE", "SparseAutoencoder", "hook_name_for", "latent_vectors", "layer_of_hook",
           "load_sae", "parse_sae_spec"]

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
ARCHITECTURES = ("topk", "standard")
SPEC_PREFIX = "sae:"

_HF_HOOK = re.compile(r"model\.layers\.(\d+)")
_TL_POST = re.compile(r"blocks\.(\d+)\.hook_resid_post")
_TL_PRE = re.compile(r"blocks\.(\d+)\.hook_resid_pre")


def hook_name_for(layer: int) -> str:
    """SAELens ``metadata.hook_name`` of steerlib layer ``layer`` (the output of HF block ``layer - 1``)."""
    if layer < 1:
        raise ValueError(f"an SAE reads a block's output: layer must be >= 1, got {layer}")
    return f"model.layers.{layer - 1}"


def layer_of_hook(hook_name: object, where: str | Path) -> int:
    """steerlib layer of an HF or TransformerLens residual hook name; other hooks are refused in one line."""
    name = str(hook_name)
    for pattern, shift in ((_HF_HOOK, 1), (_TL_POST, 1), (_TL_PRE, 0)):
        match = pattern.fullmatch(name)
        if match:
            return int(match.group(1)) + shift
    raise ValueError(f"{where}: hook_name {hook_name!r} is not a residual-stream hook steerlib reads "
                     "(model.layers.N, blocks.N.hook_resid_post or blocks.N.hook_resid_pre)")


@dataclass(frozen=True)
class SparseAutoencoder:
    """A sparse autoencoder on the residual stream at one steerlib layer (a value: tensors are private copies).

    Attributes:
        W_enc: [d_in, d_sae]; W_dec: [d_sae, d_in]; b_enc: [d_sae]; b_dec: [d_in].
        architecture: "topk" or "standard" (ReLU).
        k: active latents per token ("topk").
        layer: steerlib layer whose residual stream it encodes.
        apply_b_dec_to_input: subtract ``b_dec`` before encoding (SAELens's default).
        metadata: the rest of ``cfg.json``'s metadata (model name, training settings, quality numbers...).
    """

    W_enc: Tensor
    W_dec: Tensor
    b_enc: Tensor
    b_dec: Tensor
    architecture: str
    k: int | None
    layer: int
    apply_b_dec_to_input: bool = True
    metadata: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture {self.architecture!r} is not supported; choose from {ARCHITECTURES}")
        d_in, d_sae = self.W_enc.shape if self.W_enc.ndim == 2 else (0, 0)
        shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,)}
        for name, shape in shapes.items():
            got = tuple(getattr(self, name).shape)
            if got != shape or 0 in shape:
                raise ValueError(f"{name} has shape {got}, expected {shape} (W_enc [d_in, d_sae])")
        if self.architecture == "topk" and (self.k is None or not 1 <= self.k <= d_sae):
            raise ValueError(f"a topk SAE needs 1 <= k <= d_sae ({d_sae}), got k={self.k}")
        for name in shapes:
            object.__setattr__(self, name, getattr(self, name).detach().float().clone())
        object.__setattr__(self, "metadata", json.loads(json.dumps(self.metadata or {})))

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    def pre_activations(self, x: Tensor) -> Tensor:
        """[.., d_in] -> [.., d_sae] encoder pre-activations."""
        if x.shape[-1] != self.d_in:
            raise ValueError(f"activations have width {x.shape[-1]} but the SAE reads width {self.d_in}")
        x = x.float()
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def encode(self, x: Tensor) -> Tensor:
        """[.., d_in] -> [.., d_sae] latent activations (dense, mostly zeros)."""
        pre = self.pre_activations(x)
        if self.architecture == "standard":
            return torch.relu(pre)
        values, indices = pre.topk(self.k, dim=-1)  # type: ignore[arg-type]
        return torch.zeros_like(pre).scatter_(-1, indices, values.relu())

    def decode(self, latents: Tensor) -> Tensor:
        """[.., d_sae] -> [.., d_in] reconstruction."""
        return latents.float() @ self.W_dec + self.b_dec

    def reconstruct(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    def direction(self, latent: int) -> Tensor:
        """Decoder row ``latent`` [d_in] (a copy)."""
        if isinstance(latent, bool) or not isinstance(latent, int) or not 0 <= latent < self.d_sae:
            raise ValueError(f"latent {latent!r} is out of range: this SAE has latents 0..{self.d_sae - 1}")
        return self.W_dec[latent].clone()

    def unit_decoder(self) -> Tensor:
        """[d_sae, d_in] decoder rows scaled to unit norm."""
        return self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def cfg(self) -> dict[str, Any]:
        """The ``cfg.json`` object SAELens reads."""
        cfg: dict[str, Any] = {
            "architecture": self.architecture, "d_in": self.d_in, "d_sae": self.d_sae, "dtype": "float32",
            "device": "cpu", "apply_b_dec_to_input": self.apply_b_dec_to_input, "normalize_activations": "none",
            "reshape_activations": "none",
            "metadata": {**(self.metadata or {}), "hook_name": hook_name_for(self.layer)},
        }
        if self.architecture == "topk":
            cfg["k"] = self.k
            cfg["rescale_acts_by_decoder_norm"] = False
        return cfg

    def save(self, folder: str | Path) -> Path:
        """Write ``cfg.json`` + ``sae_weights.safetensors`` into ``folder`` (SAELens's format)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({name: getattr(self, name).contiguous() for name in ("W_enc", "W_dec", "b_enc", "b_dec")},
                  str(folder / WEIGHTS_FILE))
        (folder / CFG_FILE).write_text(json.dumps(self.cfg(), indent=2))
        return folder


def load_sae(folder: str | Path) -> SparseAutoencoder:
    """Read a SAELens-format folder (written by steerlib or by SAELens); unsupported settings fail in one line."""
    folder = Path(folder)
    cfg_path, weights_path = folder / CFG_FILE, folder / WEIGHTS_FILE
    if not cfg_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(f"no SAE at {folder} (expected {CFG_FILE} and {WEIGHTS_FILE})")
    cfg = load_json(cfg_path, "SAE config")
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_path}: an SAE config must be a JSON object, got {type(cfg).__name__}")
    architecture = cfg.get("architecture", "standard")
    if architecture not in ARCHITECTURES:
        raise ValueError(f"{cfg_path}: architecture {architecture!r} is not supported; steerlib reads "
                         f"{', '.join(ARCHITECTURES)}")
    for key, fine in (("normalize_activations", "none"), ("reshape_activations", "none")):
        if cfg.get(key, fine) != fine:
            raise ValueError(f"{cfg_path}: {key} {cfg[key]!r} is not supported (steerlib reads SAEs with "
                             f"{key} 'none')")
    if cfg.get("rescale_acts_by_decoder_norm"):
        raise ValueError(f"{cfg_path}: rescale_acts_by_decoder_norm is not supported")
    metadata = cfg.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise ValueError(f"{cfg_path}: metadata must be a JSON object, got {type(metadata).__name__}")
    hook = metadata.get("hook_name", cfg.get("hook_name"))
    if hook is None:
        raise ValueError(f"{cfg_path}: no metadata.hook_name: cannot tell which layer the SAE reads")
    tensors = read_safetensors(weights_path)
    missing = [name for name in ("W_enc", "W_dec", "b_enc", "b_dec") if name not in tensors]
    if missing:
        raise ValueError(f"{weights_path}: missing tensors {missing}")
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        check_dtype_of(tensors[name], weights_path, name)
    for name, key in (("W_enc", "d_in"), ("W_enc", "d_sae")):
        want = cfg.get(key)
        got = tensors[name].shape[0 if key == "d_in" else 1] if tensors[name].ndim == 2 else None
        if want is not None and got != want:
            raise ValueError(f"{weights_path}: W_enc has shape {tuple(tensors['W_enc'].shape)}, but cfg.json says "
                             f"d_in={cfg.get('d_in')} d_sae={cfg.get('d_sae')}")
    try:
        return SparseAutoencoder(
            W_enc=tensors["W_enc"], W_dec=tensors["W_dec"], b_enc=tensors["b_enc"], b_dec=tensors["b_dec"],
            architecture=architecture, k=cfg.get("k"), layer=layer_of_hook(hook, cfg_path),
            apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
            metadata={k: v for k, v in metadata.items() if k != "hook_name"})
    except ValueError as exc:
        raise ValueError(f"{folder}: {exc}") from None


def parse_sae_spec(spec: str) -> tuple[Path, int]:
    """``sae:<folder>#<id>`` -> (folder, latent id); anything else fails in one line."""
    body = spec[len(SPEC_PREFIX):] if spec.startswith(SPEC_PREFIX) else None
    folder, sep, latent = (body or "").rpartition("#")
    if body is None or not sep or not folder or not latent.isdigit():
        raise ValueError(f"{spec!r} is not an SAE latent: write sae:<folder>#<latent id>, e.g. sae:runs/sae#12")
    return Path(folder), int(latent)


def latent_vectors(spec: str, model=None) -> TraitVectors:
    """The decoder row named by ``sae:<folder>#<id>`` as ``TraitVectors`` with the SAE's layer recommended.

    The table has one row per residual layer of ``model`` (without a model: of the depth the SAE's metadata
    records as ``n_layers``, else up to the SAE's layer; ``load_vectors`` re-reads it at a model's depth); every
    row but the SAE's layer is zero, so the latent steers and reads out only where the SAE was trained.
    """
    folder, latent = parse_sae_spec(spec)
    sae = load_sae(folder)
    n_positions = max(sae.layer, int(sae.metadata.get("n_layers") or 0)) + 1  # the model's depth when recorded
    if model is not None:
        from steerlib.core.arch import get_layout

        layout = get_layout(model)
        if sae.layer > layout.n_layers:
            raise ValueError(f"{folder}: the SAE reads layer {sae.layer} but the model has {layout.n_layers} blocks")
        n_positions = layout.n_positions
    table = torch.zeros(n_positions, sae.d_in)
    table[sae.layer] = sae.direction(latent)
    name = f"{folder.name}#{latent}"
    return TraitVectors(vectors={"response_mean": table}, model_name=str(sae.metadata.get("model_name", "unknown")),
                        trait=name, method="sae_latent",
                        metadata={"source": "sae latent", "path": str(folder), "latent": latent,
                                  "recommended_layer": sae.layer})
