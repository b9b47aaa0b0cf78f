"""Helpers of the vLLM tests: the engine's settings and a way to run rows through it and collect what came back."""

from __future__ import annotations

import threading

TOKEN_BUDGET = 64  # tokens per vLLM step: prompts longer than this are prefilled in chunks
READOUT_LAYER = 12


class Collected:
    """What one row's sink received."""

    def __init__(self) -> None:
        self.text = ""
        self.values: list[list[float]] = []
        self.completion = None
        self.error = None
        self.done = threading.Event()

    def __call__(self, item: tuple) -> None:
        if item[0] == "token":
            self.text += item[1]
            self.values.extend(item[2])
        elif item[0] == "done":
            self.completion = item[1]
            self.done.set()
        else:
            self.error = item[1]
            self.done.set()


def run_rows(engine, rows, max_tokens: int = 10, timeout: float = 300.0):
    """Submit ``(prompt_ids, edits)`` rows together; return (row, Collected) per row once all are done."""
    from steerlib.serve.engine import Sampling

    out = []
    for ids, edits in rows:
        got = Collected()
        row = engine.submit(ids, edits, Sampling(max_tokens=max_tokens), got, steered=bool(edits))
        out.append((row, got))
    for _, got in out:
        assert got.done.wait(timeout), "a row did not finish"
        assert got.error is None, got.error
    return out


class LentEngine:
    """The session's engine lent to an app: the app's shutdown must not stop it (it only unhooks the app)."""

    def __init__(self, engine):
        object.__setattr__(self, "_engine", engine)

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def __setattr__(self, name, value):
        setattr(self._engine, name, value)

    def stop(self, timeout: float = 30.0) -> None:
        self._engine.on_finish = None
