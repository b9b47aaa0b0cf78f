"""An OpenAI-compatible chat server that steers and monitors every response.

``POST /v1/chat/completions`` accepts the usual OpenAI request (streaming or not) plus two extensions:

* ``"steering": [{"vector": "optimistic", "layer": 15, "coef": 4.0, "mode": "add"}]`` in the body (the
  ``openai`` client sends it with ``extra_body={"steering": [...]}``) replaces the server's default
  steering for this request; ``"steering": []`` turns steering off.
* every response carries ``"trait_projections": {"optimistic": {"mean": .., "max": .., "prompt_last": ..,
  "layer": 15}}``: the per-token projections of the generated tokens on each monitored trait's unit
  direction (``prompt_last`` pairs with the first generated token: it is read before any token exists).
  Streaming chunks carry the current token's value as ``"trait_projection"``.

``GET /v1/monitor`` returns the recent history and alerts of a ``steerlib.drift.DriftMonitor`` fed with the
mean projection of every response; ``GET /`` is a small page drawing that history live.

Concurrency model: steering hooks act on the whole model, so only one generation may run at a time and a
batch must share one steering config. Requests are queued; one worker thread takes the oldest request,
gathers queued requests with the same steering config and sampling parameters (up to ``max_batch``, waiting
at most ``batch_wait_ms`` for more) and runs them as one ``generate`` batch. Requests with a different
config wait in a backlog and lead a later batch, so one request's steering never reaches another's tokens.
Streaming requests run one at a time through ``steerlib.generation.stream``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import json
import logging
import queue
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from steerlib.core.chat import format_messages
from steerlib.core.loading import load_vectors
from steerlib.core.serialize import to_jsonable
from steerlib.core.vectors import TraitVectors
from steerlib.monitoring.drift import DriftMonitor
from steerlib.steering.generation import eos_ids, generate, stream
from steerlib.steering.steer import SteerOp, TraitReadout, build_ops, build_readout

__all__ = [
    "ApiError",
    "BackgroundServer",
    "ChatCompletionRequest",
    "Engine",
    "SteeringSpec",
    "create_app",
    "serve",
]

log = logging.getLogger("steerlib.server")


# --------------------------------------------------------------------------------------------------------
# Request schema
# --------------------------------------------------------------------------------------------------------
class SteeringSpec(BaseModel):
    """One steering edit requested by a client (see ``steerlib.steer.build_ops``)."""

    model_config = ConfigDict(extra="forbid")

    vector: str = Field(description="name of a trait vector loaded by the server")
    layer: int | None = Field(None, description="residual layer 1..n_layers (default: the vector's recommended one)")
    coef: float = Field(1.0, description="scale of the added vector for mode 'add'")
    mode: Literal["add", "ablate", "cap"] = "add"
    positions: Literal["all", "prompt", "response"] = "all"
    cap_min: float | None = None
    cap_max: float | None = None
    relative: bool = Field(False, description="coef is a fraction of the typical residual norm at the layer")

    def key(self) -> tuple:
        return (self.vector, self.layer, self.coef, self.mode, self.positions, self.cap_min, self.cap_max,
                self.relative)


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The subset of OpenAI's chat completion request the server honours, plus ``steering``.

    Unknown fields are ignored (clients send many optional ones); fields that would change the meaning of
    the answer but are not implemented (``n > 1``, ``stop``, ``tools``, ``logprobs``) are rejected.
    """

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    tools: list[Any] | None = None
    logprobs: bool | None = None
    steering: list[SteeringSpec] | None = None


