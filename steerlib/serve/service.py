"""The state behind the routes: the engine and tokenizer, the vector registry, steering resolution and drift.

``AppOptions`` says how the HTTP side and the engine run; ``Service`` owns the engine (one continuous batch), the
``VectorRegistry``, the per-token read-out and the drift monitor fed from each finished response. The routers
(``openai_routes``, ``ollama_routes``) and ``app`` use it; it knows nothing about HTTP routes.
"""

from __future__ import annotations

import copy
import math
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from steerlib.core.arch import get_layout
from steerlib.core.chat import format_messages
from steerlib.core.checks import check_int
from steerlib.core.models import eos_ids, unwrap_model
from steerlib.core.serialize import to_jsonable
from steerlib.core.vectors import TraitVectors
from steerlib.core.version import __version__
from steerlib.monitoring.drift import Alert, DriftMonitor
from steerlib.serve.contract import Completion, EngineFactory, FinishedRequest, ServingEngine
from steerlib.serve.conversations import ConversationLog, turn_bucket
from steerlib.serve.engine import Engine
from steerlib.serve.metrics import ServerMetrics, edits_label
from steerlib.serve.registry import VectorRegistry
from steerlib.serve.schema import ApiError, SteeringSpec
from steerlib.steering.calibration import Calibration, Percentile, calibrated_cap
from steerlib.steering.plan import Edit, lower_ops
from steerlib.steering.steer import When, build_ops, build_readout

__all__ = ["AppOptions", "Service"]


@dataclass(frozen=True)
class AppOptions:
    """Everything about the HTTP side and the engine that is not the model itself.

    Attributes:
        model_name: id reported by ``/v1/models`` and ``/api/tags``.
        model_aliases: further names the unsteered model answers to (listed there too).
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
        metrics: serve Prometheus metrics at ``/metrics`` (False: no route, nothing observed).
        metrics_key: a second bearer token that opens ``/metrics`` only (for the scraper); the API key opens it too.
        metrics_no_auth: serve ``/metrics`` without any key (say so explicitly; exclusive with ``metrics_key``).
        metrics_buckets: histogram buckets of the projection series (None: ``metrics.DEFAULT_BUCKETS``).
        metrics_conversations: most recently active conversations exported by id (bounds the label set).
        conversations: conversations whose per-turn projections are kept (LRU; 0: off).
        conversation_turns: turns kept per conversation (the newest).
        presets: steering presets served as models: (name, steering specs) pairs; a request whose ``model``
            names one (Ollama's ``:latest`` tag allowed) and gives no steering of its own is steered with it,
            so clients that cannot send extra fields can still pick a steered variant.
    """

    model_name: str = "steerlib"
    model_aliases: tuple[str, ...] = ()
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
    metrics: bool = True
    metrics_key: str | None = None
    metrics_no_auth: bool = False
    metrics_buckets: tuple[float, ...] | None = None
    metrics_conversations: int = 10
    conversations: int = 1024
    conversation_turns: int = 256
    presets: tuple[tuple[str, tuple[SteeringSpec, ...]], ...] = ()

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue", "max_tokens_limit"):
            check_int(getattr(self, name), name)
        if not 1 <= self.default_max_tokens <= self.max_tokens_limit:
            raise ValueError(f"default_max_tokens must be in 1..max_tokens_limit ({self.max_tokens_limit}), "
                             f"got {self.default_max_tokens}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key is empty")
        if self.metrics_key is not None and not self.metrics_key.strip():
            raise ValueError("metrics_key is empty")
        if self.metrics_key is not None and self.metrics_no_auth:
            raise ValueError("give either a metrics key or metrics without auth, not both")
        if self.metrics_buckets is not None:
            b = self.metrics_buckets
            if not b or not all(math.isfinite(x) for x in b) or len(set(b)) != len(b):
                raise ValueError(f"metrics buckets must be distinct finite numbers, got {list(b)}")
        if self.metrics_conversations < 0 or self.conversations < 0 or self.conversation_turns < 1:
            raise ValueError("metrics_conversations and conversations must be >= 0, conversation_turns >= 1")


