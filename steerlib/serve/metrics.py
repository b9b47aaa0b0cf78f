"""Prometheus metrics for the server: trait projections, drift, steering mix, engine load, conversations.

``ServerMetrics`` owns a ``CollectorRegistry`` of its own (not the process-global one), so one process can hold
many apps (tests, notebooks) without their series colliding. Two kinds of series feed it:

* **Per response** (observed by the service's completion callback, once per finished reply, off the decode
  path): histograms of the response-mean projection and of the last prompt token's projection per trait and
  read-out layer, responses by steering, drift alerts; per conversation turn (when the client names a
  conversation) a histogram of the response projection by turn-number bucket.
* **At scrape time** (custom collectors, so the engine does no per-step work for metrics): the engine's
  ``stats()`` counters and gauges (only the keys the running engine reports, so any engine with the same
  ``stats()`` keys is covered), the drift monitor's state, and the most recently active conversations.

Projections are signed, so the projection histograms have negative buckets and therefore (as OpenMetrics
requires, and ``prometheus_client`` does) no ``_sum``: a sum that can fall would read as a counter reset to
``rate()``. Their centre and spread come from ``histogram_quantile``; the drift monitor's value is a gauge.

Cardinality is bounded by construction: labels are the monitored traits, their read-out layer, fixed label sets
(``steering``, ``finish_reason``, ``turns``) and at most ``conversation_series`` conversation ids.
The full list of series is ``SERIES`` (and the README's table).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from steerlib.serve.conversations import LAST_TURN_BUCKET, TURN_BUCKETS, ConversationLog, Turn
from steerlib.steering.plan import Edit

__all__ = ["DEFAULT_BUCKETS", "ENGINE_COUNTERS", "ENGINE_GAUGES", "SERIES", "STEERING_LABELS", "ServerMetrics",
           "edits_label", "steering_label"]

# Label values of ``steering``: no edit, unconditional edits only, at least one edit behind a gate (``when``).
STEERING_LABELS = ("none", "steered", "gated")
FINISH_LABELS = ("stop", "length")
# Projections are dot products with a unit direction; their scale depends on the model and layer, so the buckets
# span four decades on both sides of zero (override with --metrics-buckets once a trait's range is known).
DEFAULT_BUCKETS = tuple(sorted({s * m * 10.0 ** e for s in (-1, 1) for e in (-1, 0, 1, 2) for m in (1, 2, 5)}
                               | {0.0}))

# engine.stats() key -> (metric name without _total, help). Keys the engine does not report are skipped.
ENGINE_COUNTERS: dict[str, tuple[str, str]] = {
    "requests": ("steerlib_engine_rows_submitted", "Rows (choices) submitted to the engine"),
    "completed": ("steerlib_engine_rows_completed", "Rows that finished (stop or length)"),
    "failed": ("steerlib_engine_rows_failed", "Rows that ended in an error"),
    "cancelled": ("steerlib_engine_rows_cancelled", "Rows cancelled (client gone or stream closed)"),
    "steps": ("steerlib_engine_steps", "Forward steps run by the engine"),
    "rows_stepped": ("steerlib_engine_rows_stepped", "Sum of batch sizes over all steps"),
    "prefill_tokens": ("steerlib_engine_prefill_tokens", "Prompt tokens prefilled"),
    "generated_tokens": ("steerlib_engine_generated_tokens", "Tokens generated"),
    "mixed_steps": ("steerlib_engine_mixed_steps", "Steps that mixed steered and unsteered rows"),
    "steered_row_steps": ("steerlib_engine_steered_row_steps", "Row-steps that carried a steering edit"),
    "step_seconds": ("steerlib_engine_step_seconds", "Seconds spent in forward steps"),
    "finish_callback_errors": ("steerlib_engine_finish_callback_errors",
                               "Finished rows whose monitoring callback (drift, metrics) raised"),
}
ENGINE_GAUGES: dict[str, tuple[str, str]] = {
    "queue_depth": ("steerlib_engine_queue_depth", "Rows waiting for a batch slot"),
    "active_rows": ("steerlib_engine_running_rows", "Rows in the running batch"),
    "max_batch": ("steerlib_engine_max_batch", "Configured largest batch"),
    "max_batch_seen": ("steerlib_engine_max_batch_seen", "Largest batch stepped so far"),
    "worker_alive": ("steerlib_engine_worker_alive", "1 while the engine's worker runs"),
}

# Every metric family the server exports, with its type (the names Prometheus sees, before _bucket/_sum/_count).
SERIES: dict[str, str] = {
    "steerlib_build_info": "gauge",
    "steerlib_requests_total": "counter",
    "steerlib_responses_total": "counter",
    "steerlib_response_projection": "histogram",
    "steerlib_prompt_projection": "histogram",
    "steerlib_turn_projection": "histogram",
    "steerlib_drift_value": "gauge",
    "steerlib_drift_upper_limit": "gauge",
    "steerlib_drift_lower_limit": "gauge",
    "steerlib_drift_calibrated": "gauge",
    "steerlib_drift_updates_total": "counter",
    "steerlib_drift_alerts_total": "counter",
    "steerlib_conversations_tracked": "gauge",
    "steerlib_conversations_evicted_total": "counter",
    "steerlib_conversation_turns": "gauge",
    "steerlib_conversation_projection": "gauge",
    "steerlib_conversation_projection_change": "gauge",
    **{name + "_total": "counter" for name, _ in ENGINE_COUNTERS.values()},
    **{name: "gauge" for name, _ in ENGINE_GAUGES.values()},
}


def steering_label(steered: bool, gated: bool = False) -> str:
    """The ``steering`` label of a request: ``gated`` wins over ``steered``; no edit is ``none``."""
    return "gated" if gated else "steered" if steered else "none"


def edits_label(edits: Sequence[Edit]) -> str:
    """The ``steering`` label of a row's lowered edits: gated if any carries a condition."""
    return steering_label(bool(edits), any(e.gate_row is not None for e in edits))


