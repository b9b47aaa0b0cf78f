"""HTTP routes: the OpenAI chat API and the Ollama API on one port, over one continuous-batching engine.

OpenAI: ``POST /v1/chat/completions`` (streamed or not, ``n``, ``stop``, ``seed``) with a ``steering`` extension
(``extra_body={"steering": [{"vector": "optimistic", "layer": 15, "coef": 4.0}]}``; ``[]`` turns the server's
default steering off), ``GET /v1/models``. Every answer carries ``trait_projections`` (mean / max /
``prompt_last`` per monitored trait) and ``batch`` (the ``[step id, batch size]`` each token came from); every
streamed chunk carries ``token_projections``: the per-token values of the tokens it holds.

Ollama: ``POST /api/chat`` and ``/api/generate`` (NDJSON streaming by default, as Ollama does), ``GET /api/tags``,
``POST /api/show``, ``GET /api/version``; steering goes in ``options.steer`` with the same specs.

Operations: ``/health`` (always open), ``/v1/stats`` (engine counters: steps, batch sizes), ``/v1/monitor`` (drift
history and alerts; ``GET /`` draws it), and the runtime vector registry ``GET/POST /v1/vectors``,
``DELETE /v1/vectors/{name}`` (loads only from folders the operator allowed at start).

Guards (``Guard``, a pure ASGI middleware, so streaming and disconnects pass straight through): the Host header
must name the bound host unless configured otherwise (DNS rebinding), request bodies are limited (413), and with
an API key every route but ``/health`` and the static page ``/`` needs ``Authorization: Bearer <key>`` (401; open
the page as ``/#key=<key>``).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hmac
import json
import logging
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from steerlib.core.chat import format_messages
from steerlib.core.loading import load_vectors
from steerlib.core.models import eos_ids
from steerlib.core.vectors import TraitVectors
from steerlib.core.version import __version__
from steerlib.monitoring.drift import DriftMonitor
from steerlib.serve.engine import (
    Completion,
    Engine,
    EngineError,
    EngineStopped,
    QueueFull,
    RowEdit,
    Sampling,
    edits_from_ops,
)
from steerlib.serve.schema import (
    ApiError,
    ChatCompletionRequest,
    OllamaChatRequest,
    OllamaGenerateRequest,
    SteeringSpec,
    VectorLoadRequest,
    validation_message,
)
from steerlib.steering.steer import build_ops, build_readout

__all__ = ["AppOptions", "Service", "create_app"]

log = logging.getLogger("steerlib.serve")

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class AppOptions:
    """Everything about the HTTP side and the engine that is not the model itself.

    Attributes:
        model_name: id reported by ``/v1/models`` and ``/api/tags``.
        default_steering: steering for requests that give none.
        monitor_traits: traits read out per token (default: every loaded vector).
        monitor_layer: layer of the read-out (default: the monitored vectors' shared recommended layer).
        max_batch: most rows stepped together.
        max_queue: queued rows beyond this get 429.
        max_tokens_limit, default_max_tokens: bounds on generation length.
        api_key: bearer token every route but ``/health`` requires (None: open).
        cors_origins: origins allowed by CORS (empty: no CORS headers).
        host: the bound host; with ``allowed_hosts`` None the Host header must name it (loopback names are
            interchangeable; a server bound to all interfaces checks nothing unless ``allowed_hosts`` is given).
        allowed_hosts: host names accepted in the Host header; ``("*",)`` turns the check off.
        max_body_bytes: larger request bodies get 413.
        vector_dirs: folders ``POST /v1/vectors`` may load from (empty: the registry is read-only).
        drift_include_steered: feed steered responses into the drift monitor's reference too (by default
            only unsteered responses calibrate it, so a client cannot shift the baseline).
    """

    model_name: str = "steerlib"
    default_steering: tuple[SteeringSpec, ...] = ()
    monitor_traits: tuple[str, ...] | None = None
    monitor_layer: int | None = None
    max_batch: int = 16
    max_queue: int = 256
    max_tokens_limit: int = 512
    default_max_tokens: int = 128
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    allowed_hosts: tuple[str, ...] | None = None
    max_body_bytes: int = 1_000_000
    vector_dirs: tuple[Path, ...] = ()
    drift_include_steered: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.default_max_tokens <= self.max_tokens_limit:
            raise ValueError(f"default_max_tokens must be in 1..max_tokens_limit ({self.max_tokens_limit}), "
                             f"got {self.default_max_tokens}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key is empty")


# ----------------------------------------------------------------------------------------------------------
# The service: vectors, steering resolution, tokenising, drift
# ----------------------------------------------------------------------------------------------------------
class Service:
    """The state behind the routes: the engine, the vector registry, the read-out and the drift monitor."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, vectors: Mapping[str, TraitVectors],
                 options: AppOptions, drift: DriftMonitor | None = None,
                 engine_factory: Callable[..., Any] | None = None):
        self.model = model
        self.options = options
        self.vectors: dict[str, TraitVectors] = {}
        # name -> load count: table keys must tell a vector from another loaded later under the same name.
        self._loads: dict[str, int] = {}
        self._vectors_lock = threading.Lock()
        for name, tv in vectors.items():
            tv.check_model(model)  # fail at start-up, not on the first request
            self.vectors[name] = tv
            self._loads[name] = 1
        traits = list(self.vectors) if options.monitor_traits is None else list(options.monitor_traits)
        unknown = [t for t in traits if t not in self.vectors]
        if unknown:
            raise ValueError(f"cannot monitor {unknown}: no such vectors (loaded: {sorted(self.vectors)})")
        self.readout = build_readout(model, {t: self.vectors[t] for t in traits}, options.monitor_layer) \
            if traits else None
        self.monitored = tuple(traits)
        self.drift = drift if drift is not None or not traits else DriftMonitor(traits, robust=True)
        self._drift_lock = threading.Lock()
        # Fast tokenizers must not be shared across threads; the worker decodes with the original while
        # request threads encode with this copy, one at a time.
        self._encoder = copy.deepcopy(tokenizer)
        self._encode_lock = threading.Lock()
        self.max_context = int(getattr(model.config, "max_position_embeddings", 0) or 0) or None
        # engine_factory: another engine with Engine's surface (steerlib.serve.vllm_engine); default the HF one.
        make = engine_factory or (lambda **kw: Engine(model, tokenizer, **kw))
        self.engine = make(readout=self.readout, max_batch=options.max_batch, max_queue=options.max_queue,
                           eos_ids=eos_ids(model, tokenizer))
        self.engine.on_finish = self._feed_drift
        self.default_steering = list(options.default_steering)
        try:
            self._default_edits = self.resolve_steering(self.default_steering, "default steering")
        except ApiError as exc:  # a start-up problem, not a request's
            raise ValueError(exc.message) from None
        self.started_at = time.time()

    # -- steering -----------------------------------------------------------------------------------------
    def resolve_steering(self, specs: Sequence[SteeringSpec], param: str = "steering") -> list[RowEdit]:
        """Validate steering specs against the loaded vectors and turn them into per-row edits (400 if bad)."""
        edits: list[RowEdit] = []
        for i, spec in enumerate(specs):
            with self._vectors_lock:
                tv = self.vectors.get(spec.vector)
                names = sorted(self.vectors)
                load = self._loads.get(spec.vector, 0)
            if tv is None:
                raise ApiError(400, f"unknown steering vector {spec.vector!r}; available: {names}",
                               param=f"{param}.{i}.vector", code="unknown_vector")
            cap = (spec.cap_min, spec.cap_max) if spec.mode == "cap" else None
            try:
                ops = build_ops(self.model, tv, spec.layer, spec.coef, mode=spec.mode, positions=spec.positions,
                                cap=cap, relative=spec.relative)
            except ValueError as exc:
                raise ApiError(400, f"{param}[{i}]: {exc}", param=f"{param}.{i}") from exc
            for op in ops:
                if not math.isfinite(op.coef) or abs(op.coef) > 1e6:
                    raise ApiError(400, f"{param}[{i}]: the effective coefficient {op.coef:g} is not usable",
                                   param=f"{param}.{i}.coef")
            # Rows share a table entry only for the same load of the same vector at the same layer.
            edits.extend(edits_from_ops(ops, [(spec.vector, load, op.layer) for op in ops]))
        return edits

    def steering_for(self, specs: list[SteeringSpec] | None, param: str) -> tuple[list[RowEdit], list[dict]]:
        if specs is None:
            return self._default_edits, [s.model_dump(exclude_defaults=True) for s in self.default_steering]
        return self.resolve_steering(specs, param), [s.model_dump(exclude_defaults=True) for s in specs]

    # -- prompts ------------------------------------------------------------------------------------------
    def encode_messages(self, messages: list[dict]) -> list[int]:
        """Chat template + tokenise (run off the event loop and off the worker)."""
        if messages[-1]["role"] == "assistant":
            raise ApiError(400, "the last message is from the assistant; continuing a reply is not supported",
                           param="messages")
        with self._encode_lock:
            try:
                prompt, _ = format_messages(self._encoder, messages)
            except Exception as exc:  # jinja templates raise their own errors (e.g. role order)
                raise ApiError(400, f"cannot format messages: {exc}", param="messages") from exc
            return self.encode_text(prompt)

    def encode_text(self, text: str) -> list[int]:
        ids = list(self._encoder(text, add_special_tokens=False)["input_ids"])
        if not ids:
            raise ApiError(400, "the prompt is empty", param="messages")
        return ids

    def check_length(self, n_prompt: int, max_tokens: int) -> None:
        if self.max_context and n_prompt + max_tokens > self.max_context:
            raise ApiError(400, f"prompt ({n_prompt} tokens) plus max_tokens ({max_tokens}) exceeds the model's "
                                f"context of {self.max_context} tokens", param="messages",
                           code="context_length_exceeded")

    def max_tokens(self, requested: int | None) -> int:
        n = requested or self.options.default_max_tokens
        if n > self.options.max_tokens_limit:
            raise ApiError(400, f"max_tokens {n} exceeds this server's limit {self.options.max_tokens_limit}",
                           param="max_tokens")
        return n

    # -- drift --------------------------------------------------------------------------------------------
    def _feed_drift(self, row: Any, completion: Completion) -> None:
        if self.drift is None:
            return
        scores = {t: p["mean"] for t, p in completion.trait_projections.items() if p.get("mean") is not None}
        if len(scores) < len(completion.trait_projections) or not scores:
            return  # an empty reply has no projection; the monitor needs a value for every trait
        with self._drift_lock:
            if row.steered and not self.drift.calibrated and not self.options.drift_include_steered:
                return  # steered traffic must not become the baseline it is judged against
            meta = {"steering": row.meta_steering, "text": completion.text[:200]}
            self.drift.update(scores, timestamp=time.time(), meta=meta)

    def monitor_snapshot(self, last: int = 200, last_alerts: int = 50) -> dict[str, Any]:
        out: dict[str, Any] = {"traits": list(self.monitored), "layer": self.engine.monitor_layer, "history": [],
                               "alerts": [], "server": self.engine.stats()}
        if self.drift is not None:
            with self._drift_lock:
                out["history"] = _jsonable(self.drift.history(last=last))
                alerts = list(self.drift.alerts)[-last_alerts:] if last_alerts else []
                limits = {t: list(self.drift.limits(t)) for t in self.drift.traits}
                drift = {**self.drift.config(), "calibrated": self.drift.calibrated,
                         "n_updates": self.drift.n_updates}
            out["alerts"] = [_jsonable(asdict(a)) for a in alerts]
            out["drift"] = _jsonable({**drift, "limits": limits})
        return out

    # -- registry -----------------------------------------------------------------------------------------
    def vector_info(self) -> dict[str, dict]:
        with self._vectors_lock:
            return {name: {"trait": tv.trait, "recommended_layer": tv.recommended_layer,
                           "n_layers": tv.n_positions - 1, "method": tv.method, "monitored": name in self.monitored}
                    for name, tv in self.vectors.items()}

    def load_vector(self, name: str, path: str) -> dict:
        if not self.options.vector_dirs:
            raise ApiError(403, "loading vectors at runtime is off (start the server with --vector-dir)",
                           code="registry_read_only", type_="permission_error")
        target = self._allowed_path(path)
        with self._vectors_lock:
            if name in self.vectors:
                raise ApiError(409, f"a vector named {name!r} is already loaded; unload it first", param="name",
                               code="vector_exists")
        try:
            tv = load_vectors(target, self.model)
            if not isinstance(tv, TraitVectors):
                raise ValueError("a single-direction tensor has no layers to steer at; save TraitVectors")
        except (ValueError, OSError) as exc:
            raise ApiError(400, f"cannot load vectors from {path!r}: {exc}", param="path") from exc
        with self._vectors_lock:
            if name in self.vectors:  # another request loaded it meanwhile
                raise ApiError(409, f"a vector named {name!r} is already loaded; unload it first", param="name",
                               code="vector_exists")
            self.vectors[name] = tv
            self._loads[name] = self._loads.get(name, 0) + 1
        return self.vector_info()[name]

    def _allowed_path(self, path: str) -> Path:
        for base in self.options.vector_dirs:
            root = Path(base).resolve()
            candidate = (root / path).resolve()  # an absolute path replaces root; then it must still be inside
            if candidate.is_relative_to(root):
                if not candidate.exists():
                    raise ApiError(404, f"no vectors at {path!r} in the allowed folders", param="path")
                return candidate
        raise ApiError(403, f"path {path!r} is outside the folders vectors may be loaded from", param="path",
                       code="path_not_allowed", type_="permission_error")

    def unload_vector(self, name: str) -> None:
        with self._vectors_lock:
            if name not in self.vectors:
                raise ApiError(404, f"no vector named {name!r}", param="name")
            if name in self.monitored:
                raise ApiError(409, f"{name!r} is monitored; it cannot be unloaded while the server runs",
                               param="name", code="vector_monitored")
            if any(s.vector == name for s in self.default_steering):
                raise ApiError(409, f"{name!r} is used by the default steering", param="name", code="vector_in_use")
            del self.vectors[name]  # rows already running keep their own copy of the edits


