"""Steering a model whose layers live on several devices (``device_map="auto"``): one plan per device.

With ``load_model(..., device_map="auto")`` accelerate puts consecutive blocks on different GPUs, and a block's
output (the residual stream the op edits) lives on that block's device. The op reads its table, per-token
arguments and read-out directions from the same device as the hidden state, and a CUDA graph must not copy
between devices inside the step. So each device gets its own ``SteeringPlan`` (tables, per-token buffers,
latch state, read-out buffers), filled once per forward pass from the same rows; a layer's hook uses the plan
of its own device. With one device this is exactly one plan, as before.

The rule for where a layer lives is stated once here: **residual layer ``L`` lives where block ``L - 1`` runs**
(accelerate's execution device when the block is offloaded, else its parameters' device).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import fields, is_dataclass

import torch
from torch import Tensor, nn

from steerlib.core.arch import Layout
from steerlib.steering.plan import Edit, SteeringPlan

__all__ = ["DevicePlans", "block_device", "layer_devices", "plan_tensors"]


def block_device(block: nn.Module, default: torch.device) -> torch.device:
    """Where ``block`` runs: accelerate's execution device if it is hooked, else its first parameter's or buffer's
    device, else ``default`` (a block without weights)."""
    hook = getattr(block, "_hf_hook", None)
    execution = getattr(hook, "execution_device", None)
    if execution is not None:
        return torch.device(execution if not isinstance(execution, int) else f"cuda:{execution}")
    for tensor in (*block.parameters(), *block.buffers()):
        return tensor.device
    return default


def layer_devices(layout: Layout, default: torch.device | str = "cpu") -> dict[int, torch.device]:
    """Residual layer ``1..n_layers`` -> the device its hidden state lives on (block ``L - 1``'s)."""
    default = torch.device(default)
    return {layer: block_device(layout.blocks[layer - 1], default) for layer in range(1, layout.n_layers + 1)}


class DevicePlans:
    """One ``SteeringPlan`` per device the model's layers live on, driven as one.

    ``set_rows`` and ``fill`` go to every device's plan (the rows are the same; a plan's tables for layers on
    other devices are small and never read); ``apply`` runs at a layer on that layer's device.

    Args:
        d_model: hidden width.
        devices: residual layer -> device (``layer_devices``).
        plan_kwargs: passed to each ``SteeringPlan`` (``max_tokens``, ``capacity``, ``fixed``).
    """

    def __init__(self, d_model: int, devices: dict[int, torch.device], **plan_kwargs):
        if not devices:
            raise ValueError("devices must map at least one layer to a device")
        self.devices = {layer: torch.device(d) for layer, d in devices.items()}
        self.plans: dict[torch.device, SteeringPlan] = {}
        for device in self.devices.values():
            if device not in self.plans:
                self.plans[device] = SteeringPlan(d_model, device, **plan_kwargs)
        self.first = next(iter(self.plans.values()))

    @property
    def layers(self):
        """The steered layers of the current rows (a mapping layer -> that layer's state, as ``SteeringPlan``)."""
        return self.first.layers

    def device_of(self, layer: int) -> torch.device:
        """Where residual layer ``layer`` lives."""
        device = self.devices.get(layer)
        if device is None:
            raise ValueError(f"layer {layer} is not one of this model's layers 1..{max(self.devices)}")
        return device

    def for_layer(self, layer: int) -> SteeringPlan:
        """The plan whose tensors live on ``layer``'s device."""
        return self.plans[self.device_of(layer)]

    def set_rows(self, rows: Sequence[Sequence[Edit]], prompt_lens: Sequence[int],
                 markers: Sequence[int | None] | None = None,
                 latched: Sequence[set[int]] | None = None) -> None:
        """``SteeringPlan.set_rows`` on every device's plan."""
        for plan in self.plans.values():
            plan.set_rows(rows, prompt_lens, markers=markers, latched=latched)

    def fill(self, row_of_token: Tensor, position: Tensor) -> None:
        """``SteeringPlan.fill`` on every device's plan, each from a copy of the inputs on its own device (made
        here, before the forward pass, not inside a layer)."""
        for device, plan in self.plans.items():
            plan.fill(row_of_token.to(device, non_blocking=True), position.to(device, non_blocking=True))

    def apply(self, layer: int, hidden: Tensor, readout: Tensor | None = None) -> Tensor | None:
        """``SteeringPlan.apply`` at ``layer`` with the plan on that layer's device."""
        return self.for_layer(layer).apply(layer, hidden, readout)

    def latched_edits(self) -> list[set[int]]:
        """Per row, the edits whose latching gate has opened on any device (an edit's layer is on one device, so
        only that device's plan can have latched it)."""
        merged: list[set[int]] | None = None
        for plan in self.plans.values():
            state = plan.latched_edits()
            merged = state if merged is None else [a | b for a, b in zip(merged, state, strict=True)]
        return merged or []


def plan_tensors(plan: SteeringPlan) -> list[Tensor]:
    """Every tensor a plan holds (tables, per-row parameters, latch state, buffers), each once.

    What a compiled graph reads from the plan: ``torch.compile(mode="reduce-overhead")`` (CUDA graphs) needs each
    of them at a fixed address, marked static, or it copies them in every replay (and skips graphs altogether
    for the ones the step mutates, such as the latch state). Found by walking the plan's attributes, so that it
    stays complete whatever the plan stores.
    """
    seen: dict[int, Tensor] = {}

    def walk(obj: object, depth: int) -> Iterator[Tensor]:
        if isinstance(obj, Tensor):
            yield obj
        elif depth > 4:
            return
        elif isinstance(obj, dict):
            for value in obj.values():
                yield from walk(value, depth + 1)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                yield from walk(value, depth + 1)
        elif is_dataclass(obj) and not isinstance(obj, type):
            for f in fields(obj):
                yield from walk(getattr(obj, f.name), depth + 1)

    for value in vars(plan).values():
        for tensor in walk(value, 0):
            seen.setdefault(id(tensor), tensor)
    return list(seen.values())
