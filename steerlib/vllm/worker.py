"""Inside every vLLM worker: find the decoder layers, hook them once, fill the step plan before each forward.

vLLM 0.32's decoder layers (Llama and its relatives) return ``(hidden_states, residual)`` and defer the add to
the next layer's fused add + RMSNorm; the residual stream steerlib edits (HF's block output) is their sum. The
hook on block ``L - 1`` therefore returns ``(h + r edited, zeros)``: the next fused add then sees exactly the
edited stream. The edit runs in one registered op, ``torch.ops.steerlib_vllm.steer_layer``, which vLLM's
``torch.compile`` keeps opaque: its body runs at every step, reads the plan filled for that step and counts that
it ran, so a step whose steered layer did not run raises instead of returning unsteered text.

Per step (``GPUModelRunner._model_forward``, the runner's documented override point), the flattened tokens are
mapped to requests with the runner's own bookkeeping: ``input_batch.req_ids``, ``query_start_loc`` (where each
request's tokens start), ``requests[id].sampling_params.extra_args`` (the spec) and ``num_prompt_tokens``; a
token's absolute position comes from the ``positions`` the runner passes to the model. Prompt vs response is
``position < prompt_len``, so chunked prefill, requests joining and leaving, and prefix-cache hits (which skip
computed positions) all steer the same tokens.

Read-out: at the read-out layer the projections of the last token each request computed in the step are kept
when that position is ``>= prompt_len - 1`` (the positions whose outputs produce generated tokens), keyed by
request id and position; the API process fetches them with ``collective_rpc("steerlib_pop_readouts")`` through
``SteerlibWorkerExtension`` (vLLM's ``worker_extension_cls``).

CUDA graphs: the table, index, coef and bounds live in buffers allocated once for ``max_num_batched_tokens``
and filled with ``copy_``. On CPU (no graphs) the op's Python body also does the bookkeeping; a graph-captured
step would keep the same buffers and move the fired counter onto the device.
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

from steerlib.steering.plan import SteeringPlan
from steerlib.vllm.slots import DEFAULT_CAPACITY, SlotTable, capacity_of, store_of
from steerlib.vllm.spec import SPEC_KEY, ParsedSpec, parse_spec

__all__ = ["IDENTITY", "SteerlibWorkerExtension", "install", "state"]

log = logging.getLogger("steerlib.vllm")

# What vLLM's compile cache must be keyed by (``additional_config={"steerlib": IDENTITY}``): its key ignores
# hooks, so a graph compiled without them (or with an older version of them) would otherwise be reused.
IDENTITY = "steerlib-hooks-" + hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
_MAX_STORED_REQUESTS = 4096


class WorkerState:
    """Everything one worker keeps: the hooked layers, the step plan, the read-out and its store."""

    def __init__(self, layers: nn.ModuleList, d_model: int, max_tokens: int, device: torch.device,
                 slots: SlotTable | None = None):
        self.layers = layers
        self.n_layers = len(layers)
        self.d_model = d_model
        # The one steering plan (steerlib.steering.plan), buffers sized for vLLM's largest step.
        self.plan = SteeringPlan(d_model, device, max_tokens=max_tokens)
        self._rows_key: tuple | None = None
        self.device = device
        self.readout_layer: int | None = None
        self.readout_dirs: Tensor | None = None
        self.in_step = False
        self.fired: dict[int, int] = {}
        self.expected: set[int] = set()
        # Pipeline parallel: the 1-based layers this stage holds (the others are vLLM's PPMissingLayer
        # placeholders); a plan layer is expected to run, and a read-out to be taken, only on its owner.
        self.owned = frozenset(i + 1 for i, m in enumerate(layers) if type(m).__name__ != "PPMissingLayer")
        # The registered vectors (steerlib.vllm.slots): keyed rows read once from the store, pinned per request.
        self.slots = slots if slots is not None else SlotTable(DEFAULT_CAPACITY, load=store_of(None).get)
        self._parsed: dict[str, tuple[str, ParsedSpec]] = {}  # request id -> (its spec, parsed)
        self._row_ids: list[str] = []  # the request of each plan row
        # Per running request with a latching gate, its opened edits: carried over when the batch's rows change
        # (a request that is preempted and resumes keeps them too).
        self._latched: dict[str, set[int]] = {}
        # Per step: which flattened rows to keep read-outs for -> (request id, position).
        self.keep_rows: list[int] = []
        self.keep_keys: list[tuple[str, int]] = []
        self.store: OrderedDict[str, dict[int, list[float]]] = OrderedDict()
        self.steps = 0

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
        """Per new row, the edits whose latching gate already opened for that request (None: nothing latches)."""
        if self._row_ids and self._latched:  # remember the rows' latches as they leave the plan (or stay in it)
            for rid, opened in zip(self._row_ids, self.plan.latched_edits(), strict=False):
                if rid in self._latched:
                    self._latched[rid] = opened
        self._latched.update({rid: set() for rid, edits in zip(req_ids, rows, strict=True)
                              if rid not in self._latched and any(e.latch for e in edits)})
        if not self._latched:
            return None
        return [self._latched.get(rid, set()) for rid in req_ids]

    def configure_readout(self, layer: int | None, directions: list[list[float]] | None) -> None:
        if layer is None:
            self.readout_layer, self.readout_dirs = None, None
            return
        if not 1 <= layer <= self.n_layers:
            raise ValueError(f"read-out layer {layer} is outside 1..{self.n_layers}")
        dirs = torch.tensor(directions, dtype=torch.float32, device=self.device)
        if dirs.ndim != 2 or dirs.shape[1] != self.d_model:
            raise ValueError(f"read-out directions must be [K, {self.d_model}], got {list(dirs.shape)}")
        self.readout_layer, self.readout_dirs = layer, dirs

    # -- per step -------------------------------------------------------------------------------------
    def begin(self, runner: Any, positions: Tensor) -> None:
        """Fill the plan for this step from the runner's bookkeeping (before the forward)."""
        num_reqs = runner.input_batch.num_reqs
        req_ids = list(runner.input_batch.req_ids[:num_reqs])
        qsl = runner.query_start_loc.cpu[: num_reqs + 1].to(torch.int64)
        pos = positions if positions.ndim == 1 else positions[0]
        n = int(pos.shape[0])
        counts = qsl[1:] - qsl[:-1]
        total = int(qsl[-1]) if num_reqs else 0
        if total > n:
            raise RuntimeError(f"steerlib: the step schedules {total} tokens but the model gets {n}")
        # Padding tokens (a step padded beyond its scheduled tokens) belong to an extra, unsteered row.
        row_of_token = torch.full((n,), num_reqs, dtype=torch.int64)
        row_of_token[:total] = torch.repeat_interleave(torch.arange(num_reqs), counts)
        rows, prompt_lens, specs = [], [], []
        self.keep_rows, self.keep_keys = [], []
        pos_cpu = pos.to("cpu", torch.int64)
        self.forget_finished(runner.requests)
        for r, rid in enumerate(req_ids):
            req = runner.requests[rid]
            extra = getattr(req.sampling_params, "extra_args", None) or {}
            spec = extra.get(SPEC_KEY)
            parsed = self.parsed(rid, spec) if spec else None
            rows.append(parsed.edits if parsed else [])
            prompt_lens.append(int(req.num_prompt_tokens))
            specs.append(spec)
            if parsed is not None and parsed.readout and self.readout_layer is not None and counts[r] > 0:
                last = int(qsl[r + 1]) - 1
                p = int(pos_cpu[last])
                if p >= req.num_prompt_tokens - 1:
                    self.keep_rows.append(last)
                    self.keep_keys.append((rid, p))
        key = (tuple(req_ids), tuple(specs), tuple(prompt_lens))
        if key != self._rows_key:  # the batch's rows changed: describe them again (not on every step)
            latched = self._carried_latches(req_ids, rows)
            self.plan.set_rows([*rows, []], [*prompt_lens, 0], latched=None if latched is None else [*latched, set()])
            self._rows_key, self._row_ids = key, req_ids
        self.plan.fill(row_of_token.to(self.device), pos.to(self.device, torch.int64))
        self.expected = set(self.plan.layers) & self.owned
        if self.keep_rows and self.readout_layer in self.owned:
            self.expected.add(self.readout_layer)
        self.fired = {}
        self.in_step = True

    def end(self) -> None:
        """Check that every layer the step needed ran (after the forward)."""
        self.in_step = False
        self.steps += 1
        missing = sorted(layer for layer in self.expected if self.fired.get(layer, 0) != 1)
        if missing:
            raise RuntimeError(f"steerlib: the steering hook at layer(s) {missing} did not run exactly once in a "
                               f"steered step (ran: {self.fired}); refusing to return unsteered output")

    def run_layer(self, layer: int, hidden: Tensor) -> None:
        """The op's body at ``layer``: edit ``hidden`` [N, D] in place and keep the read-out rows."""
        if not self.in_step:
            return
        self.fired[layer] = self.fired.get(layer, 0) + 1
        readout = self.readout_dirs if layer == self.readout_layer and self.keep_rows else None
        if layer not in self.plan.layers and readout is None:
            return
        proj = self.plan.apply(layer, hidden, readout)
        if readout is not None and proj is not None:
            values = proj[torch.tensor(self.keep_rows, device=proj.device)].tolist()
            for (rid, p), v in zip(self.keep_keys, values, strict=True):
                self.store.setdefault(rid, {})[p] = v
                self.store.move_to_end(rid)
            while len(self.store) > _MAX_STORED_REQUESTS:
                self.store.popitem(last=False)

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


