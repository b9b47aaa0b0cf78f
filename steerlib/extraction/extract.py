"""The Persona Vectors extraction pipeline: prompts -> responses -> scores -> activations -> vectors.

For every extraction question and every (positive, negative) instruction pair, responses are generated
under each system prompt and scored by a judge. Positive responses scoring at least ``pos_threshold`` and
negative ones at most ``neg_threshold`` are kept (optionally also requiring coherence), their residual
streams are captured, and the per-layer difference of means is the trait vector, at three poolings
(response mean, prompt mean, last prompt token). The same is done on the held-out evaluation questions to
sweep layers honestly.

Every intermediate goes to ``out_dir`` as it is produced (``responses.jsonl``, ``scores.jsonl``), so a run
that is interrupted resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from steerlib.core.arch import get_layout
from steerlib.core.backends import BACKENDS
from steerlib.core.capture import Activations, capture_activations
from steerlib.core.chat import format_prompt
from steerlib.core.checks import check_choice, check_int, check_number
from steerlib.core.pipeline import pipeline_engine
from steerlib.core.vectors import TraitVectors
from steerlib.core.version import __version__
from steerlib.extraction.sweep import LayerSweep, fit_probes, layer_sweep, mean_difference, pca_direction
from steerlib.steering.generation import GenerateTexts, generate
from steerlib.store.results import ResultsStore, read_records
from steerlib.traits.judges import describe_judge
from steerlib.traits.judges.llm import LLMJudge
from steerlib.traits.library import Trait, load_trait


@dataclass
class ExtractionConfig:
    """Knobs of one extraction run (stored in the vectors' metadata)."""

    n_samples: int = 1
    max_new_tokens: int = 48
    temperature: float = 0.0
    pos_threshold: float = 50.0
    neg_threshold: float = 50.0
    coherence_threshold: float | None = None
    max_pairs: int | None = None
    max_questions: int | None = None
    batch_size: int = 16
    backend: str = "torch"
    seed: int = 0
    evaluate: bool = True

    def __post_init__(self) -> None:
        # Every number is checked here, before a model is loaded: 0 or a negative count would otherwise
        # change meaning silently (a slice [:0] is everything to `x or all`, [:-2] drops from the end).
        check_int(self.n_samples, "n_samples")
        check_int(self.max_new_tokens, "max_new_tokens")
        check_int(self.batch_size, "batch_size")
        for name in ("max_pairs", "max_questions"):
            if getattr(self, name) is not None:
                check_int(getattr(self, name), name)
        check_number(self.temperature, "temperature", minimum=0)
        for name in ("pos_threshold", "neg_threshold"):
            check_number(getattr(self, name), name)
        if self.coherence_threshold is not None:
            check_number(self.coherence_threshold, "coherence_threshold")
        check_choice(self.backend, "backend", BACKENDS)
        if self.n_samples > 1 and self.temperature == 0:
            raise ValueError("n_samples > 1 needs temperature > 0 (greedy decoding repeats itself)")
        for name in ("pos_threshold", "neg_threshold"):
            if not 0 <= getattr(self, name) <= 100:
                raise ValueError(f"{name} must be within 0..100")


@dataclass
class ExtractionResult:
    vectors: TraitVectors
    sweep: LayerSweep
    probe_vectors: TraitVectors | None
    pca_vectors: TraitVectors | None
    counts: dict
    out_dir: Path
    files: dict[str, Path] = field(default_factory=dict)


def _jobs(trait: Trait, questions: tuple[str, ...], split: str, cfg: ExtractionConfig) -> list[dict]:
    pairs = trait.instruction_pairs if cfg.max_pairs is None else trait.instruction_pairs[: cfg.max_pairs]
    qs = questions if cfg.max_questions is None else questions[: cfg.max_questions]
    jobs = []
    for p, pair in enumerate(pairs):
        for q, question in enumerate(qs):
            for s in range(cfg.n_samples):
                for polarity, system in (("pos", pair.positive), ("neg", pair.negative)):
                    jobs.append({"id": f"{split}-{polarity}-p{p}-q{q}-s{s}", "split": split, "polarity": polarity,
                                 "pair": p, "question_index": q, "sample": s, "question": question,
                                 "system": system})
    return jobs


def _generate_missing(model, tokenizer, jobs: list[dict], log: ResultsStore, cfg: ExtractionConfig,
                      progress: bool, generate_texts: GenerateTexts | None = None,
                      on_records: Callable[[list[dict]], None] | None = None) -> dict[str, dict]:
    done = log.by_key("id")
    todo = [j for j in jobs if j["id"] not in done]
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc="generate", unit="resp", disable=not progress)
    engine = pipeline_engine(generate_texts)
    if engine is not None and todo:
        # One submission for the whole stage; answers are appended as the engine finishes them. A job's seed is
        # fixed by its place in the whole job list, so a resumed run draws what the uninterrupted one would.
        place = {j["id"]: k for k, j in enumerate(jobs)}
        engine.start(len(todo) * cfg.max_new_tokens)
        prompts = [format_prompt(tokenizer, j["question"], j["system"]) for j in todo]
        seeds = [cfg.seed + place[j["id"]] for j in todo] if cfg.temperature > 0 else None
        # ``pool``: the engine pools each answer's residuals as it generates it, so the capture stage reads them.
        for finished in engine.stream(prompts, cfg.max_new_tokens, cfg.temperature, seeds, pool=True):
            records = [{**todo[i], "response": t} for i, t in finished]
            log.append(records)
            done.update({r["id"]: r for r in records})
            bar.update(len(records))
            if on_records is not None and records:
                on_records(records)
        todo = []
    # One chunk per batch: each is appended the moment it is generated.
    for start in range(0, len(todo), cfg.batch_size):
        chunk = todo[start : start + cfg.batch_size]
        prompts = [format_prompt(tokenizer, j["question"], j["system"]) for j in chunk]
        seed = cfg.seed + start if cfg.temperature > 0 else None
        if generate_texts is not None:
            texts = generate_texts(prompts, cfg.max_new_tokens, cfg.temperature, seed)
        else:
            texts = [g.text for g in generate(model, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens,
                                              temperature=cfg.temperature, batch_size=cfg.batch_size, seed=seed)]
        records = [{**j, "response": t} for j, t in zip(chunk, texts, strict=True)]
        log.append(records)
        done.update({r["id"]: r for r in records})
        bar.update(len(chunk))
    bar.close()
    return {j["id"]: done[j["id"]] for j in jobs}


