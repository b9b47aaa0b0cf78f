"""Continuous batching with per-row steering: many requests, each with its own steering, in one batch.

One worker thread owns the model and steps it one forward pass at a time over a shared HF ``DynamicCache``:

* a **step** feeds every active row the tokens it still needs: the whole prompt for a row that just joined
  (its prefill), one token for a decoding row. Rows are left-padded to the step's longest input; a 4-D additive
  attention mask built from a per-slot validity mask ``[B, S]`` lets each query see exactly its own row's real
  past, and ``position_ids`` carry each row's own absolute positions, so a row's numbers do not depend on who
  else is in the batch. After a step with a prefill the cache is compacted (real slots moved right, padding
  zeroed), so pure decode steps carry no waste.
* **new rows join at a step boundary** (up to ``max_batch``), and **finished rows leave at once** (EOS, max
  tokens, a stop sequence, or a client that went away); their cache rows are dropped before the next step.
* **steering is per row**: forward hooks on the steered blocks run ``steerlib.kernels.fused_steer_rows`` with a
  per-layer table of the vectors the batch uses and, per token, an index into it (``-1`` = none), a coefficient
  and cap bounds. A row's ``positions`` are resolved per step and per row: its prompt tokens are the tokens of
  its prefill step, its response tokens those of its decode steps, so a prefill row and a decode row in the same
  forward pass each get exactly their own edits.
* the monitor read-out rides on the same fused call; per the convention of ``steerlib.steering.generation`` the value
  paired with generated token ``t`` is read at the position whose output produced ``t`` (the last input
  position of the step).

Why not transformers' own continuous batching (5.24: ``generate_batch`` / ``ContinuousBatchingManager``)? It
packs every request's tokens into one ``[1, total_tokens]`` sequence described by cumulative sequence lengths over
a paged cache, its scheduler decides that packing inside its own loop, and it switches the model's attention
implementation to a paged/flash one (the model is shared with the rest of the library). A forward hook would see
``[1, total_tokens, D]`` with no row identity; per-row steering would need each step's packing map from its
internals. Stepping a ``DynamicCache`` ourselves is small, exact (the tests compare with ``steerlib.generate``) and
uses only public inputs (``attention_mask``, ``position_ids``, the cache).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from transformers.cache_utils import DynamicCache

from steerlib.core.arch import get_layout
from steerlib.core.compat import cache_keyword
from steerlib.kernels import fused_steer_rows
from steerlib.serve.schema import ApiError
from steerlib.steering.steer import SteerOp, TraitReadout

__all__ = ["Completion", "Engine", "RowEdit", "Sampling", "edits_from_ops"]

log = logging.getLogger("steerlib.serve")


@dataclass(frozen=True)
class RowEdit:
    """One steering edit of one row at one layer, in the form the per-row op takes.

    Attributes:
        layer: residual layer 1..n_layers.
        key: identity of ``vector`` in the layer's table (rows sharing a vector share an entry).
        vector: [d_model] fp32; raw for ``add``, unit for ``ablate``/``cap``.
        coef: coefficient (0 for ablate/cap).
        lo, hi: cap bounds (-inf/+inf: unbounded).
        positions: "all", "prompt" or "response".
        gate_key: identity of the condition direction (None: ungated), gate_vector its [d_model] unit vector.
        gate_lo, gate_hi: the gate's bounds on the projection (measured at this layer, before the edit).
        latch: once the gate opens at a token of the row, the edit stays on for the rest of the row.
    """

    layer: int
    key: tuple
    vector: Tensor
    coef: float
    lo: float
    hi: float
    positions: str
    gate_key: tuple | None = None
    gate_vector: Tensor | None = None
    gate_lo: float = -math.inf
    gate_hi: float = math.inf
    latch: bool = False


def edits_from_ops(ops: Sequence[SteerOp], keys: Sequence[tuple],
                   gate_keys: Sequence[tuple] | None = None) -> list[RowEdit]:
    """Turn validated ``SteerOp``s into per-row edits; ``keys[i]`` names op ``i``'s vector (name, layer...) and
    ``gate_keys[i]`` its condition's vector, for ops with a ``when``."""
    out = []
    for i, (op, key) in enumerate(zip(ops, keys, strict=True)):
        vec = op.vector.detach().float().cpu()
        if op.mode == "add":
            edit = RowEdit(op.layer, (*key, "raw"), vec, float(op.coef), -math.inf, math.inf, op.positions)
        else:
            lo, hi = (0.0, 0.0) if op.mode == "ablate" else (op.cap_min, op.cap_max)
            if lo is not None and hi is not None and lo > hi:
                raise ValueError(f"cap_min ({lo}) must be <= cap_max ({hi})")
            edit = RowEdit(op.layer, (*key, "unit"), vec / vec.norm(), 0.0,
                           -math.inf if lo is None else float(lo), math.inf if hi is None else float(hi),
                           op.positions)
        if op.when is not None:
            if gate_keys is None:
                raise ValueError("ops with a condition need gate_keys")
            g = op.when.vector.detach().float().cpu()
            glo, ghi = op.when.bounds
            edit = dataclasses.replace(edit, gate_key=(*gate_keys[i], "gate"), gate_vector=g / g.norm(), gate_lo=glo,
                                       gate_hi=ghi, latch=op.when.latch)
        out.append(edit)
    return out


