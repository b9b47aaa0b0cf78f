"""``steerlib export``: saved vectors as a llama.cpp control vector."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from steerlib.core.gguf_vectors import direction_index, export_gguf
from steerlib.core.loading import load_vectors
from steerlib.core.vectors import TraitVectors

__all__ = ["export_file"]


def export_file(
    vectors_path: str | Path,
    out: str | Path,
    *,
    layers: Sequence[int] | None = None,
    coef: float = 1.0,
    kind: str | None = None,
    model_hint: str = "llama",
) -> tuple[Path, list[int], list[str]]:
    """Write saved vectors as a llama.cpp control vector; returns the file, the steerlib layers written and the
    tensor names they became (default layers: the recommended one, else every layer llama.cpp can steer).

    An output that is the input, its metadata sidecar, or inside the input folder is refused before anything is
    read or written (the write itself goes to a temporary file renamed into place, so a failed export never
    leaves a damaged file either)."""
    _refuse_output_over_input(Path(vectors_path), Path(out))
    tv = load_vectors(vectors_path)
    if not isinstance(tv, TraitVectors):
        raise ValueError(f"{vectors_path}: export needs saved TraitVectors, not a bare tensor")
    path = export_gguf(tv, out, layers=layers, coef=coef, kind=kind, model_hint=model_hint)
    written = list(layers) if layers is not None else (
        [tv.recommended_layer] if tv.recommended_layer is not None else list(range(2, tv.n_positions)))
    names = [f"direction.{direction_index(x % tv.n_positions)}" for x in written]
    return path, written, names


def _refuse_output_over_input(source: Path, out: Path) -> None:
    """One line, before any work, when writing ``out`` would overwrite what ``source`` is read from."""
    src, dst = source.resolve(), out.resolve()  # symlinks and `..` name the same files
    if source.is_dir():
        if dst.is_relative_to(src):
            raise ValueError(f"--out {out} is inside the input folder {source}; write the export elsewhere")
        return
    read = [src, src.with_suffix(".json")]  # a vectors file and its metadata sidecar
    if dst in read or (out.exists() and any(p.exists() and out.samefile(p) for p in read)):  # hard links too
        raise ValueError(f"--out {out} would overwrite the input {source} (or its metadata); write the export "
                         "elsewhere")