def _score_missing(responses: dict[str, dict], log: ResultsStore, judge, coherence_judge, progress: bool,
                   chunk_size: int = 32) -> dict[str, dict]:
    done = log.by_key("id")
    todo = [r for rid, r in responses.items() if rid not in done]
    bar = tqdm(total=len(responses), initial=len(responses) - len(todo), desc="judge", unit="resp",
               disable=not progress)
    for start in range(0, len(todo), chunk_size):
        chunk = todo[start : start + chunk_size]
        records = _score_chunk(chunk, log, judge, coherence_judge)
        done.update({r["id"]: r for r in records})
        bar.update(len(chunk))
    bar.close()
    return {rid: done[rid] for rid in responses}


def _score_chunk(chunk: list[dict], log: ResultsStore, judge, coherence_judge) -> list[dict]:
    """Judge responses and append their scores (the store is thread-safe)."""
    pairs = [(r["question"], r["response"]) for r in chunk]
    scores = judge.score_many(pairs)
    coherence = coherence_judge.score_many(pairs) if coherence_judge is not None else [None] * len(chunk)
    records = [{"id": r["id"], "score": s, "coherence": c} for r, s, c in zip(chunk, scores, coherence, strict=True)]
    log.append(records)
    return records


class _JudgeAlongside:
    """Judges answers on one background thread while the engine generates the next ones (an HTTP judge waits on
    the network, not on the cores the engine uses). ``finish()`` waits and raises the first failure."""

    def __init__(self, log: ResultsStore, judge, coherence_judge):
        self.log, self.judge, self.coherence_judge = log, judge, coherence_judge
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="steerlib-judge")
        self.futures: list[Future] = []

    def submit(self, records: list[dict]) -> None:
        self.futures.append(self.pool.submit(_score_chunk, records, self.log, self.judge, self.coherence_judge))

    def finish(self) -> None:
        self.pool.shutdown(wait=True)
        for f in self.futures:
            f.result()


