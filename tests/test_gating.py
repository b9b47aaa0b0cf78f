"""Gated steering and finer positions end to end on the embedded model (``generate``, ``stream``, the compiled
path): a gate that never opens gives the unsteered tokens, one that always opens the ungated ones, and per-token
and latched gates, first-N / window / marker positions equal hand-written hooks."""

from __future__ import annotations

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from steerlib import build_ops, format_prompt, generate, stream
from steerlib.core.arch import get_layout
from steerlib.steering.plan import Condition, FirstGenerated, FromMarker, GeneratedWindow, SteerOp
from steerlib.steering.steer import When

LAYER = 10
COEF = 8.0
ABOVE = 4.0  # a pessimism projection at layer 10 that some generated tokens cross and others do not
PROMPTS = ["How was your week?", "What will tomorrow bring?"]
N_NEW = 12


@pytest.fixture(scope="module")
def setup(embedded, optimism_vectors):
    model, tok = embedded
    prompts = [format_prompt(tok, q) for q in PROMPTS]
    free = generate(model, tok, prompts, max_new_tokens=N_NEW)
    ungated = generate(model, tok, prompts, steering=build_ops(model, optimism_vectors, LAYER, COEF),
                       max_new_tokens=N_NEW)
    return model, tok, prompts, free, ungated


def _manual(model, tok, prompts, v: torch.Tensor, u: torch.Tensor, *, above: float | None = None,
            latch: bool = False, span=None) -> list[list[int]]:
    """Greedy generation with a hand-written hook: add COEF * v at LAYER where <h, u> >= above (and, latched,
    in every later pass of a row once it opened), restricted to absolute positions span(P) = (start, end)."""
    from steerlib.core.capture import pad_batch, pad_token_id

    ids, mask, _, _ = pad_batch([tok(p, add_special_tokens=False)["input_ids"] for p in prompts], pad_token_id(tok))
    width = ids.shape[1]
    state = {"past": 0, "latched": torch.zeros(len(prompts), dtype=torch.bool)}

    def hook(_m, _a, out):
        h = out[0] if isinstance(out, tuple) else out
        b, t, _ = h.shape
        pos = torch.arange(state["past"], state["past"] + t)
        on = torch.ones(b, t, dtype=torch.bool)
        if above is not None:
            on = (h @ u >= above) | state["latched"][:, None]
            if latch:
                state["latched"] |= on.any(1)
        if span is not None:
            start, end = span(width)
            on = on & ((pos >= start) & (pos < end))[None, :]
        state["past"] += t
        new = h + COEF * v * on[..., None]
        return (new, *out[1:]) if isinstance(out, tuple) else new

    handle = get_layout(model).blocks[LAYER - 1].register_forward_hook(hook)
    try:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=N_NEW, do_sample=False,
                             pad_token_id=pad_token_id(tok))
    finally:
        handle.remove()
    return [row[width:].tolist() for row in out]


def _cut(rows: list[list[int]], like: list[list[int]]) -> list[list[int]]:
    return [r[:len(x)] for r, x in zip(rows, like, strict=True)]


def test_never_open_is_unsteered_and_always_open_is_ungated(setup, optimism_vectors) -> None:
    model, tok, prompts, free, ungated = setup
    for latch in (False, True):
        never = build_ops(model, optimism_vectors, LAYER, COEF, when=When(-optimism_vectors, above=1e9, latch=latch))
        always = build_ops(model, optimism_vectors, LAYER, COEF,
                           when=When(-optimism_vectors, above=-1e9, latch=latch))
        assert [g.token_ids for g in generate(model, tok, prompts, steering=never, max_new_tokens=N_NEW)] == \
            [g.token_ids for g in free]
        assert [g.token_ids for g in generate(model, tok, prompts, steering=always, max_new_tokens=N_NEW)] == \
            [g.token_ids for g in ungated]
    assert [g.token_ids for g in free] != [g.token_ids for g in ungated]


