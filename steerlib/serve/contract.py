"""The engine contract: what the server asks of an engine, and the values an engine hands back.

Two engines run rows for the server: the Hugging Face engine (``steerlib.serve.engine.Engine``, continuous
batching over a shared ``DynamicCache``) and the vLLM engine (``steerlib.serve.vllm_engine.VllmEngine``, over
vLLM's ``AsyncLLM``). The service, the routes and the metrics see only what is written here:

* ``ServingEngine``: the protocol both implement (``submit`` / ``cancel`` / ``start`` / ``stop`` / ``hold`` /
  ``stats`` / ``capabilities``...). ``Service`` takes an ``EngineFactory`` that builds one.
* ``Sampling`` in, ``Completion`` out to the client (through the row's sink), ``FinishedRequest`` out to the
  server's own bookkeeping (``on_finish``: drift, metrics). ``FinishedRequest`` is a frozen value: it never lends
  an engine's private row, so a field one engine lacks cannot surface as an exception inside a callback.
* The ``EngineError`` family: refusals and failures, each mapped to one HTTP status by the routes.

A row's sink receives, from the engine's thread, ``("token", text, [[K values] per token], [step, batch])``
events and then exactly one of ``("done", Completion)`` (also for a cancelled row, finish reason
``"cancelled"``) or ``("error", EngineError)``.

Log-probabilities (``/v1/completions`` with ``logprobs`` / ``echo``, chat's ``logprobs``) are asked for in
``Sampling.logprobs`` / ``Sampling.prompt_logprobs`` and come back in ``Completion.logprobs`` (one ``TokenLogprob``
per generated token, parallel to ``Completion.token_ids``) and ``Completion.prompt_logprobs`` (one per prompt
token, the first None: nothing predicts it). They are the model's own distribution (before temperature and top-p,
as vLLM's default ``raw_logprobs``) under the row's steering, prompt positions included. Pooled activations captured inside the engine (the pipeline's extraction read-out) are per request, so
they will be a field of ``FinishedRequest`` keyed by (layer, pooling). An engine says which of these it offers in
``EngineCapabilities`` so the routes refuse what it lacks with one 400, whichever engine runs.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from steerlib.steering.plan import Edit, Support
from steerlib.steering.readout import summarize
from steerlib.steering.steer import TraitReadout

__all__ = ["MAX_LOGPROBS", "Completion", "EngineCapabilities", "EngineError", "EngineFactory", "EngineStopped",
           "FinishedRequest", "QueueFull", "RowFailed", "RowHandle", "Sampling", "ServingEngine", "Sink",
           "TokenLogprob", "UnsupportedSteering", "public_finish", "summarize_projections"]

# Most alternatives per token a request may ask for (OpenAI's chat limit; vLLM's default ``max_logprobs``).
MAX_LOGPROBS = 20


class EngineError(Exception):
    """Something the engine refused or could not do; the server maps each kind to its HTTP status."""


class QueueFull(EngineError):
    """More rows are queued than the engine accepts."""


class EngineStopped(EngineError):
    """The worker is not running, or is shutting down."""


class UnsupportedSteering(EngineError):
    """This engine cannot apply the row's steering (e.g. a condition on the vLLM engine); nothing was queued."""


class RowFailed(EngineError):
    """This row's generation failed (its sampling, decoding, or the step it was in)."""


@dataclass(frozen=True)
class Sampling:
    """Per-row decoding settings."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: none; k >= 0: each generated token's log-probability and the k most likely
    prompt_logprobs: int | None = None  # the same for every prompt token (``echo``); None: none

    def __post_init__(self) -> None:
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and not 0 <= k <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be in 0..{MAX_LOGPROBS}, got {k}")


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability under the (steered) model, and the most likely tokens at its position.

    Attributes:
        token_id: the token (generated, or the prompt's).
        logprob: its natural-log probability.
        top: ``(token id, logprob)`` of the k most likely tokens, most likely first.
    """

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Completion:
    """What a finished row hands back to its client."""

    text: str
    completion_tokens: int
    prompt_tokens: int
    finish_reason: str
    trait_projections: dict[str, dict[str, Any]]
    steps: list[list[int]]  # [step id, batch size] per generated token
    queue_ms: float
    ttft_ms: float | None
    token_ids: tuple[int, ...] = ()  # the generated tokens (an ending EOS included)
    logprobs: tuple[TokenLogprob, ...] | None = None  # parallel to token_ids when ``Sampling.logprobs`` was set
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None  # per prompt token (the first None)