# ----------------------------------------------------------------------------------------------------------
# Running one request: n rows, events into an asyncio queue
# ----------------------------------------------------------------------------------------------------------
class _Run:
    """The rows of one request (``n`` choices) and the event queue the worker feeds."""

    def __init__(self, service: Service, prompt_ids: list[int], edits: list[RowEdit], steering: list[dict],
                 sampling: list[Sampling]):
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.rows = []
        self.prompt_tokens = len(prompt_ids)
        self.steering = steering
        try:
            for i, sp in enumerate(sampling):
                row = service.engine.submit(prompt_ids, edits, sp, self._sink(i), steered=bool(edits))
                row.meta_steering = steering
                self.rows.append(row)
        except EngineError as exc:
            self.cancel()  # a full queue refused choice i: the choices already queued must not run for nobody
            raise engine_api_error(exc) from exc

    def _sink(self, index: int):
        def sink(item: tuple) -> None:
            if item[0] == "error" and isinstance(item[1], EngineError):
                item = ("error", engine_api_error(item[1]))
            with contextlib.suppress(RuntimeError):  # the loop is gone: the server is shutting down
                self.loop.call_soon_threadsafe(self.events.put_nowait, (index, item))
        return sink

    def cancel(self) -> None:
        for row in self.rows:
            row.cancelled.set()

    async def events_until_done(self) -> AsyncIterator[tuple[int, tuple]]:
        open_rows = len(self.rows)
        while open_rows:
            index, item = await self.events.get()
            if item[0] in ("done", "error"):
                open_rows -= 1
            yield index, item

    async def results(self, request: Request) -> list[Completion]:
        """Wait for every row; a client that disconnects cancels its rows at the next step."""
        out: list[Completion | None] = [None] * len(self.rows)
        it = self.events_until_done().__aiter__()
        while True:
            task = asyncio.ensure_future(it.__anext__())
            while not task.done():
                done, _ = await asyncio.wait({task}, timeout=0.5)
                if not done and await request.is_disconnected():
                    self.cancel()
            try:
                index, item = task.result()
            except StopAsyncIteration:
                break
            if item[0] == "error":
                self.cancel()
                raise item[1]
            if item[0] == "done":
                out[index] = item[1]
        return [c for c in out if c is not None]


