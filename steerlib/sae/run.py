"""The three SAE commands as library calls: ``train_run``, ``decompose_run``, ``diff_run`` (the CLI only parses).

``train_run`` lays out one folder: the SAE itself (``cfg.json`` + ``sae_weights.safetensors``, SAELens's format),
``corpus/neutral.jsonl`` (the model's answers to the shipped neutral questions, generated once), ``cache/`` (the
activation cache), ``checkpoints/`` (sparsify's), ``train.json`` and ``quality.json``. Each stage resumes.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, fields
from pathlib import Path

import torch

from steerlib.core.chat import format_prompt
from steerlib.core.checks import check_int
from steerlib.core.loading import load_vectors, resolve_vector
from steerlib.core.models import load_model
from steerlib.core.sae_format import SparseAutoencoder, load_sae
from steerlib.sae.cache import harvest
from steerlib.sae.corpus import Sample, answer_samples, rollout_samples, text_samples
from steerlib.sae.decompose import Decomposition, decompose
from steerlib.sae.diff import ModelDiff, model_diff, token_activations
from steerlib.sae.quality import Quality, lm_loss, reconstruction_quality, spliced
from steerlib.sae.train import SaeTrainConfig, split_rows, train_sae
from steerlib.steering.calibration import reference_questions

__all__ = ["build_corpus", "decompose_run", "diff_run", "train_run"]


def _say(progress: bool, text: str) -> None:
    if progress:
        print(text, flush=True)


def build_corpus(model, tokenizer, out: Path, *, rollouts: Sequence[str | Path] = (), neutral: bool = True,
                 text_files: Sequence[str | Path] = (), max_new_tokens: int = 64, progress: bool = False) -> list[Sample]:
    """Extraction rollouts (both polarities), the model's answers to the neutral questions, and text files.

    The neutral answers are written to ``out/corpus/neutral.jsonl`` and read back on the next run.
    """
    for path in [*rollouts, *text_files]:
        if not Path(path).exists():
            raise FileNotFoundError(f"no corpus source at {path}")
    samples: list[Sample] = []
    for run in rollouts:
        samples += rollout_samples(run, tokenizer, split=None)
    if neutral:
        saved = out / "corpus" / "neutral.jsonl"
        if saved.is_file():
            samples += [Sample(**json.loads(line)) for line in saved.read_text().splitlines() if line.strip()]
        else:
            answers = answer_samples(model, tokenizer, max_new_tokens=max_new_tokens, progress=progress)
            saved.parent.mkdir(parents=True, exist_ok=True)
            saved.write_text("".join(json.dumps(asdict(s)) + "\n" for s in answers))
            samples += answers
    if text_files:
        samples += text_samples(text_files)
    if not samples:
        raise ValueError("the corpus is empty: give --rollouts, --text or keep the neutral answers")
    return samples


def train_run(out: str | Path, layer: int, *, model_path: str | None = None, rollouts: Sequence[str | Path] = (),
              neutral: bool = True, text_files: Sequence[str | Path] = (), cfg: SaeTrainConfig | None = None,
              max_tokens: int | None = None, loss_samples: int = 32, max_new_tokens: int = 64,
              progress: bool = True) -> tuple[SparseAutoencoder, Quality, dict[str, float]]:
    """Corpus -> activation cache -> SAE -> quality, in ``out``. Returns the SAE, its quality and stage seconds."""
    cfg = cfg or SaeTrainConfig()
    check_int(loss_samples, "loss_samples")
    out = Path(out)
    model, tokenizer = load_model(model_path)
    layer = int(layer)
    from steerlib.core.arch import get_layout

    layout = get_layout(model)
    layout.check_layer(layer, allow_embeddings=False)
    if layer >= layout.n_layers:
        raise ValueError(f"layer {layer} is after the final norm; train SAEs at layers 1..{layout.n_layers - 1}")
    times: dict[str, float] = {}
    t = time.perf_counter()
    samples = build_corpus(model, tokenizer, out, rollouts=rollouts, neutral=neutral, text_files=text_files,
                           max_new_tokens=max_new_tokens, progress=progress)
    times["corpus_s"] = time.perf_counter() - t
    t = time.perf_counter()
    cache = harvest(model, tokenizer, samples, layer, out / "cache", max_tokens=max_tokens, progress=progress)
    times["harvest_s"] = time.perf_counter() - t
    _say(progress, f"cached {cache.n_tokens} tokens of {cache.done_samples}/{len(samples)} samples at layer {layer}")
    t = time.perf_counter()
    name = str(getattr(model.config, "name_or_path", "") or "unknown")
    sae = train_sae(cache, out, cfg, model_name=name, n_layers=layout.n_layers)
    times["train_s"] = time.perf_counter() - t
    t = time.perf_counter()
    # The quality stage of a finished run is read back, not recomputed: same weights (their digest), same scoring.
    measured = {"weights_sha256": hashlib.sha256((out / "sae_weights.safetensors").read_bytes()).hexdigest(),
                "loss_samples": loss_samples, "cached_tokens": cache.n_tokens}
    quality = _stored_quality(out / "quality.json", measured)
    if quality is None:
        _, held = split_rows(cache.n_tokens, cfg)
        quality = reconstruction_quality(sae, cache, held)
        step = max(1, len(samples) // loss_samples)
        scored = samples[::step][:loss_samples]
        clean = lm_loss(model, tokenizer, scored)
        with spliced(model, sae):
            patched = lm_loss(model, tokenizer, scored)
        quality = Quality(quality.explained_variance, quality.l0, quality.dead_fraction, quality.n_tokens, clean,
                          patched)
    times["quality_s"] = time.perf_counter() - t
    (out / "quality.json").write_text(json.dumps({**asdict(quality), "loss_increase": quality.loss_increase,
                                                  **measured, "seconds": times}, indent=2))
    return sae, quality, times


def _stored_quality(path: Path, measured: Mapping[str, object]) -> Quality | None:
    """The quality a finished run wrote for these very weights and settings, else None."""
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if any(stored.get(key) != value for key, value in measured.items()):
        return None
    return Quality(**{f.name: stored[f.name] for f in fields(Quality)})


def _polar_tokens(model, tokenizer, runs: Sequence[str | Path], layer: int, split: str | None,
                  limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Response-token activations of the positive and of the negative answers of extraction runs."""
    from steerlib.extraction.extract import load_responses

    out = {}
    for polarity in ("pos", "neg"):
        records = [r for run in runs for r in load_responses(run)
                   if r.get("polarity") == polarity and (split is None or r.get("split") == split)][:limit]
        if not records:
            raise ValueError(f"no {polarity} answers in {[str(r) for r in runs]} (split {split})")
        prompts = [format_prompt(tokenizer, r["question"], r.get("system")) for r in records]
        out[polarity] = token_activations(model, tokenizer, prompts, [r["response"] for r in records], layer,
                                          responses_only=True)
    return out["pos"], out["neg"]


