"""Where the residual stream lives in common decoder architectures.

Layer indices follow ``output_hidden_states``: index 0 is the embedding output and index ``L`` (1..n) the
output of decoder block ``L - 1``. The last index is taken after the final norm, as transformers reports it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

# model_type -> (path to the decoder blocks, path to the final norm)
_LAYOUTS: dict[str, tuple[str, str]] = {
    "llama": ("model.layers", "model.norm"),
    "mistral": ("model.layers", "model.norm"),
    "mixtral": ("model.layers", "model.norm"),
    "qwen2": ("model.layers", "model.norm"),
    "qwen3": ("model.layers", "model.norm"),
    "gemma": ("model.layers", "model.norm"),
    "gemma2": ("model.layers", "model.norm"),
    "gemma3_text": ("model.layers", "model.norm"),
    "phi3": ("model.layers", "model.norm"),
    "olmo2": ("model.layers", "model.norm"),
    "gpt2": ("transformer.h", "transformer.ln_f"),
    "gpt_neox": ("gpt_neox.layers", "gpt_neox.final_layer_norm"),
    "opt": ("model.decoder.layers", "model.decoder.final_layer_norm"),
}


def _get(module: nn.Module, path: str) -> nn.Module | None:
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


@dataclass(frozen=True)
class Layout:
    """The decoder blocks and final norm of a model, with its depth and width."""

    blocks: nn.ModuleList
    final_norm: nn.Module
    body: nn.Module  # the module that owns the blocks; its forward starts each pass
    n_layers: int
    d_model: int

    @property
    def n_positions(self) -> int:
        """Number of residual-stream indices: embeddings plus one per block."""
        return self.n_layers + 1

    def check_layer(self, layer: int, *, allow_embeddings: bool = True) -> int:
        low = 0 if allow_embeddings else 1
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise ValueError(f"layer must be an int, got {layer!r}")
        given = layer
        if layer < 0:
            layer += self.n_positions
        if not low <= layer <= self.n_layers:
            raise ValueError(
                f"layer {given} is out of range: this model has {self.n_layers} blocks, so residual-stream "
                f"layers run from {low} to {self.n_layers} (0 = embeddings, L = output of block L-1)"
            )
        return layer


def get_layout(model: nn.Module) -> Layout:
    """Find the blocks and final norm of ``model`` or raise a clear error for unknown architectures."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    paths = _LAYOUTS.get(model_type or "")
    if paths is None:
        raise NotImplementedError(
            f"architecture {model_type!r} ({type(model).__name__}) is not supported; supported model types: "
            f"{', '.join(sorted(_LAYOUTS))}"
        )
    blocks = _get(model, paths[0])
    norm = _get(model, paths[1])
    if not isinstance(blocks, nn.ModuleList) or norm is None:
        raise NotImplementedError(f"{type(model).__name__} does not have the expected {paths[0]} / {paths[1]}")
    body = _get(model, paths[0].rsplit(".", 1)[0])
    d_model = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if model_type == "opt" and config.word_embed_proj_dim != config.hidden_size:
        # project_in/project_out change the width at both ends (e.g. OPT-350m): no single d_model fits.
        raise NotImplementedError(
            f"OPT with word_embed_proj_dim ({config.word_embed_proj_dim}) != hidden_size ({config.hidden_size}) "
            "is not supported"
        )
    return Layout(blocks=blocks, final_norm=norm, body=body, n_layers=len(blocks), d_model=int(d_model))