# --------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------
class ApiError(Exception):
    """An error returned to the client in OpenAI's shape ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type_: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid value")
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return (f"{param}: {msg}{more}" if param else f"{msg}{more}"), param


# --------------------------------------------------------------------------------------------------------
# Engine: the queue and the single generation worker
# --------------------------------------------------------------------------------------------------------
@dataclass
class _Params:
    """Everything a batch must share besides steering."""

    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None

    def key(self) -> tuple:
        return (self.max_tokens, self.temperature, self.top_p, self.seed)


@dataclass
class _Job:
    prompt: str
    ops: list[SteerOp]
    steering: list[dict]
    params: _Params
    stream: bool
    key: tuple
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    sink: Callable[[tuple], None] | None = None  # streaming: receives ("token", text, proj) items
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued_at: float = field(default_factory=time.time)


@dataclass
class Completion:
    """What the worker hands back for one request."""

    text: str
    completion_tokens: int
    prompt_tokens: int
    finish_reason: str
    trait_projections: dict[str, dict[str, float | int | None]]
    batch: dict[str, Any]


_STOP = object()


class Engine:
    """Owns the model: validates steering, queues requests, batches and runs them on one thread.

    Args:
        model, tokenizer: a loaded causal LM (``steerlib.models.load_model``).
        vectors: trait name -> ``TraitVectors`` usable in per-request steering and monitoring.
        model_name: the id reported by ``/v1/models`` and in responses.
        default_steering: steering applied when a request has no ``steering`` field.
        monitor_traits: traits whose projections are reported (default: every vector).
        monitor_layer: layer the projections are read at (default: the monitored vectors' shared
            recommended layer).
        max_batch: most requests in one ``generate`` call.
        batch_wait_ms: how long the worker waits for more compatible requests after taking one.
        max_queue: queued requests beyond this are refused with 429.
        max_tokens_limit: largest ``max_tokens`` accepted.
        default_max_tokens: used when a request gives none.
        drift: the drift monitor fed with every response's mean projections (default: one with the
            DriftMonitor defaults over ``monitor_traits``; None when nothing is monitored).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        vectors: Mapping[str, TraitVectors],
        *,
        model_name: str = "steerlib",
        default_steering: Sequence[SteeringSpec | Mapping[str, Any]] = (),
        monitor_traits: Sequence[str] | None = None,
        monitor_layer: int | None = None,
        max_batch: int = 8,
        batch_wait_ms: float = 20.0,
        max_queue: int = 256,
        max_tokens_limit: int = 512,
        default_max_tokens: int = 128,
        drift: DriftMonitor | None = None,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if batch_wait_ms < 0:
            raise ValueError(f"batch_wait_ms must be >= 0, got {batch_wait_ms}")
        if not 1 <= default_max_tokens <= max_tokens_limit:
            raise ValueError(f"default_max_tokens must be in 1..max_tokens_limit ({max_tokens_limit})")
        self.model = model
        self.tokenizer = tokenizer
        self.vectors = dict(vectors)
        self.model_name = model_name
        self.max_batch = max_batch
        self.batch_wait = batch_wait_ms / 1000.0
        self.max_queue = max_queue
        self.max_tokens_limit = max_tokens_limit
        self.default_max_tokens = default_max_tokens
        self.max_context = int(getattr(model.config, "max_position_embeddings", 0) or 0) or None
        for tv in self.vectors.values():
            tv.check_model(model)  # fail at start-up, not on the first request

        traits = list(self.vectors) if monitor_traits is None else list(monitor_traits)
        unknown = [t for t in traits if t not in self.vectors]
        if unknown:
            raise ValueError(f"cannot monitor {unknown}: no such vectors (loaded: {sorted(self.vectors)})")
        self.monitor: TraitReadout | None = None
        self.monitor_layer: int | None = None
        if traits:
            self.monitor = build_readout(model, {t: self.vectors[t] for t in traits}, monitor_layer)
            self.monitor_layer = self.monitor.layers[0]
        self.drift = drift
        if self.drift is None and traits:
            self.drift = DriftMonitor(traits)
        self._drift_lock = threading.Lock()

        self.default_steering = [s if isinstance(s, SteeringSpec) else SteeringSpec(**s) for s in default_steering]
        self._default_ops = self.resolve_steering(self.default_steering)  # validates them now

        self._queue: queue.Queue = queue.Queue()
        self._backlog: deque[_Job] = deque()  # incompatible jobs met while batching; only the worker touches it
        self._running = threading.Event()
        self._running.set()
        self._thread: threading.Thread | None = None
        self._batch_ids = itertools.count(1)
        self._stats_lock = threading.Lock()
        self._stats = {"requests": 0, "completed": 0, "failed": 0, "batches": 0, "batched_requests": 0,
                       "max_batch_seen": 0, "generated_tokens": 0}
        self.started_at = time.time()

    # -- steering ---------------------------------------------------------------------------------------
    def resolve_steering(self, specs: Sequence[SteeringSpec]) -> list[SteerOp]:
        """Validate a steering request and expand it into ops; raises ``ApiError`` (400) on a bad spec."""
        ops: list[SteerOp] = []
        for i, spec in enumerate(specs):
            if spec.vector not in self.vectors:
                raise ApiError(400, f"unknown steering vector {spec.vector!r}; available: {sorted(self.vectors)}",
                               param=f"steering.{i}.vector", code="unknown_vector")
            cap = (spec.cap_min, spec.cap_max) if spec.mode == "cap" else None
            try:
                ops.extend(build_ops(self.model, self.vectors[spec.vector], spec.layer, spec.coef, mode=spec.mode,
                                     positions=spec.positions, cap=cap, relative=spec.relative))
            except ValueError as exc:
                raise ApiError(400, f"steering[{i}]: {exc}", param=f"steering.{i}") from exc
        return ops

    # -- lifecycle --------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._thread = threading.Thread(target=self._run, name="steerlib-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the batch in flight, refuse what is still queued (503), and stop the worker."""
        self._running.set()
        self._queue.put(_STOP)
        if self._thread is not None:
            self._thread.join(timeout)
        for job in [*self._backlog, *self._drain_queue()]:
            self._fail(job, ApiError(503, "server is shutting down", type_="server_error"))
        self._backlog.clear()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Pause the worker between batches while inside the block (requests keep queueing).

        Used by tests to queue several requests deterministically before any runs, and handy to drain a
        server for maintenance.
        """
        self._running.clear()
        try:
            yield
        finally:
            self._running.set()

    def queue_depth(self) -> int:
        return self._queue.qsize() + len(self._backlog)

    def submit(self, job: _Job) -> None:
        if not self.alive:
            raise ApiError(503, "the generation worker is not running", type_="server_error")
        if self.queue_depth() >= self.max_queue:
            raise ApiError(429, f"too many queued requests ({self.max_queue}); retry later", code="queue_full",
                           type_="rate_limit_error")
        with self._stats_lock:
            self._stats["requests"] += 1
        self._queue.put(job)

    def stats(self) -> dict[str, Any]:
        with self._stats_lock:
            s = dict(self._stats)
        s["mean_batch_size"] = s["batched_requests"] / s["batches"] if s["batches"] else None
        s["queue_depth"] = self.queue_depth()
        s["worker_alive"] = self.alive
        s["uptime_s"] = time.time() - self.started_at
        s["max_batch"] = self.max_batch
        s["batch_wait_ms"] = self.batch_wait * 1000.0
        return s

    # -- building jobs ----------------------------------------------------------------------------------
    def make_job(self, req: ChatCompletionRequest) -> _Job:
        """Validate a request (raises ``ApiError``) and turn it into a queued unit of work."""
        if req.n != 1:
            raise ApiError(400, "only n=1 is supported", param="n")
        if req.stop:
            raise ApiError(400, "stop sequences are not supported", param="stop")
        if req.tools:
            raise ApiError(400, "tools are not supported", param="tools")
        if req.logprobs:
            raise ApiError(400, "logprobs are not supported", param="logprobs")
        max_tokens = req.max_completion_tokens or req.max_tokens or self.default_max_tokens
        if max_tokens > self.max_tokens_limit:
            raise ApiError(400, f"max_tokens {max_tokens} exceeds this server's limit {self.max_tokens_limit}",
                           param="max_tokens")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages]
        if messages[-1]["role"] == "assistant":
            raise ApiError(400, "the last message is from the assistant; continuing a reply is not supported",
                           param="messages")
        try:
            prompt, _ = format_messages(self.tokenizer, messages)
        except Exception as exc:  # jinja templates raise their own errors (e.g. role order)
            raise ApiError(400, f"cannot format messages: {exc}", param="messages") from exc
        specs = self.default_steering if req.steering is None else req.steering
        ops = self._default_ops if req.steering is None else self.resolve_steering(specs)
        params = _Params(max_tokens, req.temperature, req.top_p if req.temperature > 0 else 1.0,
                         req.seed if req.temperature > 0 else None)
        steering_key = tuple(s.key() for s in specs)
        return _Job(prompt=prompt, ops=ops, steering=[s.model_dump(exclude_defaults=True) for s in specs],
                    params=params, stream=req.stream, key=(steering_key, params.key(), req.stream))

    # -- the worker -------------------------------------------------------------------------------------
    def _drain_queue(self) -> list[_Job]:
        out = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return out
            if item is not _STOP:
                out.append(item)

    def _next(self, timeout: float | None) -> Any:
        if self._backlog:
            return self._backlog.popleft()
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def _collect(self, first: _Job) -> tuple[list[_Job], bool]:
        """The batch led by ``first``: compatible jobs from the backlog, then from the queue until full or
        ``batch_wait`` passes. Returns (batch, stop_seen)."""
        batch = [first]
        if first.stream or self.max_batch == 1:
            return batch, False
        keep: deque[_Job] = deque()
        while self._backlog:
            job = self._backlog.popleft()
            (batch if job.key == first.key and len(batch) < self.max_batch else keep).append(job)
        self._backlog = keep
        deadline = time.monotonic() + self.batch_wait
        while len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get_nowait() if remaining <= 0 else self._queue.get(timeout=remaining)
            except queue.Empty:
                break
            if item is _STOP:
                return batch, True
            if item.key == first.key:
                batch.append(item)
            else:
                self._backlog.append(item)  # leads or joins a later batch: never shares this one's steering
        return batch, False

    def _run(self) -> None:
        stop = False
        while not stop:
            self._running.wait()
            item = self._next(timeout=0.5)
            if item is None:
                continue
            if item is _STOP:
                break
            if not self._running.is_set():  # hold() began while we waited: keep the job for later
                self._backlog.appendleft(item)
                continue
            batch, stop = self._collect(item)
            # A client that went away before its job started needs no generation.
            batch = [job for job in batch if job.future.set_running_or_notify_cancel()]
            if not batch:
                continue
            try:
                self._run_batch(batch)
            except BaseException as exc:  # never let one batch take the worker down
                log.exception("batch of %d failed", len(batch))
                for job in batch:
                    self._fail(job, exc)

    def _fail(self, job: _Job, exc: BaseException) -> None:
        error = exc if isinstance(exc, ApiError) else ApiError(
            500, f"generation failed: {type(exc).__name__}: {exc}", type_="server_error")
        with self._stats_lock:
            self._stats["failed"] += 1
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            job.future.set_exception(error)
        if job.sink is not None:
            job.sink(("error", error))

    def _finish(self, job: _Job, completion: Completion) -> None:
        with self._stats_lock:
            self._stats["completed"] += 1
            self._stats["generated_tokens"] += completion.completion_tokens
        self._feed_drift(job, completion)
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            job.future.set_result(completion)
        if job.sink is not None:
            job.sink(("done", completion))

    def _feed_drift(self, job: _Job, completion: Completion) -> None:
        if self.drift is None:
            return
        scores = {t: p["mean"] for t, p in completion.trait_projections.items() if p.get("mean") is not None}
        if len(scores) < len(completion.trait_projections) or not scores:
            return  # an empty reply has no projection; the monitor needs a value for every trait
        meta = {"batch_id": completion.batch["id"], "steering": job.steering,
                "text": completion.text[:200]}
        try:
            with self._drift_lock:
                self.drift.update(scores, timestamp=time.time(), meta=meta)
        except Exception:  # monitoring must never fail a request
            log.exception("drift monitor update failed")

    def _check_length(self, batch: list[_Job]) -> tuple[list[_Job], dict[int, int]]:
        """Count prompt tokens (on the worker: fast tokenizers are not safe to share across threads) and
        refuse jobs whose prompt plus max_tokens exceed the model's context."""
        ok, lengths = [], {}
        for job in batch:
            n = len(self.tokenizer(job.prompt, add_special_tokens=False)["input_ids"])
            if self.max_context and n + job.params.max_tokens > self.max_context:
                self._fail(job, ApiError(400, f"prompt ({n} tokens) plus max_tokens ({job.params.max_tokens}) "
                                              f"exceeds the model's context of {self.max_context} tokens",
                                         param="messages", code="context_length_exceeded"))
                continue
            lengths[id(job)] = n
            ok.append(job)
        return ok, lengths

    def _run_batch(self, batch: list[_Job]) -> None:
        batch, prompt_lengths = self._check_length(batch)
        if not batch:
            return
        batch_id = next(self._batch_ids)
        started = time.time()
        with self._stats_lock:
            self._stats["batches"] += 1
            self._stats["batched_requests"] += len(batch)
            self._stats["max_batch_seen"] = max(self._stats["max_batch_seen"], len(batch))
        first = batch[0]
        if first.stream:
            self._run_stream(first, batch_id, started, prompt_lengths[id(first)])
            return
        p = first.params
        try:
            gens = generate(self.model, self.tokenizer, [job.prompt for job in batch], steering=first.ops,
                            readout=self.monitor, max_new_tokens=p.max_tokens, temperature=p.temperature,
                            top_p=p.top_p, seed=p.seed, batch_size=len(batch))
        except Exception as exc:
            log.exception("generation failed for batch %d (%d requests)", batch_id, len(batch))
            for job in batch:
                self._fail(job, exc)
            return
        finished = time.time()
        eos = eos_ids(self.model, self.tokenizer)
        for job, gen in zip(batch, gens, strict=True):
            proj = {}
            if self.monitor is not None:
                for trait in self.monitor.names:
                    values = gen.token_projections(trait)
                    proj[trait] = _summary(values.tolist(), self.monitor_layer)
            stopped = bool(gen.token_ids) and gen.token_ids[-1] in eos
            self._finish(job, Completion(
                text=gen.text, completion_tokens=len(gen.token_ids), prompt_tokens=prompt_lengths[id(job)],
                finish_reason="stop" if stopped else "length", trait_projections=proj,
                batch=_batch_info(batch_id, len(batch), job, started, finished)))

    def _run_stream(self, job: _Job, batch_id: int, started: float, prompt_tokens: int) -> None:
        p = job.params
        if p.seed is not None:
            torch.manual_seed(p.seed)
        names = self.monitor.names if self.monitor is not None else []
        values: dict[str, list[float]] = {t: [] for t in names}
        pieces: list[str] = []
        n_tokens = 0
        try:
            # Always consume the generator to its end, even for a client that left: closing it early would
            # leave its generation thread running with the steering hooks still installed.
            for text, proj in stream(self.model, self.tokenizer, job.prompt, steering=job.ops, readout=self.monitor,
                                     max_new_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p):
                n_tokens += 1
                pieces.append(text)
                token_proj = {}
                if proj is not None:
                    for k, trait in enumerate(names):
                        token_proj[trait] = float(proj[0, k])
                        values[trait].append(token_proj[trait])
                if not job.cancelled.is_set() and job.sink is not None:
                    job.sink(("token", text, token_proj))
        except Exception as exc:
            log.exception("streaming generation failed (batch %d)", batch_id)
            self._fail(job, exc)
            return
        # stream() skips the EOS token, so fewer tokens than asked means the model stopped by itself.
        finish = "length" if n_tokens >= p.max_tokens else "stop"
        self._finish(job, Completion(
            text="".join(pieces).strip(), completion_tokens=n_tokens, prompt_tokens=prompt_tokens,
            finish_reason=finish, trait_projections={t: _summary(values[t], self.monitor_layer) for t in names},
            batch=_batch_info(batch_id, 1, job, started, time.time())))

    # -- monitor ----------------------------------------------------------------------------------------
    def monitor_snapshot(self, last: int = 200, last_alerts: int = 50) -> dict[str, Any]:
        """What ``/v1/monitor`` returns: the last ``last`` drift-monitor updates (one per response), the last
        ``last_alerts`` alerts, the drift settings with alert limits, and server statistics."""
        out: dict[str, Any] = {
            "traits": self.monitor.names if self.monitor is not None else [],
            "layer": self.monitor_layer,
            "history": [],
            "alerts": [],
            "server": self.stats(),
        }
        if self.drift is not None:
            with self._drift_lock:
                out["history"] = to_jsonable(self.drift.history(last=last))
                alerts = list(self.drift.alerts)[-last_alerts:] if last_alerts else []
                limits = {t: list(self.drift.limits(t)) for t in self.drift.traits}
                drift = {**self.drift.config(), "calibrated": self.drift.calibrated, "n_updates": self.drift.n_updates}
            out["alerts"] = [to_jsonable(asdict(a)) for a in alerts]
            # Alert limits in projection units (None until calibrated, or for a side that does not alert).
            out["drift"] = to_jsonable({**drift, "limits": limits})
        return out


