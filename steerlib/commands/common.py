"""Shared by several commands: vectors checked against the model they were loaded for, the vLLM text
generator behind ``--engine vllm``, and the ``--on-error`` choices.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from steerlib.core.checks import check_choice
from steerlib.core.loading import load_vectors
from steerlib.core.models import resolve_model_path
from steerlib.core.vectors import TraitVectors

ON_ERROR = ("raise", "skip")

__all__ = ["ON_ERROR", "fit_vectors", "text_generator"]


def fit_vectors(source: TraitVectors | Tensor, path: str | Path, model) -> TraitVectors | Tensor:
    """Vectors loaded before the model, checked against it; a mismatch names the file."""
    try:
        return load_vectors(source, model)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def text_generator(engine: str, model_path: str | Path | None, vllm_args: Mapping[str, Any] | None = None):
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
    from steerlib.vllm.offline import VllmGenerator

    folder, _ = resolve_model_path(model_path)
    return VllmGenerator(folder, options)
