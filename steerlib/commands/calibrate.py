"""``steerlib calibrate``: per-layer projection percentiles saved beside the vectors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from steerlib.commands.common import fit_vectors, text_generator
from steerlib.core import models
from steerlib.core.checks import check_int
from steerlib.core.loading import load_vectors
from steerlib.steering.calibration import Calibration, calibrate, calibration_path

__all__ = ["calibrate_file"]


def calibrate_file(
    vectors_path: str | Path,
    *,
    model_path: str | Path | None = None,
    layers: Sequence[int] | None = None,
    max_new_tokens: int = 48,
    batch_size: int = 8,
    fresh: bool = False,
    engine: str = "hf",
    vllm_args: Mapping[str, Any] | None = None,
) -> tuple[Calibration, Path]:
    """Calibrate the vectors at ``vectors_path`` on the shipped reference questions; saved beside them.
    ``engine="vllm"``: the answers come from one vLLM submission (``vllm_args``: its engine arguments).

    Returns:
        The calibration and the path it was written to (``<vectors folder>/calibration.json``).
    """
    check_int(max_new_tokens, "max_new_tokens")
    check_int(batch_size, "batch_size")
    source = load_vectors(vectors_path)  # a damaged file fails before the model loads
    generator = text_generator(engine, model_path, vllm_args)  # a bad engine choice fails here too
    out = calibration_path(vectors_path)
    try:
        loaded = models.load_model(model_path)
        model, tok = loaded
        source = fit_vectors(source, vectors_path, model)
        cal = calibrate(model, tok, source, out, layers=layers, max_new_tokens=max_new_tokens,
                        batch_size=batch_size, resume=not fresh, model_name=loaded.name, generate_texts=generator)
    finally:
        if generator is not None:
            generator.close()
    return cal, out
