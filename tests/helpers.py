"""Helpers shared by test modules (fixtures live in conftest.py; plain functions and constants live here).

Test modules import from here, never from each other, so that every test file runs alone
(``pytest tests/test_x.py``) and its imports do not depend on the rootdir being a package.
"""

from __future__ import annotations

from torch import nn


def count_hooks(model: nn.Module) -> int:
    """Forward hooks and forward pre-hooks on every module of ``model`` (transformers adds some of its own)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
