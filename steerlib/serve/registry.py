"""The runtime vector registry: named trait vectors the server steers and reads out with.

Vectors loaded at start stay; ``POST /v1/vectors`` may add more, but only from folders the operator allowed with
``--vector-dir`` (a path resolving outside them is refused, 403), and ``DELETE /v1/vectors/{name}`` removes one
unless something depends on it. A vector may carry a calibration (``steerlib calibrate``, saved beside it), which
lets requests cap at a percentile of it. (A vector reloaded under an old name never reuses the old one's steering
table entry: the plan keys entries by the row's content.)
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import torch

from steerlib.core.loading import load_vectors
from steerlib.core.vectors import META_FILE, WEIGHTS_FILE, TraitVectors
from steerlib.serve.schema import ApiError
from steerlib.steering.calibration import Calibration, calibration_path

__all__ = ["VectorRegistry"]


def _files_read(target: Path) -> list[Path]:
    """The files ``load_vectors(target)`` may open: a folder's weights and metadata, or a file and its sidecar."""
    if target.is_dir():
        return [target / WEIGHTS_FILE, target / META_FILE]
    return [target, target.with_suffix(".json")]


class VectorRegistry:
    """Named ``TraitVectors`` for one model, safe to read and change from request threads."""

    def __init__(self, model: torch.nn.Module, vectors: Mapping[str, TraitVectors], vector_dirs: Sequence[Path],
                 calibrations: Mapping[str, Calibration] | None = None):
        """Check and register the start-up vectors.

        Args:
            model: the served model (every vector must fit it).
            vectors: name -> vectors loaded at start.
            vector_dirs: folders runtime loads may read from (empty: read-only).
            calibrations: name -> calibration of that vector (enables percentile caps on it).
        """
        self.model = model
        self.vector_dirs = tuple(vector_dirs)
        self.vectors: dict[str, TraitVectors] = {}
        self._lock = threading.Lock()
        for name, tv in vectors.items():
            tv.check_model(model)  # fail at start-up, not on the first request
            self.vectors[name] = tv
        self.calibrations: dict[str, Calibration] = {}
        for name, cal in (calibrations or {}).items():
            if name not in self.vectors:
                raise ValueError(f"calibration given for {name!r}, which is not a loaded vector")
            cal.check_model(model, f"calibration of {name!r}")
            self.calibrations[name] = cal

    def names(self) -> list[str]:
        """The loaded names, sorted."""
        with self._lock:
            return sorted(self.vectors)

    def lookup(self, name: str) -> tuple[TraitVectors | None, list[str]]:
        """One consistent read of a vector.

        Args:
            name: the vector's name.

        Returns:
            (the vectors or None, every loaded name sorted).
        """
        with self._lock:
            return self.vectors.get(name), sorted(self.vectors)

    def calibration(self, name: str) -> Calibration | None:
        """The calibration loaded with ``name``, or None."""
        with self._lock:
            return self.calibrations.get(name)

    def info(self, monitored: Collection[str]) -> dict[str, dict]:
        """Name -> trait, recommended layer, number of layers, method and whether it is monitored."""
        with self._lock:
            return {name: {"trait": tv.trait, "recommended_layer": tv.recommended_layer,
                           "n_layers": tv.n_positions - 1, "method": tv.method, "monitored": name in monitored}
                    for name, tv in self.vectors.items()}

    def load(self, name: str, path: str) -> None:
        """Load vectors from ``path`` (relative to or inside an allowed folder) under ``name``.

        Args:
            name: the name to register (409 if taken).
            path: where the saved ``TraitVectors`` are.

        Raises:
            ApiError: 403 (registry read-only or path outside the allowed folders), 404, 409 or 400.
        """
        if not self.vector_dirs:
            raise ApiError(403, "loading vectors at runtime is off (start the server with --vector-dir)",
                           code="registry_read_only", type_="permission_error")
        target = self._allowed_path(path)
        with self._lock:
            if name in self.vectors:
                raise ApiError(409, f"a vector named {name!r} is already loaded; unload it first", param="name",
                               code="vector_exists")
        try:
            tv = load_vectors(target, self.model)
            if not isinstance(tv, TraitVectors):
                raise ValueError("a single-direction tensor has no layers to steer at; save TraitVectors")
            cal_file = calibration_path(target)
            cal = Calibration.load(cal_file, self.model) if cal_file.is_file() else None
        except (ValueError, OSError) as exc:
            raise ApiError(400, f"cannot load vectors from {path!r}: {exc}", param="path") from exc
        with self._lock:
            if name in self.vectors:  # another request loaded it meanwhile
                raise ApiError(409, f"a vector named {name!r} is already loaded; unload it first", param="name",
                               code="vector_exists")
            self.vectors[name] = tv
            self.calibrations.pop(name, None)
            if cal is not None:
                self.calibrations[name] = cal

    def _allowed_path(self, path: str) -> Path:
        for base in self.vector_dirs:
            root = Path(base).resolve()
            candidate = (root / path).resolve()  # an absolute path replaces root; then it must still be inside
            if candidate.is_relative_to(root):
                if not candidate.exists():
                    raise ApiError(404, f"no vectors at {path!r} in the allowed folders", param="path")
                for read in _files_read(candidate):
                    # Every file the loader opens, not only the folder: a symlink inside an allowed folder
                    # may point anywhere.
                    if (read.exists() or read.is_symlink()) and not read.resolve().is_relative_to(root):
                        raise ApiError(403, f"path {path!r}: {read.name} resolves outside the folders vectors "
                                       "may be loaded from", param="path", code="path_not_allowed",
                                       type_="permission_error")
                return candidate
        raise ApiError(403, f"path {path!r} is outside the folders vectors may be loaded from", param="path",
                       code="path_not_allowed", type_="permission_error")

    def unload(self, name: str, monitored: Collection[str], in_use: Collection[str]) -> None:
        """Remove ``name`` unless it is monitored or used by the default steering.

        Args:
            name: the vector to remove (404 if unknown).
            monitored: names the read-out depends on (409).
            in_use: names the default steering uses (409).
        """
        with self._lock:
            if name not in self.vectors:
                raise ApiError(404, f"no vector named {name!r}", param="name")
            if name in monitored:
                raise ApiError(409, f"{name!r} is monitored; it cannot be unloaded while the server runs",
                               param="name", code="vector_monitored")
            if name in in_use:
                raise ApiError(409, f"{name!r} is used by the default steering", param="name", code="vector_in_use")
            del self.vectors[name]  # rows already running keep their own copy of the edits
            self.calibrations.pop(name, None)
