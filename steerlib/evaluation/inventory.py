"""A judge-free personality measure: a Likert inventory scored from next-token probabilities.

Each statement of the inventory is put to the model as a user message asking for a rating 1..5. Instead of
sampling an answer (noisy) or asking a judge (another model's opinion), the model's next-token distribution
right after the assistant's generation prompt is read at the five option tokens. The rating of an item is
the expected option value under those probabilities renormalised over the five options,

    E = sum_k k * p_k / sum_k p_k,           k = 1..5,

and a reverse-keyed item counts as ``6 - E``. A scale's score is the mean over its items, from 1 (low pole)
to 5 (high pole). Nothing is sampled, so the same model and steering give the same scores every time.

The built-in inventory (``steerlib/data/inventory/big_five.json``) was written for steerlib: eight
statements per Big Five scale, half reverse-keyed.

Steering: ``administer(..., steering=ops)`` applies ``SteerOp``s to the whole prompt (the read-out is the
next token after it), and ``inventory_matrix`` steers along each trait vector in turn to give the matrix of
effects on every scale.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import nn

from steerlib.core.capture import pad_batch
from steerlib.core.chat import format_prompt
from steerlib.core.loading import load_vectors
from steerlib.core.vectors import TraitVectors
from steerlib.steering.steer import ResidualEditor, SteerOp, build_ops
from steerlib.store.plots import pyplot, save_figure

KEYS = ("+", "-")


@dataclass(frozen=True)
class Item:
    """One statement: ``key`` is "+" when agreeing means a high score, "-" when it is reverse-keyed."""

    scale: str
    text: str
    key: str


@dataclass(frozen=True)
class Inventory:
    """A Likert inventory: statements grouped into scales, a prompt template and the answer options.

    Attributes:
        name: inventory name.
        items: every statement in file order.
        options: answer strings, lowest first (each must be one token for the model it is given to).
        template: user message with a ``{statement}`` slot.
        system: optional system prompt (None: the chat template's default).
    """

    name: str
    items: tuple[Item, ...]
    options: tuple[str, ...]
    template: str
    system: str | None = None

    @property
    def scales(self) -> tuple[str, ...]:
        """Scale names in the order they first appear."""
        return tuple(dict.fromkeys(it.scale for it in self.items))

    def question(self, item: Item) -> str:
        return self.template.replace("{statement}", item.text)

    @classmethod
    def load(cls, source: str | Path = "big_five") -> Inventory:
        """Load a built-in inventory by name or an inventory JSON file.

        Raises:
            ValueError: naming the file and the malformed field.
        """
        path = Path(source)
        if not path.suffix:
            builtin = resources.files("steerlib").joinpath("data", "inventory", f"{source}.json")
            if not builtin.is_file():
                raise ValueError(f"no built-in inventory {str(source)!r} (built-in: big_five)")
            text, where = builtin.read_text(), f"{source}.json"
        else:
            if not path.is_file():
                raise FileNotFoundError(f"no inventory file at {path}")
            text, where = path.read_text(), str(path)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not valid JSON ({exc})") from None
        return cls.from_dict(data, where)

    @classmethod
    def from_dict(cls, data: Mapping, where: str = "inventory") -> Inventory:
        for name in ("name", "options", "template", "scales"):
            if name not in data:
                raise ValueError(f"{where}: missing field {name!r}")
        options = tuple(data["options"])
        if len(options) < 2 or not all(isinstance(o, str) and o for o in options):
            raise ValueError(f"{where}: 'options' must list at least two non-empty strings")
        if "{statement}" not in data["template"]:
            raise ValueError(f"{where}: 'template' lacks the {{statement}} slot")
        items = []
        for scale, entries in data["scales"].items():
            if not entries:
                raise ValueError(f"{where}: scale {scale!r} has no items")
            for i, entry in enumerate(entries):
                if entry.get("key") not in KEYS or not str(entry.get("text", "")).strip():
                    raise ValueError(f"{where}: scale {scale!r} item {i} needs a non-empty 'text' and a 'key' of "
                                     f"'+' or '-', got {entry!r}")
                items.append(Item(scale, entry["text"], entry["key"]))
        return cls(data["name"], tuple(items), options, data["template"], data.get("system"))


@dataclass(frozen=True)
class InventoryResult:
    """Scores of one administration.

    Attributes:
        scales: scale name -> mean keyed rating (1..5).
        item_ratings: per item, the expected rating before keying (1..5).
        option_probs: [n_items, n_options] renormalised option probabilities.
        option_mass: per item, the raw probability mass on the options (low mass: the model wanted to say
            something else, and the rating means less).
    """

    inventory: Inventory
    scales: dict[str, float]
    item_ratings: tuple[float, ...]
    option_probs: torch.Tensor
    option_mass: tuple[float, ...]

    def format(self) -> str:
        rows = [f"{s:18s} {v:5.2f}" for s, v in self.scales.items()]
        rows.append(f"{'option mass':18s} {np.mean(self.option_mass):5.2f} (mean over items)")
        return "\n".join(rows)


def option_token_ids(tokenizer, options: Sequence[str]) -> list[int]:
    """The single token id of each answer option; raises when an option is not exactly one token."""
    ids = []
    for opt in options:
        toks = tokenizer(opt, add_special_tokens=False)["input_ids"]
        if len(toks) != 1:
            raise ValueError(f"answer option {opt!r} is {len(toks)} tokens for this tokenizer; inventory "
                             "options must be single tokens")
        ids.append(int(toks[0]))
    if len(set(ids)) != len(ids):
        raise ValueError(f"answer options {list(options)} do not map to distinct tokens")
    return ids


def keyed_score(ratings: Sequence[float], keys: Sequence[str], n_options: int) -> list[float]:
    """Apply reverse keying: a "-" item's rating r becomes (n_options + 1) - r."""
    return [r if k == "+" else (n_options + 1) - r for r, k in zip(ratings, keys, strict=True)]


@torch.inference_mode()
def _option_probs(model: nn.Module, tokenizer, prompts: list[str], option_ids: list[int],
                  steering: Sequence[SteerOp], batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token probabilities after each prompt at the option tokens: ([N, K] renormalised, [N] raw mass)."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    ids_t = torch.tensor(option_ids)
    probs, mass = [], []
    encoded = [list(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    for start in range(0, len(encoded), batch_size):
        ids, mask, positions, _ = pad_batch(encoded[start:start + batch_size], pad_id, "left")
        with ResidualEditor(model, steering):
            # Explicit position ids: a left-padded row then reads exactly as it would alone.
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                           position_ids=positions.to(device), use_cache=False).logits[:, -1]
        p = torch.softmax(logits.float().cpu(), dim=-1)[:, ids_t]  # [B, K]
        m = p.sum(-1)
        probs.append(p / m.unsqueeze(-1))
        mass.append(m)
    return torch.cat(probs), torch.cat(mass)


def administer(
    model: nn.Module,
    tokenizer,
    inventory: Inventory | str | Path = "big_five",
    *,
    steering: Sequence[SteerOp] = (),
    batch_size: int = 16,
) -> InventoryResult:
    """Give the model every item of ``inventory`` and score it from the option probabilities.

    Args:
        model: HF causal LM.
        tokenizer: its tokenizer (with a chat template).
        inventory: an ``Inventory``, a built-in name or a JSON path.
        steering: ``SteerOp``s active while the items are read (see ``steerlib.steering.steer.build_ops``).
        batch_size: items per forward pass.
    """
    inv = inventory if isinstance(inventory, Inventory) else Inventory.load(inventory)
    option_ids = option_token_ids(tokenizer, inv.options)
    prompts = [format_prompt(tokenizer, inv.question(it), inv.system) for it in inv.items]
    probs, mass = _option_probs(model, tokenizer, prompts, option_ids, steering, batch_size)
    values = torch.arange(1, len(inv.options) + 1, dtype=torch.float32)
    ratings = (probs * values).sum(-1).tolist()
    keyed = keyed_score(ratings, [it.key for it in inv.items], len(inv.options))
    scales = {s: float(np.mean([k for k, it in zip(keyed, inv.items, strict=True) if it.scale == s]))
              for s in inv.scales}
    return InventoryResult(inv, scales, tuple(ratings), probs, tuple(mass.tolist()))


@dataclass(frozen=True)
class InventoryMatrix:
    """Effect of steering along each vector on each scale.

    Attributes:
        vectors: names of the steering vectors (rows).
        scales: inventory scales (columns).
        baseline: unsteered scale scores.
        steered: per vector, scale scores while steering with ``+coef``.
        effects: [n_vectors, n_scales] steered - baseline.
        coef: the coefficient used (relative to the residual norm when ``relative``).
        relative: whether ``coef`` was relative.
        layers: steering layer of each vector.
        diagnostics: unsteered ``option_mass`` (mean probability on the options: low means the model mostly
            wanted to say something else) and ``rating_sd`` (spread of the raw item ratings: near 0 means the
            model rates every statement alike, so keyed scales sit near the midpoint whatever is steered).
    """

    vectors: tuple[str, ...]
    scales: tuple[str, ...]
    baseline: dict[str, float]
    steered: dict[str, dict[str, float]]
    effects: np.ndarray
    coef: float
    relative: bool
    layers: tuple[int, ...]
    diagnostics: dict[str, float] = field(default_factory=dict)

    def own_scale_largest(self) -> dict[str, bool]:
        """For each vector named like a scale: does it move its own scale more (in absolute value) than any other?"""
        out = {}
        for i, v in enumerate(self.vectors):
            if v in self.scales:
                j = self.scales.index(v)
                out[v] = bool(abs(self.effects[i, j]) >= np.abs(self.effects[i]).max())
        return out

    def format(self) -> str:
        head = "vector \\ scale    " + " ".join(f"{s[:8]:>8s}" for s in self.scales)
        rows = [head, "baseline          " + " ".join(f"{self.baseline[s]:8.2f}" for s in self.scales)]
        for i, v in enumerate(self.vectors):
            rows.append(f"{v[:17]:17s} " + " ".join(f"{x:+8.2f}" for x in self.effects[i]))
        kind = "x typical residual norm" if self.relative else "(raw)"
        rows.append(f"coef {self.coef:g} {kind}; layers {list(self.layers)}")
        if self.diagnostics:
            rows.append(", ".join(f"{k} {v:.3f}" for k, v in self.diagnostics.items()) + " (unsteered)")
        return "\n".join(rows)

    def to_dict(self) -> dict:
        return {"vectors": list(self.vectors), "scales": list(self.scales), "baseline": self.baseline,
                "steered": self.steered, "effects": self.effects.tolist(), "coef": self.coef,
                "relative": self.relative, "layers": list(self.layers), "diagnostics": self.diagnostics}

    @classmethod
    def from_dict(cls, data: Mapping) -> InventoryMatrix:
        return cls(tuple(data["vectors"]), tuple(data["scales"]), dict(data["baseline"]), dict(data["steered"]),
                   np.asarray(data["effects"], dtype=float), float(data["coef"]), bool(data["relative"]),
                   tuple(data["layers"]), dict(data.get("diagnostics", {})))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> InventoryMatrix:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no inventory matrix at {path}")
        return cls.from_dict(json.loads(path.read_text()))

    def plot(self, path: str | Path, title: str = "inventory: effect of steering") -> Path:
        plt = pyplot()

        lim = max(float(np.abs(self.effects).max()), 1e-3)
        fig, ax = plt.subplots(figsize=(1.2 * len(self.scales) + 2.5, 0.7 * len(self.vectors) + 1.8))
        im = ax.imshow(self.effects, cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set_xticks(range(len(self.scales)), self.scales, rotation=30, ha="right")
        ax.set_yticks(range(len(self.vectors)), self.vectors)
        for i in range(len(self.vectors)):
            for j in range(len(self.scales)):
                ax.text(j, i, f"{self.effects[i, j]:+.2f}", ha="center", va="center", fontsize=9)
        ax.set_xlabel("scale (change in score, 1-5 Likert)")
        ax.set_ylabel("steering vector")
        fig.colorbar(im, ax=ax, shrink=0.8)
        ax.set_title(title)
        return save_figure(fig, path, dpi=100)


def inventory_matrix(
    model: nn.Module,
    tokenizer,
    vectors: Mapping[str, TraitVectors | str | Path],
    *,
    inventory: Inventory | str | Path = "big_five",
    coef: float = 0.5,
    relative: bool = True,
    layer: int | None = None,
    batch_size: int = 16,
) -> InventoryMatrix:
    """Steer along each vector in turn and measure the change on every scale of the inventory.

    Args:
        model: HF causal LM.
        tokenizer: its tokenizer.
        vectors: row name -> trait vectors (TraitVectors or a saved folder); name rows after the scales
            (e.g. "openness") so ``own_scale_largest`` can match them.
        inventory: the inventory to administer.
        coef: steering coefficient; with ``relative`` a fraction of the typical residual norm at the layer,
            which puts vectors of different norms on one footing.
        relative: see ``coef``.
        layer: steering layer for every vector (default: each vector's recommended layer).
        batch_size: items per forward pass.
    """
    if not vectors:
        raise ValueError("no steering vectors given for the inventory matrix")
    inv = inventory if isinstance(inventory, Inventory) else Inventory.load(inventory)
    loaded = {name: load_vectors(v, model) if isinstance(v, str | Path) else v
              for name, v in vectors.items()}
    # Build every op first, so a bad vector fails before any forward pass.
    ops = {name: build_ops(model, tv, layer, coef, relative=relative) for name, tv in loaded.items()}
    base = administer(model, tokenizer, inv, batch_size=batch_size)
    steered = {name: administer(model, tokenizer, inv, steering=o, batch_size=batch_size).scales
               for name, o in ops.items()}
    scales = inv.scales
    effects = np.array([[steered[n][s] - base.scales[s] for s in scales] for n in loaded])
    diagnostics = {"option_mass": float(np.mean(base.option_mass)), "rating_sd": float(np.std(base.item_ratings))}
    return InventoryMatrix(tuple(loaded), scales, base.scales, steered, effects, float(coef), relative,
                           tuple(o[0].layer for o in ops.values()), diagnostics)