def decompose_run(vector: str | Path, sae_folder: str | Path, *, model_path: str | None = None,
                  rollouts: Sequence[str | Path] = (), top: int = 10, snippets: int = 3, kind: str | None = None,
                  out: str | Path | None = None) -> Decomposition:
    """Decompose the vector at the SAE's layer; with rollouts, also rank latents positive minus negative."""
    sae = load_sae(sae_folder)
    model, tokenizer = load_model(model_path)
    vec = resolve_vector(load_vectors(vector, model), sae.layer, kind=kind, d_model=sae.d_in)
    pos = neg = None
    if rollouts:
        pos, neg = _polar_tokens(model, tokenizer, rollouts, sae.layer, None)
    cache = None
    if snippets > 0 and (Path(sae_folder) / "cache" / "cache.json").is_file():
        from steerlib.sae.cache import ActivationCache

        cache = ActivationCache(Path(sae_folder) / "cache")
    result = decompose(vec, sae, top=top, positive=pos, negative=neg, model=model, tokenizer=tokenizer,
                       cache=cache, snippets=snippets)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result.to_dict(), indent=2))
    return result


def diff_run(base: str | None, finetuned: str | Path, sae_folder: str | Path, *,
             vectors: Mapping[str, str | Path] | None = None, questions: Sequence[str] | None = None,
             max_questions: int | None = None, max_new_tokens: int = 48, top: int = 10, screen: int = 0, screen_coef: float = 0.5,
             screen_trait: str | None = None, judge: str | None = None, out: str | Path | None = None,
             progress: bool = True) -> tuple[ModelDiff, list[dict]]:
    """Diff a finetuned model (HF folder or LoRA adapter on ``base``) against ``base`` through an SAE.

    ``screen`` > 0 steers the base model with each of the top ``screen`` increased latents at ``screen_coef``
    times the base model's median residual norm and scores the answers on ``screen_trait``'s vector (and judge).
    """
    from steerlib.finetuning.shift import load_finetuned
    from steerlib.steering.generation import generate

    sae = load_sae(sae_folder)
    tuned, tokenizer, is_adapter = load_finetuned(finetuned, base)
    base_model = load_model(base).model
    questions = list(reference_questions() if questions is None else questions)[:max_questions]
    prompts = [format_prompt(tokenizer, q) for q in questions]
    answers = [g.text for g in generate(base_model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                        progress=progress)]
    units = {name: resolve_vector(load_vectors(path, base_model), sae.layer, d_model=sae.d_in)
             for name, path in (vectors or {}).items()}
    result = model_diff(base_model, tuned, tokenizer, sae, prompts, answers, vectors=units, top=top)
    rows: list[dict] = []
    if screen > 0:
        from steerlib.sae.screen import screen_latents

        if screen_trait is None or screen_trait not in units:
            raise ValueError("--screen needs --screen-trait naming one of the --vector traits")
        judge_obj = None
        if judge is not None:
            from steerlib.traits.judges import make_judge

            judge_obj = make_judge(judge, screen_trait, base_model, tokenizer)
        latents = [r["latent"] for r in result.increased[:screen]]
        rows = screen_latents(base_model, tokenizer, sae_folder, latents, questions[:16], units[screen_trait],
                              sae.layer, screen_coef * result.residual_norm, judge=judge_obj,
                              max_new_tokens=max_new_tokens, progress=progress)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps({"diff": result.to_dict(), "screen": rows}, indent=2))
    return result, rows
