"""Where does a trait live? Per-layer separation, probes, PCA, and the recommended steering layer.

All functions take activations as tensors [N, n_layers, d_model] plus boolean labels (True = trait
expressed, i.e. generated under the positive instruction and kept by the judge).

Recommended layer rule (stored in the vectors' metadata): among the middle layers, from 25% to 75% of the
depth, take the one whose held-out projections separate positive from negative responses best by Cohen's
d (on the extraction set when no held-out set is given). Middle layers are where the paper and our own
runs find steering effective; late layers often separate as well but steer the text less.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from steerlib.store.plots import pyplot, save_figure


def cohens_d(pos: np.ndarray, neg: np.ndarray) -> float:
    """Standardised mean difference with the pooled standard deviation."""
    n1, n2 = len(pos), len(neg)
    if n1 < 2 or n2 < 2:
        return float("nan")
    pooled = ((n1 - 1) * pos.var(ddof=1) + (n2 - 1) * neg.var(ddof=1)) / (n1 + n2 - 2)
    return float((pos.mean() - neg.mean()) / max(np.sqrt(pooled), 1e-12))


def project(acts: Tensor, vectors: Tensor) -> Tensor:
    """Projection of [N, L, D] activations on the unit per-layer directions [L, D] -> [N, L]."""
    unit = vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return torch.einsum("nld,ld->nl", acts.float(), unit.float())


def mean_difference(acts: Tensor, labels: Tensor) -> Tensor:
    """mean(positive) - mean(negative) per layer: [L, D]."""
    _check_labels(labels)
    return acts[labels].float().mean(0) - acts[~labels].float().mean(0)


def pca_direction(pos: Tensor, neg: Tensor, reference: Tensor | None = None) -> Tensor:
    """First principal component of paired differences pos_i - neg_i per layer, [L, D].

    Sign is aligned with ``reference`` (e.g. the mean difference) and the norm set to the mean difference's,
    so coefficients mean the same thing for either method.
    """
    diffs = (pos - neg).float()  # [P, L, D]
    if diffs.shape[0] < 2:
        raise ValueError("PCA needs at least 2 paired differences")
    out = []
    for layer in range(diffs.shape[1]):
        x = diffs[:, layer]
        # Uncentred: the mean difference is the signal we want the first component to carry.
        _, _, v = torch.linalg.svd(x, full_matrices=False)
        direction = v[0]
        ref = reference[layer] if reference is not None else x.mean(0)
        if torch.dot(direction, ref) < 0:
            direction = -direction
        out.append(direction * ref.norm())
    return torch.stack(out)


@dataclass
class ProbeResult:
    directions: Tensor  # [L, D] probe weights, scaled to the mean difference's norm
    train_accuracy: list[float]
    heldout_accuracy: list[float | None]


def fit_probes(
    acts: Tensor, labels: Tensor, heldout: Tensor | None = None, heldout_labels: Tensor | None = None,
    reference: Tensor | None = None, C: float = 1.0,
) -> ProbeResult:
    """A logistic-regression probe per layer; held-out accuracy when a held-out set is given."""
    # scikit-learn takes ~1.5 s to import: only when fitting.
    from sklearn.linear_model import LogisticRegression

    _check_labels(labels)
    y = labels.numpy().astype(int)
    dirs, train_acc, held_acc = [], [], []
    for layer in range(acts.shape[1]):
        x = acts[:, layer].float().numpy()
        # Standardise so C means the same at every layer despite norms growing with depth.
        mu, sd = x.mean(0), x.std(0) + 1e-6
        clf = LogisticRegression(C=C, max_iter=2000).fit((x - mu) / sd, y)
        w = torch.from_numpy(clf.coef_[0] / sd).float()  # back to the raw activation space
        ref = reference[layer] if reference is not None else None
        dirs.append(w / w.norm() * (ref.norm() if ref is not None else 1.0))
        train_acc.append(float(clf.score((x - mu) / sd, y)))
        if heldout is not None and heldout_labels is not None and len(heldout_labels):
            xh = heldout[:, layer].float().numpy()
            held_acc.append(float(clf.score((xh - mu) / sd, heldout_labels.numpy().astype(int))))
        else:
            held_acc.append(None)
    return ProbeResult(torch.stack(dirs), train_acc, held_acc)


@dataclass
class LayerSweep:
    """Per-layer separation of positive vs negative responses along the trait vector."""

    layers: list[int]
    cohens_d: list[float]
    auroc: list[float]
    probe_accuracy: list[float | None]
    evaluated_on: str  # "heldout" or "extraction"
    recommended_layer: int

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    def table(self) -> str:
        rows = ["layer  cohen_d  auroc  probe_acc"]
        for i, layer in enumerate(self.layers):
            acc = self.probe_accuracy[i]
            mark = "  <- recommended" if layer == self.recommended_layer else ""
            rows.append(f"{layer:5d}  {self.cohens_d[i]:7.2f}  {self.auroc[i]:5.3f}  "
                        f"{'  -  ' if acc is None else f'{acc:5.3f}'}{mark}")
        return "\n".join(rows)

    def plot(self, path: str | Path, title: str = "") -> Path:
        plt = pyplot()

        fig, ax1 = plt.subplots(figsize=(8, 4))
        ax1.plot(self.layers, self.cohens_d, "o-", color="tab:blue", label="Cohen's d")
        ax1.set_xlabel("layer (0 = embeddings)")
        ax1.set_ylabel("Cohen's d", color="tab:blue")
        ax2 = ax1.twinx()
        ax2.plot(self.layers, self.auroc, "s--", color="tab:orange", label="AUROC")
        accs = [a if a is not None else np.nan for a in self.probe_accuracy]
        ax2.plot(self.layers, accs, "^:", color="tab:green", label="probe accuracy")
        ax2.set_ylabel("AUROC / probe accuracy")
        ax2.set_ylim(0.0, 1.05)
        ax1.axvline(self.recommended_layer, color="gray", alpha=0.5, label=f"recommended ({self.recommended_layer})")
        lines = ax1.get_lines() + ax2.get_lines()
        ax1.legend(lines, [line.get_label() for line in lines], loc="lower right")
        ax1.set_title(title or f"layer sweep ({self.evaluated_on} responses)")
        return save_figure(fig, path, dpi=100)


def recommend_layer(layers: list[int], scores: list[float], n_layers: int) -> int:
    """The best-scoring layer within 25%..75% of the depth (see module docstring)."""
    lo, hi = max(1, round(0.25 * n_layers)), round(0.75 * n_layers)
    candidates = [(s, -layer) for layer, s in zip(layers, scores, strict=True) if lo <= layer <= hi and np.isfinite(s)]
    if not candidates:
        candidates = [(s, -layer) for layer, s in zip(layers, scores, strict=True) if np.isfinite(s)]
    if not candidates:
        raise ValueError("no layer has a finite separation score")
    return -max(candidates)[1]


def layer_sweep(
    vectors: Tensor,
    layers: list[int],
    n_layers: int,
    acts: Tensor,
    labels: Tensor,
    probe_accuracy: list[float | None] | None = None,
    heldout: bool = True,
) -> LayerSweep:
    """Separation along ``vectors`` [L, D] of ``acts`` [N, L, D] with boolean ``labels``."""
    from sklearn.metrics import roc_auc_score  # scikit-learn is ~1.5 s to import: only on use

    _check_labels(labels)
    proj = project(acts, vectors).numpy()
    y = labels.numpy()
    ds = [cohens_d(proj[y, i], proj[~y, i]) for i in range(len(layers))]
    aucs = [float(roc_auc_score(y, proj[:, i])) for i in range(len(layers))]
    return LayerSweep(
        layers=list(layers),
        cohens_d=ds,
        auroc=aucs,
        probe_accuracy=probe_accuracy or [None] * len(layers),
        evaluated_on="heldout" if heldout else "extraction",
        recommended_layer=recommend_layer(list(layers), ds, n_layers),
    )


def _check_labels(labels: Tensor) -> None:
    if labels.dtype != torch.bool:
        raise ValueError(f"labels must be a bool tensor, got {labels.dtype}")
    if labels.all() or (~labels).all():
        raise ValueError("need both positive and negative samples (after filtering one side is empty)")
