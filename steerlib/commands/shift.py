"""``steerlib shift``: a finetune's activation shift projected on a trait vector, per layer."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from steerlib.core import models
from steerlib.core.checks import check_int, check_out_dir, read_text
from steerlib.core.loading import load_vectors
from steerlib.core.vectors import TraitVectors
from steerlib.finetuning.shift import FinetuningShift, finetuning_shift, load_finetuned, plot_shift
from steerlib.traits.library import load_trait

__all__ = ["shift_file"]


def shift_file(
    finetuned_path: str | Path,
    vectors_path: str | Path,
    *,
    out_dir: str | Path,
    base_path: str | Path | None = None,
    trait: str | None = None,
    questions_path: str | Path | None = None,
    layers: Sequence[int] | None = None,
    kind: str | None = None,
    max_new_tokens: int = 48,
    batch_size: int = 8,
    dtype: str = "float32",
    device: str | None = None,
) -> FinetuningShift:
    """CLI entry: measure a finetune's shift and write ``shift.json`` and ``shift.png`` into ``out_dir``.

    Args:
        finetuned_path: a full HF model folder or a PEFT adapter folder.
        vectors_path: saved TraitVectors (or a ``.pt`` tensor).
        out_dir: output folder.
        base_path: the base model (None: embedded SmolLM2).
        trait: built-in or JSON trait whose ``eval_questions`` are used (default: the vectors' trait).
        questions_path: a text file with one question per line (overrides ``trait``).
        layers: layers to measure (default all).
        kind: TraitVectors pooling kind.
        max_new_tokens: length of the base model's responses.
        batch_size: samples per forward pass.
        dtype: model dtype.
        device: model device.
    """
    check_int(max_new_tokens, "max_new_tokens")
    check_int(batch_size, "batch_size")
    if layers is not None and len(layers) == 0:
        raise ValueError("layers is empty: give the layers to measure, or none for all")
    out_dir = check_out_dir(out_dir)
    vectors = load_vectors(vectors_path)
    if questions_path is not None:
        questions = [q.strip() for q in read_text(questions_path, "questions file").splitlines() if q.strip()]
        if not questions:
            raise ValueError(f"{questions_path}: no questions (the file is empty)")
    else:
        name = trait or (vectors.trait if isinstance(vectors, TraitVectors) else None)
        if name is None:
            raise ValueError("pass trait or questions_path: a bare tensor names no trait")
        questions = list(load_trait(name).eval_questions)
    finetuned, tokenizer, is_adapter = load_finetuned(finetuned_path, base_path, dtype=dtype, device=device)
    base = None if is_adapter else models.load_model(base_path, dtype=dtype, device=device).model
    shift = finetuning_shift(base, finetuned, tokenizer, vectors, questions, layers, kind=kind,
                             max_new_tokens=max_new_tokens, batch_size=batch_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "shift.json").write_text(json.dumps(shift.to_dict(), indent=2))
    recommended = vectors.recommended_layer if isinstance(vectors, TraitVectors) else None
    plot_shift(shift, out_dir / "shift.png", highlight_layer=recommended)
    return shift