def _summary(values: list[float], layer: int | None) -> dict[str, float | int | None]:
    """Mean, max and first (= read at the last prompt token) of one trait's per-token projections."""
    if not values:
        return {"mean": None, "max": None, "prompt_last": None, "layer": layer, "n_tokens": 0}
    return {"mean": sum(values) / len(values), "max": max(values), "prompt_last": values[0], "layer": layer,
            "n_tokens": len(values)}


def _batch_info(batch_id: int, size: int, job: _Job, started: float, finished: float) -> dict[str, Any]:
    return {"id": batch_id, "size": size, "queue_ms": round((started - job.enqueued_at) * 1000, 2),
            "generate_ms": round((finished - started) * 1000, 2), "enqueued_at": job.enqueued_at,
            "started_at": started}


# --------------------------------------------------------------------------------------------------------
# HTTP layer
# --------------------------------------------------------------------------------------------------------
def _usage(c: Completion) -> dict[str, int]:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens}


def _sse(payload: Any) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def create_app(
    model: torch.nn.Module,
    tokenizer: Any,
    vectors: Mapping[str, TraitVectors],
    **engine_options: Any,
) -> FastAPI:
    """The FastAPI app; ``engine_options`` go to ``Engine`` (model_name, default_steering, monitor_traits,
    monitor_layer, max_batch, batch_wait_ms, max_queue, max_tokens_limit, default_max_tokens, drift).

    The worker starts and stops with the app's lifespan; ``app.state.engine`` is the ``Engine``.
    """
    engine = Engine(model, tokenizer, vectors, **engine_options)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            # Joining the worker blocks; keep the event loop free while the batch in flight finishes.
            await asyncio.to_thread(engine.stop)

    app = FastAPI(title="steerlib", description="OpenAI-compatible chat with persona-vector steering and "
                  "monitoring", lifespan=lifespan)
    app.state.engine = engine

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return ApiError(400, message, param=param, code="invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return ApiError(exc.status_code, str(exc.detail)).response()

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        page = resources.files("steerlib").joinpath("static/index.html").read_text(encoding="utf-8")
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = engine.alive
        return JSONResponse({"status": "ok" if ok else "worker stopped", "worker_alive": ok},
                            status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models() -> dict:
        vectors_info = {name: {"trait": tv.trait, "recommended_layer": tv.recommended_layer,
                               "n_layers": tv.n_positions - 1, "method": tv.method}
                        for name, tv in engine.vectors.items()}
        return {"object": "list", "data": [{
            "id": engine.model_name, "object": "model", "created": int(engine.started_at), "owned_by": "steerlib",
            "trait_vectors": vectors_info, "monitored_traits": engine.monitor.names if engine.monitor else [],
            "monitor_layer": engine.monitor_layer,
            "default_steering": [s.model_dump(exclude_defaults=True) for s in engine.default_steering],
        }]}

    @app.get("/v1/monitor")
    async def monitor(last: int = Query(200, ge=1, le=10_000), alerts: int = Query(50, ge=0, le=10_000)) -> dict:
        return engine.monitor_snapshot(last=last, last_alerts=alerts)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest) -> Any:
        job = engine.make_job(req)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if not req.stream:
            engine.submit(job)
            c: Completion = await asyncio.wrap_future(job.future)
            return {
                "id": completion_id, "object": "chat.completion", "created": created, "model": engine.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text},
                             "finish_reason": c.finish_reason, "logprobs": None}],
                "usage": _usage(c),
                "trait_projections": c.trait_projections,
                "steering": job.steering,
                "batch": c.batch,
            }
        return await _stream_response(engine, job, req, completion_id, created)

    return app


