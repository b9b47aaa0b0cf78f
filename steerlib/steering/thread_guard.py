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


@contextlib.contextmanager
def owner_thread_only(model: nn.Module) -> Iterator[None]:
    """While the block runs, a forward pass of ``model`` from any thread but this one raises.

    Args:
        model: the module whose forward passes are guarded (the model given to ``steer()``).

    Yields:
        Nothing; the guard is removed when the block exits, also on an exception.
    """
    owner = threading.current_thread()

    def guard(_module: nn.Module, _args: tuple) -> None:
        here = threading.current_thread()
        if here is not owner:
            raise ForeignThreadForward(
                f"thread {here.name!r} ran this model while thread {owner.name!r} is inside steer(): hooks are "
                "per model, so this pass would be steered too. For unsteered and steered requests at once use "
                "`steerlib serve` (per-request steering) or one model copy per thread; to steer passes you start "
                "in other threads on purpose (e.g. a streamer thread), pass threads='any' to steer()"
            )

    handle = model.register_forward_pre_hook(guard)
    try:
        yield
    finally:
        handle.remove()
