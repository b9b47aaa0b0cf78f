"""``steerlib monitor``: a deployed assistant's responses scored over time, with drift alerts."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from torch import Tensor

from steerlib.commands.common import ON_ERROR, fit_vectors
from steerlib.core import models
from steerlib.core.checks import check_choice, check_int, check_out_dir
from steerlib.core.loading import load_vectors
from steerlib.core.vectors import TraitVectors
from steerlib.monitoring.conversations import DriftReport, monitor_conversations, read_conversations
from steerlib.monitoring.drift import DriftMonitor
from steerlib.store.results import exclusive_output

__all__ = ["monitor_file"]


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
    # The monitor's own checks, run before the model loads (a throwaway instance watching one name).
    DriftMonitor(["check"], window=window, method=method, threshold=threshold, reference_size=reference_size)
    check_choice(on_error, "on_error", ON_ERROR)
    check_int(batch_size, "batch_size")
    check_out_dir(out_dir)
    with exclusive_output(out_dir, "steerlib monitor"):
        if not vectors_paths:
            raise ValueError("no trait vectors given")
        with warnings.catch_warnings():  # skipped lines are reported once, by the run itself
            warnings.simplefilter("ignore")
            read_conversations(conversations_path, on_error=on_error)  # a malformed log fails now, naming its line
        specs = [str(spec).rpartition("=") if "=" in str(spec) else ("", "", str(spec)) for spec in vectors_paths]
        loaded = [load_vectors(path) for _, _, path in specs]  # damaged files fail before the model loads
        model, tokenizer = models.load_model(model_path, dtype=dtype, device=device)
        vectors: dict[str, TraitVectors | Tensor] = {}
        for (name, _, path), vec in zip(specs, loaded, strict=True):
            vec = fit_vectors(vec, path, model)
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
