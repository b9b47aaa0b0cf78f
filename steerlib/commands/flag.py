"""``steerlib flag``: score a finetuning data file against a trait vector, rank it, plot it."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from steerlib.commands.common import ON_ERROR, fit_vectors, text_generator
from steerlib.core import models
from steerlib.core.arch import get_layout
from steerlib.core.checks import check_choice, check_int, check_out_dir
from steerlib.core.loading import load_vectors, pick_layer
from steerlib.finetuning.flag.report import plot_histogram, rank, write_rows
from steerlib.finetuning.flag.scoring import BASELINES, Baseline, score_dataset
from steerlib.store.results import exclusive_output
from steerlib.store.samples import read_samples

__all__ = ["FlagReport", "flag_file"]


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
    engine: str = "hf",
    vllm_args: Mapping[str, Any] | None = None,
    server: str | None = None,
    api_key: str | None = None,
) -> FlagReport:
    """Score a data file against a trait vector and write scores, rankings, a histogram and a summary.

    Writes into ``out_dir``: ``scores.jsonl`` (resumable), ``ranked.jsonl``, ``ranked.csv``, ``histogram.png``
    and ``summary.json``.

    Args:
        data_path: JSONL/CSV training data (see ``steerlib.store.samples.read_samples``).
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
        use_ray: score with a Ray Data pipeline (``steerlib.finetuning.flag.ray``).
        ray_concurrency: number of Ray scoring actors.
        ray_address: Ray cluster address (None: start a local instance).
        dtype: model dtype.
        device: model device (default CUDA when available).
        progress: show progress.
        label_key: a meta field with known labels, to split the histogram by.
        negate: score on the opposite pole (the negated direction), so the ranking puts the samples most
            against the trait first (e.g. the gloomiest samples with an optimism vector). Scores are then
            projections on ``-v``.
        engine: "hf" or "vllm": what generates the "generate" baseline's responses and computes the activations
            (with "vllm", read inside vLLM: the HF model's weights are not loaded).
        vllm_args: vLLM engine arguments by vLLM's names (``VllmOptions``) with ``engine="vllm"``.
        server: a running ``steerlib serve``'s URL instead of a local engine: its engine generates the baseline
            and computes the activations (``steerlib.serve.remote``; it must serve ``model_path``'s model, whose
            tokenizer and shape are read here, and capture inside it: ``--engine vllm``).
        api_key: the server's API key.
    """
    check_int(top_k, "top_k")
    check_int(batch_size, "batch_size")
    check_int(max_new_tokens, "max_new_tokens")
    check_int(ray_concurrency, "ray_concurrency")
    check_choice(on_error, "on_error", ON_ERROR)
    check_choice(baseline, "baseline", BASELINES)
    if (engine != "hf" or server is not None) and use_ray:
        raise ValueError("--ray scores on HF models of its own: use it without --engine vllm or --server")
    if engine != "hf" and server is not None:
        raise ValueError("--engine vllm and --server name two engines: choose one")
    generator = text_generator(engine, model_path, vllm_args)
    with exclusive_output(check_out_dir(out_dir), "steerlib flag"):
        out_dir = check_out_dir(out_dir)
        read = read_samples(data_path, on_error=on_error)
        out_dir.mkdir(parents=True, exist_ok=True)
        if not read.samples:
            raise ValueError(f"{data_path}: no valid samples ({len(read.problems)} malformed lines)")
        scores_path = out_dir / "scores.jsonl"
        vectors = load_vectors(vectors_path)
        layer = pick_layer(vectors, layer)
        if negate:
            # The other pole is the negated direction: every projection flips sign, so highest-first ranks it.
            vectors = -vectors
        if use_ray:
            from steerlib.finetuning.flag.ray import score_dataset_ray  # ray is an optional extra

            result = score_dataset_ray(
                model_path, read.samples, vectors, layer, out_path=scores_path, batch_size=batch_size,
                baseline=baseline, max_new_tokens=max_new_tokens, resume=resume, kind=kind,
                concurrency=ray_concurrency, address=ray_address, dtype=dtype, progress=progress,
            )
        else:
            if generator is None and server is None:
                model, tokenizer = models.load_model(model_path, dtype=dtype, device=device)
            else:  # another engine holds the weights: only the shape and the tokenizer are needed here
                (model, tokenizer), _ = models.load_model_skeleton(model_path)
            vectors = fit_vectors(vectors, vectors_path, model)
            if server is not None:
                from steerlib.serve.remote import RemoteEngine  # serving is an optional extra

                generator = RemoteEngine(server, tokenizer, api_key=api_key)
                layout = get_layout(model)
                generator.check_model(layout.n_layers, layout.d_model)
            try:
                result = score_dataset(
                    model, tokenizer, read, vectors, layer, out_path=scores_path, batch_size=batch_size,
                    baseline=baseline, max_new_tokens=max_new_tokens, resume=resume, progress=progress, kind=kind,
                    generate_texts=generator,
                )
            finally:
                if generator is not None:
                    generator.close()
        ranked = rank(result, samples=read.samples, out_path=out_dir / "ranked.jsonl")
        write_rows(ranked, out_dir / "ranked.csv")
        hist = plot_histogram(result, out_dir / "histogram.png", top_k=min(top_k, len(ranked)),
                              label_key=label_key)
        summary = {**result.summary(), "data": str(data_path), "negated": negate,
                   "problems": [str(p) for p in read.problems]}
        summary_path = out_dir / "summary.json"
        summary_path.write_text(json.dumps(summary, indent=2))
        return FlagReport(summary=summary, top=ranked[:top_k], scores_path=scores_path,
                          ranked_jsonl=out_dir / "ranked.jsonl", ranked_csv=out_dir / "ranked.csv",
                          histogram=hist, summary_path=summary_path, problems=list(read.problems))
