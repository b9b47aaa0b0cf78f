"""Where the residual stream lives in a decoder-only causal LM, found from the model's structure and config.

Layer indices (defined once, in ``steerlib.core.hooks``): index 0 is the embedding output (the input of the first
decoder block) and index ``L`` (1..n) the output of decoder block ``L - 1``, the last one before the final norm.

Discovery, without a per-architecture table:

1. the text config (``config.get_text_config()``, so a vision-language model gives its language tower) says how
   many decoder blocks there are (``num_hidden_layers``) and how wide the stream is (``hidden_size``);
2. the decoder blocks are the ``nn.ModuleList`` of exactly that length inside the model's decoder
   (``model.get_decoder()``); when several lists have that length, the one holding the most parameters (the blocks,
   not per-layer side projections) wins, and lists inside vision/audio towers are never considered;
3. the module that owns that list is the ``body`` (its forward starts each pass);
4. the final norm is the norm module the body registers after its blocks (``norm``, ``ln_f``,
   ``final_layernorm``, ...). A body without one reports its last block's output as the last layer.

``_EXPLICIT`` keeps a path only where that search is ambiguous; ``_UNSUPPORTED`` names the architectures whose
residual stream is not one ``[batch, seq, d_model]`` tensor between blocks, with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

# model_type -> (path to the decoder blocks, path to the final norm or "" for none), only where the structural
# search would pick wrongly.
_EXPLICIT: dict[str, tuple[str, str]] = {}

# model_type -> why steerlib's layer convention (one residual tensor per block boundary) does not apply.
# Found by building every causal-LM type of transformers 5.24 tiny (tests/test_all_archs.py).
_UNSUPPORTED: dict[str, str] = {
    "nanochat": "one norm module is applied to the embeddings and after the last block, so the last layer "
                "cannot be read from a hook on it",
    "openai-gpt": "its blocks return a list, not a tensor or tuple",
    "xlnet": "the stream is laid out [seq, batch, d_model] and split in two (content and query streams)",
    "xlm": "it has no block modules: attention, norms and FFNs sit in parallel ModuleLists",
    "deepseek_v4": "hyper-connections: the residual is several streams [batch, seq, n_streams, d_model]",
    "hy_v4": "hyper-connections: the residual is several streams [batch, seq, n_streams, d_model]",
    "inkling2_text": "block attention residuals: each block also reads a separate stack of block states",
    "inkling2_loop_text": "block attention residuals: each block also reads a separate stack of block states",
}

# Sub-modules that hold non-text towers; their block lists are never the language model's residual stream.
_OTHER_TOWERS = ("vision", "visual", "audio", "image", "speech", "vqmodel", "vq_model", "perceiver", "encoder")

_LAYER_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers")
_WIDTH_KEYS = ("hidden_size", "n_embd", "d_model", "dim")


def _get(module: nn.Module, path: str) -> nn.Module | None:
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def text_config(config: object) -> object:
    """The language-model part of a config (itself for text-only models)."""
    getter = getattr(config, "get_text_config", None)
    if not callable(getter):
        return config
    try:
        return getter(decoder=True)
    except (TypeError, ValueError):
        return getter()


def _config_int(config: object, keys: tuple[str, ...]) -> int | None:
    for key in keys:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def config_depth(config: object) -> int | None:
    """The number of decoder blocks a model config declares (its language tower's, for a multimodal one), or
    None where it names none; read without building the model (``get_layout`` reads the same keys)."""
    return _config_int(text_config(config), _LAYER_KEYS)


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm | nn.RMSNorm) or "norm" in type(module).__name__.lower()


@dataclass(frozen=True)
class Layout:
    """The decoder blocks and final norm of a model, with its depth and width.

    Attributes:
        blocks: the decoder blocks; block ``L - 1`` outputs residual layer ``L``.
        final_norm: the final norm (whose output transformers reports as ``output_hidden_states[n_layers]``; steerlib's
            layer ``n_layers`` is its input), or the last block for a body without one.
        body: the module that owns the blocks; its forward starts each pass.
        n_layers: number of blocks.
        d_model: width of the residual stream.
        embedding: the token embedding (``model.get_input_embeddings()``), or None where the model has none.
    """

    blocks: nn.ModuleList
    final_norm: nn.Module
    body: nn.Module
    n_layers: int
    d_model: int
    embedding: nn.Module | None = None

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


def _search_root(model: nn.Module) -> nn.Module:
    """The decoder of ``model`` (``get_decoder()``), so the search skips heads and other towers."""
    getter = getattr(model, "get_decoder", None)
    if callable(getter):
        try:
            decoder = getter()
        except (AttributeError, NotImplementedError, ValueError):
            decoder = None
        if isinstance(decoder, nn.Module):
            return decoder
    return model


def _find_blocks(model: nn.Module, n_layers: int, model_type: str) -> tuple[nn.ModuleList, nn.Module]:
    """The ModuleList of ``n_layers`` blocks and the module that owns it."""
    candidates: list[tuple[int, int, str, nn.ModuleList, nn.Module]] = []
    for root in (_search_root(model), model):
        for name, module in root.named_modules():
            if not isinstance(module, nn.ModuleList) or len(module) != n_layers:
                continue
            parts = name.split(".")
            if any(tower in part.lower() for part in parts[:-1] for tower in _OTHER_TOWERS):
                continue
            owner = root.get_submodule(".".join(parts[:-1])) if len(parts) > 1 else root
            candidates.append((_n_params(module), -len(parts), name, module, owner))
        if candidates:
            break
    if not candidates:
        raise NotImplementedError(
            f"architecture {model_type!r} ({type(model).__name__}): no list of {n_layers} decoder blocks "
            f"(the configured number of layers) was found"
        )
    # Most parameters first (the blocks, not per-layer side modules), then the shallowest path.
    candidates.sort(key=lambda c: (c[0], c[1]), reverse=True)
    return candidates[0][3], candidates[0][4]


def _find_final_norm(body: nn.Module, blocks: nn.ModuleList) -> nn.Module | None:
    """The body's final norm: the first norm registered after its block list (``norm``, ``ln_f``...), else its
    only norm that is not an embedding norm (OPT registers ``final_layer_norm`` before ``layers``)."""
    seen_blocks = False
    before: list[nn.Module] = []
    for name, child in body.named_children():
        if child is blocks:
            seen_blocks = True
        elif _is_norm(child):
            if seen_blocks:
                return child
            if "emb" not in name.lower():
                before.append(child)
    return before[0] if len(before) == 1 else None


def get_layout(model: nn.Module) -> Layout:
    """Find the blocks and final norm of ``model`` or raise a clear error naming its model type.

    Args:
        model: a decoder-only causal LM (or its base model) from transformers.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None) or type(model).__name__
    name = f"{model_type!r} ({type(model).__name__})"
    if model_type in _UNSUPPORTED:
        raise NotImplementedError(f"architecture {name} is not supported: {_UNSUPPORTED[model_type]}")
    if config is None:
        raise NotImplementedError(f"{type(model).__name__} has no config: cannot find its decoder blocks")
    text = text_config(config)
    text_type = getattr(text, "model_type", None) or model_type
    if getattr(text, "is_encoder_decoder", False):
        raise NotImplementedError(f"architecture {name} is encoder-decoder; steerlib needs a decoder-only model")
    n_layers = _config_int(text, _LAYER_KEYS)
    d_model = _config_int(text, _WIDTH_KEYS)
    if n_layers is None or d_model is None:
        raise NotImplementedError(
            f"architecture {name}: the config gives no number of layers or hidden size "
            f"(looked for {', '.join(_LAYER_KEYS)} and {', '.join(_WIDTH_KEYS)})"
        )
    explicit = _EXPLICIT.get(text_type) or _EXPLICIT.get(model_type)
    if explicit is not None:
        blocks = _get(model, explicit[0])
        if not isinstance(blocks, nn.ModuleList):
            raise NotImplementedError(f"architecture {name}: expected decoder blocks at {explicit[0]}")
        body = _get(model, explicit[0].rsplit(".", 1)[0]) if "." in explicit[0] else model
        norm = _get(model, explicit[1]) if explicit[1] else None
    else:
        blocks, body = _find_blocks(model, n_layers, model_type)
        norm = _find_final_norm(body, blocks)
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    width = getattr(embedding, "embedding_dim", None)
    if isinstance(width, int) and width != d_model:
        # A projection between embedding and blocks (e.g. OPT-350m's project_in) changes the width: no single
        # d_model describes every layer.
        raise NotImplementedError(
            f"architecture {name}: embedding width {width} differs from hidden size {d_model} "
            "(a projection changes the residual width), which is not supported"
        )
    return Layout(blocks=blocks, final_norm=norm if norm is not None else blocks[-1], body=body,
                  n_layers=len(blocks), d_model=d_model, embedding=embedding)