async def _stream_response(engine: Engine, job: _Job, req: ChatCompletionRequest, completion_id: str,
                           created: int) -> Any:
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def sink(item: tuple) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: the server is shutting down
            loop.call_soon_threadsafe(events.put_nowait, item)

    job.sink = sink
    engine.submit(job)
    first = await events.get()
    # Until the first event the response has not started, so an early failure is still a plain HTTP error.
    if first[0] == "error":
        return first[1].response()
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def chunk(delta: dict, finish: str | None = None, **extra: Any) -> dict:
        return {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                "model": engine.model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}

    async def body() -> AsyncIterator[str]:
        item = first
        try:
            yield _sse(chunk({"role": "assistant", "content": ""}))
            while True:
                kind = item[0]
                if kind == "token":
                    yield _sse(chunk({"content": item[1]}, trait_projection=item[2]))
                elif kind == "done":
                    c: Completion = item[1]
                    yield _sse(chunk({}, c.finish_reason, trait_projections=c.trait_projections,
                                     steering=job.steering, batch=c.batch))
                    if include_usage:
                        yield _sse({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                                    "model": engine.model_name, "choices": [], "usage": _usage(c)})
                    yield "data: [DONE]\n\n"
                    return
                else:  # the response has started: report the failure in-band, as OpenAI does
                    yield _sse(item[1].body())
                    return
                item = await events.get()
        finally:
            job.cancelled.set()  # client gone or stream over: the worker stops forwarding tokens

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# --------------------------------------------------------------------------------------------------------
# Running it
# --------------------------------------------------------------------------------------------------------
class BackgroundServer:
    """Run an app with uvicorn on a background thread (tests, notebooks, the load test).

    ``port=0`` picks a free port; ``url`` is the base URL once started. Use as a context manager or call
    ``start()``/``stop()``.
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.app = app
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.host, self.port = self._sock.getsockname()[:2]
        self._server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="steerlib-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the server thread exited during start-up (see the log above)")
            if time.monotonic() > deadline:
                raise TimeoutError(f"server did not start within {timeout} s")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def named_vectors(model: torch.nn.Module, vectors: Mapping[str, str | Path | TraitVectors] | None) -> dict[str, TraitVectors]:
    """name -> TraitVectors from paths (folders or ``.safetensors`` files), checked against ``model``."""
    out = {}
    for name, src in (vectors or {}).items():
        tv = load_vectors(src, model)
        if not isinstance(tv, TraitVectors):
            raise ValueError(f"vector {name!r}: the server needs saved TraitVectors (a folder or .safetensors), "
                             "not a bare tensor")
        out[name] = tv
    return out


def default_steering_specs(
    steer: Sequence[tuple[int, float]], steer_vector: str | None, names: Sequence[str], mode: str = "add",
    positions: str = "all",
) -> list[SteeringSpec]:
    """CLI-style ``--steer LAYER:COEF`` pairs for one named vector -> specs."""
    if not steer:
        return []
    if steer_vector is None:
        if len(names) != 1:
            raise ValueError(f"say which vector to steer with (loaded: {sorted(names)})")
        steer_vector = names[0]
    if steer_vector not in names:
        raise ValueError(f"cannot steer with {steer_vector!r}: not among the loaded vectors {sorted(names)}")
    return [SteeringSpec(vector=steer_vector, layer=int(layer), coef=float(coef), mode=mode,  # type: ignore[arg-type]
                         positions=positions)  # type: ignore[arg-type]
            for layer, coef in steer]


def serve(
    model_path: str | Path | None = None,
    vectors: Mapping[str, str | Path] | None = None,
    *,
    steer: Sequence[tuple[int, float]] = (),
    steer_vector: str | None = None,
    steer_mode: str = "add",
    steer_positions: str = "all",
    monitor_traits: Sequence[str] | None = None,
    monitor_layer: int | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 8,
    batch_wait_ms: float = 20.0,
    max_queue: int = 256,
    max_tokens_limit: int = 512,
    default_max_tokens: int = 128,
    drift_window: int = 20,
    drift_method: str = "zscore",
    drift_threshold: float = 3.0,
    drift_reference_size: int = 50,
    alerts_path: str | Path | None = None,
    dtype: str = "float32",
    device: str | None = None,
    log_level: str = "info",
) -> None:
    """Load a model and trait vectors and serve them until interrupted (what ``steerlib serve`` runs).

    Args:
        model_path: local HF folder or .gguf; None = the embedded SmolLM2-135M-Instruct.
        vectors: trait name -> saved TraitVectors (folder or .safetensors file).
        steer: default steering as (layer, coef) pairs, applied to requests without a ``steering`` field.
        steer_vector: which vector ``steer`` uses (default: the only one loaded).
        steer_mode, steer_positions: mode ("add", "ablate") and positions of the default steering.
        monitor_traits: traits reported per response and fed to the drift monitor (default: all vectors).
        monitor_layer: layer the projections are read at (default: the vectors' recommended layer).
        host, port: where to listen.
        max_batch, batch_wait_ms: batching limits (see ``Engine``).
        max_queue: queued requests beyond this get 429.
        max_tokens_limit, default_max_tokens: bounds on generation length.
        drift_*: ``DriftMonitor`` window, method, threshold and reference size.
        alerts_path: JSONL file the drift monitor appends alerts to.
        dtype, device: how to load the model.
        log_level: uvicorn log level.
    """
    import uvicorn

    from steerlib.core.models import load_model

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    loaded = load_model(model_path, dtype=dtype, device=device)
    trait_vectors = named_vectors(loaded.model, vectors)
    traits = list(trait_vectors) if monitor_traits is None else list(monitor_traits)
    drift = DriftMonitor(traits, window=drift_window, method=drift_method, threshold=drift_threshold,
                         reference_size=drift_reference_size, alerts_path=alerts_path) if traits else None
    app = create_app(
        loaded.model, loaded.tokenizer, trait_vectors, model_name=loaded.name,
        default_steering=default_steering_specs(steer, steer_vector, list(trait_vectors), steer_mode,
                                                steer_positions),
        monitor_traits=traits, monitor_layer=monitor_layer, max_batch=max_batch, batch_wait_ms=batch_wait_ms,
        max_queue=max_queue, max_tokens_limit=max_tokens_limit, default_max_tokens=default_max_tokens, drift=drift,
    )
    log.info("serving %s with vectors %s on http://%s:%d (monitor page at /)", loaded.name,
             sorted(trait_vectors), host, port)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
