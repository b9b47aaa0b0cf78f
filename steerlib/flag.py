"""Flagging finetuning data by its projection on a trait vector (Persona Vectors, section 5).

Each training sample (prompt, response) is scored by the projection of the mean response-token activation
at one layer on the unit trait direction. The paper's *projection difference* subtracts the projection of the
base model's own greedy response to the same prompt (``baseline="generate"``): a sample scores high when its
response expresses the trait more than the model would by itself. ``baseline="prompt_last"`` is a cheap
stand-in that subtracts the projection of the last prompt token instead (no generation).

Scoring runs in length-sorted batches and only as deep as the needed layer. Results are appended to a JSONL
file batch by batch (one line per sample, with its index), so a killed run resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .arch import get_layout
from .capture import pad_batch, tokenize_pairs
from .data_io import ReadResult, Sample, as_samples, read_samples
from .hooks import StopForward, record_residual
from .vectors import TraitVectors, resolve_vector

__all__ = [
    "BASELINES",
    "FlagReport",
    "FlagResult",
    "RunPlan",
    "append_records",
    "dataset_score",
    "flag_file",
    "length_sorted_batches",
    "load_direction",
    "load_vectors_file",
    "plan_run",
    "plot_histogram",
    "pooled_activations",
    "rank",
    "read_score_file",
    "sample_record",
    "score_dataset",
    "score_pairs",
    "unwrap_model",
]

Baseline = Literal["none", "generate", "prompt_last"]
BASELINES = ("none", "generate", "prompt_last")
VectorSource = TraitVectors | Tensor


def unwrap_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a PEFT wrapper (LoRA layers are injected in place, so they stay active).

    ``get_layout`` looks up ``model.layers`` by the config's model type; a ``PeftModel`` nests the HF model
    one level deeper, so hooks must be placed on the unwrapped model.
    """
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def load_direction(
    vectors: VectorSource | str | Path, layer: int, *, kind: str | None = None, d_model: int | None = None
) -> Tensor:
    """Unit float32 direction at ``layer`` from TraitVectors, a [D] or [n_layers + 1, D] tensor, or a path."""
    vec = resolve_vector(vectors, layer, kind=kind, d_model=d_model).float().cpu()
    return vec / vec.norm()


@torch.inference_mode()
def pooled_activations(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    responses: Sequence[str],
    layer: int,
    *,
    truncate: bool = True,
) -> tuple[Tensor, Tensor, list[int]]:
    """Response-mean and last-prompt-token activations at one layer for one batch.

    Args:
        model: HF causal LM (a PEFT wrapper is unwrapped).
        tokenizer: its tokenizer.
        prompts: formatted prompts.
        responses: non-empty responses, one per prompt.
        layer: residual-stream layer (``output_hidden_states`` index).
        truncate: stop the forward pass after ``layer`` instead of running every block.

    Returns:
        (response_mean [B, D], prompt_last [B, D], response token counts), float32 on CPU.
    """
    model = unwrap_model(model)
    layout = get_layout(model)
    layer = layout.check_layer(layer)
    encoded = tokenize_pairs(tokenizer, prompts, responses)
    for i, (ids, p_len) in enumerate(encoded):
        if len(ids) == p_len:
            raise ValueError(f"response {i} tokenises to nothing: there is no response token to average")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids, mask, positions, offsets = pad_batch([e[0] for e in encoded], pad_id, "left")
    device = next(model.parameters()).device
    kwargs: dict[str, Any] = {"use_cache": False}
    if not truncate:
        kwargs["logits_to_keep"] = 1  # the full pass still runs every block; skip the vocabulary projection
    with record_residual(model, [layer], to_cpu=False, stop_after_last=truncate) as records:
        with contextlib.suppress(StopForward):
            model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                  **kwargs)
    hidden = records[layer][0].float().cpu()
    width = hidden.shape[1]
    resp_mean = torch.empty(len(encoded), hidden.shape[-1])
    prompt_last = torch.empty_like(resp_mean)
    counts = []
    for row, (seq, p_len) in enumerate(encoded):
        off = int(offsets[row])
        assert off + len(seq) == width  # left padding: every row ends at the last column
        acts = hidden[row, off:]
        prompt_last[row] = acts[p_len - 1]
        resp_mean[row] = acts[p_len:].mean(dim=0)
        counts.append(len(seq) - p_len)
    return resp_mean, prompt_last, counts


