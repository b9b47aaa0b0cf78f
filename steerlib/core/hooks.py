"""Hook-level primitives on the residual stream, and the one definition of "layer ``L``".

Layer ``L`` of the residual stream, for capture, steering and read-out alike:

- ``0``: the embeddings, i.e. the input of block 0;
- ``1..n``: the output of block ``L - 1``, the top layer ``n`` included: **before** the final norm.

This equals transformers' ``output_hidden_states[L]`` for every ``L < n``; transformers reports its last entry
after the final norm, steerlib's layer ``n`` is the last block's raw output. So a vector read at any layer is
added back in the space it was read from. ``residual_site`` maps a layer to the module and hook side that see it;
every path that hooks the stream by layer goes through it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from steerlib.core.arch import Layout, get_layout


class HookHandles:
    """Hook handles that come and go as a unit: registered all or none, removed in reverse order.

    ``add`` inside ``registering()``: if any registration raises, the ones already made are removed before the
    error propagates, so a model is never left half-hooked.
    """

    def __init__(self) -> None:
        self._handles: list = []

    def add(self, handle) -> None:
        self._handles.append(handle)

    @contextlib.contextmanager
    def registering(self) -> Iterator[HookHandles]:
        try:
            yield self
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def __len__(self) -> int:
        return len(self._handles)


class StopForward(Exception):
    """Raised inside a hook to end a forward pass early once every needed layer has been seen."""


def _hidden_of(output: object) -> Tensor:
    """Decoder blocks return a tensor (transformers 5) or a tuple whose first item is the hidden state."""
    return output[0] if isinstance(output, tuple) else output


# ``edit(flat, (batch, seq), kwargs)``: ``flat`` is residual layer ``L`` as ``[batch * seq, d_model]``, contiguous;
# ``kwargs`` the block's keyword arguments (``position_ids``...). It returns None (it edited ``flat`` in place, or
# only read it) or a replacement ``[batch * seq, d_model]`` (a functional edit).
ResidualEdit = Callable[[Tensor, tuple[int, int], dict], Tensor | None]


def hook_residual(layout: Layout, layer: int, edit: ResidualEdit) -> RemovableHandle:
    """Register ``edit`` at residual layer ``layer``: the one hook point of the residual stream.

    It owns what every path that hooks the stream by layer needs: the module address (``residual_site``), the
    block output's unwrap (a tensor or a tuple whose first item is the hidden state), the flatten to
    ``[batch * seq, d_model]``, and the rewrap of a replacement. When the hidden state is contiguous ``flat`` is a
    view of it, so an in-place edit changes the block's output itself; otherwise ``flat`` is a contiguous copy,
    written back after ``edit``. No host read and no branch on values: it runs inside compiled graphs too.

    Returns the hook's handle (add it to a ``HookHandles``).
    """
    module, is_input = residual_site(layout, layer)

    def run(hidden: Tensor, kwargs: dict) -> Tensor | None:
        b, t, d = hidden.shape
        viewed = hidden.is_contiguous()
        flat = hidden.view(b * t, d) if viewed else hidden.reshape(b * t, d).contiguous()
        new = edit(flat, (b, t), kwargs)
        if new is None:
            if viewed:
                return None
            new = flat
        return new.view(b, t, d)

    if is_input:
        def pre_hook(_module: nn.Module, args: tuple, kwargs: dict):
            new = run(args[0] if args else kwargs["hidden_states"], kwargs)
            if new is None:
                return None
            return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})

        return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def hook(_module: nn.Module, _args: tuple, kwargs: dict, output: object):
        new = run(_hidden_of(output), kwargs)
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return module.register_forward_hook(hook, with_kwargs=True)


def residual_site(layout: Layout, layer: int) -> tuple[nn.Module, bool]:
    """``(module, is_input)`` whose input (``is_input``) or output carries residual layer ``layer``.

    Layer 0 is the first block's input; layer ``L >= 1`` the output of block ``L - 1``, the top layer too.
    """
    layer = layout.check_layer(layer)
    if layer == 0:
        return layout.blocks[0], True
    return layout.blocks[layer - 1], False


def check_layers(layout: Layout, layers: Sequence[int] | int | None) -> list[int]:
    """Normalise a layer selection (None = all, negatives count from the end) and validate it."""
    if layers is None:
        return list(range(layout.n_positions))
    if isinstance(layers, int):
        layers = [layers]
    checked = [layout.check_layer(layer) for layer in layers]
    if not checked:
        raise ValueError("no layers selected")
    return sorted(set(checked))


@contextlib.contextmanager
def record_residual(
    model: nn.Module,
    layers: Sequence[int] | int | None = None,
    *,
    to_cpu: bool = True,
    stop_after_last: bool = False,
) -> Iterator[dict[int, list[Tensor]]]:
    """Record residual layer ``L`` (see the module docstring) for each selected layer on every forward pass.

    Yields a dict ``layer -> list of tensors [batch, seq, d_model]``, one per forward call. Hooks are all
    registered before the body runs and removed when it exits, also when it raises.

    Args:
        model: an HF causal LM of a supported architecture.
        layers: layers to record; None = all.
        to_cpu: move each recording off the device as it is made, so device memory holds one batch only.
        stop_after_last: stop the forward pass after the deepest requested layer (raises ``StopForward``
            inside the model; wrap the call in ``contextlib.suppress(StopForward)``). Saves the compute of
            later blocks when only early layers are read.
    """
    layout = get_layout(model)
    layers = check_layers(layout, layers)
    records: dict[int, list[Tensor]] = {layer: [] for layer in layers}
    deepest = max(layers)

    def store(layer: int):
        def read(flat: Tensor, shape: tuple[int, int], _kwargs: dict) -> None:
            hidden = flat.detach().view(*shape, flat.shape[-1])
            # Blocking copy: a non_blocking device-to-host copy lands in pageable memory and may be read
            # before it has finished.
            records[layer].append(hidden.to("cpu") if to_cpu else hidden)
            if stop_after_last and layer == deepest:
                raise StopForward

        return read

    handles = HookHandles()
    try:
        for layer in layers:
            handles.add(hook_residual(layout, layer, store(layer)))
        yield records
    finally:
        handles.remove()
