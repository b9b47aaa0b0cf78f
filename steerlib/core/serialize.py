"""One JSON sanitiser for everything steerlib writes: results lines, vector metadata, server responses."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

__all__ = ["to_jsonable"]


def to_jsonable(value: Any) -> Any:
    """``value`` in strict JSON types: NaN/inf become null, tensors lists (or numbers), numpy scalars numbers,
    paths strings, tuples lists; mappings and sequences recursively. Anything else is returned as is, so
    ``json.dumps`` still rejects what has no JSON form."""
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Tensor):
        return to_jsonable(value.tolist())
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return to_jsonable(value.item())
    return value
