"""Dose-response: how a trait score and its projection move with the steering coefficient."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from steerlib.core.checks import check_number
from steerlib.steering.generation import generate
from steerlib.steering.steer import TraitReadout, build_ops
from steerlib.store.plots import pyplot, save_figure


@dataclass
class DoseResponse:
    """Per coefficient: mean judge score (None without a judge) and mean projection over prompts."""

    coefs: list[float]
    scores: list[float | None]
    projections: list[float]
    samples: list[list[str]]
    layer: int

    def format(self) -> str:
        rows = [f"layer {self.layer}", "   coef   judge  projection  example"]
        for c, s, p, texts in zip(self.coefs, self.scores, self.projections, self.samples, strict=True):
            judge = "   -  " if s is None else f"{s:6.1f}"
            example = texts[0].replace("\n", " ")[:70]
            rows.append(f"{c:7.2f}  {judge}  {p:10.2f}  {example}")
        return "\n".join(rows)

    def is_monotonic(self, what: str = "scores") -> bool:
        values = [v for v in getattr(self, what) if v is not None]
        return bool(np.all(np.diff(values) >= 0))

    def plot(self, path: str | Path, title: str = "dose-response") -> Path:
        plt = pyplot()

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
) -> DoseResponse:
    """Generate under each coefficient (add mode at ``layer``) and measure judge score and projection.

    Args:
        prompts: formatted prompts; ``questions`` (the raw user messages) go to the judge, default prompts.
        readout: read-out of the trait at ``layer`` (see ``steer.build_readout``).
        judge: anything with ``score_many``; None skips scoring.
    """
    if not coefs:
        raise ValueError("no coefficients to compare: coefs is empty")
    coefs = [check_number(c, "dose-response coefficient") for c in coefs]  # all before the first generation
    questions = questions or prompts
    scores, projections, samples = [], [], []
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
    result = DoseResponse(list(coefs), scores, projections, samples, layer)
    if plot_path is not None:
        result.plot(plot_path)
    return result
