"""The serving engine on vLLM: ``steerlib.serve.contract.ServingEngine`` over vLLM's ``AsyncLLM``.

``steerlib serve --engine vllm`` builds this instead of the Hugging Face engine; the routes, the steering
request field, the vector registry, the drift monitor, metrics and auth are unchanged (they use only the
contract, and ``on_finish`` gets the same ``FinishedRequest`` from both engines).

* A row's edits (already validated and lowered by the service) travel to vLLM's workers as a JSON spec in
  ``SamplingParams.extra_args["steerlib"]`` and salt the prefix cache (``steerlib.vllm``); steerlib's vLLM plugin
  (entry point ``vllm.general_plugins``) applies them per token inside vLLM's forward.
* The trait read-out is configured once in every worker (``collective_rpc("steerlib_configure_readout")``) and
  each step's values are fetched with ``collective_rpc("steerlib_pop_readouts")``: one call per round of
  outputs for every row that got tokens in it, not one per row.
* AsyncLLM runs on an event loop in a thread of its own; ``sink`` is called from that thread, as the HF
  engine calls it from its worker thread.
* Text, finish reasons and read-out pairing are decided by the same ``detok.Reply`` as on the HF engine
  (steerlib detokenises, stop sequences included). The last token's own read-out needs one more forward pass,
  so a row asks vLLM for one token more than ``max_tokens`` (or, after a stop sequence, waits for the next
  token) and drops that token.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from steerlib.serve.contract import (
    Completion,
    EngineCapabilities,
    EngineStopped,
    FinishedRequest,
    QueueFull,
    RowFailed,
    Sampling,
    TokenLogprob,
    UnsupportedSteering,
    public_finish,
)
from steerlib.serve.detok import Reply
from steerlib.serve.logprobs import from_vllm
from steerlib.steering.plan import Edit
from steerlib.steering.steer import TraitReadout
from steerlib.vllm.capture import CAPTURE_KEY, check_boundary
from steerlib.vllm.layout import VllmOptions, bound_cores, loadable_compile_cache, start_config
from steerlib.vllm.slots import SlotsExhausted, store_of
from steerlib.vllm.spec import SPEC_KEY, SUPPORT, UnsupportedOnVllm, cache_salt, encode_rows

__all__ = ["VllmEngine", "engine_args", "merge_readouts"]

log = logging.getLogger("steerlib.serve")


def engine_args(model_path: str, *, max_batch: int = 16, max_model_len: int | None = None, dtype: str = "float32",
                enforce_eager: bool = False, max_steer_vectors: int | None = None,
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """vLLM engine arguments for a steerlib server (``VllmOptions.engine_args``: the worker extension and the
    compile-cache identity included); ``max_steer_vectors``: rows each worker's slot table holds
    (``steerlib.vllm.slots``); ``extra`` holds any other engine argument by vLLM's name."""
    opts = VllmOptions.from_engine_args({"max_model_len": max_model_len, "dtype": dtype,
                                         "enforce_eager": enforce_eager, "max_steer_vectors": max_steer_vectors,
                                         **(extra or {})})
    return opts.engine_args(str(model_path), max_num_seqs=max_batch)


@dataclass
class _RowState:
    """A running row's progress (the engine's event loop only)."""

    reply: Reply
    seen: list[int] = field(default_factory=list)  # every token vLLM returned (the closing one included)
    stored: dict[int, list[float]] = field(default_factory=dict)  # fetched read-outs by position, not yet used
    first_token: float | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # per kept generated token (Sampling.logprobs)
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None


@dataclass
class _Row:
    """One generation (one choice of one request); the app reads ``steered``, ``meta_steering``, ``cancelled``."""

    prompt_ids: list[int]
    edits: tuple[Edit, ...]
    spec: str | None
    sampling: Sampling
    sink: Callable[[tuple], None]
    steered: bool
    request_id: str = ""
    meta_steering: list = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.monotonic)
    started: bool = False
    token_ids: list[int] = field(default_factory=list)  # generated so far (EOS included, as vLLM reports)
    task: Future | None = None  # the row's coroutine on the engine's loop (``cancel`` cancels it)


