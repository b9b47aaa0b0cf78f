"""Batch generation with vLLM for the pipeline (``steerlib extract --engine vllm``, ``flag --baseline generate``).

Only the text comes from vLLM; activations are still captured on the Hugging Face model, where they are exact.
Greedy decoding with vLLM gives the HF path's tokens on the embedded model (the tests compare them); sampled
responses differ from HF's as any two samplers' do.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from steerlib.vllm.layout import VllmOptions, bound_cores, start_config

__all__ = ["VllmGenerator"]


class VllmGenerator:
    """A callable ``(prompts, max_new_tokens, temperature, seed) -> texts`` on an in-process ``vllm.LLM``.

    Args:
        model_folder: a Hugging Face model folder (``steerlib.core.models.resolve_model_path``).
        options: vLLM's engine arguments (``VllmOptions``; default: one worker, compiled, the context limit
            ``max_model_len=2048``).

    The engine starts on first use, after its layout is checked (``check_layout``) and, for several CPU workers,
    their cores bound (a script using it needs an ``if __name__ == "__main__":`` guard: vLLM spawns its engine
    process).
    """

    def __init__(self, model_folder: str | Path, options: VllmOptions | None = None):
        self.model_folder = str(model_folder)
        self.options = options if options is not None else VllmOptions(max_model_len=2048)
        self.kwargs = self.options.engine_args(self.model_folder)
        self._llm: Any = None

    def _engine(self) -> Any:
        if self._llm is None:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
            from vllm import LLM

            config = start_config(self.kwargs, asynchronous=False)  # refuses a layout steering is not right under
            with bound_cores(config.parallel_config.world_size):
                self._llm = LLM(**self.kwargs)
        return self._llm

    def __call__(self, prompts: Sequence[str], max_new_tokens: int, temperature: float = 0.0,
                 seed: int | None = None) -> list[str]:
        from vllm import SamplingParams

        llm = self._engine()
        tok = llm.get_tokenizer()
        ids = [list(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
        params = [SamplingParams(max_tokens=max_new_tokens, temperature=temperature,
                                 seed=None if seed is None else seed + i, skip_special_tokens=True)
                  for i in range(len(prompts))]
        outs = llm.generate([{"prompt_token_ids": x} for x in ids], params, use_tqdm=False)
        return [o.outputs[0].text.strip() for o in outs]

    def close(self) -> None:
        if self._llm is not None:
            self._llm.llm_engine.engine_core.shutdown()
            self._llm = None
