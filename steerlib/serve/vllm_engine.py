"""The serving engine on vLLM: the surface of ``steerlib.serve.engine.Engine`` over vLLM's ``AsyncLLM``.

``steerlib serve --engine vllm`` builds this instead of the Hugging Face engine; the routes, the steering
request field, the vector registry, the drift monitor and auth are unchanged (they only use ``submit``,
``stats``, ``start``/``stop``, ``hold``, ``queue_depth``, ``active_rows``, ``monitor_layer`` and ``on_finish``).

* A row's edits (already validated and lowered by the service) travel to vLLM's workers as a JSON spec in
  ``SamplingParams.extra_args["steerlib"]`` and salt the prefix cache (``steerlib.vllm``); steerlib's vLLM plugin
  (entry point ``vllm.general_plugins``) applies them per token inside vLLM's forward.
* The trait read-out is configured once in every worker (``collective_rpc("steerlib_configure_readout")``) and
  each step's values are fetched with ``collective_rpc("steerlib_pop_readouts")``: one call per round of
  outputs for every row that got tokens in it, not one per row.
* AsyncLLM runs on an event loop in a thread of its own; ``sink`` is called from that thread, as the HF
  engine calls it from its worker thread.
* Text and read-out mean what they mean on the HF engine: steerlib detokenises (``TextStream``, stop sequences
  included) and a response's projections are its tokens' own (``values[0]`` at the last prompt token, then one
  per response token). The last token's own read-out needs one more forward pass, so a row asks vLLM for one
  token more than ``max_tokens`` (or, after a stop sequence, waits for the next token) and drops that token.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from steerlib.serve.detok import TextStream
from steerlib.serve.engine import (
    Completion,
    EngineStopped,
    QueueFull,
    RowFailed,
    Sampling,
    UnsupportedSteering,
    summarize_projections,
)
from steerlib.steering.plan import Edit
from steerlib.steering.steer import TraitReadout
from steerlib.vllm.slots import CAPACITY_KEY, SlotsExhausted, capacity_of, store_of
from steerlib.vllm.spec import SPEC_KEY, UnsupportedOnVllm, cache_salt, encode_rows

__all__ = ["VllmEngine", "engine_args"]

log = logging.getLogger("steerlib.serve")


def engine_args(model_path: str, *, max_batch: int = 16, max_model_len: int | None = None, dtype: str = "float32",
                enforce_eager: bool = False, max_steer_vectors: int | None = None,
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """vLLM engine arguments for a steerlib server: the worker extension and the compile-cache identity
    (``max_steer_vectors``: rows each worker's slot table holds, ``steerlib.vllm.slots``)."""
    from steerlib.vllm.worker import IDENTITY

    args = dict(model=str(model_path), dtype=dtype, max_num_seqs=max_batch, enforce_eager=enforce_eager,
                enable_prefix_caching=True, additional_config={"steerlib": IDENTITY},
                worker_extension_cls="steerlib.vllm.worker.SteerlibWorkerExtension")
    if max_model_len is not None:
        args["max_model_len"] = max_model_len
    if max_steer_vectors is not None:
        args["additional_config"][CAPACITY_KEY] = capacity_of({CAPACITY_KEY: max_steer_vectors})
    args.update(extra or {})
    return args


@dataclass
class _RowState:
    """A running row's progress (the engine's event loop only)."""

    text: TextStream
    seen: list[int] = field(default_factory=list)  # every token vLLM returned
    tokens: list[int] = field(default_factory=list)  # the reply's tokens (EOS included, the closing one not)
    values: list[list[float]] = field(default_factory=list)
    unsent: list[list[float]] = field(default_factory=list)
    stored: dict[int, list[float]] = field(default_factory=dict)  # fetched read-outs by position, not yet used
    finish: str | None = None
    first_token: float | None = None


@dataclass
class _Row:
    """One generation (one choice of one request); the app reads ``steered``, ``meta_steering``, ``cancelled``."""

    prompt_ids: list[int]
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
        self.monitor_layer = readout.layers[0] if readout is not None else None
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.eos_ids = set(eos_ids or ())
        self.dtype = args.get("dtype", "auto")
        self._store = store_of(args.get("additional_config"))  # rows go there once; requests carry their keys
        self.on_finish: Callable[[_Row, Completion], None] | None = None
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
                                       "readout_calls": 0}

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
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self._llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**self.args))
        if self.readout is not None:
            dirs = self.readout.directions[self.monitor_layer].float().tolist()
            await self._llm.collective_rpc("steerlib_configure_readout", args=(self.monitor_layer, dirs))
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
                 max_batch=self.max_batch, engine="vllm", steps=None, mean_batch_size=None, mean_step_ms=None)
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
        row = _Row(prompt_ids=list(prompt_ids), spec=spec, sampling=sampling, sink=sink, steered=steered)
        row.request_id = f"steerlib-{next(self._ids)}"
        with self._lock:
            self._rows[row.request_id] = row
        asyncio.run_coroutine_threadsafe(self._run(row), self._loop)
        return row

    def _params(self, row: _Row) -> Any:
        from vllm import SamplingParams

        sp = row.sampling
        # One token more with a read-out: its forward pass reads the last kept token's own position.
        extra = 1 if self.readout is not None else 0
        return SamplingParams(max_tokens=sp.max_tokens + extra, temperature=sp.temperature, top_p=sp.top_p,
                              seed=sp.seed, ignore_eos=self.ignore_eos, skip_special_tokens=True,
                              detokenize=False, extra_args={SPEC_KEY: row.spec} if row.spec else None)

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
            state = _RowState(TextStream(self.tokenizer, row.sampling.stop))
            async for out in self._llm.generate(prompt, self._params(row), row.request_id):
                row.started = True
                if row.cancelled.is_set():
                    await self._llm.abort(row.request_id)
                    self._finish_cancelled(row)
                    return
                new = list(out.outputs[0].token_ids)[len(state.seen):]
                state.seen.extend(new)
                if await self._take(row, state, new):
                    break
            if state.finish is None:  # vLLM ended the request first (e.g. its own length limit)
                state.finish = "length"
            await self._llm.abort(row.request_id)
            self._complete(row, state)
        except SlotsExhausted as exc:  # every vector slot is pinned by running rows: retry later (429)
            with self._lock:
                self._rows.pop(row.request_id, None)
            row.sink(("error", QueueFull(str(exc))))
        except Exception as exc:  # one row's failure must not take the loop down
            log.exception("vLLM row %s failed", row.request_id)
            with self._lock:
                self._rows.pop(row.request_id, None)
                self._stats["failed"] += 1
            row.sink(("error", RowFailed(f"generation failed: {type(exc).__name__}: {exc}")))

    async def _take(self, row: _Row, state: _RowState, new: list[int]) -> bool:
        """Account for newly generated tokens; True when the row is complete (its read-out included)."""
        values = await self._values(row, state, len(state.seen) - len(new), len(new)) if self.readout else None
        for j, token in enumerate(new):
            if state.finish is not None:  # the closing token: only its forward pass's read-out is used
                if values is not None:
                    state.values.append(values[j])
                    state.unsent.append(values[j])
                if state.unsent:
                    row.sink(("token", "", state.unsent, [0, 0]))
                    state.unsent = []
                return True
            is_eos = token in self.eos_ids and not self.ignore_eos
            state.tokens.append(token)
            row.token_ids = list(state.tokens)
            if state.first_token is None:
                state.first_token = time.monotonic()
            if values is not None:
                state.values.append(values[j])  # the EOS token's value too: read at the last response token
                if not is_eos:
                    state.unsent.append(values[j])
            final = is_eos or len(state.tokens) >= row.sampling.max_tokens
            delta, stopped = state.text.push(state.tokens[:-1] if is_eos else state.tokens, final)
            state.finish = "stop" if is_eos or stopped else ("length" if final else None)
            if delta or (state.finish is not None and state.unsent):
                row.sink(("token", delta, state.unsent, [0, 0]))
                state.unsent = []
            if state.finish is not None and (is_eos or self.readout is None):
                return True  # nothing more to read (EOS's value is the last response token's)
        return False

    async def _values(self, row: _Row, state: _RowState, done: int, count: int) -> list[list[float]]:
        """Read-out values of the forward passes that produced tokens ``done .. done + count - 1``: token ``i``
        (0-based) was produced at position ``prompt_len - 1 + i``. A fetch may also bring positions of steps that
        ran since (vLLM schedules ahead); they wait in ``state.stored`` for their tokens."""
        first = len(row.prompt_ids) - 1
        wanted = [first + i for i in range(done, done + count)]
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
                got = (await self._llm.collective_rpc("steerlib_pop_readouts", args=(list(waiting),)))[0]
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
        names = self.readout.names if self.readout is not None else []
        proj = {name: summarize_projections([v[k] for v in state.values], self.monitor_layer) for k, name in enumerate(names)}
        first = state.first_token
        c = Completion(text=state.text.text, completion_tokens=len(state.tokens), prompt_tokens=len(row.prompt_ids),
                       finish_reason=state.finish or "stop", trait_projections=proj, steps=[[0, 0]] * len(state.tokens),
                       queue_ms=0.0, ttft_ms=round((first - row.enqueued) * 1000, 2) if first else None)
        with self._lock:
            self._rows.pop(row.request_id, None)
            self._stats["completed"] += 1
            self._stats["prefill_tokens"] += len(row.prompt_ids)
            self._stats["generated_tokens"] += len(state.tokens)
        if self.on_finish is not None:
            try:
                self.on_finish(row, c)
            except Exception:  # monitoring must never fail a request
                log.exception("on_finish callback failed")
        row.sink(("done", c))

