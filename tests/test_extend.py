"""Methods and position rules extend in one place: a toy method and a toy position rule, registered here and
nowhere else, steer through ``steer()``, the compiled path, the CLI, the server (HF engine) and the vLLM spec; and
what a consumer cannot apply is refused by every consumer with the same message."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from typer.testing import CliRunner

from steerlib import (
    CompiledSteering,
    Lowered,
    PositionRule,
    SteeringMethod,
    SteerOp,
    register_method,
    register_positions,
    steer,
    unit,
)
from steerlib.steering.plan import (
    METHODS,
    NO_END,
    FromMarker,
    SteeringNotSupported,
    check_supported,
    lower_ops,
    parse_params,
    position_rule,
)


@register_method
@dataclass(frozen=True)
class Nudge(SteeringMethod):
    """Toy method: add ``step`` times the unit direction, then keep the projection at or above ``floor``."""

    name: ClassVar[str] = "nudge"
    strength: ClassVar[str | None] = "step"
    features: ClassVar[frozenset[str]] = frozenset({"add", "cap"})
    step: float = 1.0
    floor: float | None = None

    def lower(self, vector):
        return Lowered(unit(vector), self.step, -math.inf if self.floor is None else self.floor, math.inf)


@register_positions
@dataclass(frozen=True)
class PromptTail(PositionRule):
    """Toy rule: the last ``n`` prompt tokens, ``[P - n, P)``, written ``tail:N``."""

    n: int
    name: ClassVar[str] = "tail"
    syntax: ClassVar[str] = "tail:N"

    @classmethod
    def parse(cls, arg):
        if arg is None or not arg.isdigit():
            raise ValueError(f"tail needs a token count, got {arg!r}")
        return cls(int(arg))

    def interval(self, prompt_len, marker=None):
        return max(0, prompt_len - self.n), prompt_len

    def spec(self):
        return f"tail:{self.n}"


LAYER = 2
STEP, FLOOR = 0.75, 1.5


def _expected(plain_proj: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """The toy edit's effect on the projection: step added, then floored, inside ``[start, end)`` only."""
    pos = torch.arange(plain_proj.shape[-1])
    edited = torch.clamp(plain_proj + STEP, min=FLOOR)
    return torch.where((pos >= start) & (pos < end), edited, plain_proj)


def test_the_registries_know_the_toys_and_their_declarations():
    assert METHODS["nudge"] is Nudge
    params = Nudge.parameters()
    assert [(p.name, p.type, p.optional, p.default) for p in params.values()] == [
        ("step", float, False, 1.0), ("floor", float, True, None)]
    assert position_rule("tail:3") == PromptTail(3) and PromptTail(3).interval(10) == (7, 10)
    assert parse_params("nudge", ["floor=2", "step=0.5"]) == {"floor": 2.0, "step": 0.5}
    with pytest.raises(ValueError, match=r"^method 'nudge' has no parameter 'ceiling'; its parameters: step, floor$"):
        SteerOp(LAYER, torch.ones(8), "nudge", params={"ceiling": 1.0})
    with pytest.raises(ValueError, match=r"^method 'nudge' parameter 'floor' must be float or null, got 'high'$"):
        SteerOp(LAYER, torch.ones(8), "nudge", params={"floor": "high"})
    with pytest.raises(ValueError, match=r"^parameter 'floor=high': could not convert string to float: 'high'$"):
        parse_params("nudge", ["floor=high"])
    with pytest.raises(ValueError, match=r"^positions 'tail:x': tail needs a token count, got 'x'$"):
        position_rule("tail:x")
    with pytest.raises(ValueError, match=r"unknown positions 'head:2'; choose from all, prompt, response, first:N, "
                                         r"window:A-B, marker:TEXT, .*tail:N"):
        position_rule("head:2")
    # coef is the method's strength, params override it; relative scales it (see build_ops).
    assert SteerOp(LAYER, torch.ones(8), "nudge", coef=0.25).method == Nudge(step=0.25)
    assert SteerOp(LAYER, torch.ones(8), "nudge", coef=0.25, params={"step": 2.0}).method == Nudge(step=2.0)


