"""Bounds on sizes that a vector file claims, checked before anything is allocated from them.

A file is data from outside: a header field saying "2e9 layers" or "2^40 tensors" must not turn into a table of
terabytes. Every reader takes the sizes it allocates from through ``check_size``, which names the file and the
field, so a hostile or damaged file fails with one line before any memory is taken.

The limits are far above any real model (the deepest open models have a few hundred blocks, the widest a residual
width of a few tens of thousands) and far below what would exhaust a machine.
"""

from __future__ import annotations

import numbers
from pathlib import Path

__all__ = ["MAX_D_MODEL", "MAX_ENTRIES", "MAX_LAYERS", "MAX_TABLE_BYTES", "check_size", "check_table"]

MAX_LAYERS = 4096
"""Most transformer blocks a vector file may describe."""

MAX_D_MODEL = 1 << 17
"""Widest residual stream a vector file may describe."""

MAX_ENTRIES = 1 << 16
"""Most tensors or metadata keys a vector file's header may declare."""

MAX_TABLE_BYTES = 1 << 31
"""Largest float32 table ([n_layers + 1, d_model] per pooling kind) a file may make us allocate."""


def check_size(value: object, field: str, path: str | Path, maximum: int, *, minimum: int = 0) -> int:
    """``value`` as an int if it lies within ``minimum..maximum``, else one line naming the file and the field.

    Args:
        value: the size read from the file.
        field: what the file calls it (``steerlib.n_layers``, ``tensor count``, ``layer_<i>``...).
        path: the file it came from.
        maximum: the largest value accepted.
        minimum: the smallest value accepted.

    Returns:
        The value as a Python int.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value != int(value):
        raise ValueError(f"{path}: {field} must be a whole number, got {value!r}")
    value = int(value)
    if not minimum <= value <= maximum:
        raise ValueError(f"{path}: {field} is {value}, outside {minimum}..{maximum}: the file is damaged or "
                         "was not written for a model")
    return value


def check_table(n_rows: int, width: int, path: str | Path, field: str) -> None:
    """Refuse a float32 ``[n_rows, width]`` table larger than ``MAX_TABLE_BYTES`` before it is allocated."""
    check_size(width, f"{field} width", path, MAX_D_MODEL, minimum=1)
    size = n_rows * width * 4
    if size > MAX_TABLE_BYTES:
        raise ValueError(f"{path}: {field} would need a [{n_rows}, {width}] table ({size / 2**30:.1f} GiB), over the "
                         f"{MAX_TABLE_BYTES / 2**30:.0f} GiB limit for a vector file")
