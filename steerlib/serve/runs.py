"""One request's rows in the engine: ``n`` choices submitted together, their events delivered to the event loop.

The worker thread calls each row's sink; ``RequestRun`` moves those events onto an ``asyncio.Queue`` so the OpenAI
and Ollama routes can stream them or wait for every choice, cancelling the rows when the client goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import Request

from steerlib.serve.engine import (
    Completion,
    EngineError,
    EngineStopped,
    QueueFull,
    Sampling,
    UnsupportedSteering,
)
from steerlib.serve.metrics import edits_label
from steerlib.serve.schema import ApiError
from steerlib.serve.service import Service
from steerlib.steering.plan import Edit

__all__ = ["RequestRun", "batch_meta", "openai_finish", "sse", "token_projections"]


class RequestRun:
    """The rows of one request (``n`` choices) and the event queue the worker feeds."""

    def __init__(self, service: Service, prompt_ids: list[int], edits: list[Edit], steering: list[dict],
                 sampling: list[Sampling], conversation_id: str | None = None):
        """Submit one row per choice.

        Args:
            service: the service whose engine runs the rows.
            prompt_ids: the tokenised prompt.
            edits: the resolved steering (empty: unsteered).
            steering: the steering as the client wrote it (reported back and logged with drift alerts).
            sampling: one ``Sampling`` per choice.
            conversation_id: the client's conversation; choice 0's reply becomes its next turn.
        """
        self.service = service
        self.conversation_id = conversation_id
        self.steered = bool(edits)
        self.label = edits_label(edits)
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
        if service.metrics is not None:
            service.metrics.count_request(self.label)

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
            if item[0] == "done" and index == 0 and self.conversation_id is not None \
                    and item[1].finish_reason != "cancelled":
                self.service.record_turn(self.conversation_id, item[1], self.label)
            yield index, item

    async def results(self, request: Request) -> list[Completion]:
        """Wait for every row; a client that disconnects cancels its rows at once, so they leave the batch at the
        engine's next step (a watcher waits on the connection itself: tokens arriving steadily never delay it)."""
        watcher = asyncio.ensure_future(self._cancel_on_disconnect(request))
        out: list[Completion | None] = [None] * len(self.rows)
        try:
            async for index, item in self.events_until_done():
                if item[0] == "error":
                    self.cancel()
                    raise item[1]
                if item[0] == "done":
                    out[index] = item[1]
        finally:
            watcher.cancel()
        return [c for c in out if c is not None]

    async def _cancel_on_disconnect(self, request: Request) -> None:
        # The body has been read: the server's next message for this request is its disconnect.
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self.cancel()


def batch_meta(c: Completion) -> dict[str, Any]:
    """The ``batch`` field of a response: the steps its tokens came from, batch sizes, queue time, TTFT."""
    sizes = [s for _, s in c.steps]
    return {"steps": c.steps, "max_size": max(sizes) if sizes else 0,
            "mean_size": round(sum(sizes) / len(sizes), 3) if sizes else 0, "queue_ms": c.queue_ms,
            "ttft_ms": c.ttft_ms}


def token_projections(names: Sequence[str], values: list[list[float]]) -> dict[str, list[float]]:
    """Per-token read-outs (one list per token) regrouped as trait name -> values."""
    return {name: [v[k] for v in values] for k, name in enumerate(names)}


def engine_api_error(exc: EngineError) -> ApiError:
    """The HTTP answer to an engine's refusal or failure (the engine itself knows no status codes)."""
    if isinstance(exc, QueueFull):
        return ApiError(429, str(exc), code="queue_full", type_="rate_limit_error")
    if isinstance(exc, EngineStopped):
        return ApiError(503, str(exc), type_="server_error")
    if isinstance(exc, UnsupportedSteering):
        return ApiError(400, str(exc), param="steering", code="unsupported_steering")
    return ApiError(500, str(exc), type_="server_error")


def openai_finish(reason: str) -> str:
    """OpenAI's finish reasons are "stop" and "length"; every other ending of a row is reported as "stop"."""
    return reason if reason in ("stop", "length") else "stop"


def sse(payload: Any) -> str:
    """One server-sent event carrying ``payload`` as JSON."""
    return f"data: {json.dumps(payload)}\n\n"
