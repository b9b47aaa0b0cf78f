"""``steerlib train``: LoRA finetuning, optionally with preventative steering or ablation."""

from __future__ import annotations

import json
from pathlib import Path

from steerlib.commands.common import fit_vectors
from steerlib.core import models
from steerlib.core.checks import check_choice, check_int, check_number, check_out_dir
from steerlib.core.loading import load_vectors, pick_layer
from steerlib.finetuning.training import TrainMode, TrainResult, lora_finetune
from steerlib.store.samples import read_samples

__all__ = ["train_file"]


def train_file(
    data_path: str | Path,
    *,
    out_dir: str | Path,
    model_path: str | Path | None = None,
    vectors_path: str | Path | None = None,
    layer: int | None = None,
    coef: float = 0.0,
    mode: TrainMode = "add",
    steps: int = 40,
    batch_size: int = 8,
    lr: float = 1e-3,
    r: int = 8,
    seed: int = 0,
    dtype: str = "float32",
    device: str | None = None,
) -> TrainResult:
    """CLI entry: LoRA-finetune on a data file, optionally with preventative steering; save the adapter.

    Args:
        data_path: JSONL/CSV training data.
        out_dir: where the adapter (``adapter_config.json`` etc.) and ``losses.json`` are written.
        model_path: base model (None: embedded SmolLM2).
        vectors_path: trait vectors for steering during training (None: plain finetune).
        layer: layer to steer (default: the vectors' recommended layer).
        coef: steering coefficient for ``mode="add"``.
        mode: "add" (preventative steering) or "ablate" (CAFT).
        steps: optimiser steps.
        batch_size: samples per step.
        lr: learning rate.
        r: LoRA rank.
        seed: random seed.
        dtype: model dtype.
        device: model device.
    """
    check_number(coef, "coef")
    check_choice(mode, "training mode", ("add", "ablate"))
    if vectors_path is None and (coef != 0 or layer is not None or mode != "add"):
        given = "coef" if coef != 0 else "layer" if layer is not None else f"mode {mode!r}"
        raise ValueError(f"{given} given without vectors: preventative steering needs --vector (a plain "
                         "finetune takes neither)")
    check_int(steps, "steps")
    check_int(batch_size, "batch_size")
    check_int(r, "LoRA rank")
    check_number(lr, "learning rate", minimum=0, strict=True)
    out_dir = check_out_dir(out_dir)  # before training, not after it
    read_samples(data_path)  # a malformed data file fails now, with its line, not after the model loads
    vectors = load_vectors(vectors_path) if vectors_path is not None else None
    model, tokenizer = models.load_model(model_path, dtype=dtype, device=device)
    steering = None
    if vectors is not None:
        vectors = fit_vectors(vectors, vectors_path, model)
        layer = pick_layer(vectors, layer)
        steering = {"vectors": vectors, "layer": layer, "coef": coef, "mode": mode}
    result = lora_finetune(model, tokenizer, data_path, steps=steps, batch_size=batch_size, lr=lr, r=r,
                           steering=steering, seed=seed)
    result.model.save_pretrained(out_dir)
    (out_dir / "losses.json").write_text(json.dumps(result.losses))
    return result