@dataclass(frozen=True)
class Sampling:
    """Per-row decoding settings."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Completion:
    """What a finished row hands back."""

    text: str
    completion_tokens: int
    prompt_tokens: int
    finish_reason: str
    trait_projections: dict[str, dict[str, Any]]
    steps: list[list[int]]  # [step id, batch size] per generated token
    queue_ms: float
    ttft_ms: float | None


@dataclass
class _Row:
    """One sequence being generated (one choice of one request). Worker-only state below the line."""

    prompt_ids: list[int]
    edits: list[RowEdit]
    sampling: Sampling
    sink: Callable[[tuple], None]
    steered: bool
    serial: int = -1  # set at admission; identifies the row for the step tables (ids of freed rows get reused)
    meta_steering: list = field(default_factory=list)  # the request's steering as the client wrote it
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.monotonic)
    # -- worker state --
    pending: list[int] = field(default_factory=list)
    n_seen: int = 0
    generated: list[int] = field(default_factory=list)
    values: list[list[float]] = field(default_factory=list)  # per emitted token: K projections
    latched: set[int] = field(default_factory=set)  # indices into edits whose latching gate has opened
    steps: list[list[int]] = field(default_factory=list)
    sent: int = 0  # characters of text already emitted
    unsent_values: list[list[float]] = field(default_factory=list)
    generator: torch.Generator | None = None
    started: float | None = None
    first_token: float | None = None
    finish: str | None = None
    text: str = ""


class _StepPlan:
    """Per-token steering of one forward pass: per layer, a table and one (index, coef, lo, hi) set per slot."""

    def __init__(self, layers: dict[int, tuple[Tensor, list[tuple[Tensor, Tensor, Tensor, Tensor]]]],
                 monitor_layer: int | None):
        self.layers = layers
        self.monitor_layer = monitor_layer
        self.projections: Tensor | None = None  # [B * T, K] read at the monitor layer
        # (layer, slot) -> gate arguments of the op (gate_dir, gate_index, gate_lo, gate_hi, gate_out [N] bool)
        self.gates: dict[tuple[int, int], dict[str, Tensor]] = {}
        # (layer, slot) -> per batch row, the index into that row's edits when its gate there latches
        self.latches: dict[tuple[int, int], list[int | None]] = {}


class Engine:
    """Owns the model; validates nothing about HTTP, only runs rows. Use ``start()``/``stop()``.

    Args:
        model, tokenizer: a loaded causal LM; the tokenizer is only used to decode on the worker.
        readout: the per-token trait read-out (``steerlib.steering.steer.build_readout``) or None.
        max_batch: most rows stepped together.
        max_queue: rows waiting beyond this are refused with 429.
        eos_ids: token ids that end a row.
        prefill_chunk: most prompt tokens of one row fed in one step (longer prompts take several steps).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, *, readout: TraitReadout | None = None, max_batch: int = 16,
                 max_queue: int = 256, eos_ids: set[int] | None = None, prefill_chunk: int = 256):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        self.model = model
        self.tokenizer = tokenizer
        self.layout = get_layout(model)
        self.cache_kw = cache_keyword(model)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.readout = readout
        self.monitor_layer = readout.layers[0] if readout is not None else None
        self.monitor_dirs = (readout.directions[self.monitor_layer].to(self.device, torch.float32)
                             if readout is not None else None)
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.eos_ids = set(eos_ids or ())
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = int(pad if pad is not None else (min(self.eos_ids) if self.eos_ids else 0))

        self._incoming: queue.Queue[_Row] = queue.Queue()
        self._rows: list[_Row] = []
        self._cache: DynamicCache | None = None
        self._kv_mask: Tensor | None = None  # [B, S] bool: which cache slots hold real tokens
        self._tables: dict[int, tuple[Tensor, dict[tuple, int]]] = {}
        self._gate_tables: dict[int, tuple[Tensor, dict[tuple, int]]] = {}
        self._tables_for: tuple | None = None
        self._stop = threading.Event()
        self._paused = threading.Event()
        self._idle = threading.Event()
        self._thread: threading.Thread | None = None
        self._step_ids = itertools.count(1)
        self._row_serials = itertools.count(1)
        self._stats_lock = threading.Lock()
        self._stats: dict[str, Any] = {"requests": 0, "completed": 0, "failed": 0, "cancelled": 0, "steps": 0,
                                       "rows_stepped": 0, "max_batch_seen": 0, "prefill_tokens": 0,
                                       "generated_tokens": 0, "mixed_steps": 0, "steered_row_steps": 0,
                                       "step_seconds": 0.0}
        self.on_finish: Callable[[_Row, Completion], None] | None = None

    # -- lifecycle ----------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="steerlib-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the step in flight; rows still running or queued get a 503."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        error = ApiError(503, "server is shutting down", type_="server_error")
        for row in [*self._rows, *self._drain()]:
            row.sink(("error", error))
        self._rows = []
        self._cache = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Pause stepping at the next step boundary while inside the block (rows keep queueing)."""
        self._paused.set()
        try:
            yield
        finally:
            self._paused.clear()

    def queue_depth(self) -> int:
        return self._incoming.qsize()

    def active_rows(self) -> int:
        return len(self._rows)

    def submit(self, prompt_ids: list[int], edits: list[RowEdit], sampling: Sampling,
               sink: Callable[[tuple], None], *, steered: bool) -> _Row:
        """Queue one row; ``sink`` receives ``("token", text, [[K values] per token], step)``, then
        ``("done", Completion)`` or ``("error", ApiError)``, from the worker thread."""
        if not self.alive:
            raise ApiError(503, "the generation worker is not running", type_="server_error")
        if self._incoming.qsize() >= self.max_queue:
            raise ApiError(429, f"too many queued requests ({self.max_queue}); retry later", code="queue_full",
                           type_="rate_limit_error")
        row = _Row(prompt_ids=list(prompt_ids), edits=list(edits), sampling=sampling, sink=sink, steered=steered)
        with self._stats_lock:
            self._stats["requests"] += 1
        self._incoming.put(row)
        return row

    def stats(self) -> dict[str, Any]:
        with self._stats_lock:
            s = dict(self._stats)
        s["mean_batch_size"] = s["rows_stepped"] / s["steps"] if s["steps"] else None
        s["mean_step_ms"] = round(1000 * s["step_seconds"] / s["steps"], 2) if s["steps"] else None
        s["queue_depth"] = self.queue_depth()
        s["active_rows"] = self.active_rows()
        s["worker_alive"] = self.alive
        s["max_batch"] = self.max_batch
        return s

    # -- the worker ---------------------------------------------------------------------------------------
    def _drain(self) -> list[_Row]:
        out = []
        while True:
            try:
                out.append(self._incoming.get_nowait())
            except queue.Empty:
                return out

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._paused.is_set():
                time.sleep(0.01)
                continue
            try:
                self._admit(block=not self._rows)
                if not self._rows:
                    continue
                started = time.perf_counter()
                self._step()
                with self._stats_lock:
                    self._stats["step_seconds"] += time.perf_counter() - started
            except BaseException as exc:  # never let one step take the worker down
                log.exception("step failed; failing its %d rows", len(self._rows))
                error = ApiError(500, f"generation failed: {type(exc).__name__}: {exc}", type_="server_error")
                for row in self._rows:
                    self._fail(row, error)
                self._rows, self._cache, self._kv_mask = [], None, None

    def _fail(self, row: _Row, error: ApiError) -> None:
        with self._stats_lock:
            self._stats["failed"] += 1
        row.sink(("error", error))

    def _admit(self, block: bool) -> None:
        """Move queued rows into the batch (a step boundary); wait briefly for work when idle."""
        new: list[_Row] = []
        if block:
            try:
                new.append(self._incoming.get(timeout=0.05))
            except queue.Empty:
                return
        while len(self._rows) + len(new) < self.max_batch:
            try:
                new.append(self._incoming.get_nowait())
            except queue.Empty:
                break
        now = time.monotonic()
        fresh = []
        for row in new:
            if row.cancelled.is_set():
                with self._stats_lock:
                    self._stats["cancelled"] += 1
                continue
            row.pending = list(row.prompt_ids)
            row.serial = next(self._row_serials)
            row.started = now
            if row.sampling.temperature > 0:
                row.generator = torch.Generator(device=self.device)
                if row.sampling.seed is not None:
                    row.generator.manual_seed(row.sampling.seed)
                else:
                    row.generator.seed()
            fresh.append(row)
        if not fresh:
            return
        if self._cache is None or not self._rows:
            self._cache = DynamicCache(config=self.model.config)
            self._kv_mask = torch.zeros((0, 0), dtype=torch.bool, device=self.device)
            self._rows = []
        else:
            self._grow_cache(len(fresh))
        self._rows.extend(fresh)
        self._kv_mask = torch.cat([self._kv_mask, torch.zeros((len(fresh), self._kv_mask.shape[1]), dtype=torch.bool,
                                                              device=self.device)])

    # -- cache surgery ------------------------------------------------------------------------------------
    def _cache_layers(self) -> list:
        layers = getattr(self._cache, "layers", None)
        if layers is None or (layers and not all(hasattr(x, "keys") and hasattr(x, "values") for x in layers)):
            raise RuntimeError("this transformers' DynamicCache has no .layers[i].keys/.values; the serving engine "
                               "needs them to add and drop rows between steps")
        return [x for x in layers if isinstance(getattr(x, "keys", None), Tensor) and x.keys.numel()]

    def _grow_cache(self, n: int) -> None:
        for layer in self._cache_layers():
            for name in ("keys", "values"):
                t = getattr(layer, name)
                setattr(layer, name, torch.cat([t, t.new_zeros((n, *t.shape[1:]))]))

    def _select_rows(self, keep: list[int]) -> None:
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        for layer in self._cache_layers():
            layer.keys = layer.keys.index_select(0, idx)
            layer.values = layer.values.index_select(0, idx)
        self._kv_mask = self._kv_mask.index_select(0, idx)

    def _compact(self) -> None:
        """Move each row's real slots to the right end, zero the padding, and drop all-padding columns."""
        mask = self._kv_mask
        width = int(mask.sum(1).max()) if mask.shape[0] else 0
        right_aligned = bool((mask.to(torch.int8).diff(dim=1) >= 0).all()) if mask.shape[1] > 1 else True
        if width == mask.shape[1] and right_aligned:
            return
        b = mask.shape[0]
        # Stable sort puts padding (False) first and keeps real slots in order.
        order = torch.sort(mask.to(torch.int8), dim=1, stable=True).indices[:, mask.shape[1] - width:]
        new_mask = torch.gather(mask, 1, order)
        for layer in self._cache_layers():
            for name in ("keys", "values"):
                t = getattr(layer, name)  # [B, H, S, d]
                g = order[:, None, :, None].expand(b, t.shape[1], width, t.shape[3])
                setattr(layer, name, torch.gather(t, 2, g) * new_mask[:, None, :, None].to(t.dtype))
        self._kv_mask = new_mask

    # -- one step -----------------------------------------------------------------------------------------
    def _tables_now(self) -> dict[int, tuple[Tensor, dict[tuple, int]]]:
        """Per-layer table [V, D] of the vectors the current rows use (rebuilt when the rows change)."""
        ident = tuple(r.serial for r in self._rows)
        if ident != self._tables_for:
            entries: dict[int, dict[tuple, Tensor]] = {}
            gates: dict[int, dict[tuple, Tensor]] = {}
            for row in self._rows:
                for e in row.edits:
                    entries.setdefault(e.layer, {}).setdefault(e.key, e.vector)
                    if e.gate_key is not None:
                        gates.setdefault(e.layer, {}).setdefault(e.gate_key, e.gate_vector)
            self._tables = {
                layer: (torch.stack(list(vecs.values())).to(self.device), {k: i for i, k in enumerate(vecs)})
                for layer, vecs in entries.items()
            }
            self._gate_tables = {
                layer: (torch.stack(list(vecs.values())).to(self.device), {k: i for i, k in enumerate(vecs)})
                for layer, vecs in gates.items()
            }
            self._tables_for = ident
        return self._tables

    def _plan(self, lengths: list[int], prefill: list[bool], t: int) -> _StepPlan:
        tables = self._tables_now()
        n = len(self._rows) * t
        layers: dict[int, tuple[Tensor, list]] = {}
        gate_args: dict[tuple[int, int], dict[str, Tensor]] = {}
        latches: dict[tuple[int, int], list[int | None]] = {}
        for layer, (table, keys) in tables.items():
            per_row = [[(k, e) for k, e in enumerate(row.edits) if e.layer == layer] for row in self._rows]
            gate_table, gate_keys = self._gate_tables.get(layer, (None, {}))
            slots = []
            for s in range(max(len(x) for x in per_row)):
                index = [-1] * n
                coef = [0.0] * n
                lo = [-math.inf] * n
                hi = [math.inf] * n
                gindex = [-1] * n
                glo = [-math.inf] * n
                ghi = [math.inf] * n
                latch: list[int | None] = [None] * len(per_row)
                for b, edits in enumerate(per_row):
                    if s >= len(edits):
                        continue
                    k, e = edits[s]
                    if e.positions != "all" and (e.positions == "prompt") != prefill[b]:
                        continue
                    # A latched gate is open whatever the projection (its bounds become the whole line).
                    opened = k in self._rows[b].latched
                    for j in range((b + 1) * t - lengths[b], (b + 1) * t):
                        index[j], coef[j], lo[j], hi[j] = keys[e.key], e.coef, e.lo, e.hi
                        if e.gate_key is not None:
                            gindex[j] = gate_keys[e.gate_key]
                            glo[j], ghi[j] = (-math.inf, math.inf) if opened else (e.gate_lo, e.gate_hi)
                    if e.gate_key is not None and e.latch and not opened:
                        latch[b] = k
                if gate_table is not None and any(x >= 0 for x in gindex):
                    gate_args[(layer, len(slots))] = {
                        "gate_dir": gate_table, "gate_index": torch.tensor(gindex, device=self.device),
                        "gate_lo": torch.tensor(glo, device=self.device),
                        "gate_hi": torch.tensor(ghi, device=self.device),
                        "gate_out": torch.ones(n, dtype=torch.bool, device=self.device)}
                    if any(x is not None for x in latch):
                        latches[(layer, len(slots))] = latch
                # The values were checked on the host (finite coefficients, ordered bounds, unit vectors where
                # bounded), so the op reads nothing back from the device; unused parts are left out.
                bounded = any(x != -math.inf for x in lo) or any(x != math.inf for x in hi)
                slots.append((torch.tensor(index, device=self.device),
                              torch.tensor(coef, device=self.device) if any(coef) else None,
                              torch.tensor(lo, device=self.device) if bounded else None,
                              torch.tensor(hi, device=self.device) if bounded else None))
            layers[layer] = (table, slots)
        if self.monitor_layer is not None and self.monitor_layer not in layers:
            layers[self.monitor_layer] = (torch.zeros((0, self.layout.d_model), device=self.device), [])
        plan = _StepPlan(layers, self.monitor_layer)
        plan.gates, plan.latches = gate_args, latches
        return plan

    def _latch(self, plan: _StepPlan, t: int) -> None:
        """After a step: rows whose latching gate opened at some token of theirs keep that edit on from now on
        (the host reads the op's gate_out here, in the same sync as the step's logits)."""
        for (layer, slot), rows in plan.latches.items():
            gate = plan.gates[(layer, slot)]
            opened = (gate["gate_out"] & (gate["gate_index"] >= 0)).view(len(rows), t).any(1).tolist()
            for b, k in enumerate(rows):
                if k is not None and opened[b]:
                    self._rows[b].latched.add(k)

    def _hook(self, layer: int, plan: _StepPlan):
        table, slots = plan.layers[layer]
        monitor = self.monitor_dirs if layer == plan.monitor_layer else None
        if not slots:  # read-out only: one call with every row unsteered
            n_rows = None
        else:
            n_rows = slots[0][0].shape[0]

        def hook(_module: nn.Module, _args: tuple, output: object):
            hidden = output[0] if isinstance(output, tuple) else output
            b, t, d = hidden.shape
            flat = hidden.reshape(b * t, d)
            inplace = flat.is_contiguous() and not (torch.is_grad_enabled() and hidden.requires_grad)
            if not flat.is_contiguous():
                flat = flat.contiguous()
            calls = slots or [(torch.full((b * t,), -1, dtype=torch.long, device=flat.device), None, None, None)]
            assert n_rows is None or n_rows == b * t
            for i, (index, coef, lo, hi) in enumerate(calls):
                last = i == len(calls) - 1
                flat, proj = fused_steer_rows(flat, table, index, coef, lo, hi, readout=monitor if last else None,
                                              inplace=inplace, validate=False, **plan.gates.get((layer, i), {}))
                if last and monitor is not None:
                    plan.projections = proj
            if inplace:
                return None
            new = flat.view(b, t, d)
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return hook

    @contextlib.contextmanager
    def _hooks(self, plan: _StepPlan) -> Iterator[None]:
        handles = []
        try:
            for layer in sorted(plan.layers):
                handles.append(self.layout.blocks[layer - 1].register_forward_hook(self._hook(layer, plan)))
            yield
        finally:
            while handles:
                handles.pop().remove()

    @torch.no_grad()
    def _step(self) -> None:
        rows = self._rows
        b = len(rows)
        # A long prompt is fed in chunks over several steps, so one arrival cannot make the step's mask
        # [B, T, S + T] huge or stall the decoding rows for long; the row samples once its prompt is in.
        lengths = [min(len(r.pending), self.prefill_chunk) for r in rows]
        prefill = [not r.generated for r in rows]
        t = max(lengths)
        s = self._kv_mask.shape[1]
        ids = torch.full((b, t), self.pad_id, dtype=torch.long)
        pos = torch.zeros((b, t), dtype=torch.long)
        step_mask = torch.zeros((b, t), dtype=torch.bool)
        for i, r in enumerate(rows):
            n = lengths[i]
            ids[i, t - n:] = torch.tensor(r.pending[:n])
            pos[i, t - n:] = torch.arange(r.n_seen, r.n_seen + n)
            step_mask[i, t - n:] = True
        ids, pos, step_mask = ids.to(self.device), pos.to(self.device), step_mask.to(self.device)
        kv = torch.cat([self._kv_mask, step_mask], dim=1)  # [B, S + T]
        causal = torch.arange(s + t, device=self.device)[None, :] <= (torch.arange(t, device=self.device) + s)[:, None]
        allowed = kv[:, None, :] & causal[None]  # [B, T, S + T]
        # A large negative number, not -inf: a query with nothing to attend to (a padding position) then
        # gets a uniform average instead of NaN, and NaN could never reach a real row through the cache.
        mask = torch.zeros((b, 1, t, s + t), dtype=self.dtype, device=self.device)
        mask.masked_fill_(~allowed[:, None], torch.finfo(self.dtype).min)

        plan = self._plan(lengths, prefill, t)
        step_id = next(self._step_ids)
        with self._hooks(plan):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                             logits_to_keep=1, **{self.cache_kw: self._cache})
        logits = out.logits[:, -1, :].float()
        self._latch(plan, t)
        self._kv_mask = kv
        if t > 1:
            self._compact()
        proj = plan.projections.view(b, t, -1)[:, -1, :].tolist() if plan.projections is not None else None

        with self._stats_lock:
            st = self._stats
            st["steps"] += 1
            st["rows_stepped"] += b
            st["max_batch_seen"] = max(st["max_batch_seen"], b)
            st["prefill_tokens"] += sum(n for n, p in zip(lengths, prefill, strict=True) if p)
            st["generated_tokens"] += sum(1 for r, n in zip(rows, lengths, strict=True) if len(r.pending) == n)
            st["mixed_steps"] += int(any(prefill) and not all(prefill))
            st["steered_row_steps"] += sum(1 for r in rows if r.edits)

        ready = [len(r.pending) == lengths[i] for i, r in enumerate(rows)]  # whole input fed: sample
        tokens = self._sample(logits, ready)
        now = time.monotonic()
        keep = []
        for i, r in enumerate(rows):
            r.n_seen += lengths[i]
            if not ready[i]:  # mid-prompt: nothing to sample yet
                r.pending = r.pending[lengths[i]:]
                if r.cancelled.is_set():
                    r.finish = "cancelled"
                    self._complete(r)
                else:
                    keep.append(i)
                continue
            token = tokens[i]
            r.pending = [token]
            r.generated.append(token)
            r.steps.append([step_id, b])
            if r.first_token is None:
                r.first_token = now
            self._emit(r, token, proj[i] if proj is not None else None, step_id, b)
            if r.finish is None and r.cancelled.is_set():
                r.finish = "cancelled"
            if r.finish is None:
                keep.append(i)
            else:
                self._complete(r)
        if len(keep) < b:
            self._rows = [rows[i] for i in keep]
            if self._rows:
                self._select_rows(keep)
                self._compact()
            else:
                self._cache, self._kv_mask = None, None

    def _sample(self, logits: Tensor, ready: list[bool]) -> list[int]:
        out = logits.argmax(-1).tolist()
        for i, r in enumerate(self._rows):
            sp = r.sampling
            if sp.temperature <= 0 or not ready[i]:
                continue
            probs = torch.softmax(logits[i] / sp.temperature, dim=-1)
            if sp.top_p < 1.0:
                sorted_p, order = probs.sort(descending=True)
                cum = sorted_p.cumsum(0)
                cut = cum - sorted_p > sp.top_p  # keep the smallest prefix whose mass reaches top_p
                sorted_p[cut] = 0.0
                probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
            out[i] = int(torch.multinomial(probs, 1, generator=r.generator))
        return out

    def _emit(self, r: _Row, token: int, values: list[float] | None, step_id: int, size: int) -> None:
        """Decide finish conditions and send the text that is final so far (holding back what a stop sequence
        or an unfinished UTF-8 character may still change)."""
        sp = r.sampling
        is_eos = token in self.eos_ids
        if not is_eos and values is not None:
            r.unsent_values.append(values)
            r.values.append(values)
        ids = r.generated[:-1] if is_eos else r.generated
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        final = is_eos or len(r.generated) >= sp.max_tokens
        r.finish = "stop" if is_eos else ("length" if final else None)
        if sp.stop:
            start = max(0, r.sent - max(len(x) for x in sp.stop))
            hits = [(text.find(x, start), x) for x in sp.stop]
            hits = [(i, x) for i, x in hits if i >= 0]
            if hits:
                text = text[:min(i for i, _ in hits)]
                r.finish = "stop"
                final = True
        upto = len(text)
        if not final:
            if text.endswith("\ufffd"):
                upto = len(text.rstrip("\ufffd"))
            for x in sp.stop:  # hold back a tail that could be the start of a stop sequence
                for k in range(min(len(x) - 1, upto), 0, -1):
                    if text[:upto].endswith(x[:k]):
                        upto -= k
                        break
        upto = max(upto, r.sent)
        delta = text[r.sent:upto]
        r.text = text[:upto] if not final else text
        if delta or (final and r.unsent_values):
            r.sent = upto
            r.sink(("token", delta, r.unsent_values, [step_id, size]))
            r.unsent_values = []

    def _complete(self, r: _Row) -> None:
        names = self.readout.names if self.readout is not None else []
        proj = {name: _summary([v[k] for v in r.values], self.monitor_layer) for k, name in enumerate(names)}
        finish = r.finish if r.finish != "cancelled" else "cancelled"
        c = Completion(text=r.text, completion_tokens=len(r.generated), prompt_tokens=len(r.prompt_ids),
                       finish_reason=finish, trait_projections=proj, steps=r.steps,
                       queue_ms=round(((r.started or r.enqueued) - r.enqueued) * 1000, 2),
                       ttft_ms=round((r.first_token - r.enqueued) * 1000, 2) if r.first_token else None)
        with self._stats_lock:
            self._stats["cancelled" if finish == "cancelled" else "completed"] += 1
        if finish != "cancelled" and self.on_finish is not None:
            try:
                self.on_finish(r, c)
            except Exception:  # monitoring must never fail a request
                log.exception("on_finish callback failed")
        r.sink(("done", c))


def _summary(values: list[float], layer: int | None) -> dict[str, Any]:
    """Mean, max and first (= read at the last prompt token) of one trait's per-token projections."""
    if not values:
        return {"mean": None, "max": None, "prompt_last": None, "layer": layer, "n_tokens": 0}
    return {"mean": sum(values) / len(values), "max": max(values), "prompt_last": values[0], "layer": layer,
            "n_tokens": len(values)}


def eos_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    """The token ids that end a generation for this model and tokenizer."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = ids if isinstance(ids, list) else [ids]
    out = {int(i) for i in ids if i is not None}
    if getattr(tokenizer, "eos_token_id", None) is not None:
        out.add(int(tokenizer.eos_token_id))
    return out
