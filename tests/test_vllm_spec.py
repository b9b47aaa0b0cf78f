"""The vLLM backend's request spec and per-step plan (no vLLM needed: these run in the main environment)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from steerlib.steering.plan import SteerOp, lower_ops
from steerlib.vllm import cache_salt, encode_spec, parse_spec
from steerlib.vllm.spec import encode_rows

D = 16


def _same(a: list, b: list) -> bool:
    """Edits equal field by field (their rows are tensors)."""
    return len(a) == len(b) and all(
        x.layer == y.layer and x.key == y.key and torch.equal(x.row, y.row) and (x.coef, x.lo, x.hi) == (y.coef, y.lo, y.hi)
        and x.rule.name == y.rule.name for x, y in zip(a, b, strict=True))


def _vec(seed: int) -> torch.Tensor:
    return torch.randn(D, generator=torch.Generator().manual_seed(seed))


def test_spec_round_trip_lowering_and_salt():
    ops = [SteerOp(layer=3, vector=_vec(0), coef=2.5, positions="response"),
           SteerOp(layer=2, vector=_vec(1), mode="cap", cap_min=-1.0, cap_max=0.5)]
    parsed = parse_spec(encode_spec(ops, readout=True), n_layers=4, d_model=D)
    assert parsed.readout and [e.layer for e in parsed.edits] == [3, 2]
    add, cap = parsed.edits
    assert add.rule.name == "response" and add.coef == 2.5 and add.lo == -math.inf
    assert _same(parsed.edits, lower_ops(ops))  # exactly what the plan makes of the same ops
    assert (cap.lo, cap.hi, cap.coef) == (-1.0, 0.5, 0.0)
    # Salts: by the edits only (the read-out flag reads what is computed anyway), None when nothing is edited.
    assert cache_salt(encode_spec(ops)) == cache_salt(encode_spec(ops, readout=True))
    assert cache_salt(encode_spec(ops)) != cache_salt(encode_spec(ops[:1]))
    assert cache_salt(encode_spec([], readout=True)) is None and cache_salt(None) is None
    assert len(cache_salt(encode_spec(ops))) <= 128 and "/" not in cache_salt(encode_spec(ops))


def test_lowered_rows_travel_unchanged():
    edits = lower_ops([SteerOp(layer=2, vector=_vec(2), mode="ablate", positions="prompt"),
                       SteerOp(layer=3, vector=_vec(3), coef=-2.0)])
    assert _same(parse_spec(encode_rows(edits), n_layers=4, d_model=D).edits, edits)


@pytest.mark.parametrize(("spec", "message"), [
    ("{", "steerlib: the steering spec is not JSON"),
    (json.dumps({"edits": [{"layer": 5, "vector": [0.0] * D}]}), "steerlib edit 0: layer must be an int in 1..4"),
    (json.dumps({"edits": [{"layer": 1, "vector": [0.0] * 3}]}), "'vector' must be a name or a list of 16 numbers"),
    (json.dumps({"edits": [{"layer": 1, "vector": "optimistic"}]}), "STEERLIB_VLLM_VECTORS names no folder"),
    (json.dumps({"edits": [{"layer": 1, "vector": [1.0] * D, "mode": "boost"}]}), "mode must be one of"),
    (json.dumps({"edits": [{"layer": 1, "vector": [1.0] * D, "coef": float("nan")}]}), "coef must be a finite"),
    (json.dumps({"edits": [{"layer": 1, "row": [1.0] * D, "lo": 0.0, "hi": 0.0}]}), "needs a unit row"),
    (json.dumps({"edits": [], "extra": 1}), "must be an object with 'edits'"),
])
def test_bad_specs_name_the_problem(spec, message, monkeypatch):
    monkeypatch.delenv("STEERLIB_VLLM_VECTORS", raising=False)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        parse_spec(spec, n_layers=4, d_model=D)


def test_serve_engine_vllm_validates_on_the_model_shape_without_weights(optimism_vectors, tmp_path):
    """``steerlib serve --engine vllm``: the API process holds the model on the meta device and a vLLM engine
    (not started here) whose arguments carry the plugin's worker extension and compile-cache identity."""
    from steerlib.serve.process import ServeOptions, build
    from steerlib.serve.vllm_engine import VllmEngine
    from steerlib.vllm.worker import IDENTITY

    optimism_vectors.save(tmp_path / "optimistic")
    app, _ = build(ServeOptions(vectors={"optimistic": tmp_path / "optimistic"}, engine="vllm",
                                vllm_args={"enforce_eager": True, "max_model_len": 256}))
    service = app.state.service
    assert isinstance(service.engine, VllmEngine) and not service.engine.alive
    assert next(service.model.parameters()).device.type == "meta"
    args = service.engine.args
    assert args["additional_config"] == {"steerlib": IDENTITY} and args["enforce_eager"] is True
    assert args["max_model_len"] == 256 and args["worker_extension_cls"].endswith("SteerlibWorkerExtension")
    with pytest.raises(ValueError, match="layer 99 is out of range"):
        from steerlib.serve.schema import SteeringSpec

        try:
            service.resolve_steering([SteeringSpec(vector="optimistic", layer=99, coef=1.0)])
        except Exception as exc:  # the service answers 400 with the layout's message
            raise ValueError(getattr(exc, "message", str(exc))) from None
    with pytest.raises(ValueError, match="unknown engine 'sglang'"):
        ServeOptions(engine="sglang").check()
