"""Inside every vLLM worker: find the decoder layers, hook them once, fill the step plan before each forward.

vLLM 0.32's decoder layers (Llama and its relatives) return ``(hidden_states, residual)`` and defer the add to
the next layer's fused add + RMSNorm; the residual stream steerlib edits (HF's block output) is their sum. The
hook on block ``L - 1`` calls one registered op, ``torch.ops.steerlib_vllm.steer_layer_``, which writes the
edited sum into ``hidden_states`` and zeros ``residual``, both IN PLACE (``mutates_args``, returning nothing, as
vLLM's own ``unified_attention_with_output`` writes into the tensor it is given): the next fused add then sees
exactly the edited stream, at the addresses a captured graph recorded.

Graph-safe by construction. The plan is a fixed-capacity ``SteeringPlan`` (``PlanCapacity``: every hookable
layer, ``max_num_seqs`` rows, ``max_num_batched_tokens`` tokens, a few slots per layer, ``K`` read-out
directions), allocated once at load; nothing it owns ever moves. Every hooked layer calls the op on every
forward, steps and vLLM's own warm-up / capture passes alike, and the op's body launches the same ops whatever
the rows ask: every slot, every argument, gates, latches and the read-out (rows that do not steer point at table
row 0 and open bounds). It reads only device tensors, never the host (no ``.item()``/``.tolist()``), and
allocates nothing of its own. So a graph captured with an empty plan, replayed after ``begin()`` refilled the
plan, steers (``tests/in_vllm/test_vllm_replay.py`` records the forward's ops and replays them to show it).

Per step (``GPUModelRunner._model_forward``, the runner's documented override point), ``begin()`` does the host
work from the runner's host-side bookkeeping, before the forward: ``input_batch.req_ids``, ``query_start_loc``
(where each request's tokens start), ``requests[id].sampling_params.extra_args`` (the spec),
``num_prompt_tokens`` and ``num_computed_tokens_cpu`` (the position of a request's last token in the step). The
per-token arguments are then computed on the device from the ``positions`` tensor the runner passes to the model
(no copy to the host). Prompt vs response is ``position < prompt_len``, so chunked prefill, requests joining and
leaving, and prefix-cache hits (which skip computed positions) all steer the same tokens. Rows are described to
the plan again only when the batch's rows change; a row that moves keeps its latched gates (moved on the device).

"Did the steered layers run" is a device-side stamp: each op call adds 1 to its layer's entry of an
``[n_layers + 1]`` counter that ``begin()`` zeros; ``end()`` reads it after the forward and raises when a layer the
step needed did not run exactly once, so a replayed graph passes and a skipped hook fails loudly.

Read-out: every layer's op writes its projections on the ``K`` configured directions into a fixed
``[max_tokens, K]`` buffer of its own; after the forward, ``end()`` gathers the rows of the read-out layer it
wants: the last token each request computed in the step, when that position is ``>= prompt_len - 1`` (the
positions whose outputs produce generated tokens), keyed by request id and position. The API process fetches
them with ``collective_rpc("steerlib_pop_readouts")`` through ``SteerlibWorkerExtension`` (vLLM's
``worker_extension_cls``).

Capture (``steerlib.vllm.capture``): the same op also adds each layer's stream into fixed per-request sums (and a
pre-hook on the first block adds the embeddings, layer 0), for requests that ask with ``steerlib_capture``; the
pooled residuals are fetched with ``collective_rpc("steerlib_pop_captures")``. In a step with a capturing
request every owned layer (and 0) must run exactly once, checked by the same stamp.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from steerlib.steering.plan import PlanCapacity, SteeringPlan
from steerlib.vllm.capture import CaptureBuffers
from steerlib.vllm.slots import DEFAULT_CAPACITY, SlotTable, capacity_of, store_of
from steerlib.vllm.spec import SPEC_KEY, ParsedSpec, parse_spec

__all__ = ["IDENTITY", "SteerlibWorkerExtension", "install", "state"]

log = logging.getLogger("steerlib.vllm")

# What vLLM's compile cache must be keyed by (``additional_config={"steerlib": IDENTITY}``): its key ignores
# hooks, so a graph compiled without them (or with an older version of them) would otherwise be reused.
# The capture module's code runs inside the same op, so it is part of the key too.
IDENTITY = "steerlib-hooks-" + hashlib.sha256(
    Path(__file__).read_bytes() + (Path(__file__).parent / "capture.py").read_bytes()).hexdigest()[:16]
_MAX_STORED_REQUESTS = 4096
SLOTS_PER_LAYER = 2  # edits one request may make at one layer
READOUT_DIRS = 16  # read-out directions K every layer's op computes (the op's maximum)


class WorkerState:
    """Everything one worker keeps: the hooked layers, the fixed step plan, the stamp, the read-out and its store.

    Args:
        layers: the model's decoder layers.
        d_model: hidden width.
        max_tokens: tokens per forward pass (vLLM's ``max_num_batched_tokens``).
        device: the worker's device.
        max_rows: requests per forward pass (vLLM's ``max_num_seqs``).
        owned: the layers (1-based) this worker runs and hooks; default all (a pipeline stage owns fewer).
        edits_per_layer: edits one request may make at one layer (the plan's slots per layer).
        slots: the registered vectors (``steerlib.vllm.slots``): rows read once from the store by content key,
            pinned while a request uses them; default the store under steerlib's cache, 256 rows.
        table_rows: steering-table rows per layer (row 0, "no edit", included); default enough for every row's
            slots to hold distinct vectors.
        gate_rows: condition directions per layer.
        capture_slots: requests that can capture pooled residuals at once (0: no capture buffers).
        max_len: the engine's context limit (sizes the capture's per-token norms).
    """

    def __init__(self, layers: nn.ModuleList, d_model: int, max_tokens: int, device: torch.device,
                 max_rows: int = 256, owned: set[int] | None = None, edits_per_layer: int = SLOTS_PER_LAYER,
                 table_rows: int | None = None, gate_rows: int | None = None, slots: SlotTable | None = None,
                 capture_slots: int = 0, max_len: int = 2048):
        self.layers = layers
        self.n_layers = len(layers)
        self.d_model = d_model
        self.device = device
        self.owned = set(range(1, self.n_layers + 1)) if owned is None else set(owned)
        distinct = max_rows * edits_per_layer
        capacity = PlanCapacity(layers=tuple(sorted(self.owned)), rows=max_rows, tokens=max_tokens,
                                slots=edits_per_layer,
                                table_rows=table_rows or min(distinct, 256) + 1,
                                gate_rows=gate_rows or min(distinct, 32), readout_dirs=READOUT_DIRS)
        # The one steering plan (steerlib.steering.plan), allocated once: its tensors never move.
        self.plan = SteeringPlan(d_model, device, capacity=capacity)
        # [n_layers + 1] int32: how many times each layer's op ran in this step (index = layer; 0 unused).
        self.stamp = torch.zeros(self.n_layers + 1, dtype=torch.int32, device=device)
        self._rows_key: tuple | None = None
        self._row_of: dict[str, int] = {}  # request id -> its plan row at the last set_rows
        self.readout_layer: int | None = None
        self.readout_k = 0
        self.in_step = False
        self.expected: set[int] = set()
        # The registered vectors (steerlib.vllm.slots): keyed rows read once from the store, pinned per request.
        self.slots = slots if slots is not None else SlotTable(DEFAULT_CAPACITY, load=store_of(None).get)
        self._parsed: dict[str, tuple[str, ParsedSpec]] = {}  # request id -> (its spec, parsed)
        # Per running request with a latching gate that left the batch (preempted), its opened edits, restored
        # when it comes back; rows that stay carry theirs on the device (``set_rows(moved_from=...)``).
        self._latched: dict[str, set[int]] = {}
        # Per step: which flattened rows to keep read-outs for -> (request id, position).
        self.keep_rows: list[int] = []
        self.keep_keys: list[tuple[str, int]] = []
        self.store: OrderedDict[str, dict[int, list[float]]] = OrderedDict()
        self.steps = 0
        # Pooled-residual capture (steerlib.vllm.capture): fixed per-slot sums, or None (chosen once, at load).
        self.capture = (CaptureBuffers(self.n_layers, d_model, capture_slots, max_tokens, max_len, device)
                        if capture_slots > 0 else None)

    def parsed(self, request_id: str, spec: str) -> ParsedSpec:
        """A running request's parsed spec; its vector keys are pinned in the slot table until it leaves."""
        got = self._parsed.get(request_id)
        if got is not None and got[0] == spec:
            return got[1]
        self.slots.release(request_id)
        parsed = parse_spec(spec, self.n_layers, self.d_model,
                            rows=lambda keys: self.slots.acquire(request_id, keys))
        self._parsed[request_id] = (spec, parsed)
        return parsed

    def forget_finished(self, running: Any) -> None:
        """Unpin the vectors of requests no longer in ``running`` (the runner's ``requests``)."""
        if len(self._parsed) > len(running) or any(rid not in running for rid in self._parsed):
            for rid in [r for r in self._parsed if r not in running]:
                del self._parsed[rid]
                self._latched.pop(rid, None)
            self.slots.release_missing(running)

    def _carried_latches(self, req_ids: list[str], rows: list[list]) -> list[set[int]] | None:
        """Per new row, the opened latches of a request that comes back after leaving the batch (None: none).

        Rows that stay are carried on the device (``moved_from``); only a latching request that leaves the batch
        while still running (preempted) costs one read of the plan's latch state, here, outside any forward."""
        new = set(req_ids)
        leaving = [(r, rid) for rid, r in self._row_of.items() if rid not in new and self._latches(rid)]
        if leaving:
            state = self.plan.latched_edits()
            for r, rid in leaving:
                self._latched[rid] = state[r]
        back = [self._latched.pop(rid, set()) if rid not in self._row_of else set() for rid in req_ids]
        return back if any(back) else None

    def _latches(self, request_id: str) -> bool:
        got = self._parsed.get(request_id)
        return got is not None and any(e.latch for e in got[1].edits)

    def configure_readout(self, layer: int | None, directions: list[list[float]] | None) -> None:
        if layer is None:
            self.readout_layer, self.readout_k = None, 0
            self.plan.set_readout(None)
            return
        if not 1 <= layer <= self.n_layers:
            raise ValueError(f"read-out layer {layer} is outside 1..{self.n_layers}")
        dirs = torch.tensor(directions, dtype=torch.float32)
        if dirs.ndim != 2 or dirs.shape[1] != self.d_model:
            raise ValueError(f"read-out directions must be [K, {self.d_model}], got {list(dirs.shape)}")
        if not 1 <= dirs.shape[0] <= READOUT_DIRS or not bool(torch.isfinite(dirs).all()):
            raise ValueError(f"read-out directions must be 1 to {READOUT_DIRS} finite rows, got {dirs.shape[0]}")
        self.plan.set_readout(dirs.to(self.device))  # written into the fixed buffer, in place
        self.readout_layer, self.readout_k = layer, int(dirs.shape[0])

    # -- per step -------------------------------------------------------------------------------------
    def begin(self, runner: Any, positions: Tensor) -> None:
        """Fill the plan for this step from the runner's host-side bookkeeping (before the forward; the only
        device work is copying the host's row map in and computing the per-token arguments from ``positions``)."""
        batch = runner.input_batch
        num_reqs = batch.num_reqs
        req_ids = list(batch.req_ids[:num_reqs])
        qsl = runner.query_start_loc.cpu[: num_reqs + 1].to(torch.int64)
        pos = positions if positions.ndim == 1 else positions[0]
        n = int(pos.shape[0])
        counts = qsl[1:] - qsl[:-1]
        total = int(qsl[-1]) if num_reqs else 0
        if total > n:
            raise RuntimeError(f"steerlib: the step schedules {total} tokens but the model gets {n}")
        # Padding tokens (a step padded beyond its scheduled tokens) belong to the plan's padding row.
        row_of_token = torch.full((n,), self.plan.capacity.rows, dtype=torch.int64)
        row_of_token[:total] = torch.repeat_interleave(torch.arange(num_reqs), counts)
        rows, prompt_lens, specs = [], [], []
        self.keep_rows, self.keep_keys = [], []
        self.forget_finished(runner.requests)
        for r, rid in enumerate(req_ids):
            req = runner.requests[rid]
            extra = getattr(req.sampling_params, "extra_args", None) or {}
            spec = extra.get(SPEC_KEY)
            parsed = self.parsed(rid, spec) if spec else None
            # A pipeline stage's plan holds only the layers it owns; the other stages make the other edits.
            rows.append([e for e in parsed.edits if e.layer in self.owned] if parsed else [])
            prompt_lens.append(int(req.num_prompt_tokens))
            specs.append(spec)
            if parsed is not None and parsed.readout and self.readout_layer in self.owned and counts[r] > 0:
                last = int(qsl[r + 1]) - 1
                # The last token's position, from the host's count of computed tokens (no read of `positions`).
                p = int(batch.num_computed_tokens_cpu[r]) + int(counts[r]) - 1
                if p >= req.num_prompt_tokens - 1:
                    self.keep_rows.append(last)
                    self.keep_keys.append((rid, p))
        key = (tuple(req_ids), tuple(specs), tuple(prompt_lens))
        if key != self._rows_key:  # the batch's rows changed: describe them again (not on every step)
            moved = [self._row_of.get(rid) for rid in req_ids]
            latched = self._carried_latches(req_ids, rows)
            self.plan.set_rows(rows, prompt_lens, moved_from=moved, latched=latched)
            self._rows_key = key
            self._row_of = {rid: r for r, rid in enumerate(req_ids)}
        self.plan.fill(row_of_token, pos)
        self.expected = set(self.plan.active_layers)
        if self.keep_rows:
            self.expected.add(self.readout_layer)
        if self.capture is not None and self.capture.begin(runner, req_ids, qsl, row_of_token, pos):
            self.expected |= self.owned | ({0} if 1 in self.owned else set())
        self.expected &= self.owned | {0}
        self.stamp.zero_()
        self.in_step = True

    def end(self) -> None:
        """After the forward: check the stamp (every layer the step needed ran exactly once), then gather the
        read-out rows the step keeps. Two reads of device memory, both outside the forward."""
        self.in_step = False
        self.steps += 1
        fired = self.stamp.tolist()
        missing = sorted(layer for layer in self.expected if fired[layer] != 1)
        if missing:
            ran = {layer: c for layer, c in enumerate(fired) if c}
            raise RuntimeError(f"steerlib: the steering hook at layer(s) {missing} did not run exactly once in a "
                               f"steered step (ran: {ran}); refusing to return unsteered output")
        if not self.keep_rows:
            return
        proj = self.plan.readout_values(self.readout_layer)
        index = torch.tensor(self.keep_rows, device=proj.device)
        values = proj.index_select(0, index)[:, : self.readout_k].tolist()
        for (rid, p), v in zip(self.keep_keys, values, strict=True):
            self.store.setdefault(rid, {})[p] = v
            self.store.move_to_end(rid)
        while len(self.store) > _MAX_STORED_REQUESTS:
            self.store.popitem(last=False)

    def run_layer(self, layer: int, hidden: Tensor) -> None:
        """The op's body at ``layer``: stamp it, edit ``hidden`` [N, D] in place, write its read-out buffer.
        The same device ops whatever the plan holds: no branch on its contents, no host read, no allocation."""
        self.stamp[layer].add_(1)
        self.plan.apply(layer, hidden)
        if self.capture is not None:  # decided at load, the same on every call
            self.capture.accumulate(layer, hidden)

    def capture_embeddings(self, hidden: Tensor) -> None:
        """The capture op's body at layer 0 (the embeddings entering the first block): stamp, add in place."""
        self.stamp[0].add_(1)
        if self.capture is not None:
            self.capture.accumulate(0, hidden)

    def pop(self, request_ids: list[str]) -> dict[str, dict[int, list[float]]]:
        """Take the stored read-outs of these requests. vLLM appends ``-`` and 8 characters to the id a client
        gives (``InputProcessor.assign_request_id``), so a stored id matches that id or that id plus the tail."""
        wanted = set(request_ids)
        out: dict[str, dict[int, list[float]]] = {rid: {} for rid in request_ids}
        for key in list(self.store):
            ext = key if key in wanted else key[:-9] if len(key) > 9 and key[-9] == "-" else None
            if ext in wanted:
                out[ext].update(self.store.pop(key))
        return out


_STATE: WorkerState | None = None


def state() -> WorkerState | None:
    """This process's worker state (None before a model was hooked)."""
    return _STATE


@torch.library.custom_op("steerlib_vllm::steer_layer_", mutates_args=("hidden", "residual"))
def steer_layer_(hidden: Tensor, residual: Tensor, layer: int) -> None:
    """``hidden += residual`` with this step's edits at ``layer`` applied, then ``residual = 0``; in place."""
    hidden.add_(residual)
    residual.zero_()
    st = _STATE
    if st is not None:
        st.run_layer(layer, hidden.view(-1, hidden.shape[-1]))


@steer_layer_.register_fake
def _steer_layer_fake(hidden: Tensor, residual: Tensor, layer: int) -> None:
    return None


# ``hidden`` is declared mutated (it is only read) so that no compiler drops an op whose effect is elsewhere.
@torch.library.custom_op("steerlib_vllm::capture_embeddings_", mutates_args=("hidden",))
def capture_embeddings_(hidden: Tensor) -> None:
    """Add the embeddings entering the first block (layer 0) into the capturing requests' sums."""
    st = _STATE
    if st is not None:
        st.capture_embeddings(hidden.view(-1, hidden.shape[-1]))


@capture_embeddings_.register_fake
def _capture_embeddings_fake(hidden: Tensor) -> None:
    return None


def _embeddings_hook(_module: nn.Module, args: tuple) -> None:
    # vLLM's decoder calls each layer as ``layer(positions, hidden_states, residual)``; the first gets the
    # embeddings as ``hidden_states``.
    capture_embeddings_(args[1])


def _make_hook(layer: int):
    def hook(_module: nn.Module, _args: tuple, output: Any) -> Any:
        hidden, residual = output
        steer_layer_(hidden, residual, layer)
        return hidden, residual
    return hook


def find_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a vLLM model whose layers return ``(hidden_states, residual)``; raise if absent."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    name = type(model).__name__
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise NotImplementedError(f"steerlib: cannot find the decoder layers of {name} (expected model.layers); "
                                  "this architecture is not supported by steerlib's vLLM backend")
    real = [m for m in layers if type(m).__name__ != "PPMissingLayer"]
    for m in real:
        params = inspect.signature(m.forward).parameters
        if "residual" not in params:
            raise NotImplementedError(f"steerlib: {name}'s layers ({type(m).__name__}) do not carry the residual "
                                      "as (hidden_states, residual); steerlib's vLLM backend cannot steer them")
    return layers


def install(runner: Any) -> WorkerState:
    """Hook the runner's model once (called right after vLLM loads it, before any compile)."""
    global _STATE
    if getattr(runner, "_steerlib_installed", False):
        return _STATE
    config = runner.vllm_config
    comp = config.compilation_config
    mode = getattr(comp, "mode", None)
    compiled = mode is not None and int(getattr(mode, "value", mode)) != 0 and not config.model_config.enforce_eager
    if compiled and not os.environ.get("VLLM_DISABLE_COMPILE_CACHE"):
        extra = config.additional_config if isinstance(config.additional_config, dict) else {}
        if extra.get("steerlib") != IDENTITY:
            raise RuntimeError(
                "steerlib: vLLM's compile cache ignores forward hooks; start vLLM with "
                f"--additional-config '{{\"steerlib\": \"{IDENTITY}\"}}' (or enforce_eager, or "
                "VLLM_DISABLE_COMPILE_CACHE=1) so that a graph compiled without steering is never reused")
    model = runner.model
    layers = find_layers(model)
    d_model = int(config.model_config.get_hidden_size())
    max_tokens = int(config.scheduler_config.max_num_batched_tokens)
    max_rows = int(config.scheduler_config.max_num_seqs)
    owned = {i + 1 for i, layer in enumerate(layers) if type(layer).__name__ != "PPMissingLayer"}
    extra = config.additional_config if isinstance(config.additional_config, dict) else {}
    slots = SlotTable(capacity_of(extra), load=store_of(extra).get)
    capture_slots = extra.get("steerlib_capture_slots", max_rows)
    if isinstance(capture_slots, bool) or not isinstance(capture_slots, int) or capture_slots < 0:
        raise ValueError(f"steerlib_capture_slots must be an int >= 0, got {capture_slots!r}")
    st = WorkerState(layers, d_model, max_tokens, torch.device(runner.device), max_rows=max_rows, owned=owned,
                     slots=slots, capture_slots=capture_slots, max_len=int(config.model_config.max_model_len))
    for i, layer in enumerate(layers):
        if i + 1 in owned:
            layer.register_forward_hook(_make_hook(i + 1))
    if 1 in owned and st.capture is not None:
        layers[0].register_forward_pre_hook(_embeddings_hook)
    _STATE = st
    runner._steerlib_installed = True
    log.info("steerlib: hooked %d decoder layers of %s (fixed plan: %d tokens, %d requests)", len(owned),
             type(model).__name__, max_tokens, max_rows)
    return st


class SteerlibWorkerExtension:
    """Methods vLLM mixes into its worker (``worker_extension_cls``) for ``collective_rpc``."""

    def steerlib_configure_readout(self, layer: int | None, directions: list[list[float]] | None) -> bool:
        st = _require_state()
        st.configure_readout(layer, directions)
        return True

    def steerlib_pop_readouts(self, request_ids: list[str]) -> dict[str, dict[int, list[float]]]:
        return _require_state().pop(request_ids)

    def steerlib_pop_captures(self, request_ids: list[str], layers: list[int] | None = None,
                              tensors: bool = False) -> dict[str, dict[str, Any]]:
        """Pooled residuals of finished capturing requests (``steerlib.vllm.capture``) at ``layers`` (None: all),
        as nested lists, or as CPU tensors with ``tensors`` (an in-process caller: a 2,000-answer job's pools as
        lists would be ~100M Python floats)."""
        st = _require_state()
        if st.capture is None:
            raise RuntimeError("steerlib: this engine was started with steerlib_capture_slots=0 (no capture)")
        if layers is not None and any(not 0 <= x <= st.n_layers for x in layers):
            raise ValueError(f"capture layers must be within 0..{st.n_layers}, got {layers}")
        keep = slice(None) if layers is None else list(layers)
        return {rid: {k: (v[keep] if tensors else v[keep].tolist()) if isinstance(v, torch.Tensor) else v
                      for k, v in got.items()}
                for rid, got in st.capture.pop(request_ids).items()}

    def steerlib_status(self) -> dict[str, Any]:
        st = _require_state()
        return {"layers": st.n_layers, "steps": st.steps, "readout_layer": st.readout_layer, "identity": IDENTITY,
                "slots": {"capacity": st.slots.capacity, "resident": len(st.slots), "pinned": st.slots.pinned(),
                          "loads": st.slots.loads, "evictions": st.slots.evictions}}


def _require_state() -> WorkerState:
    if _STATE is None:
        raise RuntimeError("steerlib: this worker's model was not hooked (is the steerlib plugin loaded?)")
    return _STATE
