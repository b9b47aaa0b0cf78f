"""``steerlib extract``: a trait's vectors into a run folder (resumable)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from steerlib.commands.common import text_generator
from steerlib.core import models
from steerlib.core.checks import check_out_dir
from steerlib.extraction.extract import ExtractionConfig, ExtractionResult, extract_trait
from steerlib.store.results import exclusive_output
from steerlib.traits.judges import JudgeError, make_judge
from steerlib.traits.library import load_trait

__all__ = ["extract_file"]


def _judges(judge: str, trait, loaded, config: ExtractionConfig, weights: bool):
    """The trait judge and the coherence judge (None unless ``config.coherence_threshold``); ``weights``: the
    loaded model has its weights (else a 'self' judge raises ``JudgeError``)."""
    model, tok = loaded
    model = model if weights else None
    trait_judge = make_judge(judge, trait, model=model, tokenizer=tok)
    coherence = None
    if config.coherence_threshold is not None:
        coherence = make_judge(judge if judge.startswith("openai:") else "self", trait, model=model, tokenizer=tok,
                               rubric=trait.coherence_rubric)
    return trait_judge, coherence


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
    environment, ``make vllm-env``; ``vllm_args``: vLLM engine arguments by vLLM's names, ``VllmOptions``) and
    reads the activations inside vLLM: the HF model's weights are then loaded only for a ``self`` judge.
    """
    config = config or ExtractionConfig()  # its numbers are checked when it is built
    generator = text_generator(engine, model_path, vllm_args)
    t = load_trait(trait)
    out_dir = check_out_dir(out_dir or Path("runs") / t.name)
    with exclusive_output(out_dir, f"steerlib extract {t.name}"):
        # With vLLM generating and capturing, the HF weights are loaded only for a judge that runs on them.
        loaded = models.load_model(model_path) if generator is None else models.load_model_skeleton(model_path)[0]
        try:
            trait_judge, coherence = _judges(judge, t, loaded, config, weights=generator is None)
        except JudgeError as exc:
            if generator is None or "'self'" not in str(exc):
                raise
            loaded = models.load_model(model_path)  # 'self' judges with the model itself
            trait_judge, coherence = _judges(judge, t, loaded, config, weights=True)
        model, tok = loaded
        try:
            return extract_trait(model, tok, t, out_dir, judge=trait_judge, coherence_judge=coherence,
                                 config=config, model_name=loaded.name, generate_texts=generator)
        finally:
            if generator is not None:
                generator.close()
