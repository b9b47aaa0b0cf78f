"""Scoring a deployed assistant's conversation logs on trait directions over time, with drift alerts.

Each assistant response in a JSONL log is projected (response mean, one layer) on every trait's unit
direction and fed to a ``DriftMonitor``. Scores go to the one resumable results store: a killed run resumes,
replaying the finished turns into the monitor so that alerts come out exactly as in one run.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from steerlib.core.arch import get_layout
from steerlib.core.capture import pooled_activations
from steerlib.core.chat import format_messages
from steerlib.core.loading import resolve_vector
from steerlib.core.models import unwrap_model
from steerlib.core.vectors import TraitVectors
from steerlib.monitoring.drift import Alert, DriftMonitor, alert_record, check_finite
from steerlib.store.results import ResultsStore, fingerprint_pairs, fingerprint_tensor
from steerlib.store.samples import BadRecord, Problem, check_messages, read_jsonl_records, report_problem

__all__ = ["DriftReport", "Turn", "monitor_conversations", "read_conversations"]


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
        return check_finite(value, what)
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
    directions = torch.stack([resolve_vector(vectors[n], layer, kind=kind, d_model=layout.d_model).float()
                              for n in names])
    directions = directions / directions.norm(dim=-1, keepdim=True)
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
    elif not monitor.calibrated and monitor.reference_size > len(turns):
        # It would never calibrate, so it could never alert: "0 alerts" would be a wrong all-clear.
        raise ValueError(
            f"{conversations_path}: {len(turns)} responses, fewer than reference_size={monitor.reference_size}: "
            "the monitor would never calibrate and could raise no alert; lower --reference-size or pass a "
            "calibration reference"
        )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scores_path, alerts_path = out_dir / "scores.jsonl", out_dir / "alerts.jsonl"
    prompts = [format_messages(tokenizer, [dict(m) for m in t.messages])[0] for t in turns]
    data_sha = fingerprint_pairs(prompts, [t.response for t in turns])
    vec_shas = [fingerprint_tensor(d) for d in directions]
    config = {"layer": layer, "kind": kind, "traits": names, "vector_sha": vec_shas, "data_sha": data_sha,
              "monitor": monitor.config(), "calibration": _calibration_sha(monitor)}
    store = ResultsStore(scores_path, config, resume=resume)
    done = store.records
    expected = [(t.line, t.turn) for t in turns[: len(done)]]
    if len(done) > len(turns) or [(r.get("line"), r.get("turn")) for r in done] != expected:
        raise ValueError(f"{scores_path} does not match the start of {conversations_path}; was the log "
                         "edited? Pass resume=False to start over")

    # Replay finished turns (with their recorded timestamps) so the monitor's state and alerts are exactly
    # those of an uninterrupted run; then rewrite the alerts file from it, which also drops any alert
    # written after the last flushed score line.
    for rec, t in zip(done, turns, strict=False):
        monitor.update(rec["scores"], timestamp=rec["timestamp"], meta=_turn_meta(t))
    alerts_path.write_text("".join(json.dumps(alert_record(a)) + "\n" for a in monitor.alerts))
    monitor.alerts_path = alerts_path

    todo = list(range(len(done), len(turns)))
    bar = tqdm(total=len(turns), initial=len(done), desc="drift", unit="response", disable=not progress)
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
        store.append(new)
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