@pytest.mark.parametrize("latch", [False, True])
def test_gate_equals_a_hand_written_hook(setup, optimism_vectors, latch: bool) -> None:
    model, tok, prompts, free, ungated = setup
    v = optimism_vectors.get(LAYER)
    u = -v / v.norm()
    ops = build_ops(model, optimism_vectors, LAYER, COEF, when=When(-optimism_vectors, above=ABOVE, latch=latch))
    gated = [g.token_ids for g in generate(model, tok, prompts, steering=ops, max_new_tokens=N_NEW)]
    manual = _manual(model, tok, prompts, v, u, above=ABOVE, latch=latch)
    assert gated == _cut(manual, gated)
    # the gate decided something: the answers are neither the unsteered nor the ungated ones
    assert gated != [g.token_ids for g in free] and gated != [g.token_ids for g in ungated]


def test_stream_and_compiled_paths_gate_like_generate(setup, optimism_vectors) -> None:
    model, tok, prompts, _, _ = setup
    for latch in (False, True):
        ops = build_ops(model, optimism_vectors, LAYER, COEF, when=When(-optimism_vectors, above=ABOVE, latch=latch))
        eager = generate(model, tok, prompts, steering=ops, max_new_tokens=N_NEW)
        compiled = generate(model, tok, prompts, steering=ops, max_new_tokens=N_NEW, compile={"backend": "eager"})
        assert [g.token_ids for g in compiled] == [g.token_ids for g in eager]
        streamed = "".join(text for text, _ in stream(model, tok, prompts[0], steering=ops, max_new_tokens=N_NEW))
        [single] = generate(model, tok, prompts[:1], steering=ops, max_new_tokens=N_NEW)
        assert streamed.strip() == single.text


@pytest.mark.parametrize("rule", ["first", "window", "marker"])
def test_finer_positions_equal_a_hand_written_hook(setup, optimism_vectors, rule: str) -> None:
    model, tok, prompts, free, _ = setup
    prompts, free = prompts[:1], free[:1]
    v = optimism_vectors.get(LAYER)
    if rule == "first":
        positions, span = FirstGenerated(3), (lambda p: (p, p + 3))
    elif rule == "window":
        positions, span = GeneratedWindow(2, 6), (lambda p: (p + 2, p + 6))
    else:
        # The marker is the text of the first three generated tokens: it is complete once token 3 exists, so
        # steering starts at the position after it.
        positions, span = FromMarker(tok.decode(free[0].token_ids[:3])), (lambda p: (p + 3, 10**9))
    ops = [SteerOp(LAYER, v, coef=COEF, positions=positions)]
    steered = [g.token_ids for g in generate(model, tok, prompts, steering=ops, max_new_tokens=N_NEW)]
    manual = _manual(model, tok, prompts, v, v, span=span)
    assert steered == _cut(manual, steered)
    assert steered != [g.token_ids for g in free]