def _remote(judge) -> bool:
    return judge is None or isinstance(judge, LLMJudge)


def _keep(record: dict, score: dict, cfg: ExtractionConfig) -> bool:
    s = score.get("score")
    if s is None:
        return False
    if cfg.coherence_threshold is not None:
        c = score.get("coherence")
        if c is None or c < cfg.coherence_threshold:
            return False
    return s >= cfg.pos_threshold if record["polarity"] == "pos" else s <= cfg.neg_threshold


def _capture(model, tokenizer, records: list[dict], layers: list[int], cfg: ExtractionConfig,
             progress: bool, generate_texts: GenerateTexts | None = None) -> Activations:
    prompts = [format_prompt(tokenizer, r["question"], r["system"]) for r in records]
    engine = pipeline_engine(generate_texts)
    if engine is not None:  # read inside the engine: no second forward on the HF model
        return engine.capture(tokenizer, prompts, [r["response"] for r in records], layers)
    return capture_activations(model, tokenizer, prompts, [r["response"] for r in records], layers,
                               backend=cfg.backend, batch_size=cfg.batch_size, progress=progress)


def _select(responses: dict[str, dict], scores: dict[str, dict], cfg: ExtractionConfig) -> tuple[list[dict], dict]:
    kept = [r for rid, r in responses.items() if _keep(r, scores[rid], cfg)]
    counts = {}
    for pol in ("pos", "neg"):
        total = sum(r["polarity"] == pol for r in responses.values())
        k = sum(r["polarity"] == pol for r in kept)
        unscored = sum(r["polarity"] == pol and scores[rid].get("score") is None for rid, r in responses.items())
        counts[pol] = {"generated": total, "kept": k, "dropped": total - k, "unscored": unscored}
    return kept, counts


