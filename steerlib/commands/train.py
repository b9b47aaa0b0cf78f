"""``steerlib train``: LoRA finetuning, optionally with preventative steering or ablation."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from steerlib.commands.common import fit_vectors
from steerlib.core import models
from steerlib.core.checks import check_int, check_number, check_out_dir
from steerlib.core.loading import load_vectors, pick_layer
from steerlib.evaluation.report import capability_probe
from steerlib.finetuning.training import TrainMode, TrainResult, lora_finetune
from steerlib.steering.plan import method_named
from steerlib.store.samples import read_samples

__all__ = ["TrainedWithCapability", "train_file"]


@dataclass
class TrainedWithCapability(TrainResult):
    """A preventative finetune's result with the model's capability before and after it (unsteered at inference):
    ``steerlib.evaluation.capability.Capability`` values, None when not measured."""

    capability_before: object | None = None
    capability_after: object | None = None


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
    capability_items: int | None = 4,
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
        capability_items: with vectors (preventative training), items of each kind of the capability set scored
            before and after training, and held-out answers' perplexity (0: not measured); also written to
            ``capability.json``.
    """
    check_number(coef, "coef")
    method_named(mode)  # any registered method: add (preventative steering), ablate (CAFT)...
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
    probe = capability_probe(model, tokenizer, capability_items) if steering is not None else None
    before = probe() if probe is not None else None  # before LoRA wraps the model's layers
    result = lora_finetune(model, tokenizer, data_path, steps=steps, batch_size=batch_size, lr=lr, r=r,
                           steering=steering, seed=seed)
    result.model.save_pretrained(out_dir)
    (out_dir / "losses.json").write_text(json.dumps(result.losses))
    if probe is None:
        return result
    after = probe(model=result.model)
    (out_dir / "capability.json").write_text(json.dumps({"before": asdict(before), "after": asdict(after)}))
    return TrainedWithCapability(result.model, result.losses, before, after)
