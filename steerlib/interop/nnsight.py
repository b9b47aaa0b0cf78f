"""steerlib ops and read-outs inside an nnsight trace; nnsight saves as steerlib activations.

For an nnsight 0.8 model wrapping an HF causal LM (``TransformersModel(model, tokenizer=tok,
task="text-generation")``, or the older name ``LanguageModel``). Layers as ``steerlib.core.hooks`` defines them:
layer 0 is ``model.layers[0].input``, layer ``L`` is ``model.layers[L - 1].output`` (the top one too). Example::

    from steerlib.interop import nnsight as slnn

    ops = steerlib.build_ops(hf_model, vectors, 16, coef=4.0)
    with lm.trace(inputs):
        slnn.steer_in_trace(lm, ops, readout)       # edits written where the tensors live
        logits = lm.output.logits.save()

    with lm.trace(inputs):
        saved = slnn.save_layers(lm, [8, 16])       # layer -> saved [B, T, D]
    acts = slnn.activations_from_saved(saved, attention_mask, prompt_lengths)   # -> steerlib extraction

nnsight runs the body of a ``with lm.trace(...)`` block in order of module execution, so call ``steer_in_trace``
before reading anything at or after its deepest layer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from steerlib.core.arch import get_layout
from steerlib.core.backends import envoy_at, module_path, require_extra
from steerlib.core.capture import Activations, activations_from_hidden
from steerlib.core.hooks import residual_site
from steerlib.interop.edits import ForeignEdits
from steerlib.steering.plan import SteerOp
from steerlib.steering.steer import TraitReadout

__all__ = ["activations_from_saved", "save_layers", "steer_in_trace"]


def _model_of(lm) -> nn.Module:
    require_extra("nnsight", "nnsight")
    module = getattr(lm, "_module", None)
    if not isinstance(module, nn.Module):
        raise ValueError(f"expected an nnsight model (TransformersModel/LanguageModel), got {type(lm).__name__}")
    return module


def _site(lm, model: nn.Module, layer: int):
    """(envoy, is_input) of residual layer ``layer`` inside ``lm``."""
    module, is_input = residual_site(get_layout(model), layer)
    return envoy_at(lm, module_path(model, module)), is_input


def _hidden(value):
    return value[0] if isinstance(value, tuple) else value


def steer_in_trace(lm, ops: Sequence[SteerOp] = (), readout: TraitReadout | None = None) -> None:
    """Inside ``with lm.trace(...)``: apply ``ops`` and fill ``readout`` for that forward, as ``steer()`` would.

    Args:
        lm: the nnsight model the trace belongs to.
        ops: steerlib ``SteerOp`` s (from ``steerlib.build_ops`` or built directly); add, ablate, cap, gates.
        readout: a ``TraitReadout`` (``steerlib.build_readout``) to fill with per-token projections.
    """
    model = _model_of(lm)
    layout = get_layout(model)
    edits = ForeignEdits(layout.d_model, layout.n_layers, ops, readout, next(model.parameters()).device)
    first, _ = _site(lm, model, 0)
    x = _hidden(first.input)
    edits.begin(int(x.shape[0]), int(x.shape[1]))
    for layer in edits.layers:
        envoy, _ = _site(lm, model, layer)
        out = envoy.output
        new = edits(layer, _hidden(out))
        envoy.output = (new, *out[1:]) if isinstance(out, tuple) else new


def save_layers(lm, layers: Sequence[int]) -> dict[int, Tensor]:
    """Inside ``with lm.trace(...)``: save the residual states at ``layers`` (steerlib layers, 0..n).

    Returns ``layer -> [B, T, D]``; the dict itself is saved too, so it outlives the trace when bound in it.
    """
    from nnsight import save

    model = _model_of(lm)
    saved = {}
    for layer in sorted({get_layout(model).check_layer(int(x)) for x in layers}):
        envoy, is_input = _site(lm, model, layer)
        saved[layer] = _hidden(envoy.input if is_input else envoy.output).save()
    return save(saved)


def activations_from_saved(saved: Mapping[int, Tensor], attention_mask: Tensor, prompt_lengths: Sequence[int],
                           *, keep_tokens: bool = False) -> Activations:
    """Pool states saved in an nnsight trace (``layer -> [B, T, D]``, e.g. from ``save_layers``) into steerlib
    ``Activations``, for the extraction code.

    Args:
        saved: steerlib layer -> saved [B, T, D] tensor.
        attention_mask: [B, T] mask of the batch that was traced (1 = real token).
        prompt_lengths: prompt tokens per row; the real tokens after them are the response.
        keep_tokens: also keep every token's activation.
    """
    hidden = {int(layer): getattr(value, "value", value) for layer, value in saved.items()}
    return activations_from_hidden(hidden, attention_mask, prompt_lengths, keep_tokens=keep_tokens,
                                   meta={"backend": "nnsight"})