@pytest.mark.filterwarnings("ignore:torch._dynamo.config.skip_nnmodule_hook_guards")
def test_eager_and_compiled_paths_apply_the_toy_method_at_the_toy_positions(make_tiny):
    model = make_tiny("llama")
    d = model.config.hidden_size
    v = torch.randn(d, generator=torch.Generator().manual_seed(3))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    op = SteerOp(LAYER, v, "nudge", coef=STEP, params={"floor": FLOOR}, positions="tail:2")
    with torch.no_grad():
        plain = model(ids, output_hidden_states=True)
        want = _expected(plain.hidden_states[LAYER][0] @ unit(v), 4, 6)
        with steer(model, op):  # ops straight into steer(): no ResidualEditor needed
            out = model(ids, output_hidden_states=True)  # the eager edit is in place: the state shows it
        with steer(model, v, LAYER, STEP, mode="nudge", params={"floor": FLOOR}, positions="tail:2"):
            built = model(ids).logits
        with CompiledSteering(model, [op], prompt_lengths=torch.tensor([6]), max_steps=1):
            compiled = model(ids, position_ids=torch.arange(6)[None]).logits
    torch.testing.assert_close(out.hidden_states[LAYER][0] @ unit(v), want, atol=1e-4, rtol=1e-5)
    assert not torch.allclose(want, plain.hidden_states[LAYER][0] @ unit(v), atol=1e-3)  # the edit did something
    torch.testing.assert_close(built, out.logits, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(compiled, out.logits, atol=1e-5, rtol=1e-5)
    # A per-row coefficient replaces the method's strength (the toy's step), whatever the method is called.
    rows = torch.tensor([[STEP], [0.0]])
    with torch.no_grad(), CompiledSteering(model, [op], prompt_lengths=torch.tensor([6, 6]), max_steps=1,
                                           row_coefs=rows):
        both = model(ids.repeat(2, 1), position_ids=torch.arange(6)[None].repeat(2, 1), output_hidden_states=True)
    with torch.no_grad(), steer(model, v, LAYER, 0.0, mode="nudge", params={"floor": FLOOR}, positions="tail:2"):
        floor_only = model(ids).logits
    torch.testing.assert_close(both.logits[:1], out.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both.logits[1:], floor_only, atol=1e-5, rtol=1e-5)


def test_every_consumer_refuses_what_it_cannot_apply_with_one_message(make_tiny):
    from steerlib.vllm.spec import SUPPORT as VLLM_SUPPORT
    from steerlib.vllm.spec import UnsupportedOnVllm, encode_rows

    model = make_tiny("llama")
    op = SteerOp(LAYER, torch.ones(model.config.hidden_size), positions=FromMarker("</think>"))
    edits = lower_ops([op])
    tail = "cannot apply marker positions (edit 0 at layer 2: positions 'marker:</think>')"
    with pytest.raises(SteeringNotSupported, match=r"^the compiled path " + _re(tail)):
        CompiledSteering(model, [op], prompt_lengths=torch.tensor([3]), max_steps=1)
    with pytest.raises(UnsupportedOnVllm, match=r"^the vLLM engine " + _re(tail)):
        encode_rows(edits)
    with pytest.raises(SteeringNotSupported, match=r"^the vLLM engine " + _re(tail)):
        check_supported(edits, VLLM_SUPPORT)
    with steer(model, op) as editor:  # the eager editor watches markers: accepted
        assert editor.markers == ["</think>"]


def _re(text: str) -> str:
    import re

    return re.escape(text) + "$"


def test_the_vllm_spec_carries_the_toys():
    from steerlib.vllm import encode_spec, parse_spec

    d = 16
    v = torch.randn(d, generator=torch.Generator().manual_seed(4))
    ops = [SteerOp(1, v, "nudge", coef=STEP, params={"floor": FLOOR}, positions="tail:3")]
    spec = encode_spec(ops)
    assert json.loads(spec)["edits"][0]["params"] == {"step": STEP, "floor": FLOOR}
    [edit] = parse_spec(spec, n_layers=2, d_model=d).edits
    [want] = lower_ops(ops)
    assert (edit.coef, edit.lo, edit.hi, edit.rule) == (want.coef, want.lo, want.hi, PromptTail(3))
    torch.testing.assert_close(edit.row, want.row)
    assert PromptTail(3).interval(2) == (0, 2) and NO_END > 2
    with pytest.raises(ValueError, match=r"^steerlib edit 0: method 'nudge' has no parameter 'x'"):
        parse_spec(json.dumps({"edits": [{"layer": 1, "vector": [1.0] * d, "mode": "nudge", "params": {"x": 1}}]}),
                   n_layers=2, d_model=d)


@pytest.mark.slow
def test_the_cli_steers_with_the_toys(tmp_path, embedded):
    from steerlib import format_prompt, generate
    from steerlib.cli import app

    model, tok = embedded
    torch.manual_seed(0)
    path = tmp_path / "v.pt"
    vec = torch.randn(576)
    torch.save(vec, path)
    args = ["steer", "--vector", str(path), "--layer", "12", "--coef", "8", "--mode", "nudge", "--param",
            "floor=4", "--positions", "tail:3", "--prompt", "Say hi.", "--max-new-tokens", "4"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    ops = [SteerOp(12, vec, "nudge", coef=8.0, params={"floor": 4.0}, positions="tail:3")]
    [gen] = generate(model, tok, [format_prompt(tok, "Say hi.")], steering=ops, max_new_tokens=4)
    assert f"--- nudge coef=8 layer=12 | Say hi.\n{gen.text}\n" in result.output
    bad = CliRunner().invoke(app, [*args[:10], "ceiling=1", *args[11:]])
    assert bad.exit_code != 0
    assert str(bad.exception) == "method 'nudge' has no parameter 'ceiling'; its parameters: step, floor"


@pytest.mark.slow
def test_the_server_steers_with_the_toys_and_refuses_alike(embedded, optimism_vectors):
    pytest.importorskip("uvicorn")
    from service_cases import Served, assert_answers_like, server_drift, server_options, server_vectors

    from steerlib.serve import BackgroundServer, create_app
    from steerlib.steering.steer import build_ops

    model, tok = embedded
    app = create_app(model, tok, server_vectors(optimism_vectors), server_options(), server_drift())
    with BackgroundServer(app) as srv:
        served = Served("hf", srv.url, app.state.service, model, tok, optimism_vectors)
        spec = {"vector": "optimistic", "layer": 10, "mode": "nudge", "coef": 6.0, "params": {"floor": 2.0},
                "positions": "tail:4"}
        ops = build_ops(model, optimism_vectors, 10, 6.0, mode="nudge", params={"floor": 2.0}, positions="tail:4")
        assert_answers_like(served.chat(steering=[spec]), served.reference(ops), "toy method and rule")
        bad = served.chat(steering=[{**spec, "params": {"ceiling": 1.0}}])
        assert bad.status_code == 400
        assert "method 'nudge' has no parameter 'ceiling'; its parameters: step, floor" in bad.json()["error"]["message"]
        marker = served.chat(steering=[{"vector": "optimistic", "layer": 10, "positions": "marker:</think>"}])
        error = marker.json()["error"]
        assert (marker.status_code, error["param"], error["code"]) == (400, "steering", "unsupported_steering")
        assert error["message"] == ("the HF engine cannot apply marker positions (edit 0 at layer 10: positions "
                                    "'marker:</think>')")


def test_steer_takes_ops_under_the_thread_guard_and_refuses_vector_arguments_with_them(make_tiny):
    import threading

    from steerlib.steering.thread_guard import ForeignThreadForward

    model = make_tiny("llama")
    op = SteerOp(LAYER, torch.ones(model.config.hidden_size), "nudge", coef=STEP)
    errors: list[BaseException] = []

    def other() -> None:
        try:
            with torch.no_grad():
                model(torch.tensor([[1, 2]]))
        except BaseException as exc:  # noqa: BLE001 -- the test inspects what the thread raised
            errors.append(exc)

    with steer(model, [op]):
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
    assert len(errors) == 1 and isinstance(errors[0], ForeignThreadForward)
    with pytest.raises(ValueError, match=r"^steer\(\) got ops and 'coef': ops carry their own layers"):
        with steer(model, op, coef=2.0):
            pass


def test_a_method_is_checked_once_when_it_registers():
    class NotFrozen(SteeringMethod):
        name: ClassVar[str] = "not-frozen"

        def lower(self, vector):
            return Lowered(vector)

    with pytest.raises(ValueError, match=r"^NotFrozen must be a frozen dataclass"):
        register_method(NotFrozen)

    @dataclass(frozen=True)
    class BadStrength(SteeringMethod):
        name: ClassVar[str] = "bad-strength"
        strength: ClassVar[str | None] = "level"
        scale: float = 1.0

        def lower(self, vector):
            return Lowered(vector, self.scale)

    with pytest.raises(ValueError, match=r"^method 'bad-strength': strength 'level' must name one of its float"):
        register_method(BadStrength)
    assert "not-frozen" not in METHODS and "bad-strength" not in METHODS
