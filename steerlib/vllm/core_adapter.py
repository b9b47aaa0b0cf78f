"""The one place the vLLM backend meets the steering core: lowering, position intervals and the step plan.

The core (issue 17, ``steerlib.steering.plan``) will own these; until it lands this module implements the same
interface (``CORE_API.md``) so that switching is a change here only:

* ``lower(op)``: a ``SteerOp`` -> one table row and per-token scalars (add: raw vector, coef, unbounded;
  ablate: unit vector, bounds 0..0; cap: unit vector, its bounds).
* ``interval(positions, prompt_len)``: the half-open interval of absolute positions an edit touches
  (all ``[0, inf)``, prompt ``[0, P)``, response ``[P, inf)``).
* ``StepPlan``: per layer a table ``[V, D]`` whose row 0 is zeros ("no edit") and, per edit slot, index /
  coef / lo / hi buffers preallocated for the most tokens of one step and filled in place with ``copy_``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from steerlib.kernels import fused_steer_rows
from steerlib.steering.steer import SteerOp

__all__ = ["INF_POS", "Lowered", "RowEdit", "StepPlan", "interval", "lower"]

INF_POS = 2**62  # "no end" of a position interval, as an int64


@dataclass(frozen=True)
class Lowered:
    """One edit as the per-row op takes it: a table row and the per-token scalars."""

    row: Tensor  # [D] fp32: raw for add, unit for ablate/cap
    coef: float
    lo: float
    hi: float


@dataclass(frozen=True)
class RowEdit:
    """One lowered edit of one request at one layer, with the position rule it applies to."""

    layer: int
    key: str  # identity of ``lowered.row`` (requests with the same key share a table entry)
    lowered: Lowered
    positions: str


def lower(op: SteerOp) -> Lowered:
    """Lower a validated ``SteerOp`` to a table row and scalars (the core's ``op.method.lower``)."""
    vec = op.vector.detach().float().cpu().contiguous()
    if op.mode == "add":
        return Lowered(vec, float(op.coef), -math.inf, math.inf)
    lo, hi = (0.0, 0.0) if op.mode == "ablate" else (op.cap_min, op.cap_max)
    return Lowered(vec / vec.norm(), 0.0, -math.inf if lo is None else float(lo), math.inf if hi is None else float(hi))


def interval(positions: str, prompt_len: int) -> tuple[int, int]:
    """Absolute positions ``[start, end)`` an edit with this rule touches, for a prompt of ``prompt_len`` tokens."""
    if positions == "all":
        return 0, INF_POS
    if positions == "prompt":
        return 0, prompt_len
    if positions == "response":
        return prompt_len, INF_POS
    raise ValueError(f"unknown positions {positions!r}")


class StepPlan:
    """Per-token steering of one forward pass over flattened tokens, in preallocated buffers.

    Args:
        layers: the residual layers (1..n) that can be edited.
        d_model: residual width.
        max_tokens: most tokens of one forward pass (vLLM's ``max_num_batched_tokens``).
        slots: edits per request per layer held without reallocating (grows when a request needs more).
        capacity: table rows per layer held without reallocating (grows when needed).
    """

    def __init__(self, layers: Sequence[int], d_model: int, max_tokens: int, *, slots: int = 2,
                 capacity: int = 32, device: torch.device | str = "cpu"):
        self.layers = sorted(layers)
        self.d_model = d_model
        self.max_tokens = max_tokens
        self.device = torch.device(device)
        self._slots = slots
        self._capacity = capacity
        self.tables = {layer: torch.zeros((capacity, d_model), device=self.device) for layer in self.layers}
        self._buffers = {layer: self._alloc(slots) for layer in self.layers}
        self._keys: dict[int, dict[str, int]] = {layer: {} for layer in self.layers}
        self.active: dict[int, int] = {}  # layer -> slots in use this step (absent: nothing to do)
        self._rows: list[list[RowEdit]] = []
        self._starts: list[int] = []
        self.n_tokens = 0

    def _alloc(self, slots: int) -> dict[str, Tensor]:
        t = self.max_tokens
        return {"index": torch.zeros((slots, t), dtype=torch.int64, device=self.device),
                "coef": torch.zeros((slots, t), device=self.device),
                "lo": torch.full((slots, t), -math.inf, device=self.device),
                "hi": torch.full((slots, t), math.inf, device=self.device)}

    def _entry(self, layer: int, edit: RowEdit) -> int:
        keys = self._keys[layer]
        if edit.key not in keys:
            if len(keys) + 1 >= self.tables[layer].shape[0]:
                grown = torch.zeros((2 * self.tables[layer].shape[0], self.d_model), device=self.device)
                grown[: self.tables[layer].shape[0]] = self.tables[layer]
                self.tables[layer] = grown
            keys[edit.key] = len(keys) + 1  # row 0 stays zeros: "no edit"
            self.tables[layer][keys[edit.key]].copy_(edit.lowered.row)
        return keys[edit.key]

    def set_rows(self, rows: Sequence[Sequence[RowEdit]], prompt_lens: Sequence[int]) -> None:
        """The batch's requests in order: their lowered edits (empty = unsteered) and prompt lengths."""
        if len(rows) != len(prompt_lens):
            raise ValueError(f"{len(rows)} rows but {len(prompt_lens)} prompt lengths")
        live = {e.key for r in rows for e in r}
        for layer in self.layers:  # forget entries no request uses any more, so the table stays small
            if any(k not in live for k in self._keys[layer]) and len(self._keys[layer]) > self._capacity // 2:
                self._keys[layer] = {}
        self._rows = [list(r) for r in rows]
        self._prompt_lens = list(prompt_lens)

    def fill(self, row_of_token: Tensor, position: Tensor) -> None:
        """Write every (layer, slot)'s per-token index/coef/lo/hi for this step's flattened tokens.

        Args:
            row_of_token: [N] int64 request index of each token (-1 = padding, never edited).
            position: [N] int64 absolute position of each token in its sequence.
        """
        n = int(row_of_token.shape[0])
        if n > self.max_tokens:
            raise RuntimeError(f"step has {n} tokens but the plan holds {self.max_tokens}")
        self.n_tokens = n
        self.active = {}
        per_layer: dict[int, list[list[RowEdit]]] = {}
        for r, edits in enumerate(self._rows):
            for e in edits:
                per_layer.setdefault(e.layer, [[] for _ in self._rows])[r].append(e)
        safe_row = row_of_token.clamp_min(0)
        valid = row_of_token >= 0
        for layer, by_row in per_layer.items():
            if layer not in self.tables:
                raise RuntimeError(f"layer {layer} is not hooked (hooked: {self.layers[0]}..{self.layers[-1]})")
            n_slots = max(len(x) for x in by_row)
            if n_slots > self._buffers[layer]["index"].shape[0]:
                self._buffers[layer] = self._alloc(n_slots)
            buf = self._buffers[layer]
            for s in range(n_slots):
                # Per request (R entries, host-side), then one gather per token on the device.
                idx, coef, lo, hi, start, end = [0], [0.0], [-math.inf], [math.inf], [0], [0]
                for r, edits in enumerate(by_row):
                    if s < len(edits):
                        e = edits[s]
                        a, b = interval(e.positions, self._prompt_lens[r])
                        idx.append(self._entry(layer, e))
                        coef.append(e.lowered.coef)
                        lo.append(e.lowered.lo)
                        hi.append(e.lowered.hi)
                        start.append(a)
                        end.append(b)
                    else:
                        idx.append(0)
                        coef.append(0.0)
                        lo.append(-math.inf)
                        hi.append(math.inf)
                        start.append(0)
                        end.append(0)
                # Row r's values sit at r + 1; entry 0 is "no edit" for padding and out-of-interval tokens.
                pick = torch.where(valid, safe_row + 1, 0)
                s_idx = torch.tensor(idx)[pick]
                inside = (position >= torch.tensor(start)[pick]) & (position < torch.tensor(end)[pick])
                s_idx = torch.where(inside, s_idx, 0)
                buf["index"][s, :n].copy_(s_idx)
                buf["coef"][s, :n].copy_(torch.where(inside, torch.tensor(coef)[pick], 0.0))
                buf["lo"][s, :n].copy_(torch.where(inside, torch.tensor(lo)[pick], -math.inf))
                buf["hi"][s, :n].copy_(torch.where(inside, torch.tensor(hi)[pick], math.inf))
            self.active[layer] = n_slots

    def apply(self, layer: int, hidden: Tensor, readout: Tensor | None) -> Tensor | None:
        """Edit ``hidden`` [N, D] in place with this step's edits at ``layer``; return ``hidden @ readout.T``."""
        n = hidden.shape[0]
        slots = self.active.get(layer, 0)
        buf = self._buffers.get(layer)
        proj = None
        for s in range(slots):
            last = s == slots - 1
            _, p = fused_steer_rows(hidden, self.tables[layer], buf["index"][s, :n], buf["coef"][s, :n],
                                    buf["lo"][s, :n], buf["hi"][s, :n], readout=readout if last else None,
                                    inplace=True, validate=False)
            if last:
                proj = p
        if readout is not None and proj is None:
            proj = hidden.float() @ readout.T
        return proj