def engine_api_error(exc: EngineError) -> ApiError:
    """The HTTP answer to an engine's refusal or failure (the engine itself knows no status codes)."""
    if isinstance(exc, QueueFull):
        return ApiError(429, str(exc), code="queue_full", type_="rate_limit_error")
    if isinstance(exc, EngineStopped):
        return ApiError(503, str(exc), type_="server_error")
    return ApiError(500, str(exc), type_="server_error")


def _batch_meta(c: Completion) -> dict[str, Any]:
    sizes = [s for _, s in c.steps]
    return {"steps": c.steps, "max_size": max(sizes) if sizes else 0,
            "mean_size": round(sum(sizes) / len(sizes), 3) if sizes else 0, "queue_ms": c.queue_ms,
            "ttft_ms": c.ttft_ms}


def _usage(prompt_tokens: int, completions: Sequence[Completion]) -> dict[str, int]:
    gen = sum(c.completion_tokens for c in completions)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": gen, "total_tokens": prompt_tokens + gen}


def _sse(payload: Any) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _token_projections(names: Sequence[str], values: list[list[float]]) -> dict[str, list[float]]:
    return {name: [v[k] for v in values] for k, name in enumerate(names)}


def _jsonable(obj: Any) -> Any:
    """Make drift records JSON-safe (NaN/inf become null; tensors and numpy scalars become numbers)."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, str | int | bool) or obj is None:
        return obj
    if hasattr(obj, "item"):
        return _jsonable(obj.item())
    return str(obj)


# ----------------------------------------------------------------------------------------------------------
# Guards: Host header, body size, API key (pure ASGI)
# ----------------------------------------------------------------------------------------------------------
class Guard:
    """Refuse requests before any route runs: wrong Host (400), too large a body (413), no key (401)."""

    def __init__(self, app: Any, *, api_key: str | None, allowed_hosts: set[str] | None, max_body: int):
        self.app = app
        self.api_key = api_key
        self.allowed_hosts = allowed_hosts
        self.max_body = max_body

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path = scope.get("path", "")
        if self.allowed_hosts is not None:
            host = _host_name(headers.get("host", ""))
            if host not in self.allowed_hosts:
                await _reply(send, 400, path, f"host {host!r} is not served here (allowed: "
                                              f"{sorted(self.allowed_hosts)}); see --allowed-host")
                return
        # "/" is the static monitor page (no data; it sends the key from its URL fragment to /v1/monitor).
        if self.api_key is not None and path not in ("/health", "/") and scope.get("method") != "OPTIONS":
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                await _reply(send, 401, path, "missing or wrong API key (send Authorization: Bearer <key>)",
                             extra=[(b"www-authenticate", b"Bearer")])
                return
        length = headers.get("content-length")
        if length is not None and not length.isdigit():
            await _reply(send, 400, path, f"invalid Content-Length {length!r}")
            return
        if length is not None and int(length) > self.max_body:
            await _reply(send, 413, path, f"request body over the limit of {self.max_body} bytes")
            return
        seen = 0

        async def limited_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise ApiError(413, f"request body over the limit of {self.max_body} bytes")
            return message

        await self.app(scope, limited_receive if "content-length" not in headers else receive, send)


def _host_name(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):  # [::1]:8000
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


async def _reply(send: Any, status: int, path: str, message: str, extra: list | None = None) -> None:
    if path.startswith("/api/"):
        body = {"error": message}
    else:
        body = ApiError(status, message, type_="invalid_request_error" if status != 401 else "authentication_error"
                        ).body()
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *(extra or [])]})
    await send({"type": "http.response.body", "body": data})


def allowed_hosts_for(host: str, configured: Sequence[str] | None) -> set[str] | None:
    """The Host names to accept: configured ones (``*`` = any), else the bound host (None = no check)."""
    if configured is not None:
        names = {h.strip().lower() for h in configured}
        return None if "*" in names else names
    if host in LOCAL_HOSTS:
        return set(LOCAL_HOSTS)
    if host in ("0.0.0.0", "::", ""):
        return None  # every interface: the operator must name the public host to get the check
    return {host.lower()}


# ----------------------------------------------------------------------------------------------------------
# The app
# ----------------------------------------------------------------------------------------------------------
def create_app(model: torch.nn.Module, tokenizer: Any, vectors: Mapping[str, TraitVectors],
               options: AppOptions | None = None, drift: DriftMonitor | None = None,
               engine_factory: Callable[..., Any] | None = None) -> FastAPI:
    """The FastAPI app; the engine starts and stops with its lifespan (``app.state.service`` holds it)."""
    options = options or AppOptions()
    service = Service(model, tokenizer, vectors, options, drift, engine_factory)
    engine = service.engine

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)

    app = FastAPI(title="steerlib", description="OpenAI- and Ollama-compatible chat with per-request "
                  "persona-vector steering and monitoring", lifespan=lifespan)
    app.state.service = service
    app.state.engine = engine

    def is_ollama(request: Request) -> bool:
        return request.url.path.startswith("/api/")

    def error_response(request: Request, exc: ApiError) -> JSONResponse:
        if is_ollama(request):
            return JSONResponse({"error": exc.message}, status_code=exc.status)
        return exc.response()

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc)
        return error_response(request, ApiError(400, message, param=param, code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(request, ApiError(exc.status_code, str(exc.detail)))

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        page = resources.files("steerlib").joinpath("static/index.html").read_text(encoding="utf-8")
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = engine.alive
        return JSONResponse({"status": "ok" if ok else "worker stopped", "worker_alive": ok},
                            status_code=200 if ok else 503)

    @app.get("/v1/stats")
    async def stats() -> dict:
        return engine.stats()

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{
            "id": options.model_name, "object": "model", "created": int(service.started_at), "owned_by": "steerlib",
            "trait_vectors": service.vector_info(), "monitored_traits": list(service.monitored),
            "monitor_layer": engine.monitor_layer,
            "default_steering": [s.model_dump(exclude_defaults=True) for s in service.default_steering],
        }]}

    @app.get("/v1/monitor")
    async def monitor(last: int = Query(200, ge=1, le=10_000), alerts: int = Query(50, ge=0, le=10_000)) -> dict:
        return service.monitor_snapshot(last=last, last_alerts=alerts)

    @app.get("/v1/vectors")
    async def list_vectors() -> dict:
        return {"vectors": service.vector_info(), "loadable_from": [str(p) for p in options.vector_dirs]}

    @app.post("/v1/vectors")
    async def load_vector(req: VectorLoadRequest) -> dict:
        info = await asyncio.to_thread(service.load_vector, req.name, req.path)
        return {"name": req.name, **info}

    @app.delete("/v1/vectors/{name}")
    async def unload_vector(name: str) -> dict:
        service.unload_vector(name)
        return {"name": name, "unloaded": True}

    # -- OpenAI -------------------------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Any:
        if req.tools:
            raise ApiError(400, "tools are not supported", param="tools")
        if req.logprobs:
            raise ApiError(400, "logprobs are not supported", param="logprobs")
        max_tokens = service.max_tokens(req.max_completion_tokens or req.max_tokens)
        edits, steering = service.steering_for(req.steering, "steering")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages]
        prompt_ids = await asyncio.to_thread(service.encode_messages, messages)
        service.check_length(len(prompt_ids), max_tokens)
        sampling = [Sampling(max_tokens=max_tokens, temperature=req.temperature,
                             top_p=req.top_p if req.temperature > 0 else 1.0,
                             seed=None if req.seed is None or req.temperature == 0 else req.seed + i,
                             stop=req.stop_sequences()) for i in range(req.n)]
        run = _Run(service, prompt_ids, edits, steering, sampling)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if not req.stream:
            try:
                done = await run.results(request)
            finally:
                run.cancel()  # no-op for finished rows; frees the slots of an abandoned request
            return {
                "id": completion_id, "object": "chat.completion", "created": created, "model": options.model_name,
                "choices": [{"index": i, "message": {"role": "assistant", "content": c.text},
                             "finish_reason": _openai_finish(c.finish_reason), "logprobs": None,
                             "trait_projections": c.trait_projections, "batch": _batch_meta(c)}
                            for i, c in enumerate(done)],
                "usage": _usage(run.prompt_tokens, done),
                "trait_projections": done[0].trait_projections,
                "steering": steering,
                "batch": _batch_meta(done[0]),
            }
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        names = list(service.monitored)

        def chunk(index: int, delta: dict, finish: str | None = None, **extra: Any) -> dict:
            return {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                    "model": options.model_name,
                    "choices": [{"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}],
                    **extra}

        async def body() -> AsyncIterator[str]:
            finished: list[Completion] = []
            try:
                for i in range(req.n):
                    yield _sse(chunk(i, {"role": "assistant", "content": ""}))
                async for index, item in run.events_until_done():
                    if item[0] == "token":
                        _, text, values, step = item
                        yield _sse(chunk(index, {"content": text}, token_projections=_token_projections(names, values),
                                         step=step))
                    elif item[0] == "done":
                        c = item[1]
                        finished.append(c)
                        yield _sse(chunk(index, {}, _openai_finish(c.finish_reason),
                                         trait_projections=c.trait_projections, steering=steering,
                                         batch=_batch_meta(c)))
                    else:  # the response has started: report the failure in-band, as OpenAI does
                        yield _sse(item[1].body())
                        return
                if include_usage:
                    yield _sse({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                                "model": options.model_name, "choices": [],
                                "usage": _usage(run.prompt_tokens, finished)})
                yield "data: [DONE]\n\n"
            finally:
                run.cancel()  # client gone or stream over: the rows leave the batch at the next step

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # -- Ollama -------------------------------------------------------------------------------------------
    def ollama_sampling(opts: Any) -> Sampling:
        temperature = opts.temperature if opts and opts.temperature is not None else 0.8
        num_predict = opts.num_predict if opts and opts.num_predict not in (None, -1) else None
        max_tokens = service.max_tokens(num_predict)
        return Sampling(max_tokens=max_tokens, temperature=temperature,
                        top_p=(opts.top_p if opts and opts.top_p is not None else 1.0) if temperature > 0 else 1.0,
                        seed=opts.seed if opts and temperature > 0 else None,
                        stop=tuple(opts.stop or ()) if opts else ())

    async def ollama_run(request: Request, prompt_ids: list[int], opts: Any, stream: bool, chat: bool) -> Any:
        sampling = ollama_sampling(opts)
        service.check_length(len(prompt_ids), sampling.max_tokens)
        edits, steering = service.steering_for(opts.steer if opts else None, "options.steer")
        run = _Run(service, prompt_ids, edits, steering, [sampling])
        started = time.monotonic_ns()
        names = list(service.monitored)

        def piece(text: str) -> dict:
            return {"message": {"role": "assistant", "content": text}} if chat else {"response": text}

        def final(c: Completion, text: str) -> dict:
            total = time.monotonic_ns() - started
            return {"model": options.model_name, "created_at": _now(), **piece(text), "done": True,
                    "done_reason": "length" if c.finish_reason == "length" else "stop", "total_duration": total,
                    "load_duration": 0, "prompt_eval_count": c.prompt_tokens,
                    "prompt_eval_duration": int((c.ttft_ms or 0) * 1e6), "eval_count": c.completion_tokens,
                    "eval_duration": max(0, total - int((c.ttft_ms or 0) * 1e6)),
                    "trait_projections": c.trait_projections, "steering": steering, "batch": _batch_meta(c)}

        if not stream:
            try:
                done = await run.results(request)
            finally:
                run.cancel()
            return final(done[0], done[0].text)

        async def body() -> AsyncIterator[str]:
            try:
                async for _, item in run.events_until_done():
                    if item[0] == "token":
                        _, text, values, step = item
                        yield json.dumps({"model": options.model_name, "created_at": _now(), **piece(text),
                                          "done": False, "token_projections": _token_projections(names, values),
                                          "step": step}) + "\n"
                    elif item[0] == "done":
                        yield json.dumps(final(item[1], "")) + "\n"
                    else:
                        yield json.dumps({"error": item[1].message}) + "\n"
                        return
            finally:
                run.cancel()

        return StreamingResponse(body(), media_type="application/x-ndjson")

    @app.post("/api/chat")
    async def ollama_chat(req: OllamaChatRequest, request: Request) -> Any:
        if req.tools:
            raise ApiError(400, "tools are not supported", param="tools")
        if req.format:
            raise ApiError(400, "format (structured output) is not supported", param="format")
        if any(m.images for m in req.messages):
            raise ApiError(400, "images are not supported", param="messages")
        messages = [{"role": m.role, "content": m.content} for m in req.messages]
        prompt_ids = await asyncio.to_thread(service.encode_messages, messages)
        return await ollama_run(request, prompt_ids, req.options, req.stream, chat=True)

    @app.post("/api/generate")
    async def ollama_generate(req: OllamaGenerateRequest, request: Request) -> Any:
        if req.format:
            raise ApiError(400, "format (structured output) is not supported", param="format")
        if not req.prompt:  # Ollama answers an empty prompt by loading the model; there is nothing to load
            return {"model": options.model_name, "created_at": _now(), "response": "", "done": True,
                    "done_reason": "load"}
        if req.raw:
            prompt_ids = await asyncio.to_thread(_locked, service, service.encode_text, req.prompt)
        else:
            messages = ([{"role": "system", "content": req.system}] if req.system else []) + [
                {"role": "user", "content": req.prompt}]
            prompt_ids = await asyncio.to_thread(service.encode_messages, messages)
        return await ollama_run(request, prompt_ids, req.options, req.stream, chat=False)

    @app.get("/api/version")
    async def ollama_version() -> dict:
        return {"version": __version__}

    def ollama_model() -> dict:
        n_params = sum(p.numel() for p in model.parameters())
        return {"name": options.model_name, "model": options.model_name, "modified_at": _now(),
                "size": int(sum(p.numel() * p.element_size() for p in model.parameters())),
                "digest": uuid.uuid5(uuid.NAMESPACE_URL, options.model_name).hex,
                "details": {"format": "safetensors", "family": getattr(model.config, "model_type", ""),
                            "families": [getattr(model.config, "model_type", "")],
                            "parameter_size": f"{n_params / 1e6:.0f}M", "quantization_level": str(service.engine.dtype)
                            .removeprefix("torch.").upper()}}

    @app.get("/api/tags")
    async def ollama_tags() -> dict:
        return {"models": [ollama_model()]}

    @app.post("/api/show")
    async def ollama_show(request: Request) -> dict:
        body = await request.json() if await request.body() else {}
        name = body.get("model") or body.get("name")
        if name not in (None, options.model_name):
            raise ApiError(404, f"model {name!r} not found (this server serves {options.model_name!r})")
        info = ollama_model()
        return {"modelfile": "", "parameters": "", "template": "", "details": info["details"],
                "model_info": {"general.architecture": info["details"]["family"],
                               "steerlib.trait_vectors": sorted(service.vector_info()),
                               "steerlib.monitored_traits": list(service.monitored)},
                "capabilities": ["completion"], "modified_at": info["modified_at"]}

    # Outermost last: CORS answers preflights before the guard asks for a key.
    app.add_middleware(Guard, api_key=options.api_key,
                       allowed_hosts=allowed_hosts_for(options.host, options.allowed_hosts),
                       max_body=options.max_body_bytes)
    if options.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(options.cors_origins), allow_methods=["*"],
                           allow_headers=["*"])
    return app


def _locked(service: Service, fn: Any, *args: Any) -> Any:
    with service._encode_lock:
        return fn(*args)


def _openai_finish(reason: str) -> str:
    return reason if reason in ("stop", "length") else "stop"


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")
