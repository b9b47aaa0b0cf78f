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
* **steering is per row**, through the one steering plan (``steerlib.steering.plan``): the batch's rows are the
  plan's rows; before each forward pass the plan's per-token buffers (table index, coefficient, bounds) are
  filled in place from each token's row and absolute position, so a prefill row and a decode row in the same
  forward pass each get exactly their own edits (prompt iff position < the row's prompt length). The hooks are
  installed once, when the engine starts, and act only on the engine's own forward passes.
* the trait read-out rides on the same op; the value streamed with generated token ``t`` is read at the
  position whose output produced ``t`` (the last input position of the step). A finished response's
  ``trait_projections`` mean is over the response tokens' own positions (the meaning ``steerlib monitor`` and
  ``flag`` use): a row that stops at its length limit is fed its last token once more ("closing step") so that
  token's read-out exists; ``prompt_last`` is the last prompt token's.

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
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from steerlib.core.arch import get_layout
from steerlib.core.capture import POOLINGS, capture_encoded, pad_token_id
from steerlib.core.compat import cache_keyword
from steerlib.core.hooks import HookHandles, check_layers, hook_residual
from steerlib.kernels import prepare_backend
from steerlib.serve.contract import (
    Completion,
    EngineCapabilities,
    EngineError,
    EngineStopped,
    FinishedRequest,
    QueueFull,
    RowFailed,
    Sampling,
    TokenLogprob,
    UnsupportedSteering,
    public_finish,
    summarize_projections,
)
from steerlib.serve.detok import Reply
from steerlib.serve.kv_slots import SlotCache
from steerlib.serve.logprobs import from_logits, prompt_entries
from steerlib.steering.devices import DevicePlans, layer_devices
from steerlib.steering.plan import Edit, SteeringNotSupported, Support, check_supported
from steerlib.steering.steer import TraitReadout

# The contract's values and errors are re-exported: callers of earlier releases import them from here.
__all__ = ["Completion", "Engine", "EngineError", "EngineStopped", "QueueFull", "RowFailed", "Sampling",
           "UnsupportedSteering", "summarize_projections"]

log = logging.getLogger("steerlib.serve")


@dataclass
class _Row:
    """One sequence being generated (one choice of one request). Worker-only state below the line."""

    prompt_ids: list[int]
    edits: list[Edit]
    sampling: Sampling
    sink: Callable[[tuple], None]
    steered: bool
    serial: int = -1  # set at admission; identifies the row for the step tables (ids of freed rows get reused)
    request_id: str = ""
    meta_steering: list = field(default_factory=list)  # the request's steering as the client wrote it
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.monotonic)
    # -- worker state --
    pending: list[int] = field(default_factory=list)
    n_seen: int = 0
    reply: Reply | None = None  # tokens, text, finish, read-out (set at admission)
    latched: set[int] = field(default_factory=set)  # indices into edits whose latching gate has opened
    steps: list[list[int]] = field(default_factory=list)
    generator: torch.Generator | None = None
    started: float | None = None
    first_token: float | None = None
    token_logprobs: list[TokenLogprob] = field(default_factory=list)  # per generated token (Sampling.logprobs)
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)  # per prompt token fed so far

    @property
    def generated(self) -> list[int]:
        return self.reply.tokens if self.reply is not None else []


