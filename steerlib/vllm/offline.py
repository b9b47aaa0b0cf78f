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

__all__ = ["VllmGenerator"]


class VllmGenerator:
    """A callable ``(prompts, max_new_tokens, temperature, seed) -> texts`` on an in-process ``vllm.LLM``.

    Args:
        model_folder: a Hugging Face model folder (``steerlib.core.models.resolve_model_path``).
        max_model_len: vLLM's context limit (default: the model's).
        enforce_eager: skip torch.compile (faster start; slower decoding).
        dtype: weights' dtype in vLLM.

    The engine starts on first use (a script using it needs an ``if __name__ == "__main__":`` guard: vLLM spawns
    its engine process).
    """

    def __init__(self, model_folder: str | Path, *, max_model_len: int | None = 2048, enforce_eager: bool = False,
                 dtype: str = "float32", **engine_args: Any):
        self.model_folder = str(model_folder)
        self.kwargs = dict(dtype=dtype, enforce_eager=enforce_eager, **engine_args)
        if max_model_len is not None:
            self.kwargs["max_model_len"] = max_model_len
        self._llm: Any = None

    def _engine(self) -> Any:
        if self._llm is None:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
            from vllm import LLM

            from steerlib.vllm.worker import IDENTITY

            self._llm = LLM(model=self.model_folder, additional_config={"steerlib": IDENTITY}, **self.kwargs)
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