def test_condition_rules_and_errors(embedded, optimism_vectors) -> None:
    model, _ = embedded
    with pytest.raises(ValueError, match="a condition needs a threshold"):
        When(optimism_vectors)
    with pytest.raises(ValueError, match="the condition is for layer 12 but the edit is at layer 10"):
        build_ops(model, optimism_vectors, LAYER, COEF, when=When(optimism_vectors, above=0.0, layer=12))
    with pytest.raises(ValueError, match="latch must be true or false"):
        Condition(optimism_vectors.get(LAYER), above=0.0, latch="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="window end \\(2\\) is before its start \\(5\\)"):
        GeneratedWindow(5, 2)
    with pytest.raises(ValueError, match="a marker must be a non-empty string"):
        FromMarker("")


def test_server_gates_per_request_like_generate(setup, optimism_vectors) -> None:
    """A steering entry with ``when`` (and ``latch``) answers exactly what ``generate`` gives with the same gate;
    a condition at another layer than the edit is a 400 naming the rule."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from steerlib.serve import AppOptions, BackgroundServer, create_app

    model, tok, prompts, _, _ = setup
    app = create_app(model, tok, {"optimistic": optimism_vectors, "pessimistic": -optimism_vectors},
                     AppOptions(monitor_traits=(), max_batch=4))
    entry = {"vector": "optimistic", "layer": LAYER, "coef": COEF, "when": {"vector": "pessimistic", "above": ABOVE}}
    with BackgroundServer(app) as srv:
        def ask(steering: list[dict]) -> httpx.Response:
            return httpx.post(f"{srv.url}/v1/chat/completions", timeout=120, json={
                "messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": N_NEW, "temperature": 0,
                "steering": steering})

        answers = {latch: ask([{**entry, "latch": latch}]) for latch in (False, True)}
        wrong_layer = ask([{**entry, "when": {**entry["when"], "layer": LAYER + 2}}])
        no_when = ask([{"vector": "optimistic", "layer": LAYER, "latch": True}])
        plain = ask([{"vector": "optimistic", "layer": LAYER, "coef": COEF}])
        scraped = httpx.get(f"{srv.url}/metrics", timeout=30).text
    # The metrics tell gated requests from unconditionally steered ones.
    requests = {dict(s.labels)["steering"]: s.value for family in text_string_to_metric_families(scraped)
                for s in family.samples if s.name == "steerlib_requests_total"}
    assert plain.status_code == 200 and requests == {"none": 0.0, "steered": 1.0, "gated": 2.0}
    for latch, reply in answers.items():
        assert reply.status_code == 200, reply.text
        ops = build_ops(model, optimism_vectors, LAYER, COEF, when=When(-optimism_vectors, above=ABOVE, latch=latch))
        [offline] = generate(model, tok, prompts[:1], steering=ops, max_new_tokens=N_NEW)
        assert reply.json()["choices"][0]["message"]["content"] == offline.text
    assert wrong_layer.status_code == 400 and "a condition is evaluated at the layer of the edit it gates" in \
        wrong_layer.text
    assert no_when.status_code == 400 and "latch needs a 'when' condition" in no_when.text


def test_cli_gated_steer_and_position_text(tmp_path, embedded, optimism_vectors) -> None:
    from typer.testing import CliRunner

    from steerlib.cli import app
    from steerlib.steering.plan import position_rule

    path = tmp_path / "optimistic"
    optimism_vectors.save(path)
    runner = CliRunner()
    base = ["steer", "--vector", str(path), "--layer", str(LAYER), "--coef", str(COEF), "--prompt", PROMPTS[0],
            "--max-new-tokens", "6"]
    result = runner.invoke(app, [*base, "--when-above", "1e9", "--latch"])
    assert result.exit_code == 0, result.output
    blocks = result.output.split("--- ")[1:]
    assert blocks[1].startswith(f"add coef={COEF:g} layer={LAYER} when projection above 1e+09 (latched)")
    assert blocks[0].split("\n", 1)[1].strip() == blocks[1].split("\n", 1)[1].strip()  # never open: same answer
    result = runner.invoke(app, [*base, "--latch"])
    assert result.exit_code != 0 and "--when-vector and --latch need --when-above" in str(result.exception)
    assert position_rule("first:3") == FirstGenerated(3) and position_rule("window:2-6") == GeneratedWindow(2, 6)
    assert position_rule("marker:</think>") == FromMarker("</think>")
    with pytest.raises(ValueError, match="unknown positions 'sideways'"):
        position_rule("sideways")


def test_plan_latches_per_row_and_carries_latches_across_row_changes() -> None:
    """The plan latches a row once its gate opened (device-side), reports it per edit, and a new ``set_rows``
    restores it for the row wherever it now sits (what the server does when its batch changes)."""
    from steerlib.steering.plan import SteeringPlan, lower_ops

    d = 8
    u = torch.eye(d)[0]
    [edit] = lower_ops([SteerOp(1, torch.eye(d)[1], coef=1.0, when=Condition(u, above=1.0, latch=True))])
    plan = SteeringPlan(d, "cpu")
    plan.set_rows([[edit], [edit]], [0, 0])
    rows = torch.tensor([0, 1])
    hidden = torch.zeros(2, d)
    hidden[0, 0] = 2.0  # row 0 passes the gate, row 1 does not
    plan.fill(rows, torch.tensor([0, 0]))
    plan.apply(1, hidden)
    assert hidden[:, 1].tolist() == [1.0, 0.0]
    assert plan.latched_edits() == [{0}, set()]
    hidden = torch.zeros(2, d)  # nobody passes now, but row 0 is latched
    plan.fill(rows, torch.tensor([1, 1]))
    plan.apply(1, hidden)
    assert hidden[:, 1].tolist() == [1.0, 0.0]
    plan.set_rows([[edit], [edit]], [0, 0], latched=[set(), {0}])  # the rows swapped places
    hidden = torch.zeros(2, d)
    plan.fill(rows, torch.tensor([2, 2]))
    plan.apply(1, hidden)
    assert hidden[:, 1].tolist() == [0.0, 1.0]
