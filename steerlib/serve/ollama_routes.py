"""The Ollama-compatible routes: ``POST /api/chat`` and ``/api/generate`` (NDJSON streaming by default, as Ollama
does), ``GET /api/tags``, ``POST /api/show``, ``GET /api/version``; steering goes in ``options.steer`` with the
same specs as the OpenAI routes' ``steering``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from steerlib.core.version import __version__
from steerlib.serve.conversations import CONVERSATION_HEADER, check_conversation_id
from steerlib.serve.engine import Completion, Sampling
from steerlib.serve.runs import RequestRun, batch_meta, token_projections
from steerlib.serve.schema import ApiError, OllamaChatRequest, OllamaGenerateRequest, OllamaShowRequest
from steerlib.serve.service import Service

__all__ = ["ollama_router"]


def ollama_router(service: Service) -> APIRouter:
    """The Ollama routes over ``service``.

    Args:
        service: the engine, registry and read-out the routes use.

    Returns:
        An ``APIRouter`` to include in the app (its paths start with ``/api/``).
    """
    router = APIRouter()

    # -- Ollama -------------------------------------------------------------------------------------------
    def ollama_sampling(opts: Any) -> Sampling:
        temperature = opts.temperature if opts and opts.temperature is not None else 0.8
        num_predict = opts.num_predict if opts and opts.num_predict not in (None, -1) else None
        max_tokens = service.max_tokens(num_predict)
        return Sampling(max_tokens=max_tokens, temperature=temperature,
                        top_p=(opts.top_p if opts and opts.top_p is not None else 1.0) if temperature > 0 else 1.0,
                        seed=opts.seed if opts and temperature > 0 else None,
                        stop=tuple(opts.stop or ()) if opts else ())

    async def ollama_run(request: Request, prompt_ids: list[int], opts: Any, stream: bool, chat: bool,
                         conversation: str | None, model: str | None) -> Any:
        sampling = ollama_sampling(opts)
        service.check_length(len(prompt_ids), sampling.max_tokens)
        edits, steering = service.steering_for(opts.steer if opts else None, "options.steer", model)
        run = RequestRun(service, prompt_ids, edits, steering, [sampling], conversation)
        started = time.monotonic_ns()
        names = list(service.monitored)

        def piece(text: str) -> dict:
            return {"message": {"role": "assistant", "content": text}} if chat else {"response": text}

        def final(c: Completion, text: str) -> dict:
            total = time.monotonic_ns() - started
            return {"model": service.options.model_name, "created_at": _now(), **piece(text), "done": True,
                    "done_reason": "length" if c.finish_reason == "length" else "stop", "total_duration": total,
                    "load_duration": 0, "prompt_eval_count": c.prompt_tokens,
                    "prompt_eval_duration": int((c.ttft_ms or 0) * 1e6), "eval_count": c.completion_tokens,
                    "eval_duration": max(0, total - int((c.ttft_ms or 0) * 1e6)),
                    "trait_projections": c.trait_projections, "steering": steering, "batch": batch_meta(c)}

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
                        yield json.dumps({"model": service.options.model_name, "created_at": _now(), **piece(text),
                                          "done": False, "token_projections": token_projections(names, values),
                                          "step": step}) + "\n"
                    elif item[0] == "done":
                        yield json.dumps(final(item[1], "")) + "\n"
                    else:
                        yield json.dumps({"error": item[1].message}) + "\n"
                        return
            finally:
                run.cancel()

        return StreamingResponse(body(), media_type="application/x-ndjson")

    @router.post("/api/chat")
    async def ollama_chat(req: OllamaChatRequest, request: Request) -> Any:
        if req.tools:
            raise ApiError(400, "tools are not supported", param="tools")
        if req.format:
            raise ApiError(400, "format (structured output) is not supported", param="format")
        if any(m.images for m in req.messages):
            raise ApiError(400, "images are not supported", param="messages")
        service.preset_named(req.model)  # an unknown model is a 404 before any work (ollama_run resolves it)
        conversation = check_conversation_id(request.headers.get(CONVERSATION_HEADER), req.conversation_id)
        messages = [{"role": m.role, "content": m.content} for m in req.messages]
        prompt_ids = await asyncio.to_thread(service.encode_messages, messages)
        return await ollama_run(request, prompt_ids, req.options, req.stream, chat=True,
                                conversation=conversation, model=req.model)

    @router.post("/api/generate")
    async def ollama_generate(req: OllamaGenerateRequest, request: Request) -> Any:
        if req.format:
            raise ApiError(400, "format (structured output) is not supported", param="format")
        conversation = check_conversation_id(request.headers.get(CONVERSATION_HEADER), req.conversation_id)
        service.preset_named(req.model)  # an unknown model is a 404, also for the empty prompt's "load"
        if not req.prompt:  # Ollama answers an empty prompt by loading the model; there is nothing to load
            return {"model": service.options.model_name, "created_at": _now(), "response": "", "done": True,
                    "done_reason": "load"}
        if req.raw:
            prompt_ids = await asyncio.to_thread(service.encode_raw, req.prompt)
        else:
            messages = ([{"role": "system", "content": req.system}] if req.system else []) + [
                {"role": "user", "content": req.prompt}]
            prompt_ids = await asyncio.to_thread(service.encode_messages, messages)
        return await ollama_run(request, prompt_ids, req.options, req.stream, chat=False,
                                conversation=conversation, model=req.model)

    @router.get("/api/version")
    async def ollama_version() -> dict:
        return {"version": __version__}

    def ollama_model(name: str | None = None) -> dict:
        name = name or service.options.model_name
        n_params = sum(p.numel() for p in service.model.parameters())
        return {"name": name, "model": name, "modified_at": _now(),
                "size": int(sum(p.numel() * p.element_size() for p in service.model.parameters())),
                "digest": uuid.uuid5(uuid.NAMESPACE_URL, name).hex,
                "details": {"format": "safetensors", "family": getattr(service.model.config, "model_type", ""),
                            "families": [getattr(service.model.config, "model_type", "")],
                            "parameter_size": f"{n_params / 1e6:.0f}M", "quantization_level": str(service.engine.dtype)
                            .removeprefix("torch.").upper()}}

    @router.get("/api/tags")
    async def ollama_tags() -> dict:
        # Steering presets are listed as models of their own, so a client that can only pick a model can steer.
        presets = [{**ollama_model(name), "steering": steering} for name, (_, steering) in service.presets.items()]
        aliases = [ollama_model(name) for name in service.options.model_aliases]
        # served_names: every `model` a request may name (others are a 404), `:latest` forms included.
        return {"models": [ollama_model(), *aliases, *presets], "served_names": service.served_names()}

    @router.post("/api/show")
    async def ollama_show(request: Request) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw) if raw.strip() else {}
        except ValueError:
            raise ApiError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
        try:
            req = OllamaShowRequest.model_validate(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise ApiError(400, f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
        name = req.model or req.name
        service.preset_named(name)  # 404 for a name this server does not serve
        info = ollama_model(name)
        return {"modelfile": "", "parameters": "", "template": "", "details": info["details"],
                "model_info": {"general.architecture": info["details"]["family"],
                               "steerlib.trait_vectors": sorted(service.vector_info()),
                               "steerlib.monitored_traits": list(service.monitored)},
                "capabilities": ["completion"], "modified_at": info["modified_at"]}

    return router


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")
