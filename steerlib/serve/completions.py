"""``POST /v1/completions``: OpenAI's (legacy) completions, with ``echo`` and ``logprobs``, steered per request.

What lm-evaluation-harness's ``local-completions`` model asks for: a prompt as token ids, ``echo: true``,
``logprobs: k`` and ``max_tokens`` 0 or 1, and it reads the prompt tokens' ``token_logprobs`` (their sum is a
continuation's log-likelihood). Those are the steered model's log-probabilities: steering at prompt positions
applies, as when the prompt is prefilled for generation.

* ``prompt``: text (tokenised as is, no chat template), token ids, or a list of either; each prompt runs ``n``
  rows and its choices are numbered ``prompt index * n + i``.
* ``steering`` / presets / the server's default: exactly as on ``/v1/chat/completions``.
* ``stream``: text chunks as on chat; a choice's ``logprobs`` object (when asked for) comes whole in its last
  chunk, the one with its ``finish_reason``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from steerlib.serve.contract import Completion, Sampling, TokenLogprob
from steerlib.serve.logprobs import completion_logprobs
from steerlib.serve.runs import RequestRun, batch_meta, openai_finish, sse, token_projections
from steerlib.serve.schema import ApiError, CompletionRequest
from steerlib.serve.service import Service

__all__ = ["check_logprobs", "completions_router"]


def check_logprobs(service: Service, *, generated: bool, prompt: bool, param: str) -> None:
    """Refuse log-probabilities the running engine cannot compute (one 400 whichever engine runs)."""
    caps = service.engine.capabilities
    missing = [what for what, asked, has in (("log-probabilities", generated, caps.logprobs),
                                            ("prompt log-probabilities", prompt, caps.prompt_logprobs))
               if asked and not has]
    if missing:
        raise ApiError(400, f"{missing[0]} are not supported on the {caps.name} engine", param=param)


def completions_router(service: Service) -> APIRouter:
    """The completions route over ``service``."""
    router = APIRouter()
    decode = service.decode_token

    @router.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Any:
        k = req.logprobs
        check_logprobs(service, generated=k is not None, prompt=k is not None and req.echo, param="logprobs")
        max_tokens = service.options.default_max_tokens if req.max_tokens is None else req.max_tokens
        if max_tokens:
            max_tokens = service.max_tokens(max_tokens)
        edits, steering = service.steering_for(req.steering, "steering", req.model)
        prompts = []
        for item in req.prompts():
            ids = await asyncio.to_thread(service.encode_raw, item) if isinstance(item, str) else list(item)
            service.check_token_ids(ids, "prompt")
            service.check_length(len(ids), max_tokens, param="prompt")
            text = item if isinstance(item, str) else await asyncio.to_thread(service.decode_ids, ids)
            prompts.append((ids, text))
        sampling = [Sampling(max_tokens=max_tokens, temperature=req.temperature,
                             top_p=req.top_p if req.temperature > 0 else 1.0,
                             seed=None if req.seed is None or req.temperature == 0 else req.seed + i,
                             stop=req.stop_sequences(), logprobs=k,
                             prompt_logprobs=k if k is not None and req.echo else None) for i in range(req.n)]
        runs: list[RequestRun] = []
        try:
            for ids, _ in prompts:
                runs.append(RequestRun(service, ids, edits, steering, sampling))
        except ApiError:
            for run in runs:
                run.cancel()
            raise
        completion_id = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        model = service.options.model_name

        def logprobs_of(c: Completion, p: int) -> dict | None:
            if k is None:
                return None
            ids, text = prompts[p]
            entries: list[TokenLogprob | None] = list(c.logprobs or ())
            tokens = list(c.token_ids)
            if req.echo:
                entries = [*(c.prompt_logprobs or [None] * len(ids)), *entries]
                tokens = [*ids, *tokens]
            return completion_logprobs(entries, tokens, decode)

        def text_of(c: Completion, p: int) -> str:
            return prompts[p][1] + c.text if req.echo else c.text

        if not req.stream:
            done: list[list[Completion]] = []
            try:
                for run in runs:
                    done.append(await run.results(request))
            finally:
                for run in runs:
                    run.cancel()  # no-op for finished rows; frees the slots of an abandoned request
            choices = [{"index": p * req.n + i, "text": text_of(c, p), "logprobs": logprobs_of(c, p),
                        "finish_reason": openai_finish(c.finish_reason), "trait_projections": c.trait_projections,
                        "batch": batch_meta(c)}
                       for p, cs in enumerate(done) for i, c in enumerate(cs)]
            prompt_tokens = sum(len(ids) for ids, _ in prompts) * req.n
            generated = sum(c.completion_tokens for cs in done for c in cs)
            return {"id": completion_id, "object": "text_completion", "created": created, "model": model,
                    "choices": choices,
                    "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": generated,
                              "total_tokens": prompt_tokens + generated},
                    "trait_projections": done[0][0].trait_projections, "steering": steering}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        names = list(service.monitored)

        def chunk(index: int, text: str, finish: str | None = None, logprobs: dict | None = None,
                  **extra: Any) -> str:
            return sse({"id": completion_id, "object": "text_completion", "created": created, "model": model,
                         "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}],
                         **extra})

        async def body() -> AsyncIterator[str]:
            generated = 0
            try:
                for p, run in enumerate(runs):
                    if req.echo:
                        for i in range(req.n):
                            yield chunk(p * req.n + i, prompts[p][1])
                    async for i, item in run.events_until_done():
                        index = p * req.n + i
                        if item[0] == "token":
                            _, text, values, step = item
                            yield chunk(index, text, token_projections=token_projections(names, values), step=step)
                        elif item[0] == "done":
                            c = item[1]
                            generated += c.completion_tokens
                            yield chunk(index, "", openai_finish(c.finish_reason), logprobs_of(c, p),
                                        trait_projections=c.trait_projections, steering=steering)
                        else:  # the response has started: report the failure in-band, as OpenAI does
                            yield sse(item[1].body())
                            return
                if include_usage:
                    prompt_tokens = sum(len(ids) for ids, _ in prompts) * req.n
                    yield sse({"id": completion_id, "object": "text_completion", "created": created,
                                "model": model, "choices": [],
                                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": generated,
                                          "total_tokens": prompt_tokens + generated}})
                yield "data: [DONE]\n\n"
            finally:
                for run in runs:
                    run.cancel()  # client gone or stream over: the rows leave the batch at the next step

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return router

