"""The package face imports on first use: `import steerlib` and `import steerlib.kernels` stay light."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import steerlib

HEAVY = ("sklearn", "peft", "triton", "transformers", "matplotlib")


def _fresh(code: str) -> dict:
    """Run ``code`` in a new interpreter; it ends by printing one JSON line, returned parsed."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


_REPORT = ("import json, sys; print(json.dumps({'steerlib': sorted(m for m in sys.modules if m.startswith('steerlib')),"
           f" 'heavy': [m for m in {HEAVY!r} if m in sys.modules]}}))")


def test_import_steerlib_loads_nothing_heavy():
    seen = _fresh("import steerlib\n" + _REPORT)
    assert seen["steerlib"] == ["steerlib"]
    assert seen["heavy"] == []


def test_kernels_import_nothing_else_of_steerlib():
    seen = _fresh("import steerlib.kernels\n" + _REPORT)
    assert [m for m in seen["steerlib"] if not m.startswith("steerlib.kernels")] == ["steerlib"]
    assert seen["heavy"] == []


def test_core_modules_leave_optional_packages_alone():
    """Every core module together: no scikit-learn, peft or triton (the modules that use them import on use)."""
    core = sorted(p.stem for p in Path(steerlib.__file__).parent.joinpath("core").glob("*.py"))
    seen = _fresh("".join(f"import steerlib.core.{name}\n" for name in core) + _REPORT)
    assert [m for m in seen["heavy"] if m in ("sklearn", "peft", "triton")] == []


def test_every_public_name_resolves_and_is_listed():
    for name in steerlib.__all__:
        assert getattr(steerlib, name) is not None, name
    assert set(steerlib.__all__) <= set(dir(steerlib))
    assert {"core", "steering", "kernels"} <= set(dir(steerlib))
    assert steerlib.steering.steer.steer is steerlib.steer


def test_unknown_name_raises_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'steerr'"):
        steerlib.steerr  # noqa: B018
