"""``steerlib shiftcheck``: does the last prompt token's projection predict the judged trait?"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from steerlib.commands.common import fit_vectors
from steerlib.core import models
from steerlib.core.checks import check_int, check_out_dir
from steerlib.core.loading import load_vectors
from steerlib.core.vectors import TraitVectors
from steerlib.evaluation.prompt_shift import ShiftCheck, prompt_shift
from steerlib.store.results import exclusive_output
from steerlib.traits.judges import make_judge
from steerlib.traits.library import load_trait

__all__ = ["shiftcheck_file"]


def shiftcheck_file(
    vectors_path: str | Path,
    out_dir: str | Path | None = None,
    *,
    model_path: str | Path | None = None,
    trait: str | None = None,
    judge: str = "auto",
    n_questions: int = 8,
    pair: int = 0,
    shots: Sequence[int] = (0, 1, 2, 4, 8),
    negative_shots: bool = True,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    resume: bool = True,
) -> tuple[ShiftCheck, Path]:
    """The prompt-shift experiment for saved vectors, written to ``out_dir`` (default: beside the vectors)."""
    vectors_path = Path(vectors_path)
    tv = load_vectors(vectors_path)  # the files and every number first: nothing loads a model before they pass
    if not isinstance(tv, TraitVectors):
        raise ValueError(f"{vectors_path}: shiftcheck needs saved TraitVectors (an extraction run), not a bare tensor")
    t = load_trait(trait or tv.trait)
    check_int(n_questions, "n_questions", minimum=3, maximum=len(t.eval_questions))
    check_int(max_new_tokens, "max_new_tokens")
    check_int(batch_size, "batch_size")
    for k in shots:
        check_int(k, "shots", minimum=0)
    folder = Path(out_dir) if out_dir is not None else (
        vectors_path if vectors_path.is_dir() else vectors_path.parent) / "shiftcheck"
    with exclusive_output(check_out_dir(folder), "steerlib shiftcheck"):
        model, tok = models.load_model(model_path)
        tv = fit_vectors(tv, vectors_path, model)
        trait_judge = make_judge(judge, t, model=model, tokenizer=tok)
        result = prompt_shift(model, tok, tv, folder, trait=t, judge=trait_judge, n_questions=n_questions, pair=pair,
                              shots=list(shots), negative_shots=negative_shots, max_new_tokens=max_new_tokens,
                              batch_size=batch_size, resume=resume, progress=True)
        return result, folder