class Engine:
    """Owns the model; knows nothing about HTTP, only runs rows. Use ``start()``/``stop()``.

    Implements ``steerlib.serve.contract.ServingEngine``.

    Args:
        model, tokenizer: a loaded causal LM; the tokenizer is only used to decode on the worker.
        readout: the per-token trait read-out (``steerlib.steering.steer.build_readout``) or None.
        max_batch: most rows stepped together.
        max_queue: rows waiting beyond this are refused (``QueueFull``).
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
        self.readout_layer = readout.layers[0] if readout is not None else None
        # Under device_map="auto" each layer's plan and read-out live on that layer's device.
        self.layer_devices = layer_devices(self.layout, self.device)
        self.readout_dirs = (readout.directions[self.readout_layer].to(self.layer_devices[self.readout_layer],
                                                                       torch.float32)
                             if readout is not None else None)
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.eos_ids = set(eos_ids or ())
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = int(pad if pad is not None else (min(self.eos_ids) if self.eos_ids else 0))

        self._incoming: queue.Queue[_Row] = queue.Queue()
        self._rows: list[_Row] = []
        self._kv = SlotCache(model, self.device)
        self.plan = DevicePlans(self.layout.d_model, self.layer_devices, max_tokens=max_batch)
        self._plan_for: tuple | None = None  # row serials the plan was built for
        self._plan_rows: list[_Row] = []  # the rows themselves (their latch state is read back on a change)
        self._hooks = HookHandles()
        self._worker_ident: int | None = None
        self._step_proj: Tensor | None = None  # [B * T, K] read-out of the step in flight
        self._stop = threading.Event()
        self._paused = threading.Event()
        self._thread: threading.Thread | None = None
        self._step_ids = itertools.count(1)
        self._row_serials = itertools.count(1)
        self._stats_lock = threading.Lock()
        self._stats: dict[str, Any] = {"requests": 0, "completed": 0, "failed": 0, "cancelled": 0, "steps": 0,
                                       "rows_stepped": 0, "max_batch_seen": 0, "prefill_tokens": 0,
                                       "generated_tokens": 0, "mixed_steps": 0, "steered_row_steps": 0,
                                       "step_seconds": 0.0, "finish_callback_errors": 0}
        self.on_finish: Callable[[FinishedRequest], None] | None = None
        # No marker watch between steps yet: a marker rule would never fire, so it is refused.
        self.capabilities = EngineCapabilities(name="hf", batch_steps=True, logprobs=True, prompt_logprobs=True,
                                               pooled_capture=True,
                                               steering=Support("the HF engine", markers=False))
        # Work run on the worker between steps (``capture``): (function, future) pairs.
        self._calls: queue.Queue[tuple[Callable[[], Any], Future]] = queue.Queue()
        self._capturing = False

    # -- lifecycle ----------------------------------------------------------------------------------------
    def start(self) -> None:
        """Install the hooks (once, for the engine's lifetime) and start the worker."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        for device in dict.fromkeys(self.layer_devices.values()):  # the kernel is built now, not in a step
            prepare_backend(device)
        with self._hooks.registering() as handles:
            for layer in range(1, self.layout.n_layers + 1):
                handles.add(hook_residual(self.layout, layer, self._hook(layer)))
        self._thread = threading.Thread(target=self._run, name="steerlib-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the step in flight; every row still running or queued ends with ``EngineStopped``."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._hooks.remove()
        error = EngineStopped("server is shutting down")
        for row in [*self._rows, *self._drain()]:
            row.sink(("error", error))
        self._rows = []
        self._kv.reset()
        while not self._calls.empty():
            self._calls.get_nowait()[1].set_exception(error)

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

    def capture(self, samples: Sequence[tuple[list[int], int]], layers: Sequence[int] | None = None,
                timeout: float = 600.0) -> list[dict[str, Any]]:
        """Pooled residuals of token sequences, ``(token ids, prompt length)`` each, at ``layers`` (None: all):
        per sample ``prompt_mean`` / ``prompt_last`` / ``response_mean`` (``[len(layers), D]`` lists, NaN without a
        response), ``token_norms`` and the token counts, as ``steerlib.core.capture`` pools them. Runs unsteered on
        the worker between two steps (the rows being served wait for it), so no pass of theirs sees its hooks."""
        if not self.alive:
            raise RuntimeError("the engine is not running")
        keep = check_layers(self.layout, None if layers is None else list(layers))
        for i, (ids, p_len) in enumerate(samples):
            if not 1 <= p_len <= len(ids):
                raise ValueError(f"sample {i}: prompt length {p_len} is outside 1..{len(ids)} (its tokens)")

        def run() -> list[dict[str, Any]]:
            self._capturing = True
            try:
                acts = capture_encoded(self.model, samples, keep, pad_id=pad_token_id(self.tokenizer),
                                       batch_size=self.max_batch)
            finally:
                self._capturing = False
            return [{**{kind: acts.pooled[kind][i].tolist() for kind in POOLINGS},
                     "token_norms": acts.token_norms[i].tolist(), "prompt_tokens": acts.prompt_lengths[i],
                     "response_tokens": acts.response_lengths[i]} for i in range(len(samples))]

        done: Future = Future()
        self._calls.put((run, done))
        return done.result(timeout)

    def _run_calls(self) -> None:
        while True:
            try:
                fn, done = self._calls.get_nowait()
            except queue.Empty:
                return
            if done.set_running_or_notify_cancel():
                try:
                    done.set_result(fn())
                except BaseException as exc:  # the caller gets the error; the worker goes on serving
                    done.set_exception(exc)

    def queue_depth(self) -> int:
        return self._incoming.qsize()

    def active_rows(self) -> int:
        return len(self._rows)

    def submit(self, prompt_ids: list[int], edits: list[Edit], sampling: Sampling,
               sink: Callable[[tuple], None], *, steered: bool) -> _Row:
        """Queue one row; ``sink`` receives ``("token", text, [[K values] per token], step)``, then exactly one of
        ``("done", Completion)`` (also for a cancelled row, with finish reason ``"cancelled"``) or
        ``("error", EngineError)``, from the worker thread."""
        if not self.alive:
            raise EngineStopped("the generation worker is not running")
        if self._incoming.qsize() >= self.max_queue:
            raise QueueFull(f"too many queued requests ({self.max_queue}); retry later")
        try:
            check_supported(edits, self.capabilities.steering)
        except SteeringNotSupported as exc:
            raise UnsupportedSteering(str(exc)) from None
        row = _Row(prompt_ids=list(prompt_ids), edits=list(edits), sampling=sampling, sink=sink, steered=steered)
        with self._stats_lock:
            self._stats["requests"] += 1
            row.request_id = f"hf-{self._stats['requests']}"
        self._incoming.put(row)
        return row

    def cancel(self, row: _Row) -> None:
        """End ``row``: it leaves the batch at the next step boundary (queued, it never starts)."""
        row.cancelled.set()

    def stats(self) -> dict[str, Any]:
        with self._stats_lock:
            s = dict(self._stats)
        s["engine"] = self.capabilities.name
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
        self._worker_ident = threading.get_ident()
        while not self._stop.is_set():
            if self._paused.is_set():
                time.sleep(0.01)
                continue
            self._run_calls()
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
                error = RowFailed(f"generation failed: {type(exc).__name__}: {exc}")
                for row in self._rows:
                    self._fail(row, error)
                self._rows = []
                self._kv.reset()

    def _fail(self, row: _Row, error: EngineError) -> None:
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
            row.started = now
            row.reply = Reply(self.tokenizer, row.sampling, len(row.prompt_ids), self.eos_ids,
                              readout=self.readout is not None)
            if row.cancelled.is_set():  # its client left while it queued: it still gets its one ending
                row.reply.cancel()
                self._complete(row)
                continue
            row.pending = list(row.prompt_ids)
            row.serial = next(self._row_serials)
            if row.sampling.temperature > 0:
                row.generator = torch.Generator(device=self.device)
                if row.sampling.seed is not None:
                    row.generator.manual_seed(row.sampling.seed)
                else:
                    row.generator.seed()
            fresh.append(row)
        if not fresh:
            return
        if not self._rows:
            self._kv.reset()
        self._kv.add_rows(len(fresh))
        self._rows.extend(fresh)

    # -- steering -----------------------------------------------------------------------------------------
    def _hook(self, layer: int):
        plan = self.plan

        def edit(flat: Tensor, _shape: tuple[int, int], _kwargs: dict) -> None:
            # Installed for the engine's lifetime on every block: it acts only on the worker's own passes, and
            # only at layers the current rows steer or read out.
            if threading.get_ident() != self._worker_ident or self._capturing:
                return
            readout = self.readout_dirs if layer == self.readout_layer else None
            if readout is None and layer not in plan.layers:
                return
            proj = plan.apply(layer, flat, readout)  # in place (a non-contiguous state is written back)
            if readout is not None:
                self._step_proj = proj

        return edit

    def _fill_plan(self, pos: Tensor, step_mask: Tensor) -> None:
        """Lower the rows' steering to this step's per-token arguments (rebuilt on the host when rows change)."""
        ident = tuple(r.serial for r in self._rows)
        if ident != self._plan_for:
            # Latched gates belong to rows, not to plan positions: read them back before the rows are rebuilt.
            if self._plan_rows:
                for row, latched in zip(self._plan_rows, self.plan.latched_edits(), strict=True):
                    row.latched = latched
            self.plan.set_rows([r.edits for r in self._rows], [len(r.prompt_ids) for r in self._rows],
                               latched=[r.latched for r in self._rows])
            self._plan_for = ident
            self._plan_rows = list(self._rows)
        b, t = pos.shape
        row_of_token = torch.arange(b, device=self.device).repeat_interleave(t)
        # Padding gets position -1, which no interval holds: only real tokens are edited.
        self.plan.fill(row_of_token, torch.where(step_mask, pos, -1).reshape(-1))

    # -- one step -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def _step(self) -> None:
        rows = self._rows
        b = len(rows)
        # A long prompt is fed in chunks over several steps, so one arrival cannot make the step's mask
        # [B, T, S + T] huge or stall the decoding rows for long; the row samples once its prompt is in.
        lengths = [min(len(r.pending), self.prefill_chunk) for r in rows]
        prefill = [not r.generated for r in rows]
        t = max(lengths)
        ids = torch.full((b, t), self.pad_id, dtype=torch.long)
        pos = torch.zeros((b, t), dtype=torch.long)
        step_mask = torch.zeros((b, t), dtype=torch.bool)
        for i, r in enumerate(rows):
            n = lengths[i]
            ids[i, t - n:] = torch.tensor(r.pending[:n])
            pos[i, t - n:] = torch.arange(r.n_seen, r.n_seen + n)
            step_mask[i, t - n:] = True
        ids, pos, step_mask = ids.to(self.device), pos.to(self.device), step_mask.to(self.device)
        mask, kv = self._kv.attention_mask(step_mask, self.dtype)
        self._fill_plan(pos, step_mask)
        self._step_proj = None
        step_id = next(self._step_ids)
        # Prompt log-probabilities need every fed position's logits; otherwise only the last one's are computed.
        want_prompt = [r.sampling.prompt_logprobs is not None and r.n_seen < len(r.prompt_ids) for r in rows]
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                         logits_to_keep=t if any(want_prompt) else 1, **{self.cache_kw: self._kv.cache})
        if any(want_prompt):
            for i, r in enumerate(rows):
                if want_prompt[i]:
                    self._prompt_logprobs(r, out.logits[i, t - lengths[i]:], lengths[i])
        logits = out.logits[:, -1, :].float()
        proj = self._step_proj.view(b, t, -1)[:, -1, :].tolist() if self._step_proj is not None else None
        self._kv.commit(kv, padded=t > 1)

        with self._stats_lock:
            st = self._stats
            st["steps"] += 1
            st["rows_stepped"] += b
            st["max_batch_seen"] = max(st["max_batch_seen"], b)
            st["prefill_tokens"] += sum(n for n, p in zip(lengths, prefill, strict=True) if p)
            st["generated_tokens"] += sum(1 for r, n in zip(rows, lengths, strict=True)
                                          if len(r.pending) == n and not r.reply.closing)
            st["mixed_steps"] += int(any(prefill) and not all(prefill))
            st["steered_row_steps"] += sum(1 for r in rows if r.edits)

        # Whole input fed: sample (a closing row only wanted its read-out).
        ready = [len(r.pending) == lengths[i] and not r.reply.closing for i, r in enumerate(rows)]
        now = time.monotonic()
        keep = []
        for i, r in enumerate(rows):
            r.n_seen += lengths[i]
            if r.reply.closing and len(r.pending) == lengths[i]:
                self._send(r, r.reply.close(proj[i] if proj is not None else None), step_id, b)
                self._complete(r)
                continue
            if not ready[i]:  # mid-prompt: nothing to sample yet
                r.pending = r.pending[lengths[i]:]
                if r.cancelled.is_set():
                    r.reply.cancel()
                    self._complete(r)
                else:
                    keep.append(i)
                continue
            try:  # a row whose sampling or decoding fails fails alone
                token = self._sample(r, logits[i])
                if r.sampling.logprobs is not None:
                    lp = torch.log_softmax(logits[i], dim=-1)
                    r.token_logprobs.append(from_logits(lp, token, r.sampling.logprobs))
                r.pending = [token]
                r.steps.append([step_id, b])
                if r.first_token is None:
                    r.first_token = now
                self._send(r, r.reply.push(token, proj[i] if proj is not None else None), step_id, b)
            except Exception as exc:
                log.exception("row %d failed", r.serial)
                self._fail(r, RowFailed(f"generation failed: {type(exc).__name__}: {exc}"))
                continue
            if r.reply.finish is None and r.cancelled.is_set():
                r.reply.cancel()
            if not r.reply.done:  # still generating, or one more step feeds its last token for its read-out
                keep.append(i)
            else:
                self._complete(r)
        if len(keep) < b:
            self._rows = [rows[i] for i in keep]
            self._kv.keep_rows(keep)

    @staticmethod
    def _prompt_logprobs(r: _Row, logits: Tensor, n: int) -> None:
        """Log-probabilities of the prompt tokens predicted by this step's ``n`` fed positions (``logits``
        ``[n, V]``): position ``q`` predicts prompt token ``q + 1``; the prompt's first token has none."""
        start = r.n_seen  # absolute position of the first fed token (n_seen is advanced after this)
        if start == 0:
            r.prompt_logprobs.append(None)
        targets = r.prompt_ids[start + 1:start + n + 1]
        r.prompt_logprobs.extend(prompt_entries(logits[:len(targets)], targets, r.sampling.prompt_logprobs or 0))

    def _sample(self, r: _Row, logits: Tensor) -> int:
        """The row's next token. Safe for any temperature > 0: logits are shifted so their maximum is 0 before
        dividing, so a tiny temperature sends every other logit to -inf (greedy) rather than inf - inf = NaN."""
        sp = r.sampling
        if sp.temperature <= 0:
            return int(logits.argmax())
        z = (logits.double() - logits.max().double()) / sp.temperature
        probs = torch.softmax(z, dim=-1)
        if sp.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            cum = sorted_p.cumsum(0)
            cut = cum - sorted_p > sp.top_p  # keep the smallest prefix whose mass reaches top_p
            sorted_p[cut] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
            raise ValueError(f"sampling probabilities are not finite at temperature {sp.temperature:g}")
        return int(torch.multinomial(probs.float(), 1, generator=r.generator))

    @staticmethod
    def _send(r: _Row, event: tuple[str, list[list[float]]] | None, step_id: int, size: int) -> None:
        if event is not None:
            r.sink(("token", event[0], event[1], [step_id, size]))

    def _complete(self, r: _Row) -> None:
        reply = r.reply
        finish = public_finish(reply.finish)
        names = self.readout.names if self.readout is not None else []
        c = Completion(text=reply.text, completion_tokens=len(reply.tokens), prompt_tokens=len(r.prompt_ids),
                       finish_reason=finish, trait_projections=reply.summaries(names, self.readout_layer),
                       steps=r.steps, queue_ms=round(((r.started or r.enqueued) - r.enqueued) * 1000, 2),
                       ttft_ms=round((r.first_token - r.enqueued) * 1000, 2) if r.first_token else None,
                       token_ids=tuple(reply.tokens),
                       logprobs=tuple(r.token_logprobs) if r.sampling.logprobs is not None else None,
                       prompt_logprobs=(tuple(r.prompt_logprobs) if r.sampling.prompt_logprobs is not None
                                        else None))
        with self._stats_lock:
            self._stats["cancelled" if finish == "cancelled" else "completed"] += 1
        if finish != "cancelled" and self.on_finish is not None:
            done = FinishedRequest.build(request_id=r.request_id, prompt_ids=r.prompt_ids, token_ids=reply.tokens,
                                         readout=reply.readout_pairs(), edits=r.edits, steered=r.steered,
                                         steering=r.meta_steering, completion=c)
            try:
                self.on_finish(done)
            except Exception:  # monitoring must never fail a request, nor fail unseen
                log.exception("on_finish callback failed for %s", r.request_id)
                with self._stats_lock:
                    self._stats["finish_callback_errors"] += 1
        r.sink(("done", c))