def _nan_to_none(x: float) -> float | None:
    return None if x is None or math.isnan(x) else float(x)


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

    Returns:
        One dict per pair with ``projection``, ``prompt_last_projection``, ``response_tokens``, ``score`` and,
        with a baseline, ``baseline_projection`` and ``projection_diff`` (``base_response`` for "generate").
    """
    if baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}; choose from {BASELINES}")
    direction = direction.float().cpu()
    resp, last, counts = pooled_activations(model, tokenizer, prompts, responses, layer, truncate=truncate)
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
        from .generation import generate

        gens = generate(unwrap_model(model), tokenizer, list(prompts), max_new_tokens=max_new_tokens,
                        batch_size=len(prompts))
        texts = [g.text for g in gens]
        usable = [i for i, t in enumerate(texts) if tokenizer(t, add_special_tokens=False)["input_ids"]]
        base = [math.nan] * len(out)
        if usable:
            b_resp, _, _ = pooled_activations(model, tokenizer, [prompts[i] for i in usable],
                                              [texts[i] for i in usable], layer, truncate=truncate)
            for i, value in zip(usable, (b_resp @ direction).tolist(), strict=True):
                base[i] = value
        for rec, text, value in zip(out, texts, base, strict=True):
            rec["base_response"] = text
            rec["baseline_projection"] = value  # NaN when the model answered with nothing
    if baseline != "none":
        for rec in out:
            rec["projection_diff"] = rec["projection"] - rec["baseline_projection"]
            rec["score"] = rec["projection_diff"]
    for rec in out:
        for key, value in rec.items():
            if isinstance(value, float):
                rec[key] = _nan_to_none(value)
    return out


# -- results file ----------------------------------------------------------------------------------------


def _meta_path(out_path: Path) -> Path:
    return out_path.with_name(out_path.name + ".meta.json")


def _fingerprint(prompts: Sequence[str], responses: Sequence[str], direction: Tensor) -> tuple[str, str]:
    data = hashlib.sha256()
    for p, r in zip(prompts, responses, strict=True):
        data.update(p.encode())
        data.update(b"\x00")
        data.update(r.encode())
        data.update(b"\x01")
    vec = hashlib.sha256(direction.float().contiguous().numpy().tobytes()).hexdigest()[:16]
    return data.hexdigest()[:16], vec


def read_score_file(path: str | Path, *, repair: bool = False) -> list[dict]:
    """Records of a results JSONL written by ``score_dataset`` (or drift monitoring).

    Args:
        path: the JSONL file.
        repair: cut off a final line left half-written by a killed run (instead of raising).
    """
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    records: list[dict] = []
    pos = 0
    number = 0
    while pos < len(data):
        end = data.find(b"\n", pos)
        number += 1
        last = end == -1
        chunk = data[pos:] if last else data[pos:end]
        try:
            if last:  # a line without its newline was cut short by a kill, even if it parses
                raise ValueError("unterminated line")
            if chunk.strip():
                records.append(json.loads(chunk))
        except ValueError as exc:
            if last and repair:
                warnings.warn(f"{path.name} line {number}: dropping a half-written line left by an "
                              "interrupted run; it will be recomputed", stacklevel=2)
                with path.open("r+b") as f:
                    f.truncate(pos)
                break
            raise ValueError(f"{path.name} line {number}: corrupt results line ({exc})") from None
        pos = len(data) if last else end + 1
    return records


def _check_resume(out_path: Path, config: dict, resume: bool, valid: set[int]) -> dict[int, dict]:
    """Start a fresh results file, or read the finished records of an interrupted run with the same config."""
    meta_path = _meta_path(out_path)
    if not resume or not out_path.exists():
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text("")
        meta_path.write_text(json.dumps(config, indent=2))
        return {}
    if meta_path.is_file():
        old = json.loads(meta_path.read_text())
        diffs = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in config.items() if old.get(k) != v]
        if diffs:
            raise ValueError(
                f"{out_path} holds results of a different run ({'; '.join(diffs)}); pass resume=False to "
                "overwrite it or choose another output path"
            )
    else:
        meta_path.write_text(json.dumps(config, indent=2))
    done: dict[int, dict] = {}
    for rec in read_score_file(out_path, repair=True):
        idx = rec.get("index")
        if not isinstance(idx, int) or idx not in valid:
            raise ValueError(f"{out_path}: record with index {idx!r}, which is not a sample of this dataset")
        if idx in done:
            raise ValueError(f"{out_path}: index {idx} appears twice; the file is corrupt, rerun with "
                             "resume=False")
        done[idx] = rec
    return done


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
    vectors: VectorSource | str | Path,
    layer: int,
    *,
    baseline: str,
    kind: str | None,
    max_new_tokens: int,
    d_model: int | None,
) -> RunPlan:
    """Format prompts, measure lengths and fix the run's identity (shared by the local and Ray paths)."""
    if baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}; choose from {BASELINES}")
    items = as_samples(samples)
    direction = load_direction(vectors, layer, kind=kind, d_model=d_model)
    by_index = {s.index: s for s in items}
    prompts = {s.index: s.prompt_text(tokenizer) for s in items}
    keys = sorted(by_index)
    encoded = tokenize_pairs(tokenizer, [prompts[i] for i in keys], [by_index[i].response for i in keys])
    lengths = {i: len(ids) for i, (ids, _) in zip(keys, encoded, strict=True)}
    responses = [by_index[i].response for i in keys]
    data_sha, vec_sha = _fingerprint([prompts[i] for i in keys], responses, direction)
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