class ServerMetrics:
    """The server's metrics in a registry of their own.

    Args:
        model_name: reported by ``steerlib_build_info``.
        version: steerlib's version, ditto.
        traits: the monitored traits (their label values exist from the start, at zero).
        layer: the read-out layer (label of every projection series; None when nothing is read out).
        engine_stats: returns the engine's ``stats()`` mapping (called at scrape time).
        drift_state: returns the drift state (``Service.drift_state``) or None (called at scrape time).
        conversations: the conversation log (read at scrape time).
        conversation_series: most recently active conversations exported with their id as a label.
        buckets: histogram bucket upper bounds for projections.
    """

    def __init__(self, *, model_name: str, version: str, traits: Sequence[str], layer: int | None,
                 engine_stats: Callable[[], Mapping[str, Any]],
                 drift_state: Callable[[], Mapping[str, Any] | None], conversations: ConversationLog,
                 conversation_series: int = 10, buckets: Sequence[float] = DEFAULT_BUCKETS):
        if conversation_series < 0:
            raise ValueError(f"conversation_series must be >= 0, got {conversation_series}")
        buckets = tuple(sorted(float(b) for b in buckets))
        if not buckets or len(set(buckets)) != len(buckets):
            raise ValueError(f"metrics buckets must be distinct numbers, got {list(buckets)}")
        self.registry = CollectorRegistry(auto_describe=True)
        self.layer = "" if layer is None else str(layer)
        self.traits = tuple(traits)
        r = self.registry
        self.requests = Counter("steerlib_requests", "Generation requests admitted, by steering", ["steering"],
                                registry=r)
        self.responses = Counter("steerlib_responses", "Replies finished (one per choice), by steering and "
                                 "finish reason", ["steering", "finish_reason"], registry=r)
        self.response_projection = Histogram(
            "steerlib_response_projection", "Mean projection of each reply's response tokens on a trait",
            ["trait", "layer"], buckets=buckets, registry=r)
        self.prompt_projection = Histogram(
            "steerlib_prompt_projection", "Projection of each request's last prompt token on a trait",
            ["trait", "layer"], buckets=buckets, registry=r)
        self.turn_projection = Histogram(
            "steerlib_turn_projection", "Response-mean projection of conversation turns, by turn-number bucket",
            ["trait", "layer", "turns"], buckets=buckets, registry=r)
        self.drift_alerts = Counter("steerlib_drift_alerts", "Drift alerts raised, by trait", ["trait", "layer"],
                                    registry=r)
        # Every label value a dashboard or rule expects exists from the first scrape (a counter that is absent
        # until its first event makes rate() and absent-based rules misfire).
        for s in STEERING_LABELS:
            self.requests.labels(s)
            for f in FINISH_LABELS:
                self.responses.labels(s, f)
        turn_labels = [label for _, label in TURN_BUCKETS] + [LAST_TURN_BUCKET]
        for t in self.traits:
            self.response_projection.labels(t, self.layer)
            self.prompt_projection.labels(t, self.layer)
            self.drift_alerts.labels(t, self.layer)
            for label in turn_labels:
                self.turn_projection.labels(t, self.layer, label)
        r.register(_InfoCollector(model_name, version))
        r.register(_EngineCollector(engine_stats))
        r.register(_DriftCollector(drift_state, self.layer))
        r.register(_ConversationCollector(conversations, conversation_series, self.layer))

    # -- per response (engine thread, once per finished reply) --------------------------------------------
    def count_request(self, steering: str) -> None:
        """One admitted generation request."""
        self.requests.labels(steering).inc()

    def observe_response(self, projections: Mapping[str, Mapping[str, Any]], steering: str,
                         finish_reason: str) -> None:
        """One finished reply: its steering, finish reason and per-trait projections.

        Args:
            projections: the completion's ``trait_projections`` (``mean`` = response tokens' mean read-out,
                ``prompt_last`` = the last prompt token's; None values are skipped).
            steering: ``none`` / ``steered`` / ``gated``.
            finish_reason: ``stop`` or ``length``.
        """
        self.responses.labels(steering, finish_reason).inc()
        for trait, p in projections.items():
            layer = self.layer if p.get("layer") is None else str(p["layer"])
            if p.get("mean") is not None:
                self.response_projection.labels(trait, layer).observe(p["mean"])
            if p.get("prompt_last") is not None:
                self.prompt_projection.labels(trait, layer).observe(p["prompt_last"])

    def count_alerts(self, traits: Sequence[str]) -> None:
        """Drift alerts just raised (one trait name per alert)."""
        for t in traits:
            self.drift_alerts.labels(t, self.layer).inc()

    def observe_turn(self, turn: Turn, bucket: str) -> None:
        """One conversation turn, into the per-turn-bucket histogram."""
        for trait, p in turn.projections.items():
            if p.get("mean") is not None:
                self.turn_projection.labels(trait, self.layer, bucket).observe(p["mean"])

    # -- exposition ---------------------------------------------------------------------------------------
    def render(self, accept: str | None) -> tuple[bytes, str]:
        """The scrape body and its content type, in the format the scraper's ``Accept`` header asks for."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


class _InfoCollector(Collector):
    def __init__(self, model_name: str, version: str):
        self.labels = {"model": model_name, "version": version}

    def collect(self) -> Iterator[Metric]:
        g = GaugeMetricFamily("steerlib_build_info", "The served model and steerlib's version",
                              labels=list(self.labels))
        g.add_metric(list(self.labels.values()), 1.0)
        yield g


class _EngineCollector(Collector):
    """Reads the engine's ``stats()`` at scrape time; only keys with numeric values become series."""

    def __init__(self, stats: Callable[[], Mapping[str, Any]]):
        self.stats = stats

    def describe(self) -> list[Metric]:
        return []  # which keys exist is known only from a live engine

    def collect(self) -> Iterator[Metric]:
        stats = self.stats()
        for table, family in ((ENGINE_COUNTERS, CounterMetricFamily), (ENGINE_GAUGES, GaugeMetricFamily)):
            for key, (name, doc) in table.items():
                value = stats.get(key)
                if isinstance(value, bool | int | float):
                    yield family(name, doc, value=float(value))


