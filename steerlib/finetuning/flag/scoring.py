"""Flagging finetuning data by its projection on a trait vector (Persona Vectors, section 5).

Each training sample (prompt, response) is scored by the projection of the mean response-token activation
at one layer on the unit trait direction. The paper's *projection difference* subtracts the projection of the
base model's own greedy response to the same prompt (``baseline="generate"``): a sample scores high when its
response expresses the trait more than the model would by itself. ``baseline="prompt_last"`` is a cheap
stand-in that subtracts the projection of the last prompt token instead (no generation).

Scoring runs in length-sorted batches and only as deep as the needed layer. Results are appended to a JSONL
file batch by batch (one line per sample, with its index), so a killed run resumes where it stopped.

Given a pipeline engine (``steerlib.core.pipeline.PipelineEngine``, e.g. vLLM's), a window of
``ENGINE_WINDOW`` samples is one submission per stage (capture the pairs, generate the baselines, capture them),
read inside the engine: the HF model runs no forward.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from torch import Tensor, nn
from tqdm.auto import tqdm

from steerlib.core.arch import get_layout
from steerlib.core.capture import check_context, pooled_activations, tokenize_pairs
from steerlib.core.loading import resolve_vector
from steerlib.core.models import unwrap_model
from steerlib.core.pipeline import PipelineEngine, answers_in_order, pipeline_engine
from steerlib.core.serialize import to_jsonable
from steerlib.core.vectors import VectorSource
from steerlib.steering.generation import GenerateTexts
from steerlib.store.results import ResultsStore, fingerprint_pairs, fingerprint_tensor
from steerlib.store.samples import ReadResult, Sample, as_samples, read_samples

__all__ = [
    "BASELINES",
    "FlagResult",
    "RunPlan",
    "dataset_score",
    "finished_records",
    "length_sorted_batches",
    "plan_run",
    "sample_record",
    "score_dataset",
    "score_pairs",
]

Baseline = Literal["none", "generate", "prompt_last"]
BASELINES = ("none", "generate", "prompt_last")
# Samples per engine submission: large enough that the engine's scheduler stays full, small enough that a
# window's pooled activations (three [D] rows per sample) and a kill's lost work stay small.
ENGINE_WINDOW = 512


def _pooled(model, tokenizer, engine: PipelineEngine | None, prompts: Sequence[str], responses: Sequence[str],
            layer: int, truncate: bool) -> tuple[Tensor, Tensor, list[int]]:
    """``pooled_activations`` on the HF model, or read inside the engine when there is one."""
    if engine is None:
        return pooled_activations(model, tokenizer, prompts, responses, layer, truncate=truncate)
    acts = engine.capture(tokenizer, prompts, responses, [layer], require_response=True)
    return acts.at("response_mean", layer), acts.at("prompt_last", layer), list(acts.response_lengths)


def score_pairs(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    responses: Sequence[str],
    direction: Tensor,
    layer: int,
    *,
    baseline: Baseline = "none",
    max_new_tokens: int = 64,
    truncate: bool = True,
    generate_texts: GenerateTexts | None = None,
) -> list[dict[str, Any]]:
    """Score one batch of (prompt, response) pairs; the unit of work shared by the local and Ray paths.

    Args:
        model: HF causal LM (the base model whose behaviour the data would change).
        tokenizer: its tokenizer.
        prompts: formatted prompts.
        responses: the training responses.
        direction: unit [D] trait direction at ``layer``.
        layer: residual-stream layer.
        baseline: "none", "generate" (minus the projection of the model's own greedy response) or
            "prompt_last" (minus the projection of the last prompt token).
        max_new_tokens: length of the generated baseline response.
        truncate: stop forward passes after ``layer``.
        generate_texts: another generator of the baseline responses (e.g. vLLM's, ``steerlib.vllm.offline``);
            called as ``(prompts, max_new_tokens, 0.0, None) -> texts``; a ``PipelineEngine`` also captures the
            activations (the HF model runs no forward).

    Returns:
        One dict per pair with ``projection``, ``prompt_last_projection``, ``response_tokens``, ``score`` and,
        with a baseline, ``baseline_projection`` and ``projection_diff`` (``base_response`` for "generate").
    """
    if baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}; choose from {BASELINES}")
    direction = direction.float().cpu()
    engine = pipeline_engine(generate_texts)
    resp, last, counts = _pooled(model, tokenizer, engine, prompts, responses, layer, truncate)
    proj = (resp @ direction).tolist()
    last_proj = (last @ direction).tolist()
    out = [
        {"projection": p, "prompt_last_projection": q, "response_tokens": n, "score": p}
        for p, q, n in zip(proj, last_proj, counts, strict=True)
    ]
    if baseline == "prompt_last":
        for rec in out:
            rec["baseline_projection"] = rec["prompt_last_projection"]
    elif baseline == "generate":
        from steerlib.steering.generation import generate

        if engine is not None:  # pooled while generated: the capture below reads them
            texts = answers_in_order(engine, list(prompts), max_new_tokens, 0.0, None, pool=True)
        elif generate_texts is not None:
            texts = list(generate_texts(list(prompts), max_new_tokens, 0.0, None))
        else:
            texts = [g.text for g in generate(unwrap_model(model), tokenizer, list(prompts),
                                              max_new_tokens=max_new_tokens, batch_size=len(prompts))]
        usable = [i for i, t in enumerate(texts) if tokenizer(t, add_special_tokens=False)["input_ids"]]
        base = [math.nan] * len(out)
        if usable:
            b_resp, _, _ = _pooled(model, tokenizer, engine, [prompts[i] for i in usable],
                                   [texts[i] for i in usable], layer, truncate)
            for i, value in zip(usable, (b_resp @ direction).tolist(), strict=True):
                base[i] = value
        for rec, text, value in zip(out, texts, base, strict=True):
            rec["base_response"] = text
            rec["baseline_projection"] = value  # NaN when the model answered with nothing
    if baseline != "none":
        for rec in out:
            rec["projection_diff"] = rec["projection"] - rec["baseline_projection"]
            rec["score"] = rec["projection_diff"]
    return [to_jsonable(rec) for rec in out]  # NaN (no baseline response) is stored as null


# -- dataset scoring -------------------------------------------------------------------------------------


@dataclass
class FlagResult:
    """Per-sample scores of a dataset, sorted by sample index.

    Attributes:
        records: one dict per sample (see ``score_pairs``) plus ``index``, ``line`` and ``meta``.
        layer: layer scored at.
        baseline: baseline used ("none", "generate", "prompt_last").
        out_path: the results JSONL.
        computed: samples computed in this call (the rest were resumed from ``out_path``).
    """

    records: list[dict]
    layer: int
    baseline: str
    out_path: Path
    computed: int = 0

    @property
    def scores(self) -> np.ndarray:
        return np.array([np.nan if r["score"] is None else r["score"] for r in self.records], dtype=float)

    def summary(self) -> dict[str, Any]:
        return {"layer": self.layer, "baseline": self.baseline, **dataset_score(self.records)}


def dataset_score(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Dataset-level scores: mean projection and, with a baseline, mean projection difference.

    The paper predicts the trait shift a finetune would cause from the dataset's mean projection difference.
    """
    records = list(records)

    def stats(key: str) -> dict[str, float | None]:
        values = np.array([r[key] for r in records if r.get(key) is not None], dtype=float)
        if values.size == 0:
            return {}
        return {f"mean_{key}": float(values.mean()), f"std_{key}": float(values.std()),
                f"median_{key}": float(np.median(values))}

    out: dict[str, Any] = {"n": len(records)}
    out.update(stats("projection"))
    if any("projection_diff" in r for r in records):
        out.update(stats("projection_diff"))
        out["n_missing_baseline"] = sum(1 for r in records if r.get("projection_diff") is None)
    return out


@dataclass
class RunPlan:
    """Everything a scoring run derives from its inputs before touching the model."""

    layer: int
    direction: Tensor  # unit [D]
    by_index: dict[int, Sample]
    prompts: dict[int, str]  # formatted prompts
    lengths: dict[int, int]  # prompt + response tokens
    config: dict[str, Any]  # what must match for a results file to be resumed


def plan_run(
    tokenizer,
    samples: Sequence[Sample] | ReadResult | str | Path,
    vectors: VectorSource,
    layer: int,
    *,
    baseline: str,
    kind: str | None,
    max_new_tokens: int,
    d_model: int | None,
    model: nn.Module | None = None,
) -> RunPlan:
    """Format prompts, measure lengths and fix the run's identity (shared by the local and Ray paths).

    With ``model`` given, a sample longer than its context is an error naming the data line.
    """
    if baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}; choose from {BASELINES}")
    if isinstance(samples, str | Path):
        samples = read_samples(samples)
    source = samples.path.name if isinstance(samples, ReadResult) else "data"
    items = as_samples(samples)
    vec = resolve_vector(vectors, layer, kind=kind, d_model=d_model).float().cpu()
    direction = vec / vec.norm()
    by_index = {s.index: s for s in items}
    prompts = {s.index: s.prompt_text(tokenizer) for s in items}
    keys = sorted(by_index)
    encoded = tokenize_pairs(tokenizer, [prompts[i] for i in keys], [by_index[i].response for i in keys])
    lengths = {i: len(ids) for i, (ids, _) in zip(keys, encoded, strict=True)}
    if model is not None:  # before any work: name the data line that cannot fit
        check_context(model, [lengths[i] for i in keys],
                      [f"{source} line {by_index[i].line} (prompt + response)" for i in keys])
    responses = [by_index[i].response for i in keys]
    data_sha = fingerprint_pairs([prompts[i] for i in keys], responses)
    vec_sha = fingerprint_tensor(direction)
    config: dict[str, Any] = {"layer": layer, "baseline": baseline, "kind": kind, "n_samples": len(items),
                              "data_sha": data_sha, "vector_sha": vec_sha}
    if baseline == "generate":
        config["max_new_tokens"] = max_new_tokens
    return RunPlan(layer=layer, direction=direction, by_index=by_index, prompts=prompts, lengths=lengths,
                   config=config)


def sample_record(sample: Sample, scores: Mapping[str, Any]) -> dict[str, Any]:
    """A results line: the sample's index and line, its scores and its meta fields."""
    rec = {"index": sample.index, "line": sample.line, **scores}
    if sample.meta:
        rec["meta"] = dict(sample.meta)
    return rec


def finished_records(store: ResultsStore, valid: set[int]) -> dict[int, dict]:
    """The records a resumed run can keep, by sample index; a record of another dataset is an error."""
    done: dict[int, dict] = {}
    for rec in store.records:
        idx = rec.get("index")
        if not isinstance(idx, int) or idx not in valid:
            raise ValueError(f"{store.path}: record with index {idx!r}, which is not a sample of this dataset")
        if idx in done:
            raise ValueError(f"{store.path}: index {idx} appears twice; the file is corrupt, start a fresh run")
        done[idx] = rec
    return done


def length_sorted_batches(lengths: Mapping[int, int], batch_size: int) -> list[list[int]]:
    """Sample indices grouped into batches of similar length, longest first (ties by index)."""
    order = sorted(lengths, key=lambda i: (-lengths[i], i))
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


def score_dataset(
    model: nn.Module,
    tokenizer,
    samples: Sequence[Sample] | ReadResult | str | Path,
    vectors: VectorSource,
    layer: int,
    *,
    out_path: str | Path,
    batch_size: int = 16,
    baseline: Baseline = "none",
    max_new_tokens: int = 64,
    resume: bool = True,
    progress: bool = True,
    kind: str | None = None,
    truncate: bool = True,
    on_batch: Callable[[int, list[dict]], None] | None = None,
    generate_texts: GenerateTexts | None = None,
) -> FlagResult:
    """Score every sample's projection (difference) on a trait direction, appending results to a JSONL.

    Args:
        model: the base HF causal LM the data would finetune.
        tokenizer: its tokenizer.
        samples: ``Sample`` list, a ``ReadResult`` or a data file path (see ``steerlib.store.samples``).
        vectors: TraitVectors, a tensor ([D] or [n_layers + 1, D]) or a saved vectors path.
        layer: residual-stream layer to read.
        out_path: results JSONL; one line per sample with its ``index``, written batch by batch.
        batch_size: samples per forward pass (length-sorted).
        baseline: "none" (projection), "generate" (paper's projection difference against the model's own
            greedy response) or "prompt_last" (cheap: minus the last prompt token's projection).
        max_new_tokens: length of generated baseline responses.
        resume: skip samples already in ``out_path`` (a run with other settings is refused); False overwrites.
        progress: show a tqdm bar (samples/s).
        kind: pooling kind of TraitVectors (default: response_mean).
        truncate: stop each forward pass after ``layer`` (False runs every block, for benchmarking).
        on_batch: called as ``on_batch(batch_number, records)`` after each batch is written.
        generate_texts: generator of the "generate" baseline's responses (default: HF greedy generation); a
            ``PipelineEngine`` also captures the activations, a window of ``ENGINE_WINDOW`` samples at a time.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}; choose from {BASELINES}")
    hf_model = unwrap_model(model)
    layout = get_layout(hf_model)
    plan = plan_run(tokenizer, samples, vectors, layout.check_layer(layer), baseline=baseline, kind=kind,
                    max_new_tokens=max_new_tokens, d_model=layout.d_model, model=hf_model)
    layer, direction, by_index, prompts = plan.layer, plan.direction, plan.by_index, plan.prompts
    out_path = Path(out_path)
    store = ResultsStore(out_path, plan.config, resume=resume)
    done = finished_records(store, set(by_index))
    lengths = plan.lengths
    # An engine takes windows of ENGINE_WINDOW samples (its scheduler batches them), the HF model batch_size.
    engine = pipeline_engine(generate_texts)
    batches = length_sorted_batches(lengths, ENGINE_WINDOW if engine is not None else batch_size)
    left = len(set(by_index) - set(done))
    if engine is not None and left:  # the engine's start is chosen by the job's size (compiling pays off on long jobs)
        engine.start(max_new_tokens * left if baseline == "generate" else None)
    computed = 0
    bar = tqdm(total=len(by_index), initial=len(done), desc=f"flag (layer {layer})", unit="sample",
               disable=not progress)
    for number, batch in enumerate(batches):
        todo = [i for i in batch if i not in done]
        if not todo:
            continue
        scored = score_pairs(model, tokenizer, [prompts[i] for i in todo],
                             [by_index[i].response for i in todo], direction, layer, baseline=baseline,
                             max_new_tokens=max_new_tokens, truncate=truncate, generate_texts=generate_texts)
        new = [sample_record(by_index[i], rec) for i, rec in zip(todo, scored, strict=True)]
        done.update((r["index"], r) for r in new)
        store.append(new)  # fsynced: a kill after this point loses nothing of this batch
        computed += len(new)
        bar.update(len(new))
        if on_batch is not None:
            on_batch(number, new)
    bar.close()
    records = [done[i] for i in sorted(done)]
    return FlagResult(records=records, layer=layer, baseline=baseline, out_path=out_path, computed=computed)


