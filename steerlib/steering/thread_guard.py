"""Refuse forward passes from other threads while a model is steered by ``steer()``.

Hooks live on the model, not on a call: while one thread is inside ``steer()``, every forward pass of that model
from any thread is steered. A second thread calling an unsteered ``model.generate`` would silently get steered
text, so ``steer()`` installs this guard, which lets only the thread that entered the block run the model and
raises, in the other thread, an error naming both threads and the per-request alternatives.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from torch import nn

__all__ = ["ForeignThreadForward", "owner_thread_only"]


class ForeignThreadForward(RuntimeError):
    """A forward pass from another thread reached a model that a ``steer()`` block is steering."""


# id(model) -> [owner thread, nesting depth, hook handle]: nested steer() blocks of one thread share one guard.
_OWNERS: dict[int, list] = {}
_OWNERS_LOCK = threading.Lock()


@contextlib.contextmanager
def owner_thread_only(model: nn.Module) -> Iterator[None]:
    """While the block runs, a forward pass of ``model`` from any thread but this one raises.

    Nested blocks of the same thread share one guard; a block entered by a second thread while the first one
    steers the model raises at once (its edits would mix with the first thread's).

    Args:
        model: the module whose forward passes are guarded (the model given to ``steer()``).

    Yields:
        Nothing; the guard is removed when the outermost block exits, also on an exception.
    """
    here = threading.current_thread()
    key = id(model)
    with _OWNERS_LOCK:
        entry = _OWNERS.get(key)
        if entry is not None and entry[0] is not here:
            raise ForeignThreadForward(
                f"thread {here.name!r} entered steer() on a model that thread {entry[0].name!r} is steering: hooks "
                "are per model, so both threads' passes would get both edits. " + _ALTERNATIVES)
        if entry is None:
            owner = here

            def guard(_module: nn.Module, _args: tuple) -> None:
                caller = threading.current_thread()
                if caller is not owner:
                    raise ForeignThreadForward(
                        f"thread {caller.name!r} ran this model while thread {owner.name!r} is inside steer(): "
                        "hooks are per model, so this pass would be steered too. " + _ALTERNATIVES)

            entry = _OWNERS[key] = [here, 0, model.register_forward_pre_hook(guard)]
        entry[1] += 1
    try:
        yield
    finally:
        with _OWNERS_LOCK:
            entry[1] -= 1
            if entry[1] == 0:
                entry[2].remove()
                del _OWNERS[key]


_ALTERNATIVES = ("For unsteered and steered requests at once use `steerlib serve` (per-request steering) or one "
                 "model copy per thread; to steer passes you start in other threads on purpose (e.g. a streamer "
                 "thread), pass threads='any' to steer()")