# ----------------------------------------------------------------------------------------------------------
# The service: vectors, steering resolution, tokenising, drift
# ----------------------------------------------------------------------------------------------------------
class Service:
    """The state behind the routes: the engine, the vector registry, the read-out and the drift monitor."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, vectors: Mapping[str, TraitVectors],
                 options: AppOptions, drift: DriftMonitor | None = None,
                 calibrations: Mapping[str, Calibration] | None = None,
                 engine_factory: EngineFactory | None = None):
        self.model = model
        self.options = options
        self.registry = VectorRegistry(model, vectors, options.vector_dirs, calibrations)
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
        layout = get_layout(unwrap_model(model))
        self.n_layers, self.d_model = layout.n_layers, layout.d_model  # steerlib's layers are 0..n_layers
        # engine_factory: another engine of the contract (steerlib.serve.vllm_engine); default the HF one.
        make: EngineFactory = engine_factory or (lambda **kw: Engine(model, tokenizer, **kw))
        self.engine: ServingEngine = make(readout=self.readout, max_batch=options.max_batch, max_queue=options.max_queue,
                           eos_ids=eos_ids(model, tokenizer))
        self.conversations = ConversationLog(options.conversations, options.conversation_turns)
        self.metrics = ServerMetrics(
            model_name=options.model_name, version=__version__, traits=self.monitored, layer=self.engine.readout_layer,
            engine_stats=self.engine.stats, drift_state=self.drift_state, conversations=self.conversations,
            conversation_series=options.metrics_conversations,
            **({"buckets": options.metrics_buckets} if options.metrics_buckets is not None else {}),
        ) if options.metrics else None
        self.engine.on_finish = self._finished  # after what it feeds exists
        self.default_steering = list(options.default_steering)
        try:
            self._default_edits = self.resolve_steering(self.default_steering, "default steering")
            self.presets: dict[str, tuple[list[Edit], list[dict]]] = {}
            for name, specs in options.presets:
                if name == options.model_name or name in self.presets:
                    raise ValueError(f"preset {name!r} is defined twice (or is the model's own name)")
                if name in options.model_aliases:
                    raise ValueError(f"preset {name!r} is also an alias of the model")
                self.presets[name] = (self.resolve_steering(specs, f"preset {name}"),
                                      [s.model_dump(exclude_defaults=True) for s in specs])
        except ApiError as exc:  # a start-up problem, not a request's
            raise ValueError(exc.message) from None
        self.started_at = time.time()

    # -- steering -----------------------------------------------------------------------------------------
    def resolve_steering(self, specs: Sequence[SteeringSpec], param: str = "steering") -> list[Edit]:
        """Validate steering specs against the loaded vectors and turn them into per-row edits (400 if bad)."""
        edits: list[Edit] = []
        for i, spec in enumerate(specs):
            tv, names = self.registry.lookup(spec.vector)
            if tv is None:
                raise ApiError(400, f"unknown steering vector {spec.vector!r}; available: {names}",
                               param=f"{param}.{i}.vector", code="unknown_vector")
            cal = self.registry.calibration(spec.vector)
            if spec.cap_percentile is not None and cal is None:
                raise ApiError(400, f"{param}[{i}]: vector {spec.vector!r} has no calibration (run `steerlib "
                               "calibrate` on it and reload it)", param=f"{param}.{i}.cap_percentile")
            when = None
            if spec.when is not None:
                cond, names = self.registry.lookup(spec.when.vector)
                if cond is None:
                    raise ApiError(400, f"unknown condition vector {spec.when.vector!r}; available: {names}",
                                   param=f"{param}.{i}.when.vector", code="unknown_vector")
                when = When(cond, spec.when.above, spec.when.below, spec.latch, spec.when.layer)
            cap = (spec.cap_min, spec.cap_max)
            layers = spec.layers if spec.layers is not None else spec.layer
            try:
                if spec.cap_percentile is not None:
                    if when is not None:
                        raise ValueError("a calibrated cap cannot carry a condition")
                    ops = calibrated_cap(self.model, tv, cal, Percentile(spec.cap_percentile, spec.cap_side),
                                         layers if layers is not None else tv.recommended_layer,
                                         positions=spec.positions)
                else:
                    ops = build_ops(self.model, tv, layers, spec.coef, mode=spec.mode, positions=spec.positions,
                                    cap=cap, relative=spec.relative, when=when, params=spec.params)
            except ValueError as exc:
                raise ApiError(400, f"{param}[{i}]: {exc}", param=f"{param}.{i}") from exc
            for op in ops:
                if not math.isfinite(op.coef) or abs(op.coef) > 1e6:
                    raise ApiError(400, f"{param}[{i}]: the effective coefficient {op.coef:g} is not usable",
                                   param=f"{param}.{i}.coef")
            # Rows share a table entry by the row's content, so a vector reloaded under the same name never
            # reuses the old one's entry.
            # (What the engine cannot apply, it refuses at submit: one 400 on every engine.)
            edits.extend(lower_ops(ops))
        return edits

    def steering_for(self, specs: list[SteeringSpec] | None, param: str,
                     model: str | None = None) -> tuple[list[Edit], list[dict]]:
        """The edits and their description for a request: its own steering, else its model's preset, else the
        server's default.

        Args:
            specs: the request's steering field (None: not given; ``[]`` turns steering off).
            param: the field's name, for errors.
            model: the request's ``model`` field (a preset's name selects the preset; a name this server does
                not serve is a 404, never the unsteered model).
        """
        preset = self.preset_named(model)
        if specs is not None:
            return self.resolve_steering(specs, param), [s.model_dump(exclude_defaults=True) for s in specs]
        if preset is not None:
            return self.presets[preset]
        return self._default_edits, [s.model_dump(exclude_defaults=True) for s in self.default_steering]

    def served_names(self) -> list[str]:
        """Every ``model`` a request may name: the model, its aliases and the presets, each also as Ollama's
        ``name:latest``."""
        names = [self.options.model_name, *self.options.model_aliases, *self.presets]
        return [form for name in names for form in (name, f"{name}:latest")]

    def preset_named(self, model: str | None) -> str | None:
        """The preset a request's ``model`` names (``name`` or Ollama's ``name:latest``); None for the model
        itself (or no ``model``).

        Raises:
            ApiError: 404 (``model_not_found``) for a name this server does not serve: a misspelled preset
                must not be answered by the unsteered model.
        """
        if model is None:
            return None
        name = model.removesuffix(":latest")
        if name in self.presets:
            return name
        if name in (self.options.model_name, *self.options.model_aliases):
            return None
        # Ollama's wording, word for word (clients match on it); /v1/models and /api/tags list the served names.
        raise ApiError(404, f"model {model!r} not found", param="model", code="model_not_found")

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

    def encode_raw(self, text: str) -> list[int]:
        """Tokenise a prompt used as is (no chat template), serialised like ``encode_messages``."""
        with self._encode_lock:
            return self.encode_text(text)

    def encode_text(self, text: str) -> list[int]:
        ids = list(self._encoder(text, add_special_tokens=False)["input_ids"])
        if not ids:
            raise ApiError(400, "the prompt is empty", param="messages")
        return ids

    def check_length(self, n_prompt: int, max_tokens: int, param: str = "messages") -> None:
        if self.max_context and n_prompt + max_tokens > self.max_context:
            raise ApiError(400, f"prompt ({n_prompt} tokens) plus max_tokens ({max_tokens}) exceeds the model's "
                                f"context of {self.max_context} tokens", param=param,
                           code="context_length_exceeded")

    def check_token_ids(self, ids: Sequence[int], param: str) -> None:
        """A prompt given as token ids must name tokens of the model's vocabulary (400 otherwise)."""
        vocab = int(self.model.config.vocab_size)
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"token id {bad[0]} is out of the vocabulary (0..{vocab - 1})", param=param)

    def decode_ids(self, ids: Sequence[int]) -> str:
        """Token ids as text (the prompt ``echo`` returns), serialised like ``encode_raw``."""
        with self._encode_lock:
            return self._encoder.decode(list(ids))

    def decode_token(self, token_id: int) -> str:
        """One token's own text (the ``tokens`` of a log-probabilities object)."""
        return self.decode_ids([token_id])

    def max_tokens(self, requested: int | None) -> int:
        n = requested or self.options.default_max_tokens
        if n > self.options.max_tokens_limit:
            raise ApiError(400, f"max_tokens {n} exceeds this server's limit {self.options.max_tokens_limit}",
                           param="max_tokens")
        return n

    # -- drift --------------------------------------------------------------------------------------------
    def _finished(self, done: FinishedRequest) -> None:
        """The engine's completion callback (engine thread, once per finished reply): drift, then metrics."""
        alerts = self._feed_drift(done)
        if self.metrics is not None:
            self.metrics.observe_response(done.trait_projections, edits_label(done.edits), done.finish_reason)
            self.metrics.count_alerts([a.trait for a in alerts])

    def _feed_drift(self, done: FinishedRequest) -> list[Alert]:
        if self.drift is None:
            return []
        projections = done.trait_projections
        scores = {t: p["mean"] for t, p in projections.items() if p.get("mean") is not None}
        if len(scores) < len(projections) or not scores:
            return []  # an empty reply has no projection; the monitor needs a value for every trait
        with self._drift_lock:
            if done.steered and not self.drift.calibrated and not self.options.drift_include_steered:
                return []  # steered traffic must not become the baseline it is judged against
            meta = {"steering": [dict(s) for s in done.steering], "text": done.text[:200]}
            return self.drift.update(scores, timestamp=time.time(), meta=meta)

    def drift_state(self) -> dict[str, Any] | None:
        """What the metrics export of the drift monitor: per trait the last tested value and the limits.

        Returns:
            ``{"method", "calibrated", "n_updates", "traits": {trait: {"value", "lower", "upper"}}}``, or None
            without a monitor. The tested value is the rolling mean for ``method="rolling"``, else the last
            reply's projection, so it compares with the limits in the same units.
        """
        if self.drift is None:
            return None
        with self._drift_lock:
            drift = self.drift
            last = drift.history(last=1)
            key = "rolling_mean" if drift.method == "rolling" else "scores"
            traits = {}
            for t in drift.traits:
                lower, upper = drift.limits(t)
                traits[t] = {"value": last[0][key][t] if last else None, "lower": lower, "upper": upper}
            return {"method": drift.method, "calibrated": drift.calibrated, "n_updates": drift.n_updates,
                    "traits": traits}

    # -- conversations ------------------------------------------------------------------------------------
    def record_turn(self, conversation_id: str, completion: Completion, steering: str) -> None:
        """Add a finished reply to its conversation's per-turn series (and the per-turn metric); ``steering`` is
        the request's ``steering`` label (``edits_label``)."""
        turn = self.conversations.record(conversation_id, completion.trait_projections,
                                         steering=steering,
                                         completion_tokens=completion.completion_tokens)
        if turn is not None and self.metrics is not None:
            self.metrics.observe_turn(turn, turn_bucket(turn.turn))

    def monitor_snapshot(self, last: int = 200, last_alerts: int = 50) -> dict[str, Any]:
        out: dict[str, Any] = {"traits": list(self.monitored), "layer": self.engine.readout_layer, "history": [],
                               "alerts": [], "server": self.engine.stats()}
        if self.drift is not None:
            with self._drift_lock:
                out["history"] = to_jsonable(self.drift.history(last=last))
                alerts = list(self.drift.alerts)[-last_alerts:] if last_alerts else []
                limits = {t: list(self.drift.limits(t)) for t in self.drift.traits}
                drift = {**self.drift.config(), "calibrated": self.drift.calibrated,
                         "n_updates": self.drift.n_updates}
            out["alerts"] = [to_jsonable(asdict(a)) for a in alerts]
            out["drift"] = to_jsonable({**drift, "limits": limits})
        return out

    # -- registry -----------------------------------------------------------------------------------------
    @property
    def vectors(self) -> dict[str, TraitVectors]:
        """The loaded vectors by name (the registry's live mapping; change it only through the registry)."""
        return self.registry.vectors

    def vector_info(self) -> dict[str, dict]:
        """Name -> what ``/v1/models`` and ``/v1/vectors`` say about each loaded vector."""
        return self.registry.info(self.monitored)

    def load_vector(self, name: str, path: str) -> dict:
        """Load vectors at runtime from an allowed folder; returns their info."""
        self.registry.load(name, path)
        return self.vector_info()[name]

    def unload_vector(self, name: str) -> None:
        """Unload a vector the read-out and the default steering do not use."""
        self.registry.unload(name, self.monitored, {s.vector for s in self.default_steering})
