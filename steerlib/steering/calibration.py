"""Calibrated bounds: where a trait's projection normally lies, per layer, so a cap can say "at percentile p".

``calibrate`` runs the model, unsteered and greedy, over a reference set of ordinary assistant questions shipped
with steerlib (``steerlib/data/reference_conversations.json``), captures the residual stream of its own answers
with the one capture path (``steerlib.core.capture``), and records per layer the percentiles 0..100 of the
per-token projection of the response tokens on the trait's unit direction. The result is saved beside the
vectors (``<vectors folder>/calibration.json``; the per-answer records in ``calibration.jsonl`` make the run
resumable through ``steerlib.store.results``), and it names the model it was measured on: loading it for another
model is refused.

A cap is then "percentile p over layers a..b" (``Percentile``, ``calibrated_cap``): ``side="max"`` caps the
projection from above at the p-th percentile of the normal range (``cap_max = q_p``), ``side="min"`` floors it
(``cap_min = q_p``). Capping trait T from above at p is the same as flooring -T at 100 - p. Percentiles between
the recorded integers are interpolated linearly.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from steerlib.core.arch import get_layout
from steerlib.core.capture import capture_activations
from steerlib.core.chat import format_prompt
from steerlib.core.checks import check_int
from steerlib.core.loading import load_vectors, resolve_vector
from steerlib.core.models import unwrap_model
from steerlib.core.pipeline import pipeline_engine
from steerlib.core.vectors import TraitVectors, VectorSource
from steerlib.steering.generation import GenerateTexts, generate
from steerlib.steering.steer import Positions, SteerOp
from steerlib.store.results import ResultsStore, fingerprint_tensor

__all__ = ["CALIBRATION_FILE", "Calibration", "Percentile", "calibrate", "calibrated_cap", "calibration_path",
           "model_identity", "reference_questions"]

CALIBRATION_FILE = "calibration.json"
RECORDS_FILE = "calibration.jsonl"
REFERENCE_FILE = "reference_conversations.json"
PERCENTILES = tuple(range(101))
Side = Literal["max", "min"]


def reference_questions() -> list[str]:
    """The shipped reference questions (ordinary assistant requests written for steerlib)."""
    text = resources.files("steerlib").joinpath("data", REFERENCE_FILE).read_text(encoding="utf-8")
    return list(json.loads(text)["questions"])


def model_identity(model: nn.Module, name: str | None = None) -> dict:
    """What a calibration must match: the architecture's shape and a fingerprint of the weights.

    The fingerprint hashes the first 64 values of every parameter (in name order), so it is cheap for any model
    size yet changes with a finetune, a different checkpoint or a different dtype.

    Args:
        model: the model.
        name: a display name to record beside the identity (not compared).

    Returns:
        ``{"name", "model_type", "n_layers", "d_model", "weights"}``.
    """
    model = unwrap_model(model)
    layout = get_layout(model)
    digest = hashlib.sha256()
    for pname, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        digest.update(pname.encode())
        digest.update(param.detach().reshape(-1)[:64].float().cpu().numpy().tobytes())
    config = getattr(model, "config", None)
    return {"name": name or str(getattr(config, "name_or_path", "") or type(model).__name__),
            "model_type": str(getattr(config, "model_type", type(model).__name__)),
            "n_layers": layout.n_layers, "d_model": layout.d_model, "weights": digest.hexdigest()[:16]}


def _same_model(a: dict, b: dict) -> bool:
    return all(a.get(k) == b.get(k) for k in ("model_type", "n_layers", "d_model", "weights"))


def calibration_path(vectors_path: str | Path) -> Path:
    """Where the calibration of the vectors at ``vectors_path`` lives: in their folder, or beside their file."""
    path = Path(vectors_path)
    if path.is_dir():
        return path / CALIBRATION_FILE
    return path.with_name(f"{path.stem}.{CALIBRATION_FILE}")


@dataclass(frozen=True)
class Percentile:
    """A bound given as a percentile of the calibrated normal range.

    Attributes:
        value: the percentile, 0..100.
        side: ``"max"`` caps the projection from above at it, ``"min"`` floors it there.
    """

    value: float
    side: Side = "max"

    def __post_init__(self) -> None:
        if isinstance(self.value, bool) or not isinstance(self.value, int | float) or not 0 <= self.value <= 100:
            raise ValueError(f"percentile must be a number in 0..100, got {self.value!r}")
        if self.side not in ("max", "min"):
            raise ValueError(f"percentile side must be 'max' or 'min', got {self.side!r}")


@dataclass(frozen=True)
class Calibration:
    """Per-layer percentiles of a trait's per-token projection over the reference answers.

    Attributes:
        trait: the trait's name.
        model: ``model_identity`` of the model it was measured on.
        vector: fingerprint of the unit directions it was measured with, at the calibrated layers.
        kind: pooling kind of the vectors used.
        percentiles: layer -> 101 values (percentiles 0..100) of the projection on the unit direction.
        n_tokens: response tokens measured (per layer, the same for all).
        n_answers: reference answers measured.
    """

    trait: str
    model: dict
    vector: str
    kind: str | None
    percentiles: dict[int, tuple[float, ...]]
    n_tokens: int
    n_answers: int

    @property
    def layers(self) -> list[int]:
        """Calibrated layers, ascending."""
        return sorted(self.percentiles)

    def value(self, layer: int, percentile: float) -> float:
        """The projection at ``percentile`` (0..100) of the normal range at ``layer``, interpolated linearly."""
        Percentile(percentile)
        if layer not in self.percentiles:
            raise ValueError(f"layer {layer} was not calibrated (calibrated layers: {_ranges(self.layers)})")
        table = self.percentiles[layer]
        lo = math.floor(percentile)
        if lo >= 100:
            return float(table[100])
        frac = percentile - lo
        return float(table[lo] + (table[lo + 1] - table[lo]) * frac)

    def check_model(self, model: nn.Module, where: str | Path = "calibration") -> None:
        """Refuse a model other than the one this calibration was measured on."""
        ident = model_identity(model)
        if not _same_model(self.model, ident):
            raise ValueError(f"{where} was measured on model {self.model.get('name')!r} "
                             f"({self.model.get('model_type')}, weights {self.model.get('weights')}), not on this "
                             f"model ({ident['model_type']}, weights {ident['weights']}); run calibrate for it")

    def save(self, path: str | Path) -> Path:
        """Write as JSON; returns the path."""
        path = Path(path)
        data = {"trait": self.trait, "model": self.model, "vector": self.vector, "kind": self.kind,
                "n_tokens": self.n_tokens, "n_answers": self.n_answers, "percentiles_of": "per-token projection "
                "of response tokens on the unit trait direction", "percentiles": {
                    str(layer): [round(v, 6) for v in values] for layer, values in sorted(self.percentiles.items())}}
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, model: nn.Module | None = None) -> Calibration:
        """Read a saved calibration (a ``calibration.json``, or the vectors folder holding one).

        Args:
            path: the file, or a vectors folder / file beside which it was saved.
            model: when given, refuse the calibration unless it was measured on this model.
        """
        path = Path(path)
        if path.suffix != ".json" or path.name == "vectors.json":
            path = calibration_path(path if path.name != "vectors.json" else path.parent)
        if not path.is_file():
            raise FileNotFoundError(f"no calibration at {path}; run `steerlib calibrate --vector ...` first")
        try:
            data = json.loads(path.read_text())
            percentiles = {int(k): tuple(float(x) for x in v) for k, v in data["percentiles"].items()}
            cal = cls(trait=str(data["trait"]), model=dict(data["model"]), vector=str(data["vector"]),
                      kind=data.get("kind"), percentiles=percentiles, n_tokens=int(data["n_tokens"]),
                      n_answers=int(data["n_answers"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: not a steerlib calibration file ({type(exc).__name__}: {exc})") from None
        for layer, values in cal.percentiles.items():
            if len(values) != len(PERCENTILES) or any(b < a for a, b in zip(values, values[1:], strict=False)):
                raise ValueError(f"{path}: layer {layer} must list 101 non-decreasing percentiles")
        if model is not None:
            cal.check_model(model, path)
        return cal


def _ranges(layers: Sequence[int]) -> str:
    return ", ".join(str(x) for x in layers) if len(layers) < 6 else f"{layers[0]}..{layers[-1]}"


def _vectors_fingerprint(source: TraitVectors | Tensor, layers: Sequence[int], kind: str | None, d: int) -> str:
    """A fingerprint of the unit directions (a rescaled vector has the same projections, so it matches)."""
    rows = torch.stack([resolve_vector(source, layer, kind=kind, d_model=d).float() for layer in layers])
    # Rounded so that a rescaling's last-bit noise does not change the fingerprint.
    return fingerprint_tensor(torch.round(rows / rows.norm(dim=-1, keepdim=True) * 1e5))


def calibrate(
    model: nn.Module,
    tokenizer,
    vectors: VectorSource,
    out_path: str | Path,
    *,
    layers: Sequence[int] | None = None,
    kind: str | None = None,
    questions: Sequence[str] | None = None,
    max_new_tokens: int = 48,
    batch_size: int = 8,
    resume: bool = True,
    model_name: str | None = None,
    trait: str | None = None,
    generate_texts: GenerateTexts | None = None,
) -> Calibration:
    """Measure the normal range of a trait's projection, per layer, on the model's own ordinary answers.

    Resumable: rerun the same call after an interruption and only the missing answers are generated. Resuming
    under other settings (another model, vectors, layers or questions) is refused, naming what changed.

    Args:
        model: HF causal LM.
        tokenizer: its tokenizer.
        vectors: the trait vectors (anything ``load_vectors`` accepts).
        out_path: the ``calibration.json`` to write (its ``.jsonl`` records go beside it).
        layers: layers to calibrate (default: every block output 1..n_layers).
        kind: pooling kind of TraitVectors to use (default: the vectors' default).
        questions: user questions (default: the shipped reference set).
        max_new_tokens: length of each reference answer.
        batch_size: answers generated and captured per step (also the resume granularity).
        resume: reuse answers already recorded in the ``.jsonl``; False starts afresh.
        model_name: recorded beside the model identity (display only).
        trait: name recorded in the calibration (default: the vectors' trait).
        generate_texts: another generator of the answers (``(prompts, max_new_tokens, temperature, seed) ->
            texts``); a ``steerlib.core.pipeline.PipelineEngine`` (vLLM's) gets every missing answer in one
            submission, and each ``batch_size`` of them is captured and stored as they arrive. The per-token
            projections are captured on ``model``.

    Returns:
        The ``Calibration`` (also saved to ``out_path``).
    """
    layout = get_layout(model)
    source = load_vectors(vectors, model)
    layers = [layout.check_layer(x, allow_embeddings=False) for x in (layers or range(1, layout.n_layers + 1))]
    layers = sorted(set(layers))
    questions = list(questions) if questions is not None else reference_questions()
    if not questions:
        raise ValueError("no reference questions to calibrate on")
    check_int(max_new_tokens, "max_new_tokens")
    check_int(batch_size, "batch_size")
    trait = trait or (source.trait if isinstance(source, TraitVectors) else "trait")
    units = torch.stack([resolve_vector(source, layer, kind=kind, d_model=layout.d_model).float()
                         for layer in layers])
    units = units / units.norm(dim=-1, keepdim=True)
    identity = model_identity(model, model_name)
    vector_fp = _vectors_fingerprint(source, layers, kind, layout.d_model)
    out_path = Path(out_path)
    settings = {"model": {k: identity[k] for k in ("model_type", "n_layers", "d_model", "weights")},
                "vector": vector_fp, "kind": kind, "layers": layers, "max_new_tokens": max_new_tokens,
                "questions": hashlib.sha256("\x00".join(questions).encode()).hexdigest()[:16]}
    store = ResultsStore(out_path.with_name(out_path.stem + ".jsonl"), settings, resume=resume)
    done = {int(k) for k in store.by_key("id")}
    todo = [i for i in range(len(questions)) if i not in done]
    for idx, texts in _answered(model, tokenizer, questions, todo, max_new_tokens, batch_size, generate_texts):
        prompts = [format_prompt(tokenizer, questions[i]) for i in idx]
        answers = [t if t.strip() else None for t in texts]  # an empty answer has no tokens to measure
        acts = capture_activations(model, tokenizer, prompts, answers, layers, batch_size=len(idx), keep_tokens=True)
        records = []
        for row, i in enumerate(idx):
            tokens = acts.tokens[row]  # [n_layers, seq, D]
            p_len = acts.prompt_lengths[row]
            proj = torch.einsum("lsd,ld->ls", tokens[:, p_len:].float(), units)  # [n_layers, response tokens]
            records.append({"id": i, "response": answers[row] or "", "proj": [[round(float(x), 5) for x in lay]
                                                                        for lay in proj]})
        store.append(records)
    by_id = store.by_key("id")
    values = [torch.cat([torch.tensor(by_id[str(i)]["proj"][li], dtype=torch.float64) for i in range(len(questions))])
              for li in range(len(layers))]
    if values[0].numel() == 0:
        raise ValueError("the reference answers are all empty: nothing to calibrate on")
    q = torch.tensor(PERCENTILES, dtype=torch.float64) / 100
    percentiles = {layer: tuple(float(x) for x in torch.quantile(vals, q)) for layer, vals in zip(layers, values,
                                                                                                   strict=True)}
    cal = Calibration(trait=trait, model=identity, vector=vector_fp, kind=kind, percentiles=percentiles,
                      n_tokens=int(values[0].numel()), n_answers=len(questions))
    cal.save(out_path)
    return cal


def _answered(model, tokenizer, questions: Sequence[str], todo: list[int], max_new_tokens: int, batch_size: int,
              generate_texts: GenerateTexts | None) -> Iterator[tuple[list[int], list[str]]]:
    """``(question ids, greedy answers)`` in groups of ``batch_size``: from an engine's one submission as they
    finish, else generated a batch at a time."""
    engine = pipeline_engine(generate_texts)
    if engine is not None and todo:
        engine.start(len(todo) * max_new_tokens)
        ready: list[tuple[int, str]] = []
        for finished in engine.stream([format_prompt(tokenizer, questions[i]) for i in todo], max_new_tokens):
            ready.extend((todo[k], text) for k, text in finished)
            while len(ready) >= batch_size:
                group, ready = ready[:batch_size], ready[batch_size:]
                yield [i for i, _ in group], [t for _, t in group]
        if ready:
            yield [i for i, _ in ready], [t for _, t in ready]
        return
    for start in range(0, len(todo), batch_size):
        idx = todo[start:start + batch_size]
        prompts = [format_prompt(tokenizer, questions[i]) for i in idx]
        if generate_texts is not None:
            yield idx, list(generate_texts(prompts, max_new_tokens, 0.0, None))
        else:
            yield idx, [g.text for g in generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                                 batch_size=len(idx))]


def calibrated_cap(
    model: nn.Module,
    vectors: VectorSource,
    calibration: Calibration | str | Path,
    percentile: Percentile | float,
    layers: int | Sequence[int],
    *,
    positions: Positions = "all",
) -> list[SteerOp]:
    """Cap ops "trait at percentile p over layers a..b": one ``cap`` ``SteerOp`` per layer.

    Args:
        model: the model (the calibration must have been measured on it).
        vectors: the trait vectors the calibration was measured with.
        calibration: a ``Calibration`` or the path it was saved to (or the vectors path beside it).
        percentile: a ``Percentile``, or a number (an upper cap at that percentile).
        layers: the layers to cap, each calibrated.
        positions: which tokens the caps touch.

    Returns:
        ``SteerOp`` s with ``mode="cap"`` and ``cap_max`` (side ``max``) or ``cap_min`` (side ``min``) set to the
        calibrated value at each layer.
    """
    pct = percentile if isinstance(percentile, Percentile) else Percentile(percentile)
    cal = calibration if isinstance(calibration, Calibration) else Calibration.load(calibration)
    cal.check_model(model)
    layout = get_layout(model)
    source = load_vectors(vectors, model)
    chosen = [layers] if isinstance(layers, int) else list(layers)
    if not chosen:
        raise ValueError("no layers to cap")
    chosen = [layout.check_layer(x, allow_embeddings=False) for x in chosen]
    if _vectors_fingerprint(source, cal.layers, cal.kind, layout.d_model) != cal.vector:
        raise ValueError(f"these vectors are not the ones the calibration of {cal.trait!r} was measured with; "
                         "calibrate them first")
    ops = []
    for layer in chosen:
        vec = resolve_vector(source, layer, kind=cal.kind, d_model=layout.d_model)
        bound = cal.value(layer, pct.value)
        ops.append(SteerOp(layer=layer, vector=vec, mode="cap", cap_max=bound if pct.side == "max" else None,
                           cap_min=bound if pct.side == "min" else None, positions=positions))
    return ops
