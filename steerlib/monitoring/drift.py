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

import json
import math
import time
import warnings
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from steerlib.store.plots import pyplot, save_figure
from steerlib.store.results import ResultsStore

__all__ = ["METHODS", "Alert", "DriftMonitor", "alert_record", "check_finite"]

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


def check_finite(value: object, what: str) -> float:
    """``value`` as a float if it is a finite real number, else a ValueError naming ``what``."""
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
        threshold = check_finite(threshold, "threshold")
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
        self._alerts_store: ResultsStore | None = None
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
        return {t: check_finite(scores[t], f"{where}: score of {t!r}") for t in self.traits}

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
        timestamp = time.time() if timestamp is None else check_finite(timestamp, "timestamp")
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
                if self._alerts_store is None or self._alerts_store.path != Path(self.alerts_path):
                    self._alerts_store = ResultsStore(self.alerts_path)
                self._alerts_store.append(alert_record(a) for a in alerts)
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
            "alerts": [alert_record(a) for a in self._alerts],
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
        plt = pyplot()

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
        return save_figure(fig, path, dpi=110)


def alert_record(alert: Alert) -> dict:
    """An alert as a JSON-able dict (the line written to alerts files)."""
    return json.loads(json.dumps(asdict(alert), default=str))
