"""The OpenAI-compatible routes: ``POST /v1/chat/completions`` (streamed or not, ``n``, ``stop``, ``seed``,
``logprobs`` / ``top_logprobs``; ``/v1/completions`` is ``steerlib.serve.completions``).

Steering is an extension field (``extra_body={"steering": [{"vector": "optimistic", "layer": 15, "coef": 4.0}]}``;
``[]`` turns the server's default steering off). Every answer carries ``trait_projections`` (mean / max /
``prompt_last`` per monitored trait) and ``batch`` (the ``[step id, batch size]`` each token came from); every
streamed chunk carries ``token_projections``: the per-token values of the tokens it holds. With ``logprobs`` a
choice's log-probabilities (the steered model's, of its content tokens) come in OpenAI's chat shape; streamed, whole in
the choice's last chunk.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from steerlib.serve.completions import check_logprobs
from steerlib.serve.conversations import CONVERSATION_HEADER, check_conversation_id
from steerlib.serve.engine import Completion, Sampling
from steerlib.serve.logprobs import chat_logprobs
from steerlib.serve.runs import RequestRun, batch_meta, openai_finish, sse, token_projections
from steerlib.serve.schema import ApiError, ChatCompletionRequest
from steerlib.serve.service import Service

__all__ = ["openai_router"]


def openai_router(service: Service) -> APIRouter:
    """The OpenAI chat route over ``service``.

    Args:
        service: the engine, registry and read-out the route uses.

    Returns:
        An ``APIRouter`` to include in the app.
    """
    router = APIRouter()

    # -- OpenAI -------------------------------------------------------------------------------------------
    @router.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Any:
        if req.tools:
            raise ApiError(400, "tools are not supported", param="tools")
        k = (req.top_logprobs or 0) if req.logprobs else None
        check_logprobs(service, generated=k is not None, prompt=False, param="logprobs")
        conversation = check_conversation_id(request.headers.get(CONVERSATION_HEADER), req.conversation_id)
        max_tokens = service.max_tokens(req.max_completion_tokens or req.max_tokens)
        edits, steering = service.steering_for(req.steering, "steering", req.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages]
        prompt_ids = await asyncio.to_thread(service.encode_messages, messages)
        service.check_length(len(prompt_ids), max_tokens)
        sampling = [Sampling(max_tokens=max_tokens, temperature=req.temperature,
                             top_p=req.top_p if req.temperature > 0 else 1.0,
                             seed=None if req.seed is None or req.temperature == 0 else req.seed + i,
                             stop=req.stop_sequences(), logprobs=k) for i in range(req.n)]
        run = RequestRun(service, prompt_ids, edits, steering, sampling, conversation)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())

        def logprobs_of(c: Completion) -> dict | None:
            if k is None:
                return None
            # The content's tokens: an ending EOS token is not part of the message.
            entries = [e for e in c.logprobs or () if e.token_id not in service.engine.eos_ids]
            return chat_logprobs(entries, service.decode_token)
        if not req.stream:
            try:
                done = await run.results(request)
            finally:
                run.cancel()  # no-op for finished rows; frees the slots of an abandoned request
            return {
                "id": completion_id, "object": "chat.completion", "created": created, "model": service.options.model_name,
                "choices": [{"index": i, "message": {"role": "assistant", "content": c.text},
                             "finish_reason": openai_finish(c.finish_reason), "logprobs": logprobs_of(c),
                             "trait_projections": c.trait_projections, "batch": batch_meta(c)}
                            for i, c in enumerate(done)],
                "usage": _usage(run.prompt_tokens, done),
                "trait_projections": done[0].trait_projections,
                "steering": steering,
                "batch": batch_meta(done[0]),
            }
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        names = list(service.monitored)

        def chunk(index: int, delta: dict, finish: str | None = None, logprobs: dict | None = None,
                  **extra: Any) -> dict:
            return {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                    "model": service.options.model_name,
                    "choices": [{"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}],
                    **extra}

        async def body() -> AsyncIterator[str]:
            finished: list[Completion] = []
            try:
                for i in range(req.n):
                    yield sse(chunk(i, {"role": "assistant", "content": ""}))
                async for index, item in run.events_until_done():
                    if item[0] == "token":
                        _, text, values, step = item
                        yield sse(chunk(index, {"content": text}, token_projections=token_projections(names, values),
                                         step=step))
                    elif item[0] == "done":
                        c = item[1]
                        finished.append(c)
                        yield sse(chunk(index, {}, openai_finish(c.finish_reason), logprobs_of(c),
                                         trait_projections=c.trait_projections, steering=steering,
                                         batch=batch_meta(c)))
                    else:  # the response has started: report the failure in-band, as OpenAI does
                        yield sse(item[1].body())
                        return
                if include_usage:
                    yield sse({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                                "model": service.options.model_name, "choices": [],
                                "usage": _usage(run.prompt_tokens, finished)})
                yield "data: [DONE]\n\n"
            finally:
                run.cancel()  # client gone or stream over: the rows leave the batch at the next step

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return router



def _usage(prompt_tokens: int, completions: Sequence[Completion]) -> dict[str, int]:
    gen = sum(c.completion_tokens for c in completions)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": gen, "total_tokens": prompt_tokens + gen}
