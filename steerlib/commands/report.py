"""``steerlib report``: one self-contained HTML page for an extraction run."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from steerlib.core import models
from steerlib.core.checks import check_int, check_number
from steerlib.evaluation.report import run_dose, write_report

__all__ = ["report_file"]


def report_file(
    run_dir: str | Path,
    out: str | Path | None = None,
    *,
    model_path: str | Path | None = None,
    dose_coefs: Sequence[float] | None = None,
    relative: bool = True,
    n_questions: int = 4,
    max_new_tokens: int = 32,
) -> Path:
    """One self-contained HTML report of an extraction run; with ``dose_coefs``, a dose-response is run first."""
    if not (Path(run_dir) / "vectors.json").is_file():
        raise FileNotFoundError(f"{run_dir} is not an extraction run folder (no vectors.json; run steerlib extract)")
    for c in dose_coefs or ():
        check_number(c, "dose coefficient")
    check_int(n_questions, "n_questions")
    check_int(max_new_tokens, "max_new_tokens")
    if dose_coefs:
        model, tok = models.load_model(model_path)
        run_dose(model, tok, run_dir, list(dose_coefs), n_questions=n_questions, max_new_tokens=max_new_tokens,
                 relative=relative)
    return write_report(run_dir, out)
