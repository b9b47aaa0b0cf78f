"""The vLLM backend's request spec and per-step plan (no vLLM needed: these run in the main environment)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from steerlib.serve.engine import UnsupportedSteering
from steerlib.serve.runs import engine_api_error
from steerlib.steering.plan import Condition, FirstGenerated, FromMarker, GeneratedWindow, SteerOp, lower_ops
from steerlib.vllm import cache_salt, encode_spec, parse_spec
from steerlib.vllm.slots import SlotTable, VectorStore, content_key
from steerlib.vllm.spec import UnsupportedOnVllm, encode_rows, register_spec, spec_keys

D = 16


def _same(a: list, b: list) -> bool:
    """Edits equal field by field (their rows are tensors)."""
    def gate(e):
        return (e.gate_key, e.gate_lo, e.gate_hi, e.latch)
    return len(a) == len(b) and all(
        x.layer == y.layer and x.key == y.key and torch.equal(x.row, y.row) and (x.coef, x.lo, x.hi) == (y.coef, y.lo, y.hi)
        and x.rule == y.rule and gate(x) == gate(y)
        and (x.gate_row is None) == (y.gate_row is None) and (x.gate_row is None or torch.equal(x.gate_row, y.gate_row))
        for x, y in zip(a, b, strict=True))


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


def test_parametrised_positions_travel_and_what_vllm_cannot_apply_is_refused_not_dropped():
    edits = lower_ops([SteerOp(layer=2, vector=_vec(4), coef=1.5, positions=FirstGenerated(3)),
                       SteerOp(layer=3, vector=_vec(5), coef=-1.0, positions=GeneratedWindow(2, 6))])
    parsed = parse_spec(encode_rows(edits), n_layers=4, d_model=D).edits
    assert _same(parsed, edits) and parsed[0].rule == FirstGenerated(3) and parsed[1].rule == GeneratedWindow(2, 6)
    by_name = parse_spec(json.dumps({"edits": [{"layer": 1, "vector": [1.0] * D, "positions": "first:4"}]}),
                         n_layers=4, d_model=D).edits
    assert by_name[0].rule == FirstGenerated(4)
    # What vLLM cannot apply yet is refused, and the vLLM engine turns that into its own refusal, which the app
    # answers with the same 400 as the HF engine's unsupported steering.
    err = engine_api_error(UnsupportedSteering("positions 'marker:x' are not supported"))
    assert (err.status, err.param, err.code) == (400, "steering", "unsupported_steering")
    marker = lower_ops([SteerOp(layer=2, vector=_vec(8), coef=1.0, positions=FromMarker("</think>"))])
    with pytest.raises(UnsupportedOnVllm, match=r"^the vLLM engine cannot apply marker positions \(edit 0 at layer 2: "
                                                 r"positions 'marker:</think>'\)$"):
        encode_rows(marker)
    with pytest.raises(UnsupportedOnVllm, match="the vLLM engine cannot apply marker positions .*'marker:x'"):
        parse_spec(json.dumps({"edits": [{"layer": 1, "vector": [1.0] * D, "positions": "marker:x"}]}), 4, D)


def test_gates_and_latches_travel_as_the_plan_lowers_them():
    ops = [SteerOp(layer=2, vector=_vec(6), coef=1.0, when=Condition(_vec(7), above=0.5)),
           SteerOp(layer=3, vector=_vec(8), mode="cap", cap_max=0.25, when=Condition(_vec(9), below=-0.1, latch=True),
                   positions="response")]
    lowered = lower_ops(ops)
    assert _same(parse_spec(encode_spec(ops), n_layers=4, d_model=D).edits, lowered)  # vectors inline
    assert _same(parse_spec(encode_rows(lowered), n_layers=4, d_model=D).edits, lowered)  # lowered rows
    gate = parse_spec(encode_rows(lowered), n_layers=4, d_model=D).edits[1]
    assert (gate.gate_lo, gate.gate_hi, gate.latch) == (-math.inf, -0.1, True)


def test_rows_travel_as_content_keys_and_are_registered_once(tmp_path):
    ops = [SteerOp(layer=2, vector=_vec(10), coef=2.0, when=Condition(_vec(11), above=0.0, latch=True)),
           SteerOp(layer=3, vector=_vec(10), mode="ablate")]
    lowered = lower_ops(ops)
    store = VectorStore(tmp_path / "store")
    keyed = encode_rows(lowered, readout=True, store=store)
    floats = encode_rows(lowered, readout=True)
    assert len(keyed) < 500 < len(floats)  # the keyed spec does not grow with the width
    keys = [lowered[0].key, lowered[0].gate_key, lowered[1].key]
    assert spec_keys(keyed) == keys and all(k == content_key(r) for k, r in zip(
        keys, [lowered[0].row, lowered[0].gate_row, lowered[1].row], strict=True))
    assert sorted(p.stem for p in (tmp_path / "store").rglob("*.safetensors")) == sorted(keys)
    # A worker resolves the keys from its slot table (loading on a miss) to exactly the server's edits.
    table = SlotTable(8, load=VectorStore(tmp_path / "store").get)
    parsed = parse_spec(keyed, 4, D, rows=lambda ks: table.acquire("req", ks))
    assert _same(parsed.edits, lowered) and parsed.readout and table.loads == 3
    # The API process rewrites a client's floats to the same keys; a keyed spec it sees again stays as it is.
    rewritten, _ = register_spec(encode_spec(ops, readout=True), 4, D, VectorStore(tmp_path / "store"))
    assert rewritten == keyed and register_spec(keyed, 4, D, store)[0] == keyed
    assert cache_salt(rewritten) == cache_salt(keyed)
    # An unknown or malformed key is a one-line error before anything runs.
    with pytest.raises(ValueError, match="steerlib: vector key 'f{24}' is not in the vector store"):
        register_spec(keyed.replace(keys[2], "f" * 24), 4, D, store)
    with pytest.raises(ValueError, match="steerlib: 'abc' is not a vector key"):
        parse_spec(keyed.replace(keys[2], "abc"), 4, D, rows=lambda ks: {})
    with pytest.raises(ValueError, match="names vectors by key but no vector store is configured"):
        parse_spec(keyed, 4, D)


def test_store_refuses_a_file_that_is_not_what_its_key_says(tmp_path):
    store = VectorStore(tmp_path)
    key = store.put(_vec(12))
    other = VectorStore(tmp_path).path(store.put(_vec(13)))
    VectorStore(tmp_path).path(key).write_bytes(other.read_bytes())
    with pytest.raises(ValueError, match=f"the stored vector '{key}' does not match its key"):
        VectorStore(tmp_path).get(key)


@pytest.mark.parametrize(("spec", "message"), [
    ("{", "steerlib: the steering spec is not JSON"),
    (json.dumps({"edits": [{"layer": 5, "vector": [0.0] * D}]}), "steerlib edit 0: layer must be an int in 1..4"),
    (json.dumps({"edits": [{"layer": 1, "vector": [0.0] * 3}]}), "'vector' must be a name or a list of 16 numbers"),
    (json.dumps({"edits": [{"layer": 1, "vector": "optimistic"}]}), "STEERLIB_VLLM_VECTORS names no folder"),
    (json.dumps({"edits": [{"layer": 1, "vector": [1.0] * D, "mode": "boost"}]}), "steerlib edit 0: unknown steering mode 'boost'"),
    (json.dumps({"edits": [{"layer": 1, "vector": [1.0] * D, "coef": float("nan")}]}), "coef must be a finite"),
    (json.dumps({"edits": [{"layer": 1, "row": [1.0] * D, "lo": 0.0, "hi": 0.0}]}), "needs a unit row"),
    (json.dumps({"edits": [], "extra": 1}), "must be an object with 'edits'"),
    (json.dumps({"edits": [{"layer": 1, "vector": [1.0] * D, "when": {"vector": [1.0] * D}}]}),
     "steerlib edit 0: a condition needs a threshold"),
    (json.dumps({"edits": [{"layer": 1, "row": [1.0] * D, "gate_row": [2.0] * D, "gate_lo": 0.0}]}),
     "a gate needs a unit row"),
    (json.dumps({"edits": [{"layer": 1, "row": [1.0] * D, "latch": True}]}), "need a gate_row"),
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


def _fake_runner(specs: list[str | None], prompt_lens: list[int], counts: list[int], computed: list[int]):
    """Just the V1 runner bookkeeping the worker reads: request ids, where each request's tokens start, specs,
    and how many tokens each request had computed before the step."""
    from types import SimpleNamespace

    ids = [f"req{i}-abcdefgh" for i in range(len(specs))]
    qsl = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
    requests = {rid: SimpleNamespace(sampling_params=SimpleNamespace(extra_args={"steerlib": s} if s else None),
                                     num_prompt_tokens=p) for rid, s, p in zip(ids, specs, prompt_lens, strict=True)}
    return SimpleNamespace(input_batch=SimpleNamespace(num_reqs=len(ids), req_ids=ids, num_computed_tokens_cpu=computed),
                           query_start_loc=SimpleNamespace(cpu=qsl), requests=requests)


def test_worker_step_raises_when_a_steered_layer_did_not_run_and_keeps_readouts_by_request():
    from steerlib.vllm import worker

    layers = torch.nn.ModuleList([torch.nn.Identity() for _ in range(4)])
    st = worker.WorkerState(layers, D, max_tokens=16, device=torch.device("cpu"))
    dirs = torch.nn.functional.normalize(torch.randn(2, D), dim=-1)
    st.configure_readout(3, dirs.tolist())
    spec = encode_spec([SteerOp(layer=2, vector=_vec(6), coef=1.5)], readout=True)
    # Request 0 ends its prompt (positions 2..4 of a 5-token prompt), request 1 (unsteered, no read-out) decodes.
    runner = _fake_runner([spec, None], [5, 3], [3, 1], [2, 7])
    positions = torch.tensor([2, 3, 4, 7])
    hidden = torch.randn(4, D)
    st.begin(runner, positions)
    for layer in (1, 3, 4):  # layer 2 never runs
        st.run_layer(layer, hidden.clone())
    with pytest.raises(RuntimeError, match=r"hook at layer\(s\) \[2\] did not run exactly once"):
        st.end()
    st.begin(runner, positions)
    h = hidden.clone()
    for layer in (1, 2, 3, 4):
        st.run_layer(layer, h)
    st.end()
    expected = hidden[:3].clone()
    expected += 1.5 * _vec(6)  # layer 2 edits request 0's tokens only
    torch.testing.assert_close(h[:3], expected)
    torch.testing.assert_close(h[3], hidden[3])
    got = st.pop(["req0", "req1"])
    assert list(got["req0"]) == [4] and got["req1"] == {}  # the last prompt position of request 0 only
    torch.testing.assert_close(torch.tensor(got["req0"][4]), h[2] @ dirs.T)
