"""Dose-response: how a trait score and its projection move with the steering coefficient, and what the model loses.

The cost side is a capability probe passed in (``steerlib.evaluation.capability.CapabilityProbe``, or anything called
with a coefficient's ops that returns an object with ``accuracy`` and ``perplexity``): multiple-choice accuracy and
the perplexity of held-out unsteered answers at each coefficient, beside the trait.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from steerlib.core.checks import check_number
from steerlib.steering.generation import generate
from steerlib.steering.steer import TraitReadout, build_ops
from steerlib.store.plots import pyplot, save_figure

# Capability below this fraction of the unsteered one is flagged (``DoseResponse.capability_drops``).
CAPABILITY_FLOOR = 0.9


@dataclass
class DoseResponse:
    """Per coefficient: mean judge score (None without a judge) and mean projection over prompts; with a capability
    probe also multiple-choice accuracy (0..1) and held-out perplexity, and the unsteered accuracy they compare to."""

    coefs: list[float]
    scores: list[float | None]
    projections: list[float]
    samples: list[list[str]]
    layer: int
    capability: list[float | None] = field(default_factory=list)
    perplexity: list[float | None] = field(default_factory=list)
    capability_base: float | None = None

    def capability_drops(self, floor: float = CAPABILITY_FLOOR) -> list[float]:
        """The coefficients whose capability accuracy is below ``floor`` times the unsteered one."""
        if self.capability_base is None:
            return []
        return [c for c, a in zip(self.coefs, self.capability, strict=True)
                if a is not None and a < floor * self.capability_base]

    def format(self) -> str:
        probed = bool(self.capability)
        rows = [f"layer {self.layer}",
                "   coef   judge  projection" + ("  capability  perplexity" if probed else "") + "  example"]
        for i, (c, s, p, texts) in enumerate(zip(self.coefs, self.scores, self.projections, self.samples,
                                                 strict=True)):
            judge = "   -  " if s is None else f"{s:6.1f}"
            example = texts[0].replace("\n", " ")[:70]
            cost = ""
            if probed:
                acc, ppl = self.capability[i], self.perplexity[i]
                cost = ("  " + ("         -" if acc is None else f"{100 * acc:9.1f}%")
                        + ("           -" if ppl is None else f"  {ppl:10.2f}"))
            rows.append(f"{c:7.2f}  {judge}  {p:10.2f}{cost}  {example}")
        if probed and self.capability_base is not None:
            drops = self.capability_drops()
            limit = f"{100 * CAPABILITY_FLOOR:.0f}% of unsteered ({100 * self.capability_base:.1f}%)"
            rows.append(f"capability below {limit} at coef {', '.join(f'{c:g}' for c in drops)}" if drops
                        else f"capability stays within {limit} at every coefficient")
        return "\n".join(rows)

    def is_monotonic(self, what: str = "scores") -> bool:
        values = [v for v in getattr(self, what) if v is not None]
        return bool(np.all(np.diff(values) >= 0))

    def plot(self, path: str | Path, title: str = "dose-response") -> Path:
        plt = pyplot()

        if self.capability:
            fig, (ax1, ax3) = plt.subplots(2, 1, figsize=(6, 7), sharex=True)
            self._plot_capability(ax3)
        else:
            fig, ax1 = plt.subplots(figsize=(6, 4))
        ax1.plot(self.coefs, self.projections, "o-", color="tab:blue", label="mean projection")
        ax1.set_xlabel("steering coefficient")
        ax1.set_ylabel("mean projection", color="tab:blue")
        if any(s is not None for s in self.scores):
            ax2 = ax1.twinx()
            ax2.plot(self.coefs, [np.nan if s is None else s for s in self.scores], "s--", color="tab:red")
            ax2.set_ylabel("judge score (0-100)", color="tab:red")
        ax1.set_title(f"{title} (layer {self.layer})")
        return save_figure(fig, path, dpi=100)

    def _plot_capability(self, ax: Any) -> None:
        acc = [np.nan if a is None else 100 * a for a in self.capability]
        ax.plot(self.coefs, acc, "o-", color="tab:green", label="capability accuracy")
        if self.capability_base is not None:
            ax.axhline(100 * CAPABILITY_FLOOR * self.capability_base, color="tab:green", ls=":", lw=1,
                       label=f"{100 * CAPABILITY_FLOOR:.0f}% of unsteered")
        ax.set_xlabel("steering coefficient")
        ax.set_ylabel("capability accuracy (%)", color="tab:green")
        ax.legend(loc="lower left", fontsize=8)
        if any(p is not None for p in self.perplexity):
            ax2 = ax.twinx()
            ax2.plot(self.coefs, [np.nan if p is None else p for p in self.perplexity], "s--", color="tab:purple")
            ax2.set_ylabel("held-out perplexity", color="tab:purple")


def dose_response(
    model,
    tokenizer,
    prompts: list[str],
    vectors,
    layer: int,
    coefs: list[float],
    *,
    readout: TraitReadout,
    judge=None,
    questions: list[str] | None = None,
    relative: bool = False,
    max_new_tokens: int = 48,
    plot_path: str | Path | None = None,
    capability: Callable[[list], Any] | None = None,
) -> DoseResponse:
    """Generate under each coefficient (add mode at ``layer``) and measure judge score and projection.

    Args:
        prompts: formatted prompts; ``questions`` (the raw user messages) go to the judge, default prompts.
        readout: read-out of the trait at ``layer`` (see ``steer.build_readout``).
        judge: anything with ``score_many``; None skips scoring.
        capability: called with each coefficient's ops (and once with none, the unsteered baseline), returns an
            object with ``accuracy`` and ``perplexity`` (``steerlib.evaluation.capability.CapabilityProbe``).
    """
    if not coefs:
        raise ValueError("no coefficients to compare: coefs is empty")
    coefs = [check_number(c, "dose-response coefficient") for c in coefs]  # all before the first generation
    questions = questions or prompts
    scores, projections, samples = [], [], []
    accuracy: list[float | None] = []
    perplexity: list[float | None] = []
    base = capability([]) if capability is not None else None
    for c in coefs:
        ops = build_ops(model, vectors, layer, c, relative=relative) if c != 0 else []
        outs = generate(model, tokenizer, prompts, steering=ops, readout=readout, max_new_tokens=max_new_tokens)
        texts = [g.text for g in outs]
        samples.append(texts)
        projections.append(float(np.mean([g.mean_projection() for g in outs])))
        if judge is not None:
            vals = [v for v in judge.score_many(list(zip(questions, texts, strict=True))) if v is not None]
            scores.append(float(np.mean(vals)) if vals else None)
        else:
            scores.append(None)
        if capability is not None:
            cost = capability(ops) if ops else base
            accuracy.append(cost.accuracy)
            perplexity.append(cost.perplexity)
    result = DoseResponse(list(coefs), scores, projections, samples, layer, accuracy, perplexity,
                          base.accuracy if base is not None else None)
    if plot_path is not None:
        result.plot(plot_path)
    return result
