"""Screening latents by steering: does adding a latent's decoder row make the model show the trait?

The paper's step after ranking by activation difference: steer the original model with each candidate and keep
the ones that move the behaviour. Each latent is steered as ``sae:<folder>#<id>`` (the one vector loader), so the
screen steers exactly as ``steerlib steer`` would.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import Tensor, nn

from steerlib.core.capture import capture_activations
from steerlib.core.chat import format_prompt
from steerlib.steering.generation import generate
from steerlib.steering.steer import build_ops

__all__ = ["screen_latents"]


def screen_latents(model: nn.Module, tokenizer, sae_folder: str | Path, latents: Sequence[int],
                   questions: Sequence[str], trait_vector: Tensor, layer: int, coef: float, *, judge=None,
                   max_new_tokens: int = 48, batch_size: int = 16, progress: bool = False) -> list[dict]:
    """Steer with each latent at ``coef`` and score the answers; the first row (``latent`` None) is unsteered.

    Each row: ``latent``, ``projection`` (mean response activation of the unsteered model reading the steered
    answers, on the unit trait vector at ``layer``) and ``judge`` (mean judge score, when a judge is given).
    """
    prompts = [format_prompt(tokenizer, q) for q in questions]
    unit = trait_vector.float() / trait_vector.float().norm()
    rows = []
    for latent in [None, *latents]:
        ops = [] if latent is None else build_ops(model, f"sae:{sae_folder}#{latent}", coef=coef)
        texts = [g.text for g in generate(model, tokenizer, prompts, steering=ops, max_new_tokens=max_new_tokens,
                                          batch_size=batch_size)]
        acts = capture_activations(model, tokenizer, prompts, texts, [layer], batch_size=batch_size)
        proj = acts.at("response_mean", layer) @ unit
        row = {"latent": latent, "projection": float(proj.nan_to_num().mean()), "example": texts[0]}
        if judge is not None:
            scores = [s for s in judge.score_many(list(zip(questions, texts, strict=True))) if s is not None]
            row["judge"] = sum(scores) / len(scores) if scores else None
        rows.append(row)
        if progress:
            print(f"screen latent {latent}: projection {row['projection']:.2f} judge {row.get('judge')}")
    return rows
