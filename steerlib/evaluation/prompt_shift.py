"""Does the last prompt token predict the trait of the answer? The prompt-induced shift experiment.

Persona Vectors (section 3.3) claims that the projection of the last prompt token on a trait vector, read
before any token is generated, predicts how strongly the answer will express the trait. This module tests
that claim for one trait and one set of vectors:

1. a ladder of system prompts from the trait's instruction pair: the full negative instruction, a softened
   negative one, no system prompt, a softened positive one, the full positive instruction;
2. many-shot prompts: k = 1, 2, 4, 8 earlier turns whose answers express the trait (and, by default, k
   turns whose answers express its opposite); k = 0 is the no-system-prompt rung of the ladder. The example
   answers are the model's own, generated under the full positive (negative) instruction on extraction
   questions, so they are disjoint from the evaluation questions asked afterwards;
3. every condition answers the same held-out evaluation questions (greedy); the trait judge scores each
   answer, and the last-prompt-token projection is read at every layer during the same generation;
4. per layer, Pearson r between projection and score, over condition means (one point per condition, as a
   monitor would be calibrated) and over single responses.

Every generation is written, with its score and per-layer projections, to ``records.jsonl`` in the output
folder as soon as its batch is done (the resumable results file of ``steerlib.finetuning.flag.scoring``): a killed run
resumes, and a run with different settings is refused instead of mixed in.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn
from tqdm.auto import tqdm

from steerlib.core.arch import get_layout
from steerlib.core.chat import format_messages
from steerlib.core.loading import load_vectors
from steerlib.core.vectors import TraitVectors
from steerlib.steering.generation import generate
from steerlib.steering.steer import build_readout
from steerlib.store.plots import pyplot, save_figure
from steerlib.store.results import ResultsStore
from steerlib.traits.library import Trait, load_trait

RECORDS_FILE = "records.jsonl"
SUMMARY_FILE = "shiftcheck.json"
DEFAULT_SHOTS = (0, 1, 2, 4, 8)
# Appended to an instruction to make the half-strength rung of the ladder.
SOFTENER = " Keep this mild: let it show only a little, and otherwise answer normally."


@dataclass(frozen=True)
class Condition:
    """One way of prompting: a system prompt and/or k in-context example turns.

    Attributes:
        name: short label, e.g. ``"system -1.0"`` or ``"shots +4"``.
        family: "system" or "shots".
        level: signed strength: -1..1 for the system ladder, +-k for k positive/negative example turns.
        system: system prompt (None: the chat template's default).
        shots: number of example turns; ``shot_polarity`` says whose answers they are.
        shot_polarity: "pos" or "neg" (ignored when shots == 0).
    """

    name: str
    family: str
    level: float
    system: str | None = None
    shots: int = 0
    shot_polarity: str = "pos"


@dataclass(frozen=True)
class ConditionPoint:
    """A condition's means over the questions: judge score and last-prompt-token projection per layer."""

    name: str
    family: str
    level: float
    n: int
    mean_score: float
    mean_projection: tuple[float, ...]  # one per layer of ShiftCheck.layers


@dataclass(frozen=True)
class ShiftCheck:
    """Result of ``prompt_shift``.

    Attributes:
        trait: trait name.
        layers: layers read (1..n_layers).
        r: per layer, Pearson r between condition-mean projection and condition-mean score.
        r_responses: per layer, Pearson r over single responses.
        r_family: per family ("system", "shots"), per layer r over that family's condition means (NaN when
            it has fewer than 3 conditions): the ladders separately, since prompt length alone moves the
            last token's projection in the many-shot family.
        best_layer: layer with the highest ``r``.
        best_r: ``r`` at ``best_layer``.
        conditions: per-condition points.
        responses: per response: condition, question index, score, projections (per layer), response text.
        settings: what the run was made with (also the resume check).
    """

    trait: str
    layers: tuple[int, ...]
    r: tuple[float, ...]
    r_responses: tuple[float, ...]
    r_family: dict[str, tuple[float, ...]]
    best_layer: int
    best_r: float
    conditions: tuple[ConditionPoint, ...]
    responses: tuple[dict, ...]
    settings: dict

    def r_at(self, layer: int) -> float:
        return self.r[self.layers.index(layer)]

    def format(self) -> str:
        fams = list(self.r_family)
        rows = ["layer  r(conditions)  r(responses)" + "".join(f"  r({f})" for f in fams)]
        for i, layer in enumerate(self.layers):
            mark = "  <- best" if layer == self.best_layer else ""
            per_fam = "".join(f"  {self.r_family[f][i]:{len(f) + 3}.3f}" for f in fams)
            rows.append(f"{layer:5d}  {self.r[i]:13.3f}  {self.r_responses[i]:12.3f}{per_fam}{mark}")
        li = self.layers.index(self.best_layer)
        rows.append("")
        rows.append(f"condition        n   judge  projection@L{self.best_layer}")
        for c in self.conditions:
            rows.append(f"{c.name:14s} {c.n:3d}  {c.mean_score:6.1f}  {c.mean_projection[li]:10.2f}")
        return "\n".join(rows)

    def to_dict(self) -> dict:
        return {"trait": self.trait, "layers": list(self.layers), "r": list(self.r),
                "r_responses": list(self.r_responses),
                "r_family": {k: list(v) for k, v in self.r_family.items()}, "best_layer": self.best_layer, "best_r": self.best_r,
                "conditions": [c.__dict__ | {"mean_projection": list(c.mean_projection)} for c in self.conditions],
                "responses": list(self.responses), "settings": self.settings}

    @classmethod
    def from_dict(cls, data: dict) -> ShiftCheck:
        conds = tuple(ConditionPoint(**{**c, "mean_projection": tuple(c["mean_projection"])})
                      for c in data["conditions"])
        return cls(data["trait"], tuple(data["layers"]), tuple(data["r"]), tuple(data["r_responses"]),
                   {k: tuple(v) for k, v in data["r_family"].items()}, int(data["best_layer"]), float(data["best_r"]), conds, tuple(data["responses"]),
                   dict(data["settings"]))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1, ensure_ascii=False))
        return path

    @classmethod
    def load(cls, path: str | Path) -> ShiftCheck:
        path = Path(path)
        if path.is_dir():
            path = path / SUMMARY_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no prompt-shift results at {path}")
        return cls.from_dict(json.loads(path.read_text()))

    def plot_scatter(self, path: str | Path, layer: int | None = None) -> Path:
        """Condition means (large markers) and single responses (small) at ``layer`` (default: best)."""
        plt = pyplot()

        layer = self.best_layer if layer is None else layer
        li = self.layers.index(layer)
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        colors = {"system": "tab:blue", "shots": "tab:orange"}
        for fam, color in colors.items():
            pts = [r for r in self.responses if r["family"] == fam and r["score"] is not None]
            ax.scatter([p["projections"][li] for p in pts], [p["score"] for p in pts], s=10, alpha=0.3,
                       color=color)
            conds = [c for c in self.conditions if c.family == fam]
            ax.scatter([c.mean_projection[li] for c in conds], [c.mean_score for c in conds], s=70,
                       color=color, edgecolor="black", label=f"{fam} (condition mean)")
            for c in conds:
                ax.annotate(c.name.split(" ", 1)[1], (c.mean_projection[li], c.mean_score), fontsize=7,
                            xytext=(4, 3), textcoords="offset points")
        ax.set_xlabel(f"last-prompt-token projection (layer {layer})")
        ax.set_ylabel("judge score (0-100)")
        ax.set_title(f"{self.trait}: r = {self.r[li]:.2f} (conditions), {self.r_responses[li]:.2f} (responses)")
        ax.legend(fontsize=8)
        return save_figure(fig, path, dpi=100)

    def plot_layers(self, path: str | Path) -> Path:
        """Pearson r per layer, over condition means and over responses."""
        plt = pyplot()

        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.plot(self.layers, self.r, "o-", label="condition means")
        ax.plot(self.layers, self.r_responses, "s--", label="single responses")
        for fam, values in self.r_family.items():
            ax.plot(self.layers, values, ":", label=f"{fam} conditions only")
        ax.axhline(0, color="gray", lw=0.8)
        ax.axvline(self.best_layer, color="gray", alpha=0.5)
        ax.set_ylim(-1.05, 1.05)
        ax.set_xlabel("layer")
        ax.set_ylabel("Pearson r (projection vs judge)")
        ax.set_title(f"{self.trait}: does the last prompt token predict the answer?")
        ax.legend(fontsize=8)
        return save_figure(fig, path, dpi=100)


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation; NaN when either side has no spread or fewer than 3 points."""
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(a) < 3 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def build_conditions(trait: Trait, pair: int = 0, shots: Sequence[int] = DEFAULT_SHOTS,
                     negative_shots: bool = True) -> list[Condition]:
    """The system-prompt ladder from instruction pair ``pair`` and the many-shot conditions."""
    if not 0 <= pair < len(trait.instruction_pairs):
        raise ValueError(f"trait {trait.name!r} has {len(trait.instruction_pairs)} instruction pairs; "
                         f"pair {pair} does not exist")
    if any(k < 0 for k in shots):
        raise ValueError(f"shot counts must be >= 0, got {list(shots)}")
    p = trait.instruction_pairs[pair]
    conds = [
        Condition("system -1.0", "system", -1.0, p.negative),
        Condition("system -0.5", "system", -0.5, p.negative + SOFTENER),
        Condition("system 0", "system", 0.0, None),
        Condition("system +0.5", "system", 0.5, p.positive + SOFTENER),
        Condition("system +1.0", "system", 1.0, p.positive),
    ]
    # k = 0 is the same prompt as the empty rung of the ladder, so it is not asked twice.
    for k in sorted(set(shots) - {0}):
        conds.append(Condition(f"shots +{k}", "shots", float(k), None, k, "pos"))
        if negative_shots:
            conds.append(Condition(f"shots -{k}", "shots", float(-k), None, k, "neg"))
    return conds


def _example_jobs(trait: Trait, pair: int, n: int, polarities: Sequence[str]) -> list[dict]:
    if n > len(trait.extraction_questions):
        raise ValueError(f"{n} example turns need {n} extraction questions; trait {trait.name!r} has "
                         f"{len(trait.extraction_questions)}")
    p = trait.instruction_pairs[pair]
    return [{"kind": "example", "polarity": pol, "question_index": q, "question": trait.extraction_questions[q],
             "system": p.positive if pol == "pos" else p.negative}
            for pol in polarities for q in range(n)]


def _messages(cond: Condition, question: str, examples: dict[tuple[str, int], dict]) -> list[dict]:
    messages = [] if cond.system is None else [{"role": "system", "content": cond.system}]
    for q in range(cond.shots):
        ex = examples[(cond.shot_polarity, q)]
        messages += [{"role": "user", "content": ex["question"]}, {"role": "assistant", "content": ex["response"]}]
    return messages + [{"role": "user", "content": question}]


def _vector_sha(tv: TraitVectors, kind: str | None) -> str:
    v = tv.vectors[kind or tv.default_kind]
    return hashlib.sha256(v.float().contiguous().numpy().tobytes()).hexdigest()[:16]


def prompt_shift(
    model: nn.Module,
    tokenizer,
    vectors: TraitVectors | str | Path,
    out_dir: str | Path,
    *,
    trait: Trait | str | Path | None = None,
    judge=None,
    n_questions: int = 8,
    pair: int = 0,
    shots: Sequence[int] = DEFAULT_SHOTS,
    negative_shots: bool = True,
    max_new_tokens: int = 32,
    kind: str | None = None,
    batch_size: int = 16,
    resume: bool = True,
    progress: bool = False,
) -> ShiftCheck:
    """Run the prompt-induced shift experiment and write its records, summary and plots to ``out_dir``.

    Args:
        model: HF causal LM.
        tokenizer: its tokenizer (with a chat template).
        vectors: the trait vectors (or their saved folder) whose projections are read at every layer.
        out_dir: folder for ``records.jsonl``, ``shiftcheck.json``, ``scatter.png`` and ``layers.png``.
        trait: the trait whose instructions, questions and judge are used (default: the vectors' trait).
        judge: anything with ``score_many``; default ``make_judge("auto", trait)``.
        n_questions: held-out evaluation questions asked under every condition.
        pair: which instruction pair builds the system-prompt ladder and the example answers.
        shots: numbers of in-context example turns (0 is the unprompted rung).
        negative_shots: also build many-shot prompts from answers expressing the opposite.
        max_new_tokens: answer length (greedy).
        kind: pooling kind of the vectors (default: response_mean).
        batch_size: prompts per generation batch (each batch is written when done).
        resume: continue ``out_dir``'s records if they were made with the same settings; False starts over.
        progress: progress bar.

    Returns:
        ``ShiftCheck`` with per-layer r and the per-condition points.
    """
    from steerlib.traits.judges import make_judge

    tv = load_vectors(vectors, model) if isinstance(vectors, str | Path) else vectors
    tv.check_model(model)
    trait_obj = load_trait(trait if trait is not None else tv.trait)
    if not 3 <= n_questions <= len(trait_obj.eval_questions):
        raise ValueError(f"n_questions must be within 3..{len(trait_obj.eval_questions)} (the trait's "
                         f"evaluation questions), got {n_questions}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    conds = build_conditions(trait_obj, pair, shots, negative_shots)
    if judge is None:
        judge = make_judge("auto", trait_obj, model=model, tokenizer=tokenizer)
    layout = get_layout(model)
    layers = list(range(1, layout.n_layers + 1))
    monitor = build_readout(model, {tv.trait: tv}, layers, kind=kind)
    questions = list(trait_obj.eval_questions[:n_questions])
    max_k = max([c.shots for c in conds], default=0)
    polarities = ["pos", "neg"] if negative_shots else ["pos"]
    jobs = _example_jobs(trait_obj, pair, max_k, polarities) if max_k else []
    for c in conds:
        jobs += [{"kind": "answer", "condition": c.name, "family": c.family, "level": c.level,
                  "question_index": q, "question": question} for q, question in enumerate(questions)]
    for i, job in enumerate(jobs):
        job["index"] = i
    settings = {"trait": trait_obj.name, "vector_sha": _vector_sha(tv, kind), "kind": kind or tv.default_kind,
                "questions": questions, "pair": pair, "conditions": [c.__dict__ for c in conds],
                "max_new_tokens": max_new_tokens, "judge": repr(judge), "layers": layers}

    out = Path(out_dir)
    records_path = out / RECORDS_FILE
    store = ResultsStore(records_path, settings, resume=resume)
    done = {r["index"]: r for r in store.records if r.get("index") in range(len(jobs))}
    bar = tqdm(total=len(jobs), initial=len(done), desc="shiftcheck", unit="prompt", disable=not progress)
    by_name = {c.name: c for c in conds}
    # Examples first: the many-shot prompts are built from them.
    for phase in ("example", "answer"):
        examples = {(r["polarity"], r["question_index"]): r for r in done.values() if r["kind"] == "example"}
        todo = [j for j in jobs if j["kind"] == phase and j["index"] not in done]
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            if phase == "example":
                msgs = [[{"role": "system", "content": j["system"]}, {"role": "user", "content": j["question"]}]
                        for j in chunk]
            else:
                msgs = [_messages(by_name[j["condition"]], j["question"], examples) for j in chunk]
            prompts = [format_messages(tokenizer, m)[0] for m in msgs]
            outs = generate(model, tokenizer, prompts, readout=monitor, max_new_tokens=max_new_tokens,
                            batch_size=batch_size)
            scores = judge.score_many([(j["question"], g.text) for j, g in zip(chunk, outs, strict=True)])
            new = []
            for j, g, s in zip(chunk, outs, scores, strict=True):
                rec = {**j, "response": g.text, "score": s}
                if phase == "answer":
                    rec["projections"] = [round(g.prompt_last_projection(tv.trait, layer), 5) for layer in layers]
                new.append(rec)
            store.append(new)
            done.update((r["index"], r) for r in new)
            bar.update(len(new))
    bar.close()
    result = _summarise(trait_obj.name, layers, conds, [done[i] for i in sorted(done)], settings)
    result.save(out / SUMMARY_FILE)
    result.plot_scatter(out / "scatter.png")
    result.plot_layers(out / "layers.png")
    return result


def _summarise(trait: str, layers: list[int], conds: list[Condition], records: list[dict],
               settings: dict) -> ShiftCheck:
    answers = [r for r in records if r["kind"] == "answer" and r["score"] is not None]
    if not answers:
        raise ValueError("the judge scored none of the answers; nothing to correlate")
    points = []
    for c in conds:
        rs = [r for r in answers if r["condition"] == c.name]
        if not rs:
            continue
        proj = np.mean([r["projections"] for r in rs], axis=0)
        points.append(ConditionPoint(c.name, c.family, c.level, len(rs), float(np.mean([r["score"] for r in rs])),
                                     tuple(float(x) for x in proj)))
    r_cond = [pearson([p.mean_projection[i] for p in points], [p.mean_score for p in points])
              for i in range(len(layers))]
    r_resp = [pearson([a["projections"][i] for a in answers], [a["score"] for a in answers])
              for i in range(len(layers))]
    r_fam = {}
    for fam in dict.fromkeys(p.family for p in points):
        sub = [p for p in points if p.family == fam]
        r_fam[fam] = tuple(pearson([p.mean_projection[i] for p in sub], [p.mean_score for p in sub])
                           for i in range(len(layers)))
    finite = [(v, layer) for v, layer in zip(r_cond, layers, strict=True) if np.isfinite(v)]
    best_r, best_layer = max(finite) if finite else (float("nan"), layers[0])
    responses = tuple({k: r[k] for k in ("condition", "family", "level", "question_index", "score", "projections",
                                         "response")} for r in answers)
    return ShiftCheck(trait, tuple(layers), tuple(r_cond), tuple(r_resp), r_fam, best_layer, float(best_r),
                      tuple(points), responses, settings)