# How a row ended (``Reply.finish``) -> what clients are told. One table for every engine: a stop sequence and an
# end-of-sequence token are both OpenAI's "stop".
_PUBLIC_FINISH = {"eos": "stop", "stop_sequence": "stop", "length": "length", "cancelled": "cancelled"}


def public_finish(reason: str) -> str:
    """The finish reason a client sees (``"stop"``, ``"length"``, ``"cancelled"``) for a row's own reason
    (``"eos"``, ``"stop_sequence"``, ``"length"``, ``"cancelled"``)."""
    try:
        return _PUBLIC_FINISH[reason]
    except KeyError:
        raise ValueError(f"unknown finish reason {reason!r}; expected one of {sorted(_PUBLIC_FINISH)}") from None


def summarize_projections(values: Sequence[float], layer: int | None) -> dict[str, Any]:
    """One trait's summary of a response (every engine reports it so): ``mean`` and ``max`` over the response
    tokens' own read-outs, ``prompt_last`` at the last prompt token. ``values[0]`` is read at the last prompt token
    and ``values[j]`` (j >= 1) at response token ``j - 1`` (the engine's closing pass supplies the last one)."""
    return summarize(values, layer)  # the pairing and the summary are stated once, in steering.readout


@dataclass(frozen=True)
class FinishedRequest:
    """One finished row (one choice of one request), as ``on_finish`` receives it; every field is a copy.

    Attributes:
        request_id: the engine's id of the row.
        prompt_ids: the prompt's token ids.
        token_ids: the generated tokens, an end-of-sequence token that ended the reply included.
        readout: ``(position, values)`` pairs in order: ``values`` (one per monitored trait) were read at absolute
            ``position``; the first pair is the last prompt token's, pair ``j >= 1`` response token ``j - 1``'s.
        edits: the row's lowered steering (``steerlib.steering.plan.Edit``), empty when unsteered.
        steered: the request asked for steering (its own, a preset's or the server's default).
        steering: the request's steering as the client wrote it (for drift alerts' metadata).
        completion: what the client was sent: text, finish reason, usage, per-trait summaries.
    """

    request_id: str
    prompt_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    readout: tuple[tuple[int, tuple[float, ...]], ...]
    edits: tuple[Edit, ...]
    steered: bool
    steering: tuple[Mapping[str, Any], ...]
    completion: Completion

    @classmethod
    def build(cls, *, request_id: str, prompt_ids: Sequence[int], token_ids: Sequence[int],
              readout: Sequence[tuple[int, Sequence[float]]], edits: Sequence[Edit], steered: bool,
              steering: Sequence[Mapping[str, Any]], completion: Completion) -> FinishedRequest:
        """A ``FinishedRequest`` holding copies (the engine keeps mutating its own row after this)."""
        return cls(request_id=request_id, prompt_ids=tuple(prompt_ids), token_ids=tuple(token_ids),
                   readout=tuple((int(p), tuple(float(x) for x in v)) for p, v in readout), edits=tuple(edits),
                   steered=steered, steering=tuple(copy.deepcopy(dict(s)) for s in steering),
                   completion=copy.deepcopy(completion))

    @property
    def text(self) -> str:
        return self.completion.text

    @property
    def finish_reason(self) -> str:
        return self.completion.finish_reason

    @property
    def trait_projections(self) -> dict[str, dict[str, Any]]:
        return self.completion.trait_projections

    @property
    def usage(self) -> dict[str, int]:
        """OpenAI's usage object for this one choice."""
        c = self.completion
        return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                "total_tokens": c.prompt_tokens + c.completion_tokens}