@torch.library.custom_op("steerlib_vllm::steer_layer", mutates_args=())
def steer_layer(hidden: Tensor, residual: Tensor, layer: int) -> Tensor:
    """``hidden + residual`` with this step's edits at ``layer`` applied (a new tensor)."""
    out = hidden + residual
    st = _STATE
    if st is not None:
        st.run_layer(layer, out.view(-1, out.shape[-1]))
    return out


@steer_layer.register_fake
def _steer_layer_fake(hidden: Tensor, residual: Tensor, layer: int) -> Tensor:
    return torch.empty_like(hidden)


def _make_hook(layer: int):
    def hook(_module: nn.Module, _args: tuple, output: Any) -> Any:
        hidden, residual = output
        return steer_layer(hidden, residual, layer), torch.zeros_like(residual)
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
    extra = config.additional_config if isinstance(config.additional_config, dict) else {}
    slots = SlotTable(capacity_of(extra), load=store_of(extra).get)
    st = WorkerState(layers, d_model, max_tokens, torch.device(runner.device), slots=slots)
    for i, layer in enumerate(layers):
        if type(layer).__name__ != "PPMissingLayer":
            layer.register_forward_hook(_make_hook(i + 1))
    _STATE = st
    runner._steerlib_installed = True
    log.info("steerlib: hooked %d decoder layers of %s (plan for %d tokens)", len(layers), type(model).__name__,
             max_tokens)
    return st


class SteerlibWorkerExtension:
    """Methods vLLM mixes into its worker (``worker_extension_cls``) for ``collective_rpc``."""

    def steerlib_configure_readout(self, layer: int | None, directions: list[list[float]] | None) -> bool:
        st = _require_state()
        st.configure_readout(layer, directions)
        return True

    def steerlib_pop_readouts(self, request_ids: list[str]) -> dict[str, dict[int, list[float]]]:
        return _require_state().pop(request_ids)

    def steerlib_status(self) -> dict[str, Any]:
        st = _require_state()
        return {"layers": st.n_layers, "steps": st.steps, "readout_layer": st.readout_layer, "identity": IDENTITY,
                "slots": {"capacity": st.slots.capacity, "resident": len(st.slots), "pinned": st.slots.pinned(),
                          "loads": st.slots.loads, "evictions": st.slots.evictions}}


def _require_state() -> WorkerState:
    if _STATE is None:
        raise RuntimeError("steerlib: this worker's model was not hooked (is the steerlib plugin loaded?)")
    return _STATE
