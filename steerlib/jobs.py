"""Path -> object wiring for every command: load the model, vectors and data files a command names, call the
library, and write its outputs. The CLI parses arguments and calls exactly one function here; the policies
(which layer by default, which judge, what gets written where) live here or below, never in the CLI.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import Tensor

from steerlib.core.chat import format_prompt
from steerlib.core.checks import check_choice, check_int, check_number, check_out_dir, check_text, read_text
from steerlib.core.gguf_vectors import direction_index, export_gguf
from steerlib.core.loading import load_vectors, pick_layer
from steerlib.core.models import load_model, resolve_model_path
from steerlib.core.vectors import TraitVectors
from steerlib.evaluation.inventory import (
    Inventory,
    InventoryMatrix,
    InventoryResult,
    administer,
    inventory_matrix,
)
from steerlib.evaluation.prompt_shift import ShiftCheck, prompt_shift
from steerlib.evaluation.report import run_dose, write_report
from steerlib.extraction.extract import ExtractionConfig, ExtractionResult, extract_trait
from steerlib.finetuning.flag.report import plot_histogram, rank, write_rows
from steerlib.finetuning.flag.scoring import BASELINES, Baseline, score_dataset
from steerlib.finetuning.shift import FinetuningShift, finetuning_shift, load_finetuned, plot_shift
from steerlib.finetuning.training import TrainMode, TrainResult, lora_finetune
from steerlib.monitoring.conversations import DriftReport, monitor_conversations, read_conversations
from steerlib.monitoring.drift import DriftMonitor
from steerlib.steering.calibration import Calibration, Percentile, calibrate, calibrated_cap, calibration_path
from steerlib.steering.dose import DoseResponse, dose_response
from steerlib.steering.generation import Generation, generate
from steerlib.steering.plan import method_named, parse_params, position_rule
from steerlib.steering.steer import When, build_ops, build_readout
from steerlib.store.results import exclusive_output
from steerlib.store.samples import read_samples
from steerlib.traits.judges import make_judge
from steerlib.traits.library import Trait, TraitError, check_trait_name, load_trait

__all__ = ["FlagReport", "calibrate_file", "check_serve", "export_file", "extract_file", "flag_file", "inventory_file", "monitor_file",
           "new_trait_file", "report_file", "shift_file", "shiftcheck_file", "steer_file", "train_file"]

ON_ERROR = ("raise", "skip")


def _fit_vectors(source: TraitVectors | Tensor, path: str | Path, model) -> TraitVectors | Tensor:
    """Vectors loaded before the model, checked against it; a mismatch names the file."""
    try:
        return load_vectors(source, model)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def extract_file(
    trait: str | Path,
    out_dir: str | Path | None = None,
    *,
    model_path: str | Path | None = None,
    judge: str = "auto",
    config: ExtractionConfig | None = None,
    engine: str = "hf",
    vllm_args: Mapping[str, Any] | None = None,
) -> ExtractionResult:
    """Extract a trait's vectors into ``out_dir`` (default ``runs/<trait>``), resuming a partial run there.

    The coherence judge, when ``config.coherence_threshold`` is set, is the same endpoint as an ``openai:``
    judge, else the model judging itself. ``engine="vllm"`` generates the responses with vLLM (the vLLM
    environment, ``make vllm-env``; ``vllm_args``: vLLM engine arguments by vLLM's names, ``VllmOptions``);
    activations are captured on the HF model either way.
    """
    config = config or ExtractionConfig()  # its numbers are checked when it is built
    generator = _text_generator(engine, model_path, vllm_args)
    t = load_trait(trait)
    out_dir = check_out_dir(out_dir or Path("runs") / t.name)
    with exclusive_output(out_dir, f"steerlib extract {t.name}"):
        loaded = load_model(model_path)
        model, tok = loaded
        trait_judge = make_judge(judge, t, model=model, tokenizer=tok)
        coherence = None
        if config.coherence_threshold is not None:
            coherence = make_judge(judge if judge.startswith("openai:") else "self", t, model=model, tokenizer=tok,
                                   rubric=t.coherence_rubric)
        try:
            return extract_trait(model, tok, t, out_dir, judge=trait_judge, coherence_judge=coherence,
                                 config=config, model_name=loaded.name, generate_texts=generator)
        finally:
            if generator is not None:
                generator.close()


def _text_generator(engine: str, model_path: str | Path | None, vllm_args: Mapping[str, Any] | None = None):
    """None for the HF engine, else a started-on-first-use vLLM generator (checked before any model loads)."""
    check_choice(engine, "engine", ("hf", "vllm"))
    if engine == "hf":
        if vllm_args:
            raise ValueError("vLLM engine arguments (--vllm-arg) need --engine vllm")
        return None
    from steerlib.vllm.layout import VllmOptions

    options = VllmOptions.from_engine_args({"max_model_len": 2048, **(vllm_args or {})})
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise ValueError("--engine vllm needs vLLM in this environment (make vllm-env, then use .venv-vllm)")
    from steerlib.core.models import resolve_model_path
    from steerlib.vllm.offline import VllmGenerator

    folder, _ = resolve_model_path(model_path)
    return VllmGenerator(folder, options)


def sweep_judge(trait: str):
    """The offline judge for a dose-response, where the trait has one (None otherwise)."""
    try:
        return make_judge("auto", load_trait(trait))
    except (TraitError, ValueError):
        return None


@dataclass(frozen=True)
class SteeredAnswers:
    """Answers to each prompt per coefficient (0 = unsteered), or a dose-response table for a sweep."""

    layer: int
    coefs: tuple[float, ...]
    answers: dict[float, list[Generation]] = field(default_factory=dict)
    dose: DoseResponse | None = None
    labels: dict[float, str] = field(default_factory=dict)


def calibrate_file(
    vectors_path: str | Path,
    *,
    model_path: str | Path | None = None,
    layers: Sequence[int] | None = None,
    max_new_tokens: int = 48,
    batch_size: int = 8,
    fresh: bool = False,
) -> tuple[Calibration, Path]:
    """Calibrate the vectors at ``vectors_path`` on the shipped reference questions; saved beside them.

    Returns:
        The calibration and the path it was written to (``<vectors folder>/calibration.json``).
    """
    check_int(max_new_tokens, "max_new_tokens")
    check_int(batch_size, "batch_size")
    source = load_vectors(vectors_path)  # a damaged file fails before the model loads
    out = calibration_path(vectors_path)
    loaded = load_model(model_path)
    model, tok = loaded
    source = _fit_vectors(source, vectors_path, model)
    cal = calibrate(model, tok, source, out, layers=layers, max_new_tokens=max_new_tokens, batch_size=batch_size,
                    resume=not fresh, model_name=loaded.name)
    return cal, out


def steer_file(
    vectors_path: str | Path,
    prompts: Sequence[str],
    *,
    model_path: str | Path | None = None,
    layer: int | None = None,
    coef: float = 4.0,
    mode: str = "add",
    positions: str = "all",
    relative: bool = False,
    cap: tuple[float | None, float | None] | None = None,
    sweep: Sequence[float] | None = None,
    system: str | None = None,
    max_new_tokens: int = 48,
    plot: str | Path | None = None,
    cap_percentile: float | None = None,
    cap_side: str = "max",
    layers: Sequence[int] | None = None,
    when_vector: str | Path | None = None,
    when_above: float | None = None,
    when_below: float | None = None,
    latch: bool = False,
    params: Sequence[str] = (),
) -> SteeredAnswers:
    """Steered answers next to unsteered ones, or with ``sweep`` a dose-response over coefficients.

    ``params`` are the method's own parameters as ``NAME=VALUE`` texts (``plan.parse_params``).

    With ``cap_percentile`` the steered answers are capped at that percentile of the vectors' calibration
    (``steerlib calibrate``) over ``layers`` (default: ``layer``); ``cap_side="min"`` floors instead.
    With ``when_above``/``when_below`` the edit is gated on the projection on ``when_vector`` (default: the steering
    vectors) at the edit's layer, per token or, with ``latch``, for the rest of a response once it opens.
    Every argument is checked before the model is loaded; ``sweep=[]`` is an error, not a plain run.
    """
    if isinstance(prompts, str) or not prompts:
        raise ValueError("no prompts given")
    for i, p in enumerate(prompts):
        check_text(p, f"prompt {i}")
    if system is not None:
        check_text(system, "system prompt")
    method_params = parse_params(mode, params)  # registered methods and position rules check themselves
    position_rule(positions)  # first:N, window:A-B and marker:TEXT too
    check_number(coef, "coef")
    check_int(max_new_tokens, "max_new_tokens")
    if sweep is not None:
        if len(sweep) == 0:
            raise ValueError("sweep is empty: give the coefficients to compare, e.g. --sweep 0,2,4")
        for c in sweep:
            check_number(c, "sweep coefficient")
    for bound in cap or ():
        if bound is not None:
            check_number(bound, "cap bound")
    if plot is not None:
        check_out_dir(Path(plot).parent, "--plot folder")
    pct = calibration = None
    if cap_percentile is not None:
        if sweep is not None or any(b is not None for b in cap or ()):
            raise ValueError("--cap-percentile replaces --cap-min/--cap-max and cannot be combined with --sweep")
        pct = Percentile(cap_percentile, side=cap_side)  # type: ignore[arg-type]
        calibration = Calibration.load(calibration_path(vectors_path))
        for x in layers or ():
            calibration.value(x, pct.value)  # an uncalibrated layer fails before the model loads
    elif layers is not None:
        raise ValueError("--layers is for --cap-percentile; use --layer for a single steering layer")
    gated = when_above is not None or when_below is not None
    for bound in (when_above, when_below):
        if bound is not None:
            check_number(bound, "condition threshold")
    if (when_vector is not None or latch) and not gated:
        raise ValueError("--when-vector and --latch need --when-above and/or --when-below")
    if gated and (sweep is not None or cap_percentile is not None):
        raise ValueError("a condition (--when-above/--when-below) cannot be combined with --sweep or --cap-percentile")
    condition_source = load_vectors(when_vector) if when_vector is not None else None
    source = load_vectors(vectors_path)  # a damaged file fails before the model loads
    loaded = load_model(model_path)
    model, tok = loaded
    source = _fit_vectors(source, vectors_path, model)
    if pct is not None:
        calibration.check_model(model, calibration_path(vectors_path))  # type: ignore[union-attr]
        chosen = list(layers) if layers else [pick_layer(source, layer)]
        ops = calibrated_cap(model, source, calibration, pct, chosen)  # type: ignore[arg-type]
        formatted = [format_prompt(tok, p, system) for p in prompts]
        trait = source.trait if isinstance(source, TraitVectors) else "trait"
        readout = build_readout(model, {trait: source}, [chosen[-1]])
        answers = {0.0: generate(model, tok, formatted, readout=readout, max_new_tokens=max_new_tokens),
                   1.0: generate(model, tok, formatted, steering=ops, readout=readout, max_new_tokens=max_new_tokens)}
        span = f"{chosen[0]}-{chosen[-1]}" if len(chosen) > 1 else str(chosen[0])
        label = f"cap {pct.side} at percentile {pct.value:g} over layers {span}"
        return SteeredAnswers(layer=chosen[-1], coefs=(0.0, 1.0), answers=answers,
                              labels={0.0: "unsteered", 1.0: label})
    layer = pick_layer(source, layer)
    formatted = [format_prompt(tok, p, system) for p in prompts]
    trait = source.trait if isinstance(source, TraitVectors) else "trait"
    readout = build_readout(model, {trait: source}, [layer])
    if sweep is not None:
        dose = dose_response(model, tok, formatted, source, layer, list(sweep), relative=relative, readout=readout,
                             max_new_tokens=max_new_tokens, judge=sweep_judge(trait), plot_path=plot)
        return SteeredAnswers(layer=layer, coefs=tuple(sweep), dose=dose)
    when = None
    labels = {}
    if gated:
        condition = _fit_vectors(condition_source, when_vector, model) if condition_source is not None else source
        when = When(condition, when_above, when_below, latch)
        side = " and ".join(f"{name} {v:g}" for name, v in (("above", when_above), ("below", when_below))
                            if v is not None)
        labels[coef] = (f"{mode} coef={coef:g} layer={layer} when projection {side}"
                        f"{' (latched)' if latch else ''}")
    answers: dict[float, list[Generation]] = {}
    for c in (0.0, coef):
        ops = [] if c == 0 else build_ops(model, source, layer, c, mode=mode, positions=positions, cap=cap,
                                          relative=relative, when=when if c == coef else None, params=method_params)
        answers[c] = generate(model, tok, formatted, steering=ops, readout=readout, max_new_tokens=max_new_tokens)
    return SteeredAnswers(layer=layer, coefs=(0.0, coef), answers=answers, labels=labels)


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
        engine: "hf" or "vllm": what generates the "generate" baseline's responses (activations stay on HF).
        vllm_args: vLLM engine arguments by vLLM's names (``VllmOptions``) with ``engine="vllm"``.
    """
    check_int(top_k, "top_k")
    check_int(batch_size, "batch_size")
    check_int(max_new_tokens, "max_new_tokens")
    check_int(ray_concurrency, "ray_concurrency")
    check_choice(on_error, "on_error", ON_ERROR)
    check_choice(baseline, "baseline", BASELINES)
    if engine != "hf" and (baseline != "generate" or use_ray):
        raise ValueError("--engine vllm generates the baseline responses: use it with --baseline generate, "
                         "without Ray")
    generator = _text_generator(engine, model_path, vllm_args)
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
            model, tokenizer = load_model(model_path, dtype=dtype, device=device)
            vectors = _fit_vectors(vectors, vectors_path, model)
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


def monitor_file(
    conversations_path: str | Path,
    vectors_paths: Sequence[str | Path],
    *,
    out_dir: str | Path,
    model_path: str | Path | None = None,
    layer: int | None = None,
    window: int = 20,
    method: str = "zscore",
    threshold: float = 3.0,
    reference_size: int = 50,
    batch_size: int = 16,
    resume: bool = True,
    on_error: Literal["raise", "skip"] = "raise",
    dtype: str = "float32",
    device: str | None = None,
    progress: bool = True,
) -> DriftReport:
    """CLI entry: load a model and trait vectors, then ``monitor_conversations`` on a log file.

    Args:
        conversations_path: JSONL conversation log.
        vectors_paths: saved TraitVectors (trait named by their metadata) or ``name=path`` strings.
        out_dir: output folder.
        model_path: model (None: embedded SmolLM2).
        layer: layer to read (default: the vectors' shared recommended layer).
        window: rolling window.
        method: "zscore", "percentile" or "rolling".
        threshold: alert threshold.
        reference_size: turns used for calibration.
        batch_size: responses per forward pass.
        resume: continue an interrupted run.
        on_error: "raise" or "skip" malformed log lines.
        dtype: model dtype.
        device: model device.
        progress: show a progress bar.
    """
    # The monitor's own checks, run before the model loads (a throwaway instance watching one name).
    DriftMonitor(["check"], window=window, method=method, threshold=threshold, reference_size=reference_size)
    check_choice(on_error, "on_error", ON_ERROR)
    check_int(batch_size, "batch_size")
    check_out_dir(out_dir)
    with exclusive_output(out_dir, "steerlib monitor"):
        if not vectors_paths:
            raise ValueError("no trait vectors given")
        with warnings.catch_warnings():  # skipped lines are reported once, by the run itself
            warnings.simplefilter("ignore")
            read_conversations(conversations_path, on_error=on_error)  # a malformed log fails now, naming its line
        specs = [str(spec).rpartition("=") if "=" in str(spec) else ("", "", str(spec)) for spec in vectors_paths]
        loaded = [load_vectors(path) for _, _, path in specs]  # damaged files fail before the model loads
        model, tokenizer = load_model(model_path, dtype=dtype, device=device)
        vectors: dict[str, TraitVectors | Tensor] = {}
        for (name, _, path), vec in zip(specs, loaded, strict=True):
            vec = _fit_vectors(vec, path, model)
            name = name or (vec.trait if isinstance(vec, TraitVectors) else Path(path).stem)
            if name in vectors:
                raise ValueError(f"two vector files for trait {name!r}; name them with name=path")
            vectors[name] = vec
        if layer is None:
            recs = {v.recommended_layer for v in vectors.values() if isinstance(v, TraitVectors)}
            all_saved = all(isinstance(v, TraitVectors) for v in vectors.values())
            if len(recs) != 1 or None in recs or not all_saved:
                raise ValueError("pass layer: the vectors do not share one recommended layer")
            layer = recs.pop()
        return monitor_conversations(model, tokenizer, vectors, layer, conversations_path, out_dir=out_dir,
                                     window=window, method=method, threshold=threshold,
                                     reference_size=reference_size, batch_size=batch_size, resume=resume,
                                     on_error=on_error, progress=progress)


def shift_file(
    finetuned_path: str | Path,
    vectors_path: str | Path,
    *,
    out_dir: str | Path,
    base_path: str | Path | None = None,
    trait: str | None = None,
    questions_path: str | Path | None = None,
    layers: Sequence[int] | None = None,
    kind: str | None = None,
    max_new_tokens: int = 48,
    batch_size: int = 8,
    dtype: str = "float32",
    device: str | None = None,
) -> FinetuningShift:
    """CLI entry: measure a finetune's shift and write ``shift.json`` and ``shift.png`` into ``out_dir``.

    Args:
        finetuned_path: a full HF model folder or a PEFT adapter folder.
        vectors_path: saved TraitVectors (or a ``.pt`` tensor).
        out_dir: output folder.
        base_path: the base model (None: embedded SmolLM2).
        trait: built-in or JSON trait whose ``eval_questions`` are used (default: the vectors' trait).
        questions_path: a text file with one question per line (overrides ``trait``).
        layers: layers to measure (default all).
        kind: TraitVectors pooling kind.
        max_new_tokens: length of the base model's responses.
        batch_size: samples per forward pass.
        dtype: model dtype.
        device: model device.
    """
    check_int(max_new_tokens, "max_new_tokens")
    check_int(batch_size, "batch_size")
    if layers is not None and len(layers) == 0:
        raise ValueError("layers is empty: give the layers to measure, or none for all")
    out_dir = check_out_dir(out_dir)
    vectors = load_vectors(vectors_path)
    if questions_path is not None:
        questions = [q.strip() for q in read_text(questions_path, "questions file").splitlines() if q.strip()]
        if not questions:
            raise ValueError(f"{questions_path}: no questions (the file is empty)")
    else:
        name = trait or (vectors.trait if isinstance(vectors, TraitVectors) else None)
        if name is None:
            raise ValueError("pass trait or questions_path: a bare tensor names no trait")
        questions = list(load_trait(name).eval_questions)
    finetuned, tokenizer, is_adapter = load_finetuned(finetuned_path, base_path, dtype=dtype, device=device)
    base = None if is_adapter else load_model(base_path, dtype=dtype, device=device).model
    shift = finetuning_shift(base, finetuned, tokenizer, vectors, questions, layers, kind=kind,
                             max_new_tokens=max_new_tokens, batch_size=batch_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "shift.json").write_text(json.dumps(shift.to_dict(), indent=2))
    recommended = vectors.recommended_layer if isinstance(vectors, TraitVectors) else None
    plot_shift(shift, out_dir / "shift.png", highlight_layer=recommended)
    return shift


def train_file(
    data_path: str | Path,
    *,
    out_dir: str | Path,
    model_path: str | Path | None = None,
    vectors_path: str | Path | None = None,
    layer: int | None = None,
    coef: float = 0.0,
    mode: TrainMode = "add",
    steps: int = 40,
    batch_size: int = 8,
    lr: float = 1e-3,
    r: int = 8,
    seed: int = 0,
    dtype: str = "float32",
    device: str | None = None,
) -> TrainResult:
    """CLI entry: LoRA-finetune on a data file, optionally with preventative steering; save the adapter.

    Args:
        data_path: JSONL/CSV training data.
        out_dir: where the adapter (``adapter_config.json`` etc.) and ``losses.json`` are written.
        model_path: base model (None: embedded SmolLM2).
        vectors_path: trait vectors for steering during training (None: plain finetune).
        layer: layer to steer (default: the vectors' recommended layer).
        coef: steering coefficient for ``mode="add"``.
        mode: "add" (preventative steering) or "ablate" (CAFT).
        steps: optimiser steps.
        batch_size: samples per step.
        lr: learning rate.
        r: LoRA rank.
        seed: random seed.
        dtype: model dtype.
        device: model device.
    """
    check_number(coef, "coef")
    check_choice(mode, "training mode", ("add", "ablate"))
    if vectors_path is None and (coef != 0 or layer is not None or mode != "add"):
        given = "coef" if coef != 0 else "layer" if layer is not None else f"mode {mode!r}"
        raise ValueError(f"{given} given without vectors: preventative steering needs --vector (a plain "
                         "finetune takes neither)")
    check_int(steps, "steps")
    check_int(batch_size, "batch_size")
    check_int(r, "LoRA rank")
    check_number(lr, "learning rate", minimum=0, strict=True)
    out_dir = check_out_dir(out_dir)  # before training, not after it
    read_samples(data_path)  # a malformed data file fails now, with its line, not after the model loads
    vectors = load_vectors(vectors_path) if vectors_path is not None else None
    model, tokenizer = load_model(model_path, dtype=dtype, device=device)
    steering = None
    if vectors is not None:
        vectors = _fit_vectors(vectors, vectors_path, model)
        layer = pick_layer(vectors, layer)
        steering = {"vectors": vectors, "layer": layer, "coef": coef, "mode": mode}
    result = lora_finetune(model, tokenizer, data_path, steps=steps, batch_size=batch_size, lr=lr, r=r,
                           steering=steering, seed=seed)
    result.model.save_pretrained(out_dir)
    (out_dir / "losses.json").write_text(json.dumps(result.losses))
    return result


def shiftcheck_file(
    vectors_path: str | Path,
    out_dir: str | Path | None = None,
    *,
    model_path: str | Path | None = None,
    trait: str | None = None,
    judge: str = "auto",
    n_questions: int = 8,
    pair: int = 0,
    shots: Sequence[int] = (0, 1, 2, 4, 8),
    negative_shots: bool = True,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    resume: bool = True,
) -> tuple[ShiftCheck, Path]:
    """The prompt-shift experiment for saved vectors, written to ``out_dir`` (default: beside the vectors)."""
    vectors_path = Path(vectors_path)
    tv = load_vectors(vectors_path)  # the files and every number first: nothing loads a model before they pass
    if not isinstance(tv, TraitVectors):
        raise ValueError(f"{vectors_path}: shiftcheck needs saved TraitVectors (an extraction run), not a bare tensor")
    t = load_trait(trait or tv.trait)
    check_int(n_questions, "n_questions", minimum=3, maximum=len(t.eval_questions))
    check_int(max_new_tokens, "max_new_tokens")
    check_int(batch_size, "batch_size")
    for k in shots:
        check_int(k, "shots", minimum=0)
    folder = Path(out_dir) if out_dir is not None else (
        vectors_path if vectors_path.is_dir() else vectors_path.parent) / "shiftcheck"
    with exclusive_output(check_out_dir(folder), "steerlib shiftcheck"):
        model, tok = load_model(model_path)
        tv = _fit_vectors(tv, vectors_path, model)
        trait_judge = make_judge(judge, t, model=model, tokenizer=tok)
        result = prompt_shift(model, tok, tv, folder, trait=t, judge=trait_judge, n_questions=n_questions, pair=pair,
                              shots=list(shots), negative_shots=negative_shots, max_new_tokens=max_new_tokens,
                              batch_size=batch_size, resume=resume, progress=True)
        return result, folder


def inventory_file(
    vectors: dict[str, str] | None = None,
    *,
    model_path: str | Path | None = None,
    inventory: str = "big_five",
    coef: float = 0.5,
    relative: bool = True,
    layer: int | None = None,
    out: str | Path | None = None,
) -> InventoryResult | InventoryMatrix:
    """Administer an inventory; with named vectors, the steering-effect matrix (saved to ``out`` if given)."""
    items = Inventory.load(inventory)  # the files and numbers first: nothing loads a model before they pass
    check_number(coef, "coef")
    if out is not None:
        check_out_dir(Path(out).parent)
    loaded = {name: load_vectors(path) for name, path in (vectors or {}).items()}
    # The lock is the output file's own (a run folder also holds other jobs' outputs).
    lock = (contextlib.nullcontext() if out is None or not loaded else
            exclusive_output(Path(out).parent, "steerlib inventory", lock_name=f".{Path(out).name}.lock"))
    with lock:
        model, tok = load_model(model_path)
        if not loaded:
            return administer(model, tok, items)
        loaded = {name: _fit_vectors(v, vectors[name], model) for name, v in loaded.items()}
        matrix = inventory_matrix(model, tok, loaded, inventory=items, coef=coef, relative=relative, layer=layer)
        if out is not None:
            matrix.save(out)
        return matrix


def report_file(
    run_dir: str | Path,
    out: str | Path | None = None,
    *,
    model_path: str | Path | None = None,
    dose_coefs: Sequence[float] | None = None,
    relative: bool = True,
    n_questions: int = 4,
    max_new_tokens: int = 32,
) -> Path:
    """One self-contained HTML report of an extraction run; with ``dose_coefs``, a dose-response is run first."""
    if not (Path(run_dir) / "vectors.json").is_file():
        raise FileNotFoundError(f"{run_dir} is not an extraction run folder (no vectors.json; run steerlib extract)")
    for c in dose_coefs or ():
        check_number(c, "dose coefficient")
    check_int(n_questions, "n_questions")
    check_int(max_new_tokens, "max_new_tokens")
    if dose_coefs:
        model, tok = load_model(model_path)
        run_dose(model, tok, run_dir, list(dose_coefs), n_questions=n_questions, max_new_tokens=max_new_tokens,
                 relative=relative)
    return write_report(run_dir, out)


def export_file(
    vectors_path: str | Path,
    out: str | Path,
    *,
    layers: Sequence[int] | None = None,
    coef: float = 1.0,
    kind: str | None = None,
    model_hint: str = "llama",
) -> tuple[Path, list[int], list[str]]:
    """Write saved vectors as a llama.cpp control vector; returns the file, the steerlib layers written and the
    tensor names they became (default layers: the recommended one, else every layer llama.cpp can steer).

    An output that is the input, its metadata sidecar, or inside the input folder is refused before anything is
    read or written (the write itself goes to a temporary file renamed into place, so a failed export never
    leaves a damaged file either)."""
    _refuse_output_over_input(Path(vectors_path), Path(out))
    tv = load_vectors(vectors_path)
    if not isinstance(tv, TraitVectors):
        raise ValueError(f"{vectors_path}: export needs saved TraitVectors, not a bare tensor")
    path = export_gguf(tv, out, layers=layers, coef=coef, kind=kind, model_hint=model_hint)
    written = list(layers) if layers is not None else (
        [tv.recommended_layer] if tv.recommended_layer is not None else list(range(2, tv.n_positions)))
    names = [f"direction.{direction_index(x % tv.n_positions)}" for x in written]
    return path, written, names


def _refuse_output_over_input(source: Path, out: Path) -> None:
    """One line, before any work, when writing ``out`` would overwrite what ``source`` is read from."""
    src, dst = source.resolve(), out.resolve()  # symlinks and `..` name the same files
    if source.is_dir():
        if dst.is_relative_to(src):
            raise ValueError(f"--out {out} is inside the input folder {source}; write the export elsewhere")
        return
    read = [src, src.with_suffix(".json")]  # a vectors file and its metadata sidecar
    if dst in read or (out.exists() and any(p.exists() and out.samefile(p) for p in read)):  # hard links too
        raise ValueError(f"--out {out} would overwrite the input {source} (or its metadata); write the export "
                         "elsewhere")


def new_trait_file(
    name: str,
    description: str,
    *,
    out: str | Path | None = None,
    base_url: str | None,
    model: str = "gpt-4o-mini",
    api_key: str | None = None,
    folder: str | Path = "traits",
) -> tuple[Trait, Path]:
    """Generate a trait from a description at an OpenAI-compatible endpoint and save it.

    The name is checked before the endpoint is called: it becomes ``<folder>/<name>.json`` and must not
    reach outside ``folder`` (no separators, no ``..``).

    Args:
        name: trait name (letters, digits, ``_``, ``-``).
        description: plain-language description.
        out: file to write (default ``<folder>/<name>.json``).
        base_url: the endpoint.
        model: chat model name at the endpoint.
        api_key: the endpoint's key, if it needs one.
        folder: where traits are kept.
    """
    from steerlib.traits.generate import generate_trait

    check_trait_name(name)
    if not description.strip():
        raise ValueError("the trait description is empty")
    path = Path(out) if out is not None else Path(folder) / f"{name}.json"
    if path.is_dir():
        raise ValueError(f"--out {path} is a folder; name the trait file to write")
    check_out_dir(path.parent, "trait folder")
    if not base_url:
        raise ValueError("no endpoint: pass --base-url or set OPENAI_BASE_URL")
    trait = generate_trait(name, description, base_url=base_url, model=model, api_key=api_key)
    return trait, trait.save(path)


def check_serve(
    model_path: str | Path | None,
    vectors: dict[str, str],
    *,
    steer: Sequence[tuple[int, float]] = (),
    steer_mode: str = "add",
    steer_positions: str = "all",
    monitor_layer: int | None = None,
    port: int = 8000,
    max_batch: int = 8,
    max_queue: int = 256,
    max_tokens_limit: int = 512,
    default_max_tokens: int = 128,
    presets: Sequence[tuple[str, Sequence[Any]]] = (),
) -> None:
    """Check what ``steerlib serve`` was given before the model loads and the server binds its port.

    Reads only the model's config (for its depth) and the vector files: a layer the model does not have, a
    coefficient that is not a finite number or a port outside 1..65535 fails here with one line.
    """
    check_int(port, "--port", minimum=1, maximum=65535)
    for value, what in ((max_batch, "--max-batch"), (max_queue, "--max-queue"),
                        (max_tokens_limit, "--max-tokens-limit"), (default_max_tokens, "--default-max-tokens")):
        check_int(value, what)
    if default_max_tokens > max_tokens_limit:
        raise ValueError(f"--default-max-tokens {default_max_tokens} exceeds --max-tokens-limit {max_tokens_limit}")
    method_named(steer_mode)
    position_rule(steer_positions)
    if not vectors:
        raise ValueError("no trait vectors given (--vector)")
    folder, _ = resolve_model_path(model_path)
    from transformers import AutoConfig  # config only: no weights are read

    config = AutoConfig.from_pretrained(folder)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n_layers = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", None)
    for layer, c in steer:
        check_number(c, f"--steer coefficient at layer {layer}")
        if n_layers is not None:
            check_int(layer, "--steer layer", maximum=n_layers)
    if monitor_layer is not None and n_layers is not None:
        check_int(monitor_layer, "--monitor-layer", maximum=n_layers)
    for name, specs in presets:
        for spec in specs:
            if spec.vector not in vectors:
                raise ValueError(f"--preset {name}: no vector named {spec.vector!r} (given: {sorted(vectors)})")
            if n_layers is not None:
                check_int(spec.layer, f"--preset {name} layer", maximum=n_layers)
    for name, path in vectors.items():
        source = load_vectors(path)
        if isinstance(source, TraitVectors) and n_layers is not None and source.n_positions != n_layers + 1:
            raise ValueError(f"{path}: vectors {name!r} cover {source.n_positions - 1} blocks but the model has "
                             f"{n_layers}")