@dataclass(frozen=True)
class EngineCapabilities:
    """What an engine offers beyond running steered rows (routes refuse the rest with one 400 on every engine).

    Attributes:
        name: ``"hf"`` or ``"vllm"`` (reported by ``stats()["engine"]``).
        batch_steps: ``Completion.steps`` names real shared forward steps (False: placeholders ``[0, 0]``).
        logprobs: per-token log-probabilities of generated tokens (``Sampling.logprobs``).
        prompt_logprobs: log-probabilities of the prompt's tokens (``Sampling.prompt_logprobs``, ``echo``).
        pooled_capture: the engine's ``capture(samples, layers)`` reads pooled activations of logged token
            sequences inside it (vLLM: in its worker; HF: on its worker thread between steps), as
            ``steerlib.core.capture`` pools them (``POST /v1/activations``).
        steering: which edits the engine applies (markers, gates, latches); the service refuses the rest with
            ``steerlib.steering.plan.check_supported``'s one message.
    """

    name: str
    batch_steps: bool
    logprobs: bool = False
    prompt_logprobs: bool = False
    pooled_capture: bool = False
    steering: Support = Support("the engine")


Sink = Callable[[tuple], None]


@runtime_checkable
class RowHandle(Protocol):
    """What ``submit`` returns: the routes set ``meta_steering`` and hand it back to ``cancel``."""

    cancelled: threading.Event
    meta_steering: list
    steered: bool


@runtime_checkable
class ServingEngine(Protocol):
    """The engine a ``Service`` runs rows on (``Engine`` and ``VllmEngine`` implement it).

    ``on_finish`` is called once per row that finished (not for cancelled or failed rows) on the engine's thread,
    before the row's ``("done", ...)`` event; an exception it raises is logged at ERROR and counted in
    ``stats()["finish_callback_errors"]``, never passed to the client.
    """

    readout_layer: int | None  # the layer of the trait read-out (None: no read-out)
    eos_ids: set[int]
    dtype: Any
    readout: TraitReadout | None
    on_finish: Callable[[FinishedRequest], None] | None

    @property
    def capabilities(self) -> EngineCapabilities: ...

    @property
    def alive(self) -> bool:
        """The engine serves (its worker or event loop runs): the server's health."""
        ...

    def start(self) -> None: ...

    def stop(self, timeout: float = 30.0) -> None:
        """Stop; rows still running or queued end with ``EngineStopped``."""
        ...

    def hold(self) -> AbstractContextManager[None]:
        """Admit no new rows while inside the block."""
        ...

    def submit(self, prompt_ids: list[int], edits: Sequence[Edit], sampling: Sampling, sink: Sink, *,
               steered: bool) -> RowHandle:
        """Queue one row (refusing at once with ``QueueFull``, ``EngineStopped`` or ``UnsupportedSteering``)."""
        ...

    def cancel(self, row: RowHandle) -> None:
        """End this row now (its client went away): it leaves the batch at the next step and its sink gets
        ``("done", Completion)`` with finish reason ``"cancelled"`` (unless it had already ended)."""
        ...

    def queue_depth(self) -> int: ...

    def active_rows(self) -> int: ...

    def stats(self) -> dict[str, Any]: ...

    def capture(self, samples: Sequence[tuple[list[int], int]], layers: Sequence[int] | None = None,
                timeout: float = 600.0) -> list[dict[str, Any]]:
        """Pooled residuals of ``(token ids, prompt length)`` samples, unsteered, at ``layers`` (None: all):
        ``prompt_mean`` / ``prompt_last`` / ``response_mean`` (``[len(layers), D]`` lists), ``token_norms``,
        ``prompt_tokens``, ``response_tokens`` per sample (``pooled_capture`` engines; the rest raise)."""
        ...


class EngineFactory(Protocol):
    """Builds the service's engine from the service's read-out and limits (``Service(engine_factory=...)``)."""

    def __call__(self, *, readout: TraitReadout | None, max_batch: int, max_queue: int,
                 eos_ids: set[int]) -> ServingEngine: ...