def extract_trait(
    model,
    tokenizer,
    trait: Trait | str | Path,
    out_dir: str | Path,
    *,
    judge=None,
    coherence_judge=None,
    config: ExtractionConfig | None = None,
    model_name: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    generate_texts: GenerateTexts | None = None,
) -> ExtractionResult:
    """Run the whole extraction for one trait, resuming from ``out_dir`` if it holds a partial run.

    Args:
        model: HF causal LM.
        tokenizer: its tokenizer (with a chat template).
        trait: a ``Trait``, a built-in trait name or a trait JSON path.
        out_dir: folder for responses, scores, vectors and the sweep (created if needed).
        judge: a judge with ``score_many``; default ``make_judge("auto", trait)``.
        coherence_judge: optional judge whose score must reach ``config.coherence_threshold``.
        config: generation / filtering settings.
        model_name: recorded in the vectors' metadata (default: the model's name_or_path).
        progress: progress bars.
        log: where to print one-line summaries.
        generate_texts: another generator of the contrastive responses, called as
            ``(formatted prompts, max_new_tokens, temperature, seed) -> texts``; when it is a
            ``steerlib.core.pipeline.PipelineEngine`` (``steerlib.vllm.offline.VllmGenerator``) the whole
            generation stage is one submission, stored answer by answer, and activations are read inside it.

    Returns:
        ``ExtractionResult`` with mean-difference vectors (saved to ``out_dir``), probe and PCA vectors, the
        layer sweep, and kept/dropped counts.
    """
    from steerlib.traits.judges import make_judge

    cfg = config or ExtractionConfig()
    trait = load_trait(trait) if not isinstance(trait, Trait) else trait
    if judge is None:
        judge = make_judge("auto", trait, model=model, tokenizer=tokenizer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layout = get_layout(model)
    layers = list(range(layout.n_positions))
    started = time.time()
    torch.manual_seed(cfg.seed)

    train_jobs = _jobs(trait, trait.extraction_questions, "extract", cfg)
    eval_jobs = _jobs(trait, trait.eval_questions, "eval", cfg) if cfg.evaluate else []
    name = model_name or str(getattr(model.config, "name_or_path", "") or type(model).__name__)
    # What makes earlier responses and scores reusable: a rerun under other settings is refused, naming them.
    # (max_pairs / max_questions / n_samples only choose which jobs run: their ids say which they are.)
    trait_sha = hashlib.sha256(trait.to_json().encode()).hexdigest()[:16]
    responses_log = ResultsStore(out / "responses.jsonl", {
        "model": name, "trait": trait.name, "trait_sha": trait_sha, "max_new_tokens": cfg.max_new_tokens,
        "temperature": cfg.temperature, "seed": cfg.seed, "batch_size": cfg.batch_size})
    scores_log = ResultsStore(out / "scores.jsonl", {
        "judge": describe_judge(judge), "coherence_judge": describe_judge(coherence_judge)})
    stages: dict[str, float] = {}  # wall seconds per stage of this call (a resumed stage counts what it redid)
    tick = time.perf_counter()
    # With an engine and an HTTP judge, answers are judged while the engine generates the rest.
    alongside = (_JudgeAlongside(scores_log, judge, coherence_judge) if pipeline_engine(generate_texts) is not None
                 and isinstance(judge, LLMJudge) and _remote(coherence_judge) else None)
    try:
        responses = _generate_missing(model, tokenizer, train_jobs + eval_jobs, responses_log, cfg, progress,
                                      generate_texts, on_records=alongside.submit if alongside else None)
    finally:
        if alongside is not None:
            alongside.finish()
    stages["generate"], tick = time.perf_counter() - tick, time.perf_counter()
    scores = _score_missing(responses, scores_log, judge, coherence_judge, progress)
    stages["judge"], tick = time.perf_counter() - tick, time.perf_counter()

    train = {rid: r for rid, r in responses.items() if r["split"] == "extract"}
    kept, counts = _select(train, scores, cfg)
    log(f"{trait.name}: kept {counts['pos']['kept']}/{counts['pos']['generated']} positive and "
        f"{counts['neg']['kept']}/{counts['neg']['generated']} negative responses")
    if counts["pos"]["kept"] < 2 or counts["neg"]["kept"] < 2:
        raise ValueError(
            f"too few responses survive filtering for {trait.name!r} (positive kept {counts['pos']['kept']}, "
            f"negative kept {counts['neg']['kept']}); loosen --pos-threshold/--neg-threshold "
            f"(now {cfg.pos_threshold}/{cfg.neg_threshold}) or use a stronger model or judge"
        )
    acts = _capture(model, tokenizer, kept, layers, cfg, progress, generate_texts)
    labels = torch.tensor([r["polarity"] == "pos" for r in kept])
    vectors = {kind: mean_difference(acts.pooled[kind], labels) for kind in acts.pooled}

    # Held-out: every eval response under its intended polarity, unfiltered, so the sweep measures how well
    # the vector separates what the instructions produce on questions it never saw.
    eval_records = [r for r in responses.values() if r["split"] == "eval"]
    eval_acts = eval_labels = None
    if eval_records:
        eval_acts = _capture(model, tokenizer, eval_records, layers, cfg, progress, generate_texts)
        eval_labels = torch.tensor([r["polarity"] == "pos" for r in eval_records])

    stages["capture"], tick = time.perf_counter() - tick, time.perf_counter()
    kind = "response_mean"
    probes = fit_probes(acts.pooled[kind], labels, eval_acts.pooled[kind] if eval_acts else None, eval_labels,
                        reference=vectors[kind])
    sweep_acts, sweep_labels = (eval_acts.pooled[kind], eval_labels) if eval_acts else (acts.pooled[kind], labels)
    sweep = layer_sweep(vectors[kind], layers, layout.n_layers, sweep_acts, sweep_labels,
                        probes.heldout_accuracy if eval_acts else probes.train_accuracy, heldout=eval_acts is not None)

    residual_norms = acts.token_norms.mean(0).tolist()
    stages["fit"] = time.perf_counter() - tick
    metadata = {
        "recommended_layer": sweep.recommended_layer,
        "layer_rule": "max held-out Cohen's d of response-mean projections within 25%-75% of depth",
        "counts": counts,
        "judge": describe_judge(judge),
        "coherence_judge": describe_judge(coherence_judge),
        "thresholds": {"positive": cfg.pos_threshold, "negative": cfg.neg_threshold,
                       "coherence": cfg.coherence_threshold},
        "config": asdict(cfg),
        "residual_norms": residual_norms,
        "sweep": sweep.to_dict(),
        "probe_train_accuracy": probes.train_accuracy,
        "library_version": __version__,
        "seconds": round(time.time() - started, 1),
        "stage_seconds": {k: round(v, 2) for k, v in stages.items()},
    }
    tv = TraitVectors(vectors=vectors, model_name=name, trait=trait.name, method="mean_diff", metadata=metadata)
    files = {"vectors": tv.save(out)}
    probe_tv = TraitVectors({kind: probes.directions}, name, trait.name, "probe",
                            {**metadata, "probe_heldout_accuracy": probes.heldout_accuracy})
    files["probe"] = probe_tv.save(out / "probe.safetensors")
    pca_tv = None
    pairs = _paired(kept)
    if len(pairs) >= 2:
        index = {r["id"]: i for i, r in enumerate(kept)}
        pos = acts.pooled[kind][[index[a] for a, _ in pairs]]
        neg = acts.pooled[kind][[index[b] for _, b in pairs]]
        pca_tv = TraitVectors({kind: pca_direction(pos, neg, vectors[kind])}, name, trait.name, "pca",
                              {**metadata, "n_pairs": len(pairs)})
        files["pca"] = pca_tv.save(out / "pca.safetensors")
    files["sweep"] = sweep.save(out / "sweep.json")
    files["plot"] = sweep.plot(out / "sweep.png", title=f"{trait.name}: layer sweep on {name}")
    (out / "summary.txt").write_text(sweep.table() + "\n")
    log(f"recommended layer {sweep.recommended_layer} (held-out AUROC "
        f"{sweep.auroc[layers.index(sweep.recommended_layer)]:.3f}); wrote {out}")
    return ExtractionResult(tv, sweep, probe_tv, pca_tv, counts, out, files)


def _paired(kept: list[dict]) -> list[tuple[str, str]]:
    """(positive id, negative id) for kept responses to the same question, pair and sample."""
    by_key = {(r["pair"], r["question_index"], r["sample"], r["polarity"]): r["id"] for r in kept}
    return [(by_key[(p, q, s, "pos")], by_key[(p, q, s, "neg")])
            for (p, q, s, pol) in by_key if pol == "pos" and (p, q, s, "neg") in by_key]


def load_responses(out_dir: str | Path) -> list[dict]:
    """The generated responses of a (possibly partial) run, with their scores merged in."""
    out = Path(out_dir)
    responses = {str(r["id"]): r for r in read_records(out / "responses.jsonl")}
    scores = {str(r["id"]): r for r in read_records(out / "scores.jsonl")}
    return [{**r, **{k: v for k, v in scores.get(rid, {}).items() if k != "id"}} for rid, r in responses.items()]
