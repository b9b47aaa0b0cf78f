"""Steering ops and a trait read-out applied to residual tensors that another library's hooks hand over.

The same lowering and the same per-row op as ``steer()`` (``steerlib.steering.plan``); only the place the tensor
comes from differs. Each forward pass announces itself (``begin``, from a hook on the first block's input) before
any edited layer runs. Positions: a pass of more than one token is a new prompt (positions 0..T-1, all of them
prompt tokens); a one-token pass after it continues it (KV-cached decoding: the response). So ``positions="all"``
and ``"prompt"`` mean the same as in ``steer()`` for single forward passes and cached generation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from steerlib.core.vectors import check_vector
from steerlib.steering.plan import FromMarker, SteeringPlan, SteerOp, lower_ops
from steerlib.steering.steer import TraitReadout


class ForeignEdits:
    """Ops and a read-out for residual tensors ``[B, T, D]`` at steerlib layers, edited out of place.

    Args:
        d_model: residual width.
        n_layers: number of decoder blocks (layers run 1..n_layers).
        ops: steerlib ``SteerOp`` s (``build_ops`` makes them from trait vectors).
        readout: a ``TraitReadout`` (``build_readout``) filled with per-token projections, as ``steer()`` fills it.
        device: where the plan's tables live (the model's device).
    """

    def __init__(self, d_model: int, n_layers: int, ops: Sequence[SteerOp] = (), readout: TraitReadout | None = None,
                 device: torch.device | str = "cpu") -> None:
        self.n_layers = n_layers
        for op in ops:
            if not isinstance(op, SteerOp):
                raise ValueError(f"ops must be SteerOp objects (see steerlib.build_ops), got {type(op).__name__}")
            if not 1 <= op.layer <= n_layers:
                raise ValueError(f"steering layer {op.layer} is out of range 1..{n_layers}")
            check_vector(op.vector, d_model, name=f"steering vector at layer {op.layer}")
        self.edits = lower_ops(list(ops))
        if any(e.latch or isinstance(e.rule, FromMarker) for e in self.edits):
            # Both keep per-row state across passes that only steer()'s generation loop drives.
            raise ValueError("latching gates and marker positions need steer(); interop applies the other ops")
        self.readout = readout
        self.plan = SteeringPlan(d_model, device)
        self.plan.set_rows([self.edits], [0])
        self.dirs: dict[int, Tensor] = {}
        if readout is not None:
            readout.clear()
            for layer in readout.layers:
                if not 1 <= layer <= n_layers:
                    raise ValueError(f"read-out layer {layer} is out of range 1..{n_layers}")
                self.dirs[layer] = readout.directions[layer].to(device=device, dtype=torch.float32)
        self.layers = sorted({e.layer for e in self.edits} | set(self.dirs))
        self._past = 0
        self._prompt = 0
        self._last = 0

    def begin(self, batch: int, seq: int) -> None:
        """A forward pass of ``batch`` x ``seq`` tokens starts (see the module docstring for positions)."""
        if seq > 1 or self._prompt == 0:
            self._past, self._prompt = 0, seq
            self.plan.set_rows([self.edits], [seq])
        else:
            self._past += self._last
        self._last = seq
        device = self.plan.device
        position = torch.arange(self._past, self._past + seq, device=device).repeat(batch)
        self.plan.fill(torch.zeros(batch * seq, dtype=torch.int64, device=device), position)

    def __call__(self, layer: int, hidden: Tensor) -> Tensor:
        """``hidden`` [B, T, D] at ``layer`` after this layer's edits (a new tensor); records the read-out."""
        batch, seq, width = hidden.shape
        flat, proj = self.plan.apply_functional(layer, hidden.reshape(batch * seq, width), self.dirs.get(layer))
        if proj is not None:
            self.readout.records[layer].append(proj.detach().view(batch, seq, -1).clone())
        return flat.view(batch, seq, width)
