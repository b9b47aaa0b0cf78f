"""Finetuning shift: how far finetuning moved a model's activations along a trait direction (paper section 4).

For a set of evaluation questions, the shift at layer ``L`` is the mean activation difference
``finetuned - base`` projected on the unit trait vector at ``L``. The paper uses the last prompt token (the
model's state just before answering); we also report the response mean, reading the base model's own
greedy responses through both models so the two see identical text.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from steerlib.core.arch import get_layout
from steerlib.core.capture import capture_activations
from steerlib.core.chat import format_prompt
from steerlib.core.loading import resolve_vector
from steerlib.core.vectors import TraitVectors
from steerlib.finetuning.flag.scoring import unwrap_model
from steerlib.store.plots import pyplot, save_figure

__all__ = ["FinetuningShift", "finetuning_shift", "load_finetuned", "plot_shift"]

SHIFT_KINDS = ("prompt_last", "response_mean")


@dataclass
class FinetuningShift:
    """Per-layer finetuning shift on a trait direction.

    Attributes:
        layers: layers measured.
        prompt_last: [len(layers)] projection of the mean last-prompt-token difference (finetuned - base).
        response_mean: [len(layers)] the same for response-mean activations over the base model's responses.
        prompt_last_norm: [len(layers)] norm of the mean last-prompt-token difference (how much moved at all).
        response_mean_norm: [len(layers)] the same for response means.
        n_questions: number of evaluation questions.
        base_responses: the base model's greedy responses that were read.
    """

    layers: list[int]
    prompt_last: np.ndarray
    response_mean: np.ndarray
    prompt_last_norm: np.ndarray
    response_mean_norm: np.ndarray
    n_questions: int
    base_responses: list[str] = field(default_factory=list)

    def at(self, layer: int, kind: str = "prompt_last") -> float:
        """The shift at one layer for ``kind`` in ("prompt_last", "response_mean")."""
        if kind not in SHIFT_KINDS:
            raise ValueError(f"unknown kind {kind!r}; choose from {SHIFT_KINDS}")
        if layer not in self.layers:
            raise ValueError(f"layer {layer} was not measured; measured layers: {self.layers}")
        return float(getattr(self, kind)[self.layers.index(layer)])

    def to_dict(self) -> dict:
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, np.ndarray):
                out[key] = value.tolist()
        return out


def _directions(vectors: TraitVectors | Tensor, layers: list[int], kind: str | None, d_model: int) -> Tensor:
    rows = []
    for layer in layers:
        if isinstance(vectors, Tensor) and vectors.ndim == 1:
            vec = vectors  # one direction used at every requested layer
        else:
            vec = resolve_vector(vectors, layer, kind=kind, d_model=d_model)
        vec = vec.detach().float().cpu()
        rows.append(vec / vec.norm())
    return torch.stack(rows)  # [n_layers_sel, D]


def _mean_activations(
    model: nn.Module,
    tokenizer,
    prompts: list[str],
    responses: list[str | None],
    layers: list[int],
    batch_size: int,
) -> dict[str, Tensor]:
    acts = capture_activations(unwrap_model(model), tokenizer, prompts, responses, layers=layers,
                               batch_size=batch_size)
    return {
        "prompt_last": acts.pooled["prompt_last"].mean(dim=0),  # [n_layers_sel, D]
        "response_mean": acts.pooled["response_mean"].nanmean(dim=0),  # NaN rows: empty base responses
    }


def finetuning_shift(
    base: nn.Module | None,
    finetuned: nn.Module,
    tokenizer,
    vectors: TraitVectors | Tensor,
    questions: Sequence[str],
    layers: Sequence[int] | None = None,
    *,
    kind: str | None = None,
    system: str | None = None,
    base_responses: Sequence[str] | None = None,
    max_new_tokens: int = 48,
    batch_size: int = 8,
) -> FinetuningShift:
    """Mean activation shift (finetuned - base) per layer, projected on the unit trait vector.

    Args:
        base: the model before finetuning; None when ``finetuned`` is a PEFT model, whose adapters are then
            disabled to obtain the base (no second copy of the weights).
        finetuned: the finetuned model (a PEFT-wrapped model works).
        tokenizer: the tokenizer shared by both.
        vectors: TraitVectors, a [n_layers + 1, D] tensor, or a [D] tensor used at every layer.
        questions: evaluation questions (e.g. ``load_trait(name).eval_questions``).
        layers: layers to measure (default: every block output 1..n_layers).
        kind: TraitVectors pooling kind (default response_mean).
        system: optional system prompt for the questions.
        base_responses: the base model's responses, if already generated; else generated greedily here.
        max_new_tokens: length of generated base responses.
        batch_size: samples per forward pass.
    """
    if isinstance(questions, str) or not questions:
        raise ValueError("questions must be a non-empty list of strings")
    layout = get_layout(unwrap_model(finetuned))
    if layers is None:
        if isinstance(vectors, Tensor) and vectors.ndim == 1:
            raise ValueError("a single [d_model] vector needs explicit layers")
        layers = list(range(1, layout.n_layers + 1))
    layers = sorted({layout.check_layer(x) for x in layers})
    directions = _directions(vectors, layers, kind, layout.d_model)
    prompts = [format_prompt(tokenizer, q, system) for q in questions]

    if base is None:
        disable = getattr(finetuned, "disable_adapter", None)
        if disable is None:
            raise ValueError("base is None but the finetuned model is not a PEFT model; pass the base model")
        base_ctx, base_model = disable, finetuned
    else:
        base_ctx, base_model = contextlib.nullcontext, base

    with base_ctx():
        if base_responses is None:
            from steerlib.steering.generation import generate

            gens = generate(unwrap_model(base_model), tokenizer, prompts, max_new_tokens=max_new_tokens,
                            batch_size=batch_size)
            base_responses = [g.text for g in gens]
        if len(base_responses) != len(prompts):
            raise ValueError(f"got {len(base_responses)} base responses for {len(prompts)} questions")
        responses = [r if r else None for r in base_responses]
        base_means = _mean_activations(base_model, tokenizer, prompts, responses, layers, batch_size)
    ft_means = _mean_activations(finetuned, tokenizer, prompts, responses, layers, batch_size)

    out = {}
    for k in SHIFT_KINDS:
        diff = ft_means[k] - base_means[k]  # [n_layers_sel, D]
        out[k] = (diff * directions).sum(dim=-1).numpy().astype(float)
        out[f"{k}_norm"] = diff.norm(dim=-1).numpy().astype(float)
    return FinetuningShift(layers=layers, n_questions=len(questions), base_responses=list(base_responses),
                           **out)


def plot_shift(
    shift: FinetuningShift | Sequence[tuple[str, FinetuningShift]],
    path: str | Path,
    *,
    highlight_layer: int | None = None,
    title: str | None = None,
) -> Path:
    """Line plot of the shift per layer (both kinds); pass ``[(label, shift), ...]`` to compare runs."""
    plt = pyplot()

    runs = [("", shift)] if isinstance(shift, FinetuningShift) else list(shift)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for ax, k in zip(axes, SHIFT_KINDS, strict=True):
        for label, s in runs:
            ax.plot(s.layers, getattr(s, k), marker="o", markersize=3, label=label or None)
        ax.axhline(0.0, color="grey", linewidth=0.8)
        if highlight_layer is not None:
            ax.axvline(highlight_layer, color="tab:red", linestyle="--", linewidth=0.8)
        ax.set_xlabel("layer")
        ax.set_title(f"{k} shift (finetuned - base)")
        if any(label for label, _ in runs):
            ax.legend()
    axes[0].set_ylabel("projection on unit trait vector")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path, dpi=110)


def load_finetuned(path: str | Path, base_path: str | Path | None = None, *, dtype: str = "float32",
                   device: str | None = None) -> tuple[nn.Module, object, bool]:
    """Load a finetuned model: a full HF folder, or a PEFT adapter folder on top of ``base_path``.

    Returns:
        (model, tokenizer, is_adapter). For an adapter the model is a ``PeftModel`` whose
        ``disable_adapter()`` gives back the base model.
    """
    from steerlib.core.models import load_model

    path = Path(path)
    if (path / "adapter_config.json").is_file():
        from peft import PeftModel

        model, tokenizer = load_model(base_path, dtype=dtype, device=device)
        return PeftModel.from_pretrained(model, path).eval(), tokenizer, True
    model, tokenizer = load_model(path, dtype=dtype, device=device)
    return model, tokenizer, False
