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
from steerlib.traits.judges import make_judge
from steerlib.traits.library import load_trait

__all__ = ["extract_file"]


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
    generator = text_generator(engine, model_path, vllm_args)
    t = load_trait(trait)
    out_dir = check_out_dir(out_dir or Path("runs") / t.name)
    with exclusive_output(out_dir, f"steerlib extract {t.name}"):
        loaded = models.load_model(model_path)
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
