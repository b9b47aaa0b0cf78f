"""steerlib ops and read-outs as TransformerLens ``fwd_hooks``; TransformerLens caches as steerlib activations.

For a TransformerLens 4.x ``TransformerBridge`` (``TransformerBridge.boot_transformers(...)``), whose hook points
``blocks.{i}.hook_resid_post`` carry steerlib layer ``i + 1`` and ``blocks.0.hook_resid_pre`` layer 0 (see
``steerlib.core.hooks``). Example::

    from steerlib.interop import transformer_lens as sltl

    ops = steerlib.build_ops(hf_model, vectors, 16, coef=4.0)   # the HF model the bridge wraps
    logits = bridge.run_with_hooks(tokens, fwd_hooks=sltl.fwd_hooks(bridge, ops))
    with bridge.hooks(fwd_hooks=sltl.fwd_hooks(bridge, ops, readout)):
        bridge(tokens)                                           # readout.records filled as steer() fills them

    _, cache = bridge.run_with_cache(tokens, names_filter=sltl.hook_names([8, 16]))
    acts = sltl.activations_from_cache(cache, attention_mask, prompt_lengths)   # -> steerlib extraction

Every call of ``fwd_hooks`` makes fresh hooks with their own position state; one list serves one run at a time.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

from torch import Tensor

from steerlib.core.backends import require_extra, tl_hook_name
from steerlib.core.capture import Activations, activations_from_hidden
from steerlib.interop.edits import ForeignEdits
from steerlib.steering.plan import SteerOp
from steerlib.steering.steer import TraitReadout

__all__ = ["activations_from_cache", "fwd_hooks", "hook_names", "layer_of"]

Hook = Callable[..., Tensor | None]

_NAME = re.compile(r"blocks\.(\d+)\.hook_resid_(pre|post)")


def layer_of(name: str) -> int:
    """The steerlib layer a residual hook point carries: ``blocks.0.hook_resid_pre`` -> 0,
    ``blocks.{i}.hook_resid_post`` -> ``i + 1`` (and ``blocks.{i}.hook_resid_pre`` -> ``i``)."""
    match = _NAME.fullmatch(name)
    if match is None:
        raise ValueError(f"{name!r} is not a residual-stream hook point (blocks.<i>.hook_resid_pre/post)")
    block = int(match.group(1))
    return block if match.group(2) == "pre" else block + 1


def hook_names(layers: Sequence[int]) -> list[str]:
    """The hook point of each steerlib layer, for ``run_with_cache(names_filter=...)``."""
    return [tl_hook_name(int(layer)) for layer in layers]


def fwd_hooks(bridge, ops: Sequence[SteerOp] = (), readout: TraitReadout | None = None) -> list[tuple[str, Hook]]:
    """``[(hook name, fn)]`` that apply ``ops`` and fill ``readout`` on ``bridge``, as ``steer()`` does on HF.

    Args:
        bridge: a TransformerLens ``TransformerBridge`` (anything with ``cfg.n_layers`` and ``cfg.d_model``).
        ops: steerlib ``SteerOp`` s (from ``steerlib.build_ops`` or built directly); add, ablate, cap, gates.
        readout: a ``TraitReadout`` (``steerlib.build_readout``) to fill with per-token projections.
    """
    require_extra("transformer_lens", "transformer-lens")
    device = next(bridge.parameters()).device
    edits = ForeignEdits(int(bridge.cfg.d_model), int(bridge.cfg.n_layers), ops, readout, device)

    def begin(tensor: Tensor, hook=None) -> None:
        edits.begin(int(tensor.shape[0]), int(tensor.shape[1]))

    def at(layer: int) -> Hook:
        def hook(tensor: Tensor, hook=None) -> Tensor:
            return edits(layer, tensor)

        return hook

    return [(tl_hook_name(0), begin), *((tl_hook_name(layer), at(layer)) for layer in edits.layers)]


def activations_from_cache(cache: Mapping[str, Tensor], attention_mask: Tensor, prompt_lengths: Sequence[int],
                           *, keep_tokens: bool = False) -> Activations:
    """Pool the residual hook points of a TransformerLens ``ActivationCache`` into steerlib ``Activations``.

    Args:
        cache: from ``run_with_cache`` (``names_filter=hook_names(layers)`` keeps only what is needed); every
            ``blocks.<i>.hook_resid_pre/post`` entry becomes its steerlib layer, other entries are ignored.
        attention_mask: [B, T] mask of the batch that was run (1 = real token).
        prompt_lengths: prompt tokens per row; the real tokens after them are the response.
        keep_tokens: also keep every token's activation.
    """
    hidden: dict[int, Tensor] = {}
    for name in cache.keys():
        if _NAME.fullmatch(name):
            hidden.setdefault(layer_of(name), cache[name])
    if not hidden:
        raise ValueError("the cache holds no residual hook point (blocks.<i>.hook_resid_pre/post)")
    return activations_from_hidden(hidden, attention_mask, prompt_lengths, keep_tokens=keep_tokens,
                                   meta={"backend": "transformer_lens"})
