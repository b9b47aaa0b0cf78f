"""One request's rows in the engine: ``n`` choices submitted together, their events delivered to the event loop.

The worker thread calls each row's sink; ``RequestRun`` moves those events onto an ``asyncio.Queue`` so the OpenAI
and Ollama routes can stream them or wait for every choice, cancelling the rows when the client goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import Request

from steerlib.serve.engine import Completion, RowEdit, Sampling
from steerlib.serve.schema import ApiError
from steerlib.serve.service import Service

__all__ = ["RequestRun", "batch_meta", "token_projections"]


class RequestRun:
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
        except ApiError:
            self.cancel()  # a full queue refused choice i: the choices already queued must not run for nobody
            raise

    def _sink(self, index: int):
        def sink(item: tuple) -> None:
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


def batch_meta(c: Completion) -> dict[str, Any]:
    """The ``batch`` field of a response: the steps its tokens came from, batch sizes, queue time, TTFT."""
    sizes = [s for _, s in c.steps]
    return {"steps": c.steps, "max_size": max(sizes) if sizes else 0,
            "mean_size": round(sum(sizes) / len(sizes), 3) if sizes else 0, "queue_ms": c.queue_ms,
            "ttft_ms": c.ttft_ms}


def token_projections(names: Sequence[str], values: list[list[float]]) -> dict[str, list[float]]:
    """Per-token read-outs (one list per token) regrouped as trait name -> values."""
    return {name: [v[k] for v in values] for k, name in enumerate(names)}
