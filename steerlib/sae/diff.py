"""Model diffing through an SAE (Wang et al. 2025, "Persona features control emergent misalignment").

Both models read identical teacher-forced text (prompts plus the base model's own answers); each latent's mean
activation over those tokens is compared, finetuned minus base, and ranked both ways. Beside it, the SAE-free
baseline: the mean residual difference and its cosine with every trait vector given. ``steerlib.sae.screen`` then
steers the base model with the top latents to see which of them carry the behaviour.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from steerlib.core.capture import capture_activations
from steerlib.core.sae_format import SparseAutoencoder

__all__ = ["ModelDiff", "model_diff", "token_activations"]


@dataclass(frozen=True)
class ModelDiff:
    """``increased`` / ``decreased``: top latents by mean activation difference (finetuned - base), each a dict
    with ``latent``, ``diff``, ``base``, ``finetuned`` and ``cosines`` (decoder row vs each trait vector);
    ``baseline_cosines``: trait -> cosine of the mean residual difference with the trait vector;
    ``residual_norm``: median token norm of the base model at the layer (a scale for steering)."""

    layer: int
    n_tokens: int
    increased: list[dict]
    decreased: list[dict]
    baseline_cosines: dict[str, float]
    baseline_norm: float
    residual_norm: float

    def to_dict(self) -> dict:
        return asdict(self)


def token_activations(model: nn.Module, tokenizer, prompts: Sequence[str], responses: Sequence[str | None],
                      layer: int, *, skip_first: int = 1, responses_only: bool = False,
                      batch_size: int = 16) -> Tensor:
    """Every token's activation at ``layer`` [n_tokens, d_model], after the first ``skip_first`` of each sample
    (only response tokens with ``responses_only``), through steerlib's one capture path."""
    acts = capture_activations(model, tokenizer, prompts, responses, [layer], batch_size=batch_size,
                               keep_tokens=True)
    parts = []
    for tokens, p_len in zip(acts.tokens, acts.prompt_lengths, strict=True):  # type: ignore[arg-type]
        parts.append(tokens[0, max(skip_first, p_len if responses_only else 0):])
    return torch.cat(parts)


@torch.no_grad()
def model_diff(base: nn.Module, finetuned: nn.Module, tokenizer, sae: SparseAutoencoder, prompts: Sequence[str],
               responses: Sequence[str | None], *, vectors: Mapping[str, Tensor] | None = None,
               top: int = 10, batch_size: int = 16) -> ModelDiff:
    """Rank SAE latents by how much finetuning changed their mean activation on identical text.

    Args:
        base, finetuned: the two models (same tokenizer and architecture; a PEFT model is fine).
        tokenizer: their tokenizer.
        sae: an SAE at the layer to compare (trained on the base model).
        prompts, responses: formatted prompts and the base model's answers (teacher-forced through both).
        vectors: trait name -> [d_model] direction at ``sae.layer`` for the cosines.
        top: latents listed each way.
    """
    if len(prompts) == 0:
        raise ValueError("no prompts to compare the models on")
    a = token_activations(base, tokenizer, prompts, responses, sae.layer, batch_size=batch_size)
    b = token_activations(finetuned, tokenizer, prompts, responses, sae.layer, batch_size=batch_size)
    fa, fb = sae.encode(a).mean(0), sae.encode(b).mean(0)
    diff = fb - fa
    units = {name: v.float() / v.float().norm() for name, v in (vectors or {}).items()}
    dec = sae.unit_decoder()

    def row(i: int) -> dict:
        return {"latent": i, "diff": float(diff[i]), "base": float(fa[i]), "finetuned": float(fb[i]),
                "cosines": {name: float(dec[i] @ u) for name, u in units.items()}}

    top = max(1, min(int(top), sae.d_sae))
    mean_diff = (b - a).mean(0)
    return ModelDiff(
        layer=sae.layer, n_tokens=int(a.shape[0]),
        increased=[row(i) for i in diff.argsort(descending=True)[:top].tolist()],
        decreased=[row(i) for i in diff.argsort()[:top].tolist()],
        baseline_cosines={name: float(mean_diff @ u / mean_diff.norm().clamp_min(1e-12)) for name, u in units.items()},
        baseline_norm=float(mean_diff.norm()), residual_norm=float(a.norm(dim=1).median()))
