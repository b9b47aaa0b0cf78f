"""The text an SAE is trained on, made locally: the model's own answers and the user's text files.

A corpus is a list of ``Sample`` (a formatted prompt and the answer, or raw text with no answer). Its digest keys
the activation cache, so a cache made from one corpus is never resumed with another.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from steerlib.core.chat import format_prompt
from steerlib.core.checks import read_text
from steerlib.extraction.extract import load_responses
from steerlib.steering.calibration import reference_questions
from steerlib.steering.generation import GenerateTexts, generate

__all__ = ["Sample", "answer_samples", "corpus_digest", "rollout_samples", "text_samples"]


@dataclass(frozen=True)
class Sample:
    """One sequence of the corpus: ``prompt`` (formatted, or raw text) and the model's ``response`` (or None)."""

    prompt: str
    response: str | None = None
    source: str = ""


def corpus_digest(samples: Sequence[Sample]) -> str:
    """A short hash of the corpus's text (sources are labels and do not count)."""
    digest = hashlib.sha256()
    for s in samples:
        digest.update(json.dumps([s.prompt, s.response]).encode())
    return digest.hexdigest()[:16]


def rollout_samples(out_dir: str | Path, tokenizer, *, split: str | None = "extract") -> list[Sample]:
    """Both polarities' answers of an extraction run (``steerlib extract``'s ``--out``), prompts as generated."""
    out = Path(out_dir)
    if not (out / "responses.jsonl").is_file():
        raise FileNotFoundError(f"no extraction rollouts at {out} (expected responses.jsonl)")
    records = [r for r in load_responses(out) if split is None or r.get("split") == split]
    return [Sample(format_prompt(tokenizer, r["question"], r.get("system")), str(r["response"]),
                   f"{out.name}:{r['id']}") for r in records]


def answer_samples(model, tokenizer, questions: Sequence[str] | None = None, *, max_new_tokens: int = 64,
                   batch_size: int = 16, progress: bool = False,
                   generate_texts: GenerateTexts | None = None) -> list[Sample]:
    """The model's own greedy answers to ``questions`` (default: the shipped neutral reference questions); with a
    ``steerlib.core.pipeline.PipelineEngine`` (vLLM's) as ``generate_texts``, all of them in one submission."""
    questions = list(reference_questions() if questions is None else questions)
    prompts = [format_prompt(tokenizer, q) for q in questions]
    if generate_texts is not None:  # one call: an engine (``VllmGenerator``) takes it as one submission
        texts = list(generate_texts(prompts, max_new_tokens, 0.0, None))
    else:
        texts = [g.text for g in generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                          batch_size=batch_size, progress=progress)]
    return [Sample(p, t, f"neutral:{i}") for i, (p, t) in enumerate(zip(prompts, texts, strict=True))]


def text_samples(paths: Iterable[str | Path], *, max_chars: int = 1200) -> list[Sample]:
    """Raw text files cut at blank lines into pieces of at most ``max_chars`` characters (no chat template)."""
    paths = list(paths)
    samples = []
    for path in paths:
        text = read_text(path, "corpus text file")
        piece = ""
        for para in [p.strip() for p in text.split("\n\n") if p.strip()]:
            while len(para) > max_chars:
                samples.append(Sample(para[:max_chars], None, str(path)))
                para = para[max_chars:]
            if len(piece) + len(para) + 2 > max_chars and piece:
                samples.append(Sample(piece, None, str(path)))
                piece = ""
            piece = f"{piece}\n\n{para}" if piece else para
        if piece:
            samples.append(Sample(piece, None, str(path)))
    if not samples:
        raise ValueError(f"the text files {[str(p) for p in paths]} hold no text")
    return samples
