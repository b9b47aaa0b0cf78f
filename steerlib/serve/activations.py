"""``POST /v1/activations``: pooled residuals of logged conversations, read inside the serving engine.

What ``monitor`` and ``flag`` need of a deployed server's logs without a second copy of the model: per (prompt,
response) pair, the mean residual over the prompt, at its last token and over the response, at the requested
layers (layer meaning as everywhere in steerlib: 0 = embeddings, ``n`` = the last block's output), and the median
token norm, exactly as ``steerlib.core.capture`` pools them. Each pair runs as a prefill-only, unsteered request
beside the rows being served. ``steerlib.serve.remote.RemoteEngine`` is its client (``steerlib flag --server``).

A sample is token ids with the prompt's length (the exact boundary the client tokenised), a formatted prompt as
text, or chat messages (the server's chat template); a response given as text is tokenised apart from the prompt.
Engines without in-engine capture (``EngineCapabilities.pooled_capture``) answer 501.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

from fastapi import APIRouter

from steerlib.serve.schema import ActivationsRequest, ApiError, CaptureSample
from steerlib.serve.service import Service

__all__ = ["activations_router"]


def _finite(rows: Any) -> Any:
    """Nested lists with NaN (no response tokens) as null: JSON has no NaN."""
    if isinstance(rows, list):
        return [_finite(x) for x in rows]
    return None if isinstance(rows, float) and math.isnan(rows) else rows


def _encode(service: Service, sample: CaptureSample, i: int) -> tuple[list[int], int]:
    """(token ids, prompt length) of one sample."""
    param = f"samples.{i}"
    if sample.token_ids is not None:
        service.check_token_ids(sample.token_ids, param + ".token_ids")
        return list(sample.token_ids), int(sample.prompt_tokens)
    if sample.messages is not None:
        prompt = service.encode_messages([{"role": m.role, "content": m.text()} for m in sample.messages])
    else:
        prompt = service.encode_raw(sample.prompt)
    response = service.encode_raw(sample.response) if sample.response else []
    return prompt + response, len(prompt)


def activations_router(service: Service) -> APIRouter:
    """The activations route over ``service``."""
    router = APIRouter()

    @router.post("/v1/activations")
    async def activations(req: ActivationsRequest) -> dict:
        service.preset_named(req.model)  # a model this server does not serve is a 404, as on every route
        engine = service.engine
        if not engine.capabilities.pooled_capture:
            raise ApiError(501, f"the {engine.capabilities.name} engine cannot capture activations inside it "
                                f"(steerlib serve --engine vllm with one pipeline stage can)",
                           code="unsupported_engine")
        n_layers = service.n_layers
        layers = None if req.layers is None else sorted(set(req.layers))
        if layers is not None and not all(0 <= x <= n_layers for x in layers):
            raise ApiError(400, f"layers must be within 0..{n_layers} (0 = embeddings, {n_layers} = the last "
                                f"block's output), got {req.layers}", param="layers")
        encoded = await asyncio.to_thread(lambda: [_encode(service, s, i) for i, s in enumerate(req.samples)])
        for i, (ids, _) in enumerate(encoded):
            service.check_length(len(ids), 0, param=f"samples.{i}")
        try:
            rows = await asyncio.to_thread(engine.capture, encoded, layers)
        except ValueError as exc:  # the engine's own refusal (e.g. a prompt boundary it cannot honour)
            raise ApiError(400, str(exc), param="samples") from None
        kept = list(range(n_layers + 1)) if layers is None else layers
        return {"object": "list", "layers": kept, "data": [
            {"index": i, "prompt_tokens": row["prompt_tokens"], "response_tokens": row["response_tokens"],
             "prompt_mean": _finite(row["prompt_mean"]), "prompt_last": _finite(row["prompt_last"]),
             "response_mean": _finite(row["response_mean"]), "token_norms": _finite(row["token_norms"])}
            for i, row in enumerate(rows)]}

    return router