class _DriftCollector(Collector):
    """The drift monitor's state: the value it tests, its limits, calibration and update count."""

    def __init__(self, state: Callable[[], Mapping[str, Any] | None], layer: str):
        self.state = state
        self.layer = layer

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        state = self.state()
        if state is None:
            return
        labels = ["trait", "layer", "method"]
        value = GaugeMetricFamily("steerlib_drift_value", "Value the drift monitor tested at its last update "
                                  "(the rolling mean for method=rolling, else the reply's projection)", labels=labels)
        upper = GaugeMetricFamily("steerlib_drift_upper_limit", "Upper alert limit in projection units",
                                  labels=labels)
        lower = GaugeMetricFamily("steerlib_drift_lower_limit", "Lower alert limit (two-sided monitors only)",
                                  labels=labels)
        for trait, t in state["traits"].items():
            key = [trait, self.layer, state["method"]]
            if t["value"] is not None:
                value.add_metric(key, t["value"])
            if t["upper"] is not None:
                upper.add_metric(key, t["upper"])
            if t["lower"] is not None:
                lower.add_metric(key, t["lower"])
        yield from (value, upper, lower)
        yield GaugeMetricFamily("steerlib_drift_calibrated", "1 once the drift monitor has its reference",
                                value=float(state["calibrated"]))
        yield CounterMetricFamily("steerlib_drift_updates", "Replies fed to the drift monitor",
                                  value=float(state["n_updates"]))


class _ConversationCollector(Collector):
    """Tracked conversations, and the latest ``k`` of them by id (bounded label set)."""

    def __init__(self, log: ConversationLog, k: int, layer: str):
        self.log = log
        self.k = k
        self.layer = layer

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("steerlib_conversations_tracked", "Conversations held in memory",
                                value=float(len(self.log)))
        yield CounterMetricFamily("steerlib_conversations_evicted", "Conversations dropped (least recently used)",
                                  value=float(self.log.dropped))
        turns = GaugeMetricFamily("steerlib_conversation_turns", "Replies so far in a recently active conversation",
                                  labels=["conversation"])
        last = GaugeMetricFamily("steerlib_conversation_projection", "Response-mean projection of the latest turn "
                                 "of a recently active conversation", labels=["conversation", "trait", "layer"])
        change = GaugeMetricFamily("steerlib_conversation_projection_change", "Latest turn's response-mean "
                                   "projection minus the first kept turn's", labels=["conversation", "trait", "layer"])
        for cid, count, first, latest in self.log.recent(self.k):
            turns.add_metric([cid], float(count))
            for trait, p in latest.projections.items():
                if p.get("mean") is None:
                    continue
                last.add_metric([cid, trait, self.layer], p["mean"])
                start = first.projections.get(trait, {}).get("mean")
                if start is not None:
                    change.add_metric([cid, trait, self.layer], p["mean"] - start)
        yield from (turns, last, change)