def append_records(f, records: Sequence[Mapping[str, Any]]) -> None:
    """Append JSONL records to an open file and flush, so finished work survives a kill."""
    f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    f.flush()


def length_sorted_batches(lengths: Mapping[int, int], batch_size: int) -> list[list[int]]:
    """Sample indices grouped into batches of similar length, longest first (ties by index)."""
    order = sorted(lengths, key=lambda i: (-lengths[i], i))
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


def score_dataset(
    model: nn.Module,
    tokenizer,
    samples: Sequence[Sample] | ReadResult | str | Path,
    vectors: VectorSource | str | Path,
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
) -> FlagResult:
    """Score every sample's projection (difference) on a trait direction, appending results to a JSONL.

    Args:
        model: the base HF causal LM the data would finetune.
        tokenizer: its tokenizer.
        samples: ``Sample`` list, a ``ReadResult`` or a data file path (see ``steerlib.data_io``).
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
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}; choose from {BASELINES}")
    hf_model = unwrap_model(model)
    layout = get_layout(hf_model)
    plan = plan_run(tokenizer, samples, vectors, layout.check_layer(layer), baseline=baseline, kind=kind,
                    max_new_tokens=max_new_tokens, d_model=layout.d_model)
    layer, direction, by_index, prompts = plan.layer, plan.direction, plan.by_index, plan.prompts
    out_path = Path(out_path)
    done = _check_resume(out_path, plan.config, resume, set(by_index))
    lengths = plan.lengths
    batches = length_sorted_batches(lengths, batch_size)
    computed = 0
    bar = tqdm(total=len(by_index), initial=len(done), desc=f"flag (layer {layer})", unit="sample",
               disable=not progress)
    with out_path.open("a", encoding="utf-8") as f:
        for number, batch in enumerate(batches):
            todo = [i for i in batch if i not in done]
            if not todo:
                continue
            scored = score_pairs(model, tokenizer, [prompts[i] for i in todo],
                                 [by_index[i].response for i in todo], direction, layer, baseline=baseline,
                                 max_new_tokens=max_new_tokens, truncate=truncate)
            new = [sample_record(by_index[i], rec) for i, rec in zip(todo, scored, strict=True)]
            done.update((r["index"], r) for r in new)
            append_records(f, new)  # flushed: a kill after this point loses nothing of this batch
            computed += len(new)
            bar.update(len(new))
            if on_batch is not None:
                on_batch(number, new)
    bar.close()
    records = [done[i] for i in sorted(done)]
    return FlagResult(records=records, layer=layer, baseline=baseline, out_path=out_path, computed=computed)


# -- ranking and plots -----------------------------------------------------------------------------------


def rank(
    records: FlagResult | Sequence[Mapping[str, Any]],
    *,
    samples: Sequence[Sample] | None = None,
    by: str = "score",
    top_k: int | None = None,
    out_path: str | Path | None = None,
    descending: bool = True,
) -> list[dict]:
    """Rank samples by a score field, highest (most trait-expressing) first.

    Args:
        records: a ``FlagResult`` or its records.
        samples: the scored samples, to add the user prompt and response text to each ranked row.
        by: the field to rank by ("score", "projection", "projection_diff"...).
        top_k: keep only the first ``k`` rows.
        out_path: also write the ranking, as CSV when the name ends in ``.csv``, else JSONL.
        descending: highest first. Samples without a value (no baseline) go last.
    """
    if isinstance(records, FlagResult):
        records = records.records
    texts = {s.index: s for s in samples} if samples is not None else {}

    def key(r: Mapping[str, Any]) -> tuple[int, float]:
        value = r.get(by)
        if value is None:
            return (1, 0.0)
        return (0, -value if descending else value)

    if records and not any(by in r for r in records):
        raise ValueError(f"no field {by!r} in the records; available: {sorted(records[0])}")
    ranked = []
    for position, rec in enumerate(sorted(records, key=key), start=1):
        row = {"rank": position, **rec}
        sample = texts.get(rec["index"])
        if sample is not None:
            row["user"] = sample.user
            row["response"] = sample.response
        ranked.append(row)
    if top_k is not None:
        ranked = ranked[:top_k]
    if out_path is not None:
        _write_rows(ranked, Path(out_path))
    return ranked


def _write_rows(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() != ".csv":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        return
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, dict | list) else v for k, v in row.items()})


def plot_histogram(
    records: FlagResult | Sequence[Mapping[str, Any]],
    path: str | Path,
    *,
    by: str = "score",
    top_k: int | None = None,
    label_key: str | None = None,
    title: str | None = None,
) -> Path:
    """Histogram of per-sample scores as a PNG, with the top-k cut-off marked.

    Args:
        records: a ``FlagResult`` or its records.
        path: output PNG.
        by: score field to plot.
        top_k: draw a line at the k-th highest score.
        label_key: a ``meta`` field (e.g. a known label) to split the histogram by.
        title: plot title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if isinstance(records, FlagResult):
        records = records.records
    rows = [r for r in records if r.get(by) is not None]
    if not rows:
        raise ValueError(f"no sample has a value for {by!r}; nothing to plot")
    values = np.array([r[by] for r in rows], dtype=float)
    bins = np.histogram_bin_edges(values, bins=min(40, max(5, len(values) // 3)))
    fig, ax = plt.subplots(figsize=(7, 4))
    if label_key is not None:
        groups: dict[str, list[float]] = {}
        for r, v in zip(rows, values, strict=True):
            groups.setdefault(str((r.get("meta") or {}).get(label_key)), []).append(v)
        for name, vals in sorted(groups.items()):
            ax.hist(vals, bins=bins, alpha=0.6, label=f"{label_key}={name}")
        ax.legend()
    else:
        ax.hist(values, bins=bins, color="tab:blue", alpha=0.8)
    if top_k is not None and 0 < top_k <= len(values):
        cut = float(np.sort(values)[::-1][top_k - 1])
        ax.axvline(cut, color="tab:red", linestyle="--", label=f"top {top_k}")
        ax.legend()
    ax.set_xlabel(by)
    ax.set_ylabel("samples")
    ax.set_title(title or f"{by} per sample (n={len(values)})")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- one-call entry point for the CLI --------------------------------------------------------------------


@dataclass
class FlagReport:
    """What ``flag_file`` wrote and found."""

    summary: dict[str, Any]
    top: list[dict]
    scores_path: Path
    ranked_jsonl: Path
    ranked_csv: Path
    histogram: Path
    summary_path: Path
    problems: list = field(default_factory=list)


def load_vectors_file(path: str | Path, model: nn.Module | None = None) -> VectorSource:
    """A saved TraitVectors folder/file, or a ``.pt`` tensor."""
    path = Path(path)
    if path.suffix == ".pt":
        tensor = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(tensor, Tensor):
            raise ValueError(f"{path} does not hold a tensor")
        return tensor
    return TraitVectors.load(path, model=unwrap_model(model) if model is not None else None)


def flag_file(
    data_path: str | Path,
    vectors_path: str | Path,
    *,
    out_dir: str | Path,
    model_path: str | Path | None = None,
    layer: int | None = None,
    kind: str | None = None,
    baseline: Baseline = "none",
    batch_size: int = 16,
    max_new_tokens: int = 64,
    top_k: int = 20,
    resume: bool = True,
    on_error: Literal["raise", "skip"] = "raise",
    use_ray: bool = False,
    ray_concurrency: int = 1,
    ray_address: str | None = None,
    dtype: str = "float32",
    device: str | None = None,
    progress: bool = True,
    label_key: str | None = None,
    negate: bool = False,
) -> FlagReport:
    """Score a data file against a trait vector and write scores, rankings, a histogram and a summary.

    Writes into ``out_dir``: ``scores.jsonl`` (resumable), ``ranked.jsonl``, ``ranked.csv``, ``histogram.png``
    and ``summary.json``.

    Args:
        data_path: JSONL/CSV training data (see ``steerlib.data_io.read_samples``).
        vectors_path: saved TraitVectors (folder or .safetensors) or a ``.pt`` tensor.
        out_dir: output folder.
        model_path: model to score with (None: embedded SmolLM2).
        layer: layer to read (default: the vectors' recommended layer).
        kind: TraitVectors pooling kind.
        baseline: "none", "generate" or "prompt_last" (see ``score_dataset``).
        batch_size: samples per forward pass.
        max_new_tokens: length of generated baseline responses.
        top_k: number of top samples returned (and marked on the histogram).
        resume: continue an interrupted run in ``out_dir``.
        on_error: "raise" or "skip" malformed data lines.
        use_ray: score with a Ray Data pipeline (``steerlib.ray_scoring``).
        ray_concurrency: number of Ray scoring actors.
        ray_address: Ray cluster address (None: start a local instance).
        dtype: model dtype.
        device: model device (default CUDA when available).
        progress: show progress.
        label_key: a meta field with known labels, to split the histogram by.
        negate: score on the opposite pole (the negated direction), so the ranking puts the samples most
            against the trait first (e.g. the gloomiest samples with an optimism vector). Scores are then
            projections on ``-v``.
    """
    from .models import load_model

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    read = read_samples(data_path, on_error=on_error)
    if not read.samples:
        raise ValueError(f"{data_path}: no valid samples ({len(read.problems)} malformed lines)")
    scores_path = out_dir / "scores.jsonl"
    vectors = load_vectors_file(vectors_path)
    if layer is None:
        if not isinstance(vectors, TraitVectors) or vectors.recommended_layer is None:
            raise ValueError("pass layer: the vectors have no recommended layer")
        layer = vectors.recommended_layer
    if negate:
        # The other pole is the negated direction: every projection flips sign, so highest-first ranks it.
        vectors = -vectors
    if use_ray:
        from .ray_scoring import score_dataset_ray

        result = score_dataset_ray(
            model_path, read.samples, vectors, layer, out_path=scores_path, batch_size=batch_size,
            baseline=baseline, max_new_tokens=max_new_tokens, resume=resume, kind=kind,
            concurrency=ray_concurrency, address=ray_address, dtype=dtype, progress=progress,
        )
    else:
        model, tokenizer = load_model(model_path, dtype=dtype, device=device)
        if isinstance(vectors, TraitVectors):
            vectors.check_model(model)
        result = score_dataset(
            model, tokenizer, read.samples, vectors, layer, out_path=scores_path, batch_size=batch_size,
            baseline=baseline, max_new_tokens=max_new_tokens, resume=resume, progress=progress, kind=kind,
        )
    ranked = rank(result, samples=read.samples, out_path=out_dir / "ranked.jsonl")
    _write_rows(ranked, out_dir / "ranked.csv")
    hist = plot_histogram(result, out_dir / "histogram.png", top_k=min(top_k, len(ranked)),
                          label_key=label_key)
    summary = {**result.summary(), "data": str(data_path), "negated": negate,
               "problems": [str(p) for p in read.problems]}
    summary_path = out_dir / "summary.json"
    summary_path.write_text(json.dumps(summary, indent=2))
    return FlagReport(summary=summary, top=ranked[:top_k], scores_path=scores_path,
                      ranked_jsonl=out_dir / "ranked.jsonl", ranked_csv=out_dir / "ranked.csv",
                      histogram=hist, summary_path=summary_path, problems=list(read.problems))
