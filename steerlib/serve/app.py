"""The HTTP app: the OpenAI chat API and the Ollama API on one port, over one continuous-batching engine.

``create_app`` builds a ``Service`` (engine, tokenizer, vector registry, read-out, drift), includes the OpenAI
(``openai_routes``) and Ollama (``ollama_routes``) routers, and serves the operations routes itself: ``/health``
(always open), ``/v1/stats`` (engine counters: steps, batch sizes), ``GET /v1/models``, ``/v1/monitor`` (drift
history and alerts; ``GET /`` draws it), and the runtime vector registry ``GET/POST /v1/vectors``,
``DELETE /v1/vectors/{name}`` (loads only from folders the operator allowed at start), ``GET /metrics``
(Prometheus; see ``metrics``), the per-conversation turn series ``GET /v1/conversations[/{id}]`` and pooled activations
of logged conversations ``POST /v1/activations`` (``activations``). Errors have one shape per
API (OpenAI's error object; Ollama's ``{"error": ...}`` under ``/api/``). The guards (``guard``) wrap it all.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from importlib import resources
from typing import Any

import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from steerlib.core.vectors import TraitVectors
from steerlib.monitoring.drift import DriftMonitor
from steerlib.serve.activations import activations_router
from steerlib.serve.completions import completions_router
from steerlib.serve.contract import EngineFactory
from steerlib.serve.guard import install_guards
from steerlib.serve.ollama_routes import ollama_router
from steerlib.serve.openai_routes import openai_router
from steerlib.serve.schema import ApiError, VectorLoadRequest, validation_message
from steerlib.serve.service import AppOptions, Service
from steerlib.steering.calibration import Calibration

__all__ = ["AppOptions", "Service", "create_app"]


def create_app(model: torch.nn.Module, tokenizer: Any, vectors: Mapping[str, TraitVectors],
               options: AppOptions | None = None, drift: DriftMonitor | None = None,
               calibrations: Mapping[str, Calibration] | None = None,
               engine_factory: EngineFactory | None = None) -> FastAPI:
    """The FastAPI app; the engine starts and stops with its lifespan (``app.state.service`` holds it).

    ``calibrations`` (vector name -> ``Calibration``) enable ``cap_percentile`` in that vector's steering entries;
    ``engine_factory`` builds another engine of the contract (``steerlib.serve.contract``; e.g. ``vllm_engine``).
    """
    options = options or AppOptions()
    service = Service(model, tokenizer, vectors, options, drift, calibrations, engine_factory)
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
        # Steering presets are models of their own: any client that can pick a model can pick a steered one.
        presets = [{"id": name, "object": "model", "created": int(service.started_at), "owned_by": "steerlib",
                    "parent": options.model_name, "steering": steering}
                   for name, (_, steering) in service.presets.items()]
        aliases = [{"id": name, "object": "model", "created": int(service.started_at), "owned_by": "steerlib",
                    "parent": options.model_name} for name in options.model_aliases]
        # served_names: every `model` a request may name (others are a 404), `:latest` forms included.
        return {"object": "list", "served_names": service.served_names(), "data": [{
            "id": options.model_name, "object": "model", "created": int(service.started_at), "owned_by": "steerlib",
            "trait_vectors": service.vector_info(), "monitored_traits": list(service.monitored),
            "readout_layer": engine.readout_layer,
            "num_layers": service.n_layers, "hidden_size": service.d_model,
            "capabilities": {"pooled_capture": engine.capabilities.pooled_capture},
            "monitor_layer": engine.readout_layer,  # the first release's name of readout_layer (kept for clients)
            "default_steering": [s.model_dump(exclude_defaults=True) for s in service.default_steering],
        }, *aliases, *presets]}

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

    @app.get("/v1/conversations")
    async def list_conversations(last: int = Query(50, ge=1, le=10_000)) -> dict:
        recent = service.conversations.recent(last)
        return {"conversations": [{"id": cid, "turns": n, "last_turn_at": latest.timestamp}
                                  for cid, n, _, latest in recent],
                "tracked": len(service.conversations), "max_conversations": options.conversations,
                "max_turns": options.conversation_turns}

    @app.get("/v1/conversations/{conversation_id}")
    async def conversation(conversation_id: str) -> dict:
        found = service.conversations.get(conversation_id)
        if found is None:
            raise ApiError(404, f"no conversation {conversation_id!r} (ids come from X-Conversation-Id or "
                                f"conversation_id; the least recently active are dropped)",
                           code="conversation_not_found")
        return {**found, "layer": engine.readout_layer, "traits": list(service.monitored)}

    metrics = service.metrics
    if metrics is not None:
        @app.get("/metrics")
        async def prometheus_metrics(request: Request) -> Response:
            body, content_type = await asyncio.to_thread(metrics.render, request.headers.get("accept"))
            return Response(body, media_type=content_type)

    app.include_router(openai_router(service))
    app.include_router(completions_router(service))
    app.include_router(activations_router(service))
    app.include_router(ollama_router(service))
    install_guards(app, api_key=options.api_key, host=options.host, allowed_hosts=options.allowed_hosts,
                   max_body=options.max_body_bytes, cors_origins=options.cors_origins,
                   route_keys={"/metrics": options.metrics_key} if options.metrics_key else None,
                   open_paths=("/metrics",) if options.metrics_no_auth else ())
    return app
