"""Ranking flagged samples, writing the ranking as JSONL or CSV, and the histogram of their scores."""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from steerlib.finetuning.flag.scoring import FlagResult
from steerlib.store.plots import pyplot, save_figure
from steerlib.store.samples import Sample

__all__ = ["plot_histogram", "rank", "write_rows"]


def rank(
    records: FlagResult | Sequence[Mapping[str, Any]],
    *,
    samples: Sequence[Sample] | None = None,
    by: str = "score",
    top_k: int | None = None,
    out_path: str | Path | None = None,
    descending: bool = True,
) -> list[dict]:
    """Rank samples by a score field, highest (most trait-expressing) first.

    Args:
        records: a ``FlagResult`` or its records.
        samples: the scored samples, to add the user prompt and response text to each ranked row.
        by: the field to rank by ("score", "projection", "projection_diff"...).
        top_k: keep only the first ``k`` rows.
        out_path: also write the ranking, as CSV when the name ends in ``.csv``, else JSONL.
        descending: highest first. Samples without a value (no baseline) go last.
    """
    if isinstance(records, FlagResult):
        records = records.records
    texts = {s.index: s for s in samples} if samples is not None else {}

    def key(r: Mapping[str, Any]) -> tuple[int, float]:
        value = r.get(by)
        if value is None:
            return (1, 0.0)
        return (0, -value if descending else value)

    if records and not any(by in r for r in records):
        raise ValueError(f"no field {by!r} in the records; available: {sorted(records[0])}")
    ranked = []
    for position, rec in enumerate(sorted(records, key=key), start=1):
        row = {"rank": position, **rec}
        sample = texts.get(rec["index"])
        if sample is not None:
            row["user"] = sample.user
            row["response"] = sample.response
        ranked.append(row)
    if top_k is not None:
        ranked = ranked[:top_k]
    if out_path is not None:
        write_rows(ranked, Path(out_path))
    return ranked


def write_rows(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() != ".csv":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        return
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, dict | list) else v for k, v in row.items()})


def plot_histogram(
    records: FlagResult | Sequence[Mapping[str, Any]],
    path: str | Path,
    *,
    by: str = "score",
    top_k: int | None = None,
    label_key: str | None = None,
    title: str | None = None,
) -> Path:
    """Histogram of per-sample scores as a PNG, with the top-k cut-off marked.

    Args:
        records: a ``FlagResult`` or its records.
        path: output PNG.
        by: score field to plot.
        top_k: draw a line at the k-th highest score.
        label_key: a ``meta`` field (e.g. a known label) to split the histogram by.
        title: plot title.
    """
    plt = pyplot()

    if isinstance(records, FlagResult):
        records = records.records
    rows = [r for r in records if r.get(by) is not None]
    if not rows:
        raise ValueError(f"no sample has a value for {by!r}; nothing to plot")
    values = np.array([r[by] for r in rows], dtype=float)
    bins = np.histogram_bin_edges(values, bins=min(40, max(5, len(values) // 3)))
    fig, ax = plt.subplots(figsize=(7, 4))
    if label_key is not None:
        groups: dict[str, list[float]] = {}
        for r, v in zip(rows, values, strict=True):
            groups.setdefault(str((r.get("meta") or {}).get(label_key)), []).append(v)
        for name, vals in sorted(groups.items()):
            ax.hist(vals, bins=bins, alpha=0.6, label=f"{label_key}={name}")
        ax.legend()
    else:
        ax.hist(values, bins=bins, color="tab:blue", alpha=0.8)
    if top_k is not None and 0 < top_k <= len(values):
        cut = float(np.sort(values)[::-1][top_k - 1])
        ax.axvline(cut, color="tab:red", linestyle="--", label=f"top {top_k}")
        ax.legend()
    ax.set_xlabel(by)
    ax.set_ylabel("samples")
    ax.set_title(title or f"{by} per sample (n={len(values)})")
    return save_figure(fig, path, dpi=110)
