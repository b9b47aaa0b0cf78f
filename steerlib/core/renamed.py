"""Old public names kept importable for a while, each use saying its new name with a ``DeprecationWarning``.

A renamed name is served by a module ``__getattr__`` (PEP 562), never by a plain alias: an alias is silent and,
in a package, can shadow a subpackage of the same name (the first release's ``steerlib.monitoring`` function
hid the ``steerlib.monitoring`` package).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any


def warn_renamed(old: str, new: str) -> None:
    """Emit the one warning text every renamed name uses, pointing at the caller of the old name.

    Args:
        old: the old name as the caller wrote it (e.g. ``"steerlib.Monitor"``).
        new: what to write instead.
    """
    # stacklevel 3: this function, the __getattr__ or wrapper that calls it, then the user's line.
    warnings.warn(f"{old} is deprecated and will be removed; use {new}", DeprecationWarning, stacklevel=3)


def renamed_getattr(module: str, renames: Mapping[str, str], namespace: Mapping[str, Any]) -> Callable[[str], Any]:
    """Build a module ``__getattr__`` that serves old names as their new ones, with a warning.

    Args:
        module: the module's ``__name__`` (for the messages).
        renames: old name -> new name, the new one defined in ``namespace``.
        namespace: the module's ``globals()``.

    Returns:
        A function to assign to the module's ``__getattr__``.

    Example:
        >>> __getattr__ = renamed_getattr(__name__, {"Monitor": "TraitReadout"}, globals())
    """

    def __getattr__(name: str) -> Any:
        new = renames.get(name)
        if new is None:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        warn_renamed(f"{module}.{name}", f"{module}.{new}")
        return namespace[new]

    return __getattr__
