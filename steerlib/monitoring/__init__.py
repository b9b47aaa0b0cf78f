"""Drift monitoring: trait projections of a deployed assistant's responses over time, with alerts.

The first release had a function ``steerlib.monitoring(model, readout)`` (now ``steerlib.read_out``). Its name
is this package's name, so the package itself stays callable for old code: calling it warns
(``DeprecationWarning``) and calls ``read_out``, while ``steerlib.monitoring.drift`` is the submodule, whatever
was imported first.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from steerlib.core.renamed import warn_renamed


class _CallablePackage(types.ModuleType):
    """This package's module type: also callable as the first release's ``monitoring`` function."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        warn_renamed("steerlib.monitoring(model, readout)", "steerlib.read_out(model, readout)")
        from steerlib.steering.steer import read_out  # the layer below; imported only by old code

        return read_out(*args, **kwargs)


# Python allows a module's class to be swapped for a ModuleType subclass (the documented way to customise a
# module beyond __getattr__); only __call__ is added.
sys.modules[__name__].__class__ = _CallablePackage
