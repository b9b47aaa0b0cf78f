"""Three ways to read the residual stream, behind one function.

Each backend takes a padded batch and returns ``layer -> [B, T, d_model]`` for the requested layers, layers as
``steerlib.core.hooks`` defines them (the top layer before the final norm). "torch" uses plain forward hooks (and
stops after the deepest layer), "transformer_lens" wraps the model in a TransformerLens 4.x ``TransformerBridge``, "nnsight" in an nnsight 0.8
``TransformersModel`` (the 0.8 name of ``LanguageModel``). The wrappers are built once per model and reused.
"""

from __future__ import annotations

import contextlib
import copy
import weakref
from collections.abc import Callable, Sequence
from importlib.util import find_spec

import torch
from torch import Tensor, nn

from steerlib.core.arch import get_layout
from steerlib.core.hooks import StopForward, record_residual, residual_site

BackendFn = Callable[[nn.Module, object, Tensor, Tensor, Tensor, Sequence[int]], dict[int, Tensor]]

_wrappers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def require_extra(module: str, package: str) -> None:
    """A one-line error naming the ``interop`` extra when TransformerLens or nnsight is missing."""
    if find_spec(module) is None:
        raise ImportError(f"{package} is not installed: pip install 'steerlib[interop]' (or pip install {package})")


def _wrapper(model: nn.Module, kind: str, build: Callable[[], object]) -> object:
    per_model = _wrappers.setdefault(model, {})
    if kind not in per_model:
        per_model[kind] = build()
    return per_model[kind]


@torch.inference_mode()
def _torch_backend(model, tokenizer, ids, mask, positions, layers, *, truncate: bool = True) -> dict[int, Tensor]:
    # truncate=False runs every block (for benchmarking the saving); the vocabulary projection is skipped.
    extra = {} if truncate else {"logits_to_keep": 1}
    with record_residual(model, layers, to_cpu=False, stop_after_last=truncate) as records:
        with contextlib.suppress(StopForward):
            model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, **extra)
    return {layer: recs[0] for layer, recs in records.items()}


def tl_hook_name(layer: int) -> str:
    """TransformerLens hook point of residual layer ``layer`` (block input for 0, else block ``layer - 1``'s output)."""
    return "blocks.0.hook_resid_pre" if layer == 0 else f"blocks.{layer - 1}.hook_resid_post"


@torch.inference_mode()
def _transformer_lens_backend(model, tokenizer, ids, mask, positions, layers) -> dict[int, Tensor]:
    require_extra("transformer_lens", "transformer-lens")
    from transformer_lens.model_bridge import TransformerBridge

    def build():
        # The bridge rewires the model it is given in place (swaps blocks for bridge modules, adds hooks,
        # forces eager attention), so hand it a twin that shares the weights instead of the caller's model.
        memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
        twin = copy.deepcopy(model, memo)
        return TransformerBridge.boot_transformers(
            str(model.config.name_or_path or "model"), hf_model=twin, tokenizer=tokenizer,
            device=str(next(model.parameters()).device),
        )

    bridge = _wrapper(model, "transformer_lens", build)
    names = {tl_hook_name(layer): layer for layer in layers}
    _, cache = bridge.run_with_cache(
        ids, attention_mask=mask, position_ids=positions, names_filter=lambda name: name in names
    )
    return {layer: cache[name] for name, layer in names.items()}


def envoy_at(root, path: str):
    """The nnsight envoy (or module) at dotted ``path`` under ``root``."""
    for part in path.split("."):
        root = getattr(root, part)
    return root


def module_path(model: nn.Module, target: nn.Module) -> str:
    """Dotted name of ``target`` inside ``model``."""
    for name, module in model.named_modules():
        if module is target:
            return name
    raise LookupError("module not found in model")


def _nnsight_backend(model, tokenizer, ids, mask, positions, layers) -> dict[int, Tensor]:
    require_extra("nnsight", "nnsight")
    from nnsight import TransformersModel  # nnsight 0.8's name (LanguageModel is deprecated there)

    lm = _wrapper(model, "nnsight", lambda: TransformersModel(model, tokenizer=tokenizer, task="text-generation"))
    layout = get_layout(model)
    paths = {layer: (module_path(model, module), is_input)
             for layer in layers for module, is_input in [residual_site(layout, layer)]}
    saved = {}
    with torch.inference_mode(), lm.trace({"input_ids": ids, "attention_mask": mask, "position_ids": positions}):
        for layer, (path, is_input) in paths.items():
            envoy = envoy_at(lm, path)
            if is_input:
                saved[layer] = envoy.input.save()
            else:
                out = envoy.output
                saved[layer] = (out[0] if isinstance(out, tuple) else out).save()
    return {layer: getattr(value, "value", value) for layer, value in saved.items()}


BACKENDS: dict[str, BackendFn] = {
    "torch": _torch_backend,
    "transformer_lens": _transformer_lens_backend,
    "nnsight": _nnsight_backend,
}


def run_backend(
    name: str, model: nn.Module, tokenizer, ids: Tensor, mask: Tensor, positions: Tensor, layers: Sequence[int],
    *, truncate: bool = True,
) -> dict[int, Tensor]:
    """Hidden states ``layer -> [B, T, D]`` for one padded batch through the named backend.

    ``truncate=False`` makes the torch backend run every block instead of stopping after the deepest layer.
    """
    try:
        fn = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; choose from {sorted(BACKENDS)}") from None
    if name == "torch":
        return _torch_backend(model, tokenizer, ids, mask, positions, list(layers), truncate=truncate)
    return fn(model, tokenizer, ids, mask, positions, list(layers))
