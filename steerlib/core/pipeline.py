"""What a pipeline stage needs from an engine that is not the HF model: answers streamed, activations pooled.

``steerlib.vllm.offline.VllmGenerator`` is one. A stage given such an engine hands it the whole job in one
submission and stores each answer as it arrives (``stream``), and reads pooled activations from it (``capture``)
instead of running the HF model again; given a plain ``GenerateTexts`` callable it generates in HF-sized batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol, runtime_checkable

from steerlib.core.capture import Activations

__all__ = ["PipelineEngine", "answers_in_order", "pipeline_engine"]


@runtime_checkable
class PipelineEngine(Protocol):
    """An engine a pipeline stage can hand a whole job to."""

    def start(self, job_tokens: int | None = None) -> None:
        """Start now (a no-op once started), sized for a job of ``job_tokens`` generated tokens (None: unknown)."""
        ...

    def __call__(self, prompts: list[str], max_new_tokens: int, temperature: float,
                 seed: int | None) -> list[str]:
        """``GenerateTexts``: the answers of ``prompts``, in order."""
        ...

    def stream(self, prompts: Sequence[str], max_new_tokens: int, temperature: float = 0.0,
               seeds: Sequence[int] | None = None, *, pool: bool = False) -> Iterator[list[tuple[int, str]]]:
        """Submit every prompt at once; yield the ``(index, text)`` of the answers finished since the last yield.
        ``pool``: the caller will ``capture`` these answers next; an engine that can pools them while generating
        (``steerlib.vllm.offline``), another ignores it."""
        ...

    def capture(self, tokenizer, prompts: Sequence[str], responses: Sequence[str | None],
                layers: Sequence[int] | None = None, *, require_response: bool = False) -> Activations:
        """Pooled activations of (prompt, response) pairs, as ``steerlib.core.capture.capture_activations``."""
        ...


def answers_in_order(engine: PipelineEngine, prompts: Sequence[str], max_new_tokens: int, temperature: float,
                     seed: int | None, *, pool: bool = False) -> list[str]:
    """``GenerateTexts`` through ``engine.stream``: every answer, in prompt order (prompt ``i`` sampled with seed
    ``seed + i``, so a resumed job draws the same answers; None: unseeded); ``pool`` as ``stream``'s."""
    seeds = None if seed is None else [seed + i for i in range(len(prompts))]
    texts = [""] * len(prompts)
    for finished in engine.stream(prompts, max_new_tokens, temperature, seeds, pool=pool):
        for i, text in finished:
            texts[i] = text
    return texts


def pipeline_engine(generate_texts: object) -> PipelineEngine | None:
    """``generate_texts`` as a ``PipelineEngine`` when it is one, else None (a plain callable)."""
    return generate_texts if isinstance(generate_texts, PipelineEngine) else None