class VllmEngine:
    """Runs rows on vLLM's AsyncLLM. Use ``start()``/``stop()``.

    Args:
        args: vLLM engine arguments (``engine_args``).
        tokenizer: used to tell EOS tokens (``eos_ids``); vLLM detokenizes itself.
        readout: the per-token trait read-out, or None.
        max_batch, max_queue: rows in flight beyond ``max_batch + max_queue`` are refused with 429.
        eos_ids: token ids that end a row (their read-out value is not reported, as in the HF engine).
        ignore_eos: generate ``max_tokens`` whatever comes (benchmarks: equal lengths on every engine).
    """

    def __init__(self, args: dict[str, Any], tokenizer: Any = None, *, readout: TraitReadout | None = None,
                 max_batch: int = 16, max_queue: int = 256, eos_ids: set[int] | None = None,
                 ignore_eos: bool = False):
        self.args = dict(args)
        self.ignore_eos = ignore_eos
        self.tokenizer = tokenizer
        self.readout = readout
        self.readout_layer = readout.layers[0] if readout is not None else None
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.eos_ids = set(eos_ids or ())
        self.dtype = args.get("dtype", "auto")
        self._store = store_of(args.get("additional_config"))  # rows go there once; requests carry their keys
        self.on_finish: Callable[[FinishedRequest], None] | None = None
        # Pooled capture reads one worker's sums: offered where one worker holds every layer.
        self.capabilities = EngineCapabilities(name="vllm", batch_steps=False, logprobs=True, prompt_logprobs=True,
                                               steering=SUPPORT, pooled_capture=(
                                                   int(args.get("pipeline_parallel_size", 1) or 1) == 1))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._llm: Any = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._held = threading.Event()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._rows: dict[str, _Row] = {}
        self._pending_readout: dict[str, asyncio.Future] = {}
        self._readout_wakeup: asyncio.Event | None = None
        self._stats: dict[str, Any] = {"requests": 0, "completed": 0, "failed": 0, "cancelled": 0,
                                       "prefill_tokens": 0, "generated_tokens": 0, "steered_rows": 0,
                                       "readout_calls": 0, "finish_callback_errors": 0}

    # -- lifecycle ----------------------------------------------------------------------------------------
    def start(self, timeout: float = 1800.0) -> None:
        """Start vLLM (loads and possibly compiles the model: minutes on a CPU) and wait until it serves."""
        if self.alive:
            return
        self._ready.clear()
        self._thread = threading.Thread(target=self._thread_main, name="steerlib-vllm", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"vLLM did not start within {timeout} s")
        if self._start_error is not None:
            raise RuntimeError(f"vLLM failed to start: {self._start_error}") from self._start_error

    def _thread_main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._boot())
        except BaseException as exc:  # reported to start()
            self._start_error = exc
            self._ready.set()
            return
        self._ready.set()
        loop.run_forever()
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()

    async def _boot(self) -> None:
        from vllm.v1.engine.async_llm import AsyncLLM

        config = start_config(self.args)  # refuses a layout steering is not right under, before any worker
        with bound_cores(config.parallel_config.world_size), loadable_compile_cache():  # spawned in here
            self._llm = AsyncLLM.from_vllm_config(config)
        if self.readout is not None:
            dirs = self.readout.directions[self.readout_layer].float().tolist()
            await self._llm.collective_rpc("steerlib_configure_readout", args=(self.readout_layer, dirs))
        self._readout_wakeup = asyncio.Event()
        asyncio.get_running_loop().create_task(self._readout_pump())

    def stop(self, timeout: float = 30.0) -> None:
        """Stop vLLM; rows still running get a 503."""
        error = EngineStopped("server is shutting down")
        with self._lock:
            rows, self._rows = list(self._rows.values()), {}
        for row in rows:
            row.cancelled.set()
            row.sink(("error", error))
        if self._llm is not None:
            if self._loop is not None and self._loop.is_running():
                with contextlib.suppress(Exception):  # a wedged loop must not keep vLLM from being shut down
                    asyncio.run_coroutine_threadsafe(_cancel_tasks(), self._loop).result(timeout)
            self._llm.shutdown()
            self._llm = None
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout)
        self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._llm is not None

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Admit no new rows to vLLM while inside the block (they wait; rows in flight continue)."""
        self._held.set()
        try:
            yield
        finally:
            self._held.clear()

    def queue_depth(self) -> int:
        with self._lock:
            return sum(1 for r in self._rows.values() if not r.started)

    def active_rows(self) -> int:
        with self._lock:
            return sum(1 for r in self._rows.values() if r.started)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            s = dict(self._stats)
        s.update(queue_depth=self.queue_depth(), active_rows=self.active_rows(), worker_alive=self.alive,
                 max_batch=self.max_batch, engine=self.capabilities.name, steps=None, mean_batch_size=None,
                 mean_step_ms=None)
        return s

    # -- rows ---------------------------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], edits: Sequence[Edit], sampling: Sampling, sink: Callable[[tuple], None],
               *, steered: bool) -> _Row:
        """Queue one row; ``sink`` gets ``("token", text, [[K values] per token], [step, batch])`` events, then
        ``("done", Completion)`` or ``("error", EngineError)`` (from the engine's thread)."""
        if not self.alive or self._loop is None:
            raise EngineStopped("the generation worker is not running")
        with self._lock:
            if len(self._rows) >= self.max_batch + self.max_queue:
                raise QueueFull(f"too many queued requests ({self.max_queue}); retry later")
            self._stats["requests"] += 1
            self._stats["steered_rows"] += int(bool(edits))
        try:
            spec = (encode_rows(edits, readout=self.readout is not None, store=self._store)
                    if (edits or self.readout) else None)
        except UnsupportedOnVllm as exc:
            raise UnsupportedSteering(str(exc)) from None
        row = _Row(prompt_ids=list(prompt_ids), edits=tuple(edits), spec=spec, sampling=sampling, sink=sink,
                   steered=steered)
        row.request_id = f"steerlib-{next(self._ids)}"
        with self._lock:
            self._rows[row.request_id] = row
        row.task = asyncio.run_coroutine_threadsafe(self._run(row), self._loop)
        return row

    def cancel(self, row: _Row) -> None:
        """End ``row`` now: its coroutine is cancelled on the engine's loop, which makes vLLM abort the request
        (``AsyncLLM.generate`` aborts on cancellation) without waiting for its next output."""
        row.cancelled.set()
        if row.task is not None:
            row.task.cancel()

    def capture(self, samples: Sequence[tuple[list[int], int]], layers: Sequence[int] | None = None,
                timeout: float = 600.0) -> list[dict[str, Any]]:
        """Pooled residuals of token sequences read inside the running engine (``steerlib.vllm.capture``): per
        ``(token ids, prompt length)``, ``prompt_mean`` / ``prompt_last`` / ``response_mean`` / ``token_norms``
        (``[len(layers), D]`` lists; None: every layer) and the token counts, as ``steerlib.core.capture`` pools
        them. Each is a prefill-only request beside the rows being served (what monitor and flag need of a
        logged conversation, without a second model)."""
        if not self.capabilities.pooled_capture:
            raise ValueError("pooled capture needs every layer on one worker (pipeline_parallel_size=1)")
        if not self.alive or self._loop is None:
            raise RuntimeError("the vLLM engine is not running")
        for i, (ids, p_len) in enumerate(samples):
            check_boundary(p_len)
            if p_len > len(ids):
                raise ValueError(f"sample {i}: prompt length {p_len} is more than its {len(ids)} tokens")
        coro = self._capture(list(samples), None if layers is None else [int(x) for x in layers])
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _capture(self, samples: list[tuple[list[int], int]], layers: list[int] | None) -> list[dict[str, Any]]:
        from vllm import SamplingParams

        async def one(rid: str, ids: list[int], p_len: int) -> None:
            params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False,
                                    extra_args={CAPTURE_KEY: p_len})
            async for _ in self._llm.generate({"prompt_token_ids": list(ids)}, params, rid):
                pass

        rids = [f"capture-{next(self._ids)}" for _ in samples]
        await asyncio.gather(*(one(rid, ids, p) for rid, (ids, p) in zip(rids, samples, strict=True)))
        got = (await self._llm.collective_rpc("steerlib_pop_captures", args=(rids, layers)))[0]
        missing = [rid for rid in rids if rid not in got]
        if missing:
            raise RuntimeError(f"steerlib: the worker returned no capture for {missing}")
        return [got[rid] for rid in rids]

    def _params(self, row: _Row) -> Any:
        from vllm import SamplingParams

        sp = row.sampling
        # One token more with a read-out: its forward pass reads the last kept token's own position. vLLM
        # generates at least one token: with max_tokens 0 that one is the prompt's closing pass (``Reply``).
        extra = 1 if self.readout is not None else 0
        return SamplingParams(max_tokens=max(1, sp.max_tokens + extra), temperature=sp.temperature, top_p=sp.top_p,
                              seed=sp.seed, ignore_eos=self.ignore_eos, skip_special_tokens=True,
                              detokenize=False, extra_args={SPEC_KEY: row.spec} if row.spec else None,
                              logprobs=sp.logprobs, prompt_logprobs=sp.prompt_logprobs)

    async def _run(self, row: _Row) -> None:
        try:
            while self._held.is_set():
                await asyncio.sleep(0.01)
            if row.cancelled.is_set():
                self._finish_cancelled(row)
                return
            prompt: dict[str, Any] = {"prompt_token_ids": row.prompt_ids}
            salt = cache_salt(row.spec)
            if salt:
                prompt["cache_salt"] = salt
            eos = set() if self.ignore_eos else self.eos_ids
            state = _RowState(Reply(self.tokenizer, row.sampling, len(row.prompt_ids), eos,
                                    readout=self.readout is not None))
            async for out in self._llm.generate(prompt, self._params(row), row.request_id):
                row.started = True
                if row.cancelled.is_set():
                    await self._llm.abort(row.request_id)
                    self._finish_cancelled(row)
                    return
                new = list(out.outputs[0].token_ids)[len(state.seen):]
                state.seen.extend(new)
                self._logprobs(row, state, out, new)
                if await self._take(row, state, new):
                    break
            if not state.reply.done:  # vLLM ended the request first (e.g. its own length limit)
                state.reply.cut_short()
            await self._llm.abort(row.request_id)
            self._complete(row, state)
        except SlotsExhausted as exc:  # every vector slot is pinned by running rows: retry later (429)
            with self._lock:
                self._rows.pop(row.request_id, None)
            row.sink(("error", QueueFull(str(exc))))
        except asyncio.CancelledError:  # ``cancel``: wherever the row was waiting, vLLM must forget it
            with contextlib.suppress(Exception):
                await self._llm.abort(row.request_id)
            self._finish_cancelled(row)
        except Exception as exc:  # one row's failure must not take the loop down
            log.exception("vLLM row %s failed", row.request_id)
            with self._lock:
                self._rows.pop(row.request_id, None)
                self._stats["failed"] += 1
            row.sink(("error", RowFailed(f"generation failed: {type(exc).__name__}: {exc}")))

    @staticmethod
    def _logprobs(row: _Row, state: _RowState, out: Any, new: list[int]) -> None:
        """Keep the log-probabilities vLLM computed (cumulative outputs: ``outputs[0].logprobs[i]`` is token
        ``i``'s); tokens past what the reply keeps (the closing token) are trimmed in ``_complete``."""
        sp = row.sampling
        if sp.prompt_logprobs is not None and state.prompt_logprobs is None and out.prompt_logprobs is not None:
            state.prompt_logprobs = tuple(None if pos is None else from_vllm(pos, tid, sp.prompt_logprobs)
                                          for pos, tid in zip(out.prompt_logprobs, row.prompt_ids, strict=True))
        if sp.logprobs is not None and new:
            got = out.outputs[0].logprobs
            first = len(state.seen) - len(new)
            state.logprobs.extend(from_vllm(got[first + j], tid, sp.logprobs) for j, tid in enumerate(new))

    async def _take(self, row: _Row, state: _RowState, new: list[int]) -> bool:
        """Account for newly generated tokens; True when the row is complete (its read-out included)."""
        reply = state.reply
        values = await self._values(row, state, len(state.seen) - len(new), len(new)) if self.readout else None
        for j, token in enumerate(new):
            value = values[j] if values is not None else None
            if reply.closing:  # the closing token: only its forward pass's read-out is used
                self._send(row, reply.close(value))
                return True
            if state.first_token is None:
                state.first_token = time.monotonic()
            self._send(row, reply.push(token, value))
            row.token_ids = list(reply.tokens)
            if reply.done:
                return True
        return False

    @staticmethod
    def _send(row: _Row, event: tuple[str, list[list[float]]] | None) -> None:
        if event is not None:
            row.sink(("token", event[0], event[1], [0, 0]))

    async def _values(self, row: _Row, state: _RowState, done: int, count: int) -> list[list[float]]:
        """Read-out values of the forward passes that produced tokens ``done .. done + count - 1`` (token ``i`` at
        ``Reply.position(i)``). A fetch may also bring positions of steps that ran since (vLLM schedules
        ahead); they wait in ``state.stored`` for their tokens."""
        wanted = [state.reply.position(i) for i in range(done, done + count)]
        if any(pos not in state.stored for pos in wanted):
            fut = asyncio.get_running_loop().create_future()
            self._pending_readout[row.request_id] = fut
            self._readout_wakeup.set()
            state.stored.update(await fut)
        missing = [pos for pos in wanted if pos not in state.stored]
        if missing:
            raise RuntimeError(f"no read-out for positions {missing} of {row.request_id} (have "
                               f"{sorted(state.stored)})")
        return [state.stored.pop(pos) for pos in wanted]

    async def _readout_pump(self) -> None:
        """One ``collective_rpc`` per round for every row waiting for read-out values."""
        while True:
            await self._readout_wakeup.wait()
            self._readout_wakeup.clear()
            await asyncio.sleep(0)  # let the other rows of this round of outputs register
            waiting, self._pending_readout = self._pending_readout, {}
            if not waiting or self._llm is None:
                continue
            try:
                got = merge_readouts(await self._llm.collective_rpc("steerlib_pop_readouts", args=(list(waiting),)))
                with self._lock:
                    self._stats["readout_calls"] += 1
            except Exception as exc:  # noqa: BLE001 - every waiting row learns it
                for fut in waiting.values():
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for rid, fut in waiting.items():
                if not fut.done():
                    fut.set_result({int(k): v for k, v in got.get(rid, {}).items()})

    def _finish_cancelled(self, row: _Row) -> None:
        with self._lock:
            self._rows.pop(row.request_id, None)
            self._stats["cancelled"] += 1
        row.sink(("done", Completion(text="", completion_tokens=0, prompt_tokens=len(row.prompt_ids),
                                     finish_reason="cancelled", trait_projections={}, steps=[],
                                     queue_ms=0.0, ttft_ms=None)))

    def _complete(self, row: _Row, state: _RowState) -> None:
        reply = state.reply
        names = self.readout.names if self.readout is not None else []
        first = state.first_token
        c = Completion(text=reply.text, completion_tokens=len(reply.tokens), prompt_tokens=len(row.prompt_ids),
                       finish_reason=public_finish(reply.finish), trait_projections=reply.summaries(names,
                                                                                                self.readout_layer),
                       steps=[[0, 0]] * len(reply.tokens), queue_ms=0.0,
                       ttft_ms=round((first - row.enqueued) * 1000, 2) if first else None,
                       token_ids=tuple(reply.tokens),
                       logprobs=(tuple(state.logprobs[:len(reply.tokens)]) if row.sampling.logprobs is not None
                                 else None),
                       prompt_logprobs=state.prompt_logprobs if row.sampling.prompt_logprobs is not None else None)
        with self._lock:
            self._rows.pop(row.request_id, None)
            self._stats["completed"] += 1
            self._stats["prefill_tokens"] += len(row.prompt_ids)
            self._stats["generated_tokens"] += len(reply.tokens)
        if self.on_finish is not None:
            done = FinishedRequest.build(request_id=row.request_id, prompt_ids=row.prompt_ids,
                                         token_ids=reply.tokens, readout=reply.readout_pairs(), edits=row.edits,
                                         steered=row.steered, steering=row.meta_steering, completion=c)
            try:
                self.on_finish(done)
            except Exception:  # monitoring must never fail a request, nor fail unseen
                log.exception("on_finish callback failed for %s", row.request_id)
                with self._lock:
                    self._stats["finish_callback_errors"] += 1
        row.sink(("done", c))


def merge_readouts(per_worker: Sequence[dict[str, dict[int, list[float]]]]) -> dict[str, dict[int, list[float]]]:
    """One engine's read-outs from all its workers: under pipeline parallel only the stage that owns the read-out
    layer has them; tensor-parallel ranks hold the same values (the residual stream after the all-reduce), the
    first rank's are kept."""
    out: dict[str, dict[int, list[float]]] = {}
    for got in per_worker:
        for rid, values in got.items():
            mine = out.setdefault(rid, {})
            for pos, v in values.items():
                mine.setdefault(int(pos), v)
    return out


async def _cancel_tasks() -> None:
    """Cancel every other task of the engine's loop, vLLM's output handler among them, and wait for them.

    vLLM's ``AsyncLLM.shutdown`` stops the engine core before it cancels the task reading from it; run from
    another thread, that task first sees the engine die and logs ``EngineDeadError`` at ERROR (and rows still
    waiting fail loudly). Cancelled first, a deliberate stop logs nothing at ERROR.
    """
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
