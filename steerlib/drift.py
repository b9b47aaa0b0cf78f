"""Drift monitoring: watch trait projections of a deployed model's responses over time and raise alerts.

``DriftMonitor`` keeps a reference distribution per trait (given to ``calibrate`` or taken from the first
``reference_size`` updates) and scores each new value against it:

* ``method="zscore"``: score = (value - mean) / std of the reference (sample std, ddof=1); alert when
  score > threshold (e.g. 3.0).
* ``method="percentile"``: threshold is a percentile (e.g. 99); alert when value > that percentile of the
  reference (numpy's linear interpolation). The score is the value's percentile rank in the reference,
  interpolated the same way, so score > threshold exactly when an alert fires (clipped to 0..100).
* ``method="rolling"``: score = (rolling mean - mean) / (std / sqrt(n)) over the last ``window`` values
  (n of them so far): a z-test on the window's mean, which catches a slow, sustained drift that no single
  value would. The alert's ``value`` is then the rolling mean.

Alerts are level-triggered (one per update and trait above threshold) and upward only unless
``two_sided=True``: a trait growing stronger is what persona drift looks like.

``monitor_conversations`` scores every assistant turn of a conversation log by its response-mean projection
and feeds a ``DriftMonitor``, writing scores, alerts and a timeline plot; it resumes after a kill.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .arch import get_layout
from .chat import format_messages
from .data_io import BadRecord, Problem, check_messages, read_jsonl_records, report_problem
from .flag import (
    _fingerprint,
    _meta_path,
    append_records,
    load_direction,
    pooled_activations,
    read_score_file,
    unwrap_model,
)
from .vectors import TraitVectors

__all__ = [
    "METHODS",
    "Alert",
    "DriftMonitor",
    "DriftReport",
    "Turn",
    "monitor_conversations",
    "monitor_file",
    "read_conversations",
]

METHODS = ("zscore", "percentile", "rolling")
STATE_VERSION = 1


@dataclass(frozen=True)
class Alert:
    """One trait crossing its threshold at one update.

    Attributes:
        timestamp: time of the update (seconds since the epoch).
        trait: trait name.
        value: the value tested (the raw projection; the rolling mean for ``method="rolling"``).
        score: z-score or percentile rank of ``value`` (see the module docstring).
        threshold: the threshold it crossed.
        method: "zscore", "percentile" or "rolling".
        index: 0-based number of the update.
        meta: the ``meta`` passed to ``update`` (conversation ids, line numbers...).
    """

    timestamp: float
    trait: str
    value: float
    score: float
    threshold: float
    method: str
    index: int
    meta: dict = field(default_factory=dict)


def _finite(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating | np.integer):
        raise ValueError(f"{what} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {value}")
    return value


class DriftMonitor:
    """Rolling trait-score monitor with reference calibration and threshold alerts.

    Args:
        traits: names of the monitored traits; every update must give a score for each.
        window: number of recent values in the rolling mean.
        method: "zscore", "percentile" or "rolling" (see the module docstring).
        threshold: z threshold (zscore, rolling) or percentile in (0, 100) (percentile).
        reference_size: updates used to calibrate automatically when ``calibrate`` was not called.
        alerts_path: JSONL file each alert is appended to as it is raised (None: keep in memory only).
        two_sided: also alert when a trait falls below the reference by the same margin.
        max_history: updates (and alerts) kept in memory; older ones are dropped.
        robust: calibrate on the median and the scaled median absolute deviation instead of mean and standard
            deviation, so a few extreme reference values (one client's absurd request) cannot widen the limits
            until nothing alerts.
    """

    def __init__(
        self,
        traits: Sequence[str],
        *,
        window: int = 20,
        method: str = "zscore",
        threshold: float = 3.0,
        reference_size: int = 50,
        alerts_path: str | Path | None = None,
        two_sided: bool = False,
        max_history: int = 100_000,
        robust: bool = False,
    ) -> None:
        if isinstance(traits, str) or not traits:
            raise ValueError("traits must be a non-empty list of trait names")
        if len(set(traits)) != len(traits) or not all(isinstance(t, str) and t for t in traits):
            raise ValueError(f"trait names must be distinct non-empty strings, got {list(traits)}")
        if method not in METHODS:
            raise ValueError(f"unknown drift method {method!r}; choose from {METHODS}")
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive int, got {window!r}")
        if not isinstance(reference_size, int) or reference_size < 2:
            raise ValueError(f"reference_size must be an int >= 2, got {reference_size!r}")
        threshold = _finite(threshold, "threshold")
        if method == "percentile" and not 0 < threshold < 100:
            raise ValueError(f"a percentile threshold must lie in (0, 100), got {threshold}")
        if max_history < 1:
            raise ValueError(f"max_history must be >= 1, got {max_history}")
        self.traits = tuple(traits)
        self.window = window
        self.method = method
        self.threshold = threshold
        self.reference_size = reference_size
        self.two_sided = bool(two_sided)
        self.max_history = max_history
        self.robust = bool(robust)
        self.alerts_path = Path(alerts_path) if alerts_path is not None else None
        self._reset()

    def _reset(self) -> None:
        self._count = 0
        self._stats: dict[str, dict[str, Any]] | None = None
        self._calibrated_at: int | None = None  # update index at which auto-calibration finished
        self._reference: dict[str, list[float]] = {t: [] for t in self.traits}
        self._windows: dict[str, deque] = {t: deque(maxlen=self.window) for t in self.traits}
        self._history: deque = deque(maxlen=self.max_history)
        self._alerts: deque = deque(maxlen=self.max_history)

    # -- calibration ---------------------------------------------------------------------------------
    @property
    def calibrated(self) -> bool:
        return self._stats is not None

    @property
    def n_updates(self) -> int:
        return self._count

    def _check_scores(self, scores: Mapping[str, float], where: str) -> dict[str, float]:
        if not isinstance(scores, Mapping):
            raise ValueError(f"{where}: scores must be a mapping trait -> value, got {type(scores).__name__}")
        missing = [t for t in self.traits if t not in scores]
        if missing:
            raise ValueError(f"{where}: no score for trait(s) {missing} (monitored: {list(self.traits)})")
        return {t: _finite(scores[t], f"{where}: score of {t!r}") for t in self.traits}

    def calibrate(self, reference: Sequence[Mapping[str, float]]) -> None:
        """Fix the reference distribution from a window of score dicts (one per response).

        Args:
            reference: at least two mappings trait -> value, e.g. scores of known-good traffic.
        """
        rows = [self._check_scores(r, f"reference row {i}") for i, r in enumerate(reference)]
        if len(rows) < 2:
            raise ValueError(f"calibration needs at least 2 reference rows, got {len(rows)}")
        self._stats = {t: self._fit(np.array([r[t] for r in rows]), t) for t in self.traits}

    def _fit(self, values: np.ndarray, trait: str) -> dict[str, Any]:
        if self.robust:
            # 1.4826 * MAD estimates the standard deviation of normal data and ignores outliers.
            center = float(np.median(values))
            stats: dict[str, Any] = {"n": int(values.size), "mean": center,
                                     "std": float(1.4826 * np.median(np.abs(values - center)))}
        else:
            stats = {"n": int(values.size), "mean": float(values.mean()), "std": float(values.std(ddof=1))}
        floor = 1e-8 * max(1.0, abs(stats["mean"]))
        if stats["std"] < floor:
            warnings.warn(f"reference values of {trait!r} are (nearly) constant; any change will alert",
                          stacklevel=3)
            stats["std"] = floor
        if self.method == "percentile":
            stats["sorted"] = np.sort(values).tolist()
            stats["upper"] = float(np.percentile(values, self.threshold))
            stats["lower"] = float(np.percentile(values, 100.0 - self.threshold))
        return stats

    def limits(self, trait: str) -> tuple[float | None, float | None]:
        """(lower, upper) alert limits in value units for ``value``-based methods (None where not alerting).

        For ``method="rolling"`` these are the limits of a full window's mean.
        """
        if self._stats is None:
            return None, None
        st = self._stats[trait]
        if self.method == "percentile":
            upper, lower = st["upper"], st["lower"]
        else:
            scale = st["std"] / (math.sqrt(self.window) if self.method == "rolling" else 1.0)
            upper, lower = st["mean"] + self.threshold * scale, st["mean"] - self.threshold * scale
        return (lower if self.two_sided else None), upper

    def _score(self, trait: str, value: float, rolling: float, n_window: int) -> tuple[float, float, bool]:
        """(tested value, score, alert?) for one trait at one update."""
        st = self._stats[trait]  # type: ignore[index]
        if self.method == "percentile":
            ref = st["sorted"]
            score = float(np.interp(value, ref, np.linspace(0.0, 100.0, len(ref))))
            alert = value > st["upper"] or (self.two_sided and value < st["lower"])
            return value, score, bool(alert)
        if self.method == "rolling":
            value = rolling
            score = (rolling - st["mean"]) / (st["std"] / math.sqrt(n_window))
        else:
            score = (value - st["mean"]) / st["std"]
        alert = score > self.threshold or (self.two_sided and score < -self.threshold)
        return value, float(score), bool(alert)

    # -- updates -------------------------------------------------------------------------------------
    def update(
        self, scores: Mapping[str, float], timestamp: float | None = None, meta: dict | None = None
    ) -> list[Alert]:
        """Add one response's trait scores; return the alerts it raises (also appended to ``alerts_path``).

        Until the monitor is calibrated, updates fill the reference window and raise no alerts; the
        ``reference_size``-th update calibrates it.

        Args:
            scores: trait -> projection for every monitored trait (extra keys are ignored).
            timestamp: seconds since the epoch (default: now).
            meta: JSON-serialisable context copied into the history and alerts.
        """
        index = self._count
        values = self._check_scores(scores, f"update {index}")
        timestamp = time.time() if timestamp is None else _finite(timestamp, "timestamp")
        meta = dict(meta or {})
        self._count += 1
        rolling = {}
        for t, v in values.items():
            self._windows[t].append(v)
            rolling[t] = float(np.mean(self._windows[t]))
        alerts: list[Alert] = []
        if self._stats is None:
            for t, v in values.items():
                self._reference[t].append(v)
            if len(self._reference[self.traits[0]]) >= self.reference_size:
                self._stats = {t: self._fit(np.array(self._reference[t]), t) for t in self.traits}
                self._calibrated_at = index
                self._reference = {t: [] for t in self.traits}
        else:
            for t in self.traits:
                tested, score, fire = self._score(t, values[t], rolling[t], len(self._windows[t]))
                if fire:
                    alerts.append(Alert(timestamp=timestamp, trait=t, value=tested, score=score,
                                        threshold=self.threshold, method=self.method, index=index, meta=meta))
        self._history.append({"index": index, "timestamp": timestamp, "scores": values,
                              "rolling_mean": rolling, "meta": meta})
        if alerts:
            self._alerts.extend(alerts)
            if self.alerts_path is not None:
                self.alerts_path.parent.mkdir(parents=True, exist_ok=True)
                with self.alerts_path.open("a", encoding="utf-8") as f:
                    append_records(f, [_alert_json(a) for a in alerts])
        return alerts

    def history(self, last: int | None = None) -> list[dict]:
        """Recent updates as ``{index, timestamp, scores, rolling_mean, meta}``, oldest first."""
        items = list(self._history)
        if last is not None:
            if last < 0:
                raise ValueError(f"last must be >= 0, got {last}")
            items = items[len(items) - last:] if last else []
        return [{**h, "scores": dict(h["scores"]), "rolling_mean": dict(h["rolling_mean"])} for h in items]

    @property
    def alerts(self) -> list[Alert]:
        return list(self._alerts)

    # -- persistence ---------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {"traits": list(self.traits), "window": self.window, "method": self.method,
                "threshold": self.threshold, "reference_size": self.reference_size,
                "two_sided": self.two_sided, "max_history": self.max_history, "robust": self.robust}

    def state_dict(self) -> dict:
        """Everything needed to resume monitoring, as JSON-serialisable data."""
        return {
            "version": STATE_VERSION,
            "config": self.config(),
            "count": self._count,
            "stats": self._stats,
            "calibrated_at": self._calibrated_at,
            "reference": {t: list(v) for t, v in self._reference.items()},
            "windows": {t: list(w) for t, w in self._windows.items()},
            "history": self.history(),
            "alerts": [_alert_json(a) for a in self._alerts],
        }

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        """Restore a ``state_dict`` (configuration included; ``alerts_path`` stays as set on this object)."""
        if not isinstance(d, Mapping) or d.get("version") != STATE_VERSION:
            raise ValueError(f"not a DriftMonitor state (version {STATE_VERSION} expected)")
        cfg = d["config"]
        if list(cfg["traits"]) != list(self.traits):
            raise ValueError(f"state is for traits {cfg['traits']}, this monitor watches {list(self.traits)}")
        # Building a throwaway monitor validates the stored configuration.
        fresh = DriftMonitor(cfg["traits"], window=cfg["window"], method=cfg["method"],
                             threshold=cfg["threshold"], reference_size=cfg["reference_size"],
                             two_sided=cfg["two_sided"], max_history=cfg["max_history"],
                             robust=cfg.get("robust", False))
        self.window, self.method, self.threshold = fresh.window, fresh.method, fresh.threshold
        self.reference_size, self.two_sided = fresh.reference_size, fresh.two_sided
        self.max_history, self.robust = fresh.max_history, fresh.robust
        self._reset()
        self._count = int(d["count"])
        self._stats = d["stats"]
        self._calibrated_at = d.get("calibrated_at")
        self._reference = {t: [float(x) for x in d["reference"][t]] for t in self.traits}
        for t in self.traits:
            self._windows[t].extend(float(x) for x in d["windows"][t])
        self._history.extend(d["history"])
        self._alerts.extend(Alert(**a) for a in d["alerts"])

    @classmethod
    def from_state_dict(cls, d: Mapping[str, Any], *, alerts_path: str | Path | None = None) -> DriftMonitor:
        monitor = cls(d["config"]["traits"], alerts_path=alerts_path)
        monitor.load_state_dict(d)
        return monitor

    # -- plotting ------------------------------------------------------------------------------------
    def plot(self, path: str | Path) -> Path:
        """Timeline per trait: values, rolling mean, alert limits and alert markers, saved as a PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        hist = list(self._history)
        fig, axes = plt.subplots(len(self.traits), 1, figsize=(9, 2.6 * len(self.traits)), sharex=True,
                                 squeeze=False)
        x = [h["index"] for h in hist]
        for ax, t in zip(axes[:, 0], self.traits, strict=True):
            ax.plot(x, [h["scores"][t] for h in hist], ".", color="tab:blue", alpha=0.5, label="value")
            ax.plot(x, [h["rolling_mean"][t] for h in hist], "-", color="tab:blue",
                    label=f"rolling mean ({self.window})")
            lower, upper = self.limits(t)
            for limit in (lower, upper):
                if limit is not None:
                    ax.axhline(limit, color="tab:red", linestyle="--", linewidth=0.9)
            if self._stats is not None:
                ax.axhline(self._stats[t]["mean"], color="grey", linestyle=":", linewidth=0.9,
                           label="reference mean")
            if self._calibrated_at is not None and hist:
                ax.axvspan(min(x), self._calibrated_at, color="grey", alpha=0.12, label="reference")
            marks = [a for a in self._alerts if a.trait == t]
            if marks:
                ax.plot([a.index for a in marks], [a.value for a in marks], "x", color="tab:red",
                        markersize=8, label="alert")
            ax.set_ylabel(t)
            ax.legend(loc="upper left", fontsize=7)
        axes[-1, 0].set_xlabel("update")
        fig.suptitle(f"trait drift ({self.method}, threshold {self.threshold:g})")
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def _alert_json(alert: Alert) -> dict:
    return json.loads(json.dumps(asdict(alert), default=str))


# -- conversation logs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Turn:
    """One assistant response in a conversation log, with the messages before it as its prompt."""

    line: int
    turn: int  # position of the assistant message in the conversation
    messages: tuple[Mapping[str, str], ...]
    response: str
    timestamp: float | None
    meta: Mapping[str, Any]


def _timestamp(value: object, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            raise BadRecord(f"{what} {value!r} is neither a number nor an ISO-8601 date") from None
    try:
        return _finite(value, what)
    except ValueError as exc:
        raise BadRecord(str(exc)) from None


def read_conversations(
    path: str | Path, *, on_error: Literal["raise", "skip"] = "raise"
) -> tuple[list[Turn], list[Problem]]:
    """Assistant turns of a JSONL conversation log, in order.

    Each line is ``{"messages": [...], "timestamp": optional, ...}``; every assistant message after at least
    one other message is a turn (a message's own "timestamp" overrides the line's). Other fields go to
    ``meta``. Malformed lines raise ``ValueError("<file> line N: ...")`` or, with ``on_error="skip"``, are
    warned about and returned as problems.
    """
    path = Path(path)
    records, problems = read_jsonl_records(path, on_error=on_error)
    turns: list[Turn] = []
    for number, record in records:
        try:
            if "messages" not in record:
                raise BadRecord("no 'messages' list")
            raw = record["messages"]
            messages = check_messages(raw)
            stamp = _timestamp(record.get("timestamp"), "timestamp")
            found = []
            for i, m in enumerate(messages):
                if m["role"] != "assistant" or i == 0:
                    continue
                if not m["content"].strip():
                    raise BadRecord(f"message {i} (assistant) is empty")
                own = _timestamp(raw[i].get("timestamp"), f"message {i} timestamp")
                meta = {k: v for k, v in record.items() if k not in ("messages", "timestamp")}
                found.append(Turn(line=number, turn=i, messages=tuple(messages[:i]), response=m["content"],
                                  timestamp=own if own is not None else stamp, meta=meta))
            if not found:
                raise BadRecord("the conversation has no assistant response after a prompt")
        except BadRecord as exc:
            report_problem(Problem(str(path), number, str(exc)), on_error, problems)
            continue
        turns.extend(found)
    return turns, problems


@dataclass
class DriftReport:
    """What ``monitor_conversations`` wrote and found."""

    monitor: DriftMonitor
    scores_path: Path
    alerts_path: Path
    plot_path: Path
    state_path: Path
    n_turns: int
    computed: int
    problems: list[Problem] = field(default_factory=list)

    @property
    def alerts(self) -> list[Alert]:
        return self.monitor.alerts


def monitor_conversations(
    model: nn.Module,
    tokenizer,
    vectors: Mapping[str, TraitVectors | Tensor],
    layer: int,
    conversations_path: str | Path,
    *,
    out_dir: str | Path,
    monitor: DriftMonitor | None = None,
    reference: Sequence[Mapping[str, float]] | None = None,
    window: int = 20,
    method: str = "zscore",
    threshold: float = 3.0,
    reference_size: int = 50,
    batch_size: int = 16,
    kind: str | None = None,
    resume: bool = True,
    on_error: Literal["raise", "skip"] = "raise",
    truncate: bool = True,
    progress: bool = True,
) -> DriftReport:
    """Score each assistant response of a conversation log on trait directions and watch for drift.

    Writes into ``out_dir``: ``scores.jsonl`` (one line per turn: line, turn, index, timestamp, scores,
    rolling_mean, alerts), ``alerts.jsonl``, ``timeline.png`` and ``monitor_state.json``. A killed run resumes
    from ``scores.jsonl``: its records are replayed into the monitor, so alerts come out as in one run.

    Args:
        model: HF causal LM that produced the responses.
        tokenizer: its tokenizer.
        vectors: trait name -> TraitVectors or tensor.
        layer: residual-stream layer to read.
        conversations_path: JSONL log (see ``read_conversations``).
        out_dir: output folder.
        monitor: a fresh ``DriftMonitor`` to use (its traits must match ``vectors``); default builds one from
            ``window``/``method``/``threshold``/``reference_size``.
        reference: score rows to calibrate with (otherwise the first ``reference_size`` turns calibrate).
        window: rolling window.
        method: "zscore", "percentile" or "rolling".
        threshold: alert threshold.
        reference_size: turns used for automatic calibration.
        batch_size: responses per forward pass.
        kind: TraitVectors pooling kind.
        resume: continue from an existing ``scores.jsonl`` with the same settings; False starts over.
        on_error: "raise" or "skip" malformed log lines.
        truncate: stop forward passes after ``layer``.
        progress: show a progress bar.
    """
    if not vectors:
        raise ValueError("no trait vectors to monitor")
    names = list(vectors)
    hf_model = unwrap_model(model)
    layout = get_layout(hf_model)
    layer = layout.check_layer(layer)
    directions = torch.stack([load_direction(vectors[n], layer, kind=kind, d_model=layout.d_model)
                              for n in names])
    turns, problems = read_conversations(conversations_path, on_error=on_error)
    if not turns:
        raise ValueError(f"{conversations_path}: no assistant responses to score")
    if monitor is None:
        monitor = DriftMonitor(names, window=window, method=method, threshold=threshold,
                               reference_size=reference_size)
    elif list(monitor.traits) != names or monitor.n_updates:
        raise ValueError(f"monitor must be fresh and watch exactly {names} (it watches "
                         f"{list(monitor.traits)} and has {monitor.n_updates} updates)")
    if reference is not None:
        monitor.calibrate(reference)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scores_path, alerts_path = out_dir / "scores.jsonl", out_dir / "alerts.jsonl"
    prompts = [format_messages(tokenizer, [dict(m) for m in t.messages])[0] for t in turns]
    data_sha, _ = _fingerprint(prompts, [t.response for t in turns], directions[0])
    vec_shas = [_fingerprint([], [], d)[1] for d in directions]
    config = {"layer": layer, "kind": kind, "traits": names, "vector_sha": vec_shas, "data_sha": data_sha,
              "monitor": monitor.config(), "calibration": _calibration_sha(monitor)}
    meta_path = _meta_path(scores_path)
    done: list[dict] = []
    if resume and scores_path.exists() and meta_path.is_file():
        old = json.loads(meta_path.read_text())
        if old != config:
            diffs = [k for k in config if old.get(k) != config[k]]
            raise ValueError(f"{scores_path} holds a run with other settings ({', '.join(diffs)}); pass "
                             "resume=False to start over or choose another out_dir")
        done = read_score_file(scores_path, repair=True)
        expected = [(t.line, t.turn) for t in turns[: len(done)]]
        if len(done) > len(turns) or [(r.get("line"), r.get("turn")) for r in done] != expected:
            raise ValueError(f"{scores_path} does not match the start of {conversations_path}; was the log "
                             "edited? Pass resume=False to start over")
    else:
        scores_path.write_text("")
        meta_path.write_text(json.dumps(config, indent=2))

    # Replay finished turns (with their recorded timestamps) so the monitor's state and alerts are exactly
    # those of an uninterrupted run; then rewrite the alerts file from it, which also drops any alert
    # written after the last flushed score line.
    for rec, t in zip(done, turns, strict=False):
        monitor.update(rec["scores"], timestamp=rec["timestamp"], meta=_turn_meta(t))
    alerts_path.write_text("".join(json.dumps(_alert_json(a)) + "\n" for a in monitor.alerts))
    monitor.alerts_path = alerts_path

    todo = list(range(len(done), len(turns)))
    bar = tqdm(total=len(turns), initial=len(done), desc="drift", unit="response", disable=not progress)
    with scores_path.open("a", encoding="utf-8") as f:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            resp, _, _ = pooled_activations(hf_model, tokenizer, [prompts[i] for i in chunk],
                                            [turns[i].response for i in chunk], layer, truncate=truncate)
            projections = (resp @ directions.T).tolist()  # [B, K]
            new = []
            for i, row in zip(chunk, projections, strict=True):
                t = turns[i]
                stamp = t.timestamp if t.timestamp is not None else time.time()
                scores = dict(zip(names, row, strict=True))
                alerts = monitor.update(scores, timestamp=stamp, meta=_turn_meta(t))
                new.append({"line": t.line, "turn": t.turn, "index": monitor.n_updates - 1,
                            "timestamp": stamp, "scores": scores,
                            "rolling_mean": monitor.history(1)[0]["rolling_mean"],
                            "alerts": [a.trait for a in alerts]})
            append_records(f, new)
            bar.update(len(chunk))
    bar.close()
    plot_path = monitor.plot(out_dir / "timeline.png")
    state_path = out_dir / "monitor_state.json"
    state_path.write_text(json.dumps(monitor.state_dict(), default=str))
    return DriftReport(monitor=monitor, scores_path=scores_path, alerts_path=alerts_path, plot_path=plot_path,
                       state_path=state_path, n_turns=len(turns), computed=len(todo), problems=problems)


def _calibration_sha(monitor: DriftMonitor) -> str | None:
    stats = monitor.state_dict()["stats"]
    if stats is None:
        return None
    return hashlib.sha256(json.dumps(stats, sort_keys=True).encode()).hexdigest()[:16]


def _turn_meta(turn: Turn) -> dict:
    return {"line": turn.line, "turn": turn.turn, **turn.meta}


def monitor_file(
    conversations_path: str | Path,
    vectors_paths: Sequence[str | Path],
    *,
    out_dir: str | Path,
    model_path: str | Path | None = None,
    layer: int | None = None,
    window: int = 20,
    method: str = "zscore",
    threshold: float = 3.0,
    reference_size: int = 50,
    batch_size: int = 16,
    resume: bool = True,
    on_error: Literal["raise", "skip"] = "raise",
    dtype: str = "float32",
    device: str | None = None,
    progress: bool = True,
) -> DriftReport:
    """CLI entry: load a model and trait vectors, then ``monitor_conversations`` on a log file.

    Args:
        conversations_path: JSONL conversation log.
        vectors_paths: saved TraitVectors (trait named by their metadata) or ``name=path`` strings.
        out_dir: output folder.
        model_path: model (None: embedded SmolLM2).
        layer: layer to read (default: the vectors' shared recommended layer).
        window: rolling window.
        method: "zscore", "percentile" or "rolling".
        threshold: alert threshold.
        reference_size: turns used for calibration.
        batch_size: responses per forward pass.
        resume: continue an interrupted run.
        on_error: "raise" or "skip" malformed log lines.
        dtype: model dtype.
        device: model device.
        progress: show a progress bar.
    """
    from .flag import load_vectors_file
    from .models import load_model

    model, tokenizer = load_model(model_path, dtype=dtype, device=device)
    vectors: dict[str, TraitVectors | Tensor] = {}
    for spec in vectors_paths:
        name, _, path = str(spec).rpartition("=") if "=" in str(spec) else ("", "", str(spec))
        vec = load_vectors_file(path, model)
        name = name or (vec.trait if isinstance(vec, TraitVectors) else Path(path).stem)
        if name in vectors:
            raise ValueError(f"two vector files for trait {name!r}; name them with name=path")
        vectors[name] = vec
    if layer is None:
        recs = {v.recommended_layer for v in vectors.values() if isinstance(v, TraitVectors)}
        all_saved = all(isinstance(v, TraitVectors) for v in vectors.values())
        if len(recs) != 1 or None in recs or not all_saved:
            raise ValueError("pass layer: the vectors do not share one recommended layer")
        layer = recs.pop()
    return monitor_conversations(model, tokenizer, vectors, layer, conversations_path, out_dir=out_dir,
                                 window=window, method=method, threshold=threshold,
                                 reference_size=reference_size, batch_size=batch_size, resume=resume,
                                 on_error=on_error, progress=progress)
