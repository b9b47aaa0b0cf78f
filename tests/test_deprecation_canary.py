"""steerlib's own calls use current names: the dose-sweep path raises no deprecation from a steerlib frame.

``helpers.deprecations_from_steerlib`` is the check ``make canary`` applies to every test
(STEERLIB_STRICT_DEPRECATIONS=1); here it is proven to catch what it must and to leave the rest alone.
"""

from __future__ import annotations

import logging
import warnings

import torch
from helpers import deprecations_from_steerlib
from transformers.modeling_outputs import CausalLMOutputWithPast

import steerlib.steering.steer as steer_module
from steerlib.steering.generation import generate
from steerlib.steering.plan import SteerOp
from steerlib.steering.steer import build_readout


def _as_steerlib(source: str, name: str = "steerlib.fake"):
    """A function whose frame belongs to module ``name`` (a fake steerlib one unless told)."""
    scope = {"__name__": name, "warnings": warnings}
    exec(compile(source, f"<{name}>", "exec"), scope)  # noqa: S102 - a two-line function of this test's own
    return scope["f"]


def test_catches_deprecations_from_steerlib_frames_only() -> None:
    old_name = _as_steerlib("def f(out):\n    return out.past_key_values\n")
    # A dependency's deprecated function warns at its caller (stacklevel=2), here steerlib code.
    deprecated = _as_steerlib("def f():\n    warnings.warn('old', FutureWarning, stacklevel=2)\n", name="dep.fake")
    calls_it = _as_steerlib("def f(g):\n    g()\n")
    out = CausalLMOutputWithPast(logits=torch.zeros(1))
    logging.getLogger("transformers").setLevel(logging.ERROR)  # as a test that silences transformers leaves it
    with deprecations_from_steerlib() as found:
        old_name(out)
        calls_it(deprecated)
    assert logging.getLogger("transformers").level == logging.ERROR
    logging.getLogger("transformers").setLevel(logging.WARNING)
    assert len(found) == 2
    assert found[0].startswith("steerlib.fake:2: ") and "`past_key_values`/`cache_params` are deprecated" in found[0]
    assert found[1] == "steerlib.fake:2: FutureWarning: old"
    with deprecations_from_steerlib() as found:
        out.past_key_values  # noqa: B018 - the test's own frame: not steerlib's
        warnings.warn("elsewhere", DeprecationWarning, stacklevel=1)
        steer_module.Monitor  # noqa: B018 - steerlib's own renamed name warns on purpose
    assert found == []


def test_dose_sweep_path_uses_current_cache_names(embedded) -> None:
    """Generation with a read-out (the dose sweep) reads the returned cache and passes it on for the closing
    read-out pass; on transformers 5.24 the old names were deprecated there (finding 10)."""
    model, tok = embedded
    vec = torch.randn(576, generator=torch.Generator().manual_seed(0))
    readout = build_readout(model, {"t": vec}, [4])
    with deprecations_from_steerlib() as found:
        gens = generate(model, tok, ["Hello", "The sky is"], steering=[SteerOp(layer=4, vector=vec, coef=2.0)],
                        readout=readout, max_new_tokens=3)
    assert found == []
    assert len(gens) == 2 and all(g.projections is not None for g in gens)


def test_a_dependency_deprecating_inside_itself_is_not_steerlibs() -> None:
    """steerlib on the stack is not enough: the deprecated call must be steerlib's own."""
    inner = _as_steerlib("def f():\n    warnings.warn('inside torch', DeprecationWarning, stacklevel=1)\n",
                         name="torch.fake")
    outer = _as_steerlib("def f(g):\n    g()\n")
    with deprecations_from_steerlib() as found:
        outer(inner)
    assert found == []
