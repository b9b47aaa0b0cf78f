"""What steerlib relies on inside transformers, found by type and checked, never assumed by name.

transformers renames keywords between minor releases (5.24 renamed the decoder's ``past_key_values`` to
``cache``). Code that reads a keyword by name then silently sees nothing. Everything here locates the KV
cache by its type, wherever it is passed or returned, and raises when a caller needs it and it is absent.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn
from transformers.cache_utils import Cache

# Keyword names the decoder's cache has had, newest first (5.24+: ``cache``; before: ``past_key_values``).
CACHE_KEYWORDS = ("cache", "past_key_values")


def find_cache(args: tuple, kwargs: Mapping[str, Any]) -> Cache | None:
    """The ``Cache`` object among a call's arguments, whatever keyword (or position) carries it."""
    for value in (*kwargs.values(), *args):
        if isinstance(value, Cache):
            return value
    return None


def output_cache(outputs: Any) -> Cache | None:
    """The ``Cache`` object a model returned (``outputs.cache`` in 5.24+, ``outputs.past_key_values`` before)."""
    values = outputs.values() if isinstance(outputs, Mapping) else vars(outputs).values()
    for value in values:
        if isinstance(value, Cache):
            return value
    return None


def cache_keyword(model: nn.Module) -> str:
    """The keyword under which ``model.forward`` accepts a KV cache; a clear error if it takes none we know."""
    params = inspect.signature(model.forward).parameters
    for name in CACHE_KEYWORDS:
        if name in params:
            return name
    raise RuntimeError(
        f"{type(model).__name__}.forward takes no KV cache under any keyword steerlib knows ({', '.join(CACHE_KEYWORDS)}); "
        "the installed transformers has changed its interface"
    )


def past_length(args: tuple, kwargs: Mapping[str, Any]) -> int | None:
    """Tokens already in the KV cache before this forward pass, or None when the inputs do not say.

    Sources, in order: a ``Cache`` object (by type), a ``cache_position`` tensor, and finally a call with no
    cache that will make its own (``use_cache`` not False), which is a fresh pass: 0. A call with
    ``use_cache=False`` and no cache is ambiguous (``generate(use_cache=False)`` re-feeds the whole sequence
    every step), so it gives None.
    """
    cache = find_cache(args, kwargs)
    if cache is not None:
        return int(cache.get_seq_length())
    cache_position = kwargs.get("cache_position")
    if isinstance(cache_position, Tensor) and cache_position.numel() > 0:
        return int(cache_position.reshape(-1)[0])
    if kwargs.get("use_cache") is False:
        return None
    return 0
