"""Calibrated caps (``steerlib.steering.calibration``): percentiles of the reference answers' projections,
resuming, refusal for another model or other settings, and caps that hold the calibrated bound."""

from __future__ import annotations

import json

import pytest
import torch

from steerlib import build_readout, format_prompt, generate
from steerlib.steering.calibration import (
    Calibration,
    Percentile,
    calibrate,
    calibrated_cap,
    reference_questions,
)
from steerlib.store.results import SettingsChanged

QUESTIONS = ["How do I boil an egg?", "What is the capital of Canada?", "Why do cats purr?",
             "How can I save money each month?", "What games can a family play?", "How do clouds form?"]
LAYERS = [6, 8, 10]


@pytest.fixture(scope="module")
def calibrated(embedded, optimism_vectors, tmp_path_factory):
    model, tok = embedded
    path = tmp_path_factory.mktemp("cal") / "calibration.json"
    cal = calibrate(model, tok, optimism_vectors, path, layers=LAYERS, questions=QUESTIONS, max_new_tokens=12,
                    batch_size=4)
    return cal, path


def test_reference_set_is_shipped_and_varied() -> None:
    qs = reference_questions()
    assert 60 <= len(qs) <= 100 and len(set(qs)) == len(qs)
    assert all(q.strip().endswith("?") for q in qs)


def test_percentiles_equal_a_manual_computation(calibrated) -> None:
    cal, path = calibrated
    records = [json.loads(line) for line in path.with_suffix(".jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in records) == list(range(len(QUESTIONS)))
    for li, layer in enumerate(LAYERS):
        values = torch.tensor([x for r in records for x in r["proj"][li]], dtype=torch.float64)
        assert cal.n_tokens == values.numel() > 0
        assert cal.value(layer, 75) == pytest.approx(float(torch.quantile(values, 0.75)), abs=1e-4)
        assert cal.value(layer, 0) == pytest.approx(float(values.min()), abs=1e-4)
        # halfway between two recorded percentiles is the mean of the two
        assert cal.value(layer, 40.5) == pytest.approx((cal.value(layer, 40) + cal.value(layer, 41)) / 2)
    loaded = Calibration.load(path)
    assert loaded.percentiles[8] == pytest.approx(cal.percentiles[8], abs=1e-5)


def test_projections_equal_the_read_out_of_the_same_answer(calibrated, embedded, optimism_vectors) -> None:
    """The recorded projections are those of the unit trait direction on the answer's tokens."""
    cal, path = calibrated
    model, tok = embedded
    record = json.loads(path.with_suffix(".jsonl").read_text().splitlines()[0])
    from steerlib import capture_activations

    prompt = format_prompt(tok, QUESTIONS[record["id"]])
    acts = capture_activations(model, tok, [prompt], [record["response"]], [8], keep_tokens=True)
    u = optimism_vectors.get(8)
    u = u / u.norm()
    expected = acts.tokens[0][0, acts.prompt_lengths[0]:] @ u
    assert torch.allclose(torch.tensor(record["proj"][1]), expected, atol=1e-3)


def test_resume_after_interruption_gives_the_same_calibration(calibrated, embedded, optimism_vectors) -> None:
    cal, path = calibrated
    model, tok = embedded
    records = path.with_suffix(".jsonl")
    lines = records.read_text().splitlines(keepends=True)
    # the first batch of four answers kept, the fifth torn mid-write: the second batch is redone as it was
    records.write_text("".join(lines[:4]) + lines[4][:10])
    with pytest.warns(UserWarning, match="half-written"):
        again = calibrate(model, tok, optimism_vectors, path, layers=LAYERS, questions=QUESTIONS, max_new_tokens=12,
                          batch_size=4)
    for layer in LAYERS:
        assert again.percentiles[layer] == pytest.approx(cal.percentiles[layer], abs=1e-4)
    with pytest.raises(SettingsChanged, match="max_new_tokens: 12 -> 13"):
        calibrate(model, tok, optimism_vectors, path, layers=LAYERS, questions=QUESTIONS, max_new_tokens=13)


def test_refused_for_another_model(calibrated, make_tiny) -> None:
    _, path = calibrated
    with pytest.raises(ValueError, match="was measured on model .* not on this model"):
        Calibration.load(path, model=make_tiny("llama"))


def test_refused_for_other_vectors(calibrated, embedded, optimism_vectors) -> None:
    cal, _ = calibrated
    with pytest.raises(ValueError, match="not the ones the calibration of 'optimistic' was measured with"):
        calibrated_cap(embedded.model, -optimism_vectors, cal, 75, LAYERS)
    assert calibrated_cap(embedded.model, optimism_vectors * 2.0, cal, 75, LAYERS)  # same directions: accepted


def test_bad_percentiles_are_refused() -> None:
    with pytest.raises(ValueError, match=r"percentile must be a number in 0..100, got 101"):
        Percentile(101)
    with pytest.raises(ValueError, match="percentile side must be 'max' or 'min'"):
        Percentile(50, side="up")  # type: ignore[arg-type]


@pytest.mark.parametrize("side", ["max", "min"])
def test_capped_projection_never_crosses_the_calibrated_bound(calibrated, embedded, optimism_vectors,
                                                               side: str) -> None:
    cal, _ = calibrated
    model, tok = embedded
    pct = Percentile(50, side=side)  # type: ignore[arg-type]
    ops = calibrated_cap(model, optimism_vectors, cal, pct, LAYERS)
    bounds = {op.layer: (op.cap_max if side == "max" else op.cap_min) for op in ops}
    assert bounds == {layer: cal.value(layer, 50) for layer in LAYERS}
    readout = build_readout(model, {"optimistic": optimism_vectors}, LAYERS)
    prompts = [format_prompt(tok, q) for q in ("Tell me about your week.", "What will tomorrow bring?")]
    free = generate(model, tok, prompts, readout=readout, max_new_tokens=10)
    capped = generate(model, tok, prompts, steering=ops, readout=readout, max_new_tokens=10)
    sign = 1.0 if side == "max" else -1.0
    crossed = 0
    for f, c in zip(free, capped, strict=True):
        for li, layer in enumerate(LAYERS):
            crossed += int((sign * (f.projections[:, li, 0] - bounds[layer]) > 1e-3).sum())
            assert float((sign * (c.projections[:, li, 0] - bounds[layer])).max()) <= 1e-3
    assert crossed > 0  # the unsteered answers do cross the median somewhere, so the cap had work to do


def test_cli_calibrate_then_steer_with_a_percentile_cap(tmp_path, embedded, optimism_vectors, monkeypatch) -> None:
    from typer.testing import CliRunner

    from steerlib.cli import app
    from steerlib.steering import calibration

    monkeypatch.setattr(calibration, "reference_questions", lambda: QUESTIONS[:4])
    folder = tmp_path / "optimistic"
    optimism_vectors.save(folder)
    runner = CliRunner()
    result = runner.invoke(app, ["calibrate", "--vector", str(folder), "--layers", "8-9", "--max-new-tokens", "8"])
    assert result.exit_code == 0, result.output
    assert "4 answers" in result.output and str(folder / "calibration.json") in result.output
    assert Calibration.load(folder).layers == [8, 9]
    result = runner.invoke(app, ["steer", "--vector", str(folder), "--prompt", "How was your week?",
                                 "--cap-percentile", "50", "--layers", "8-9", "--max-new-tokens", "6"])
    assert result.exit_code == 0, result.output
    assert "--- unsteered" in result.output and "--- cap max at percentile 50 over layers 8-9" in result.output
    result = runner.invoke(app, ["steer", "--vector", str(folder), "--prompt", "x", "--cap-percentile", "50",
                                 "--layers", "8-12"])
    assert result.exit_code != 0 and "layer 10 was not calibrated (calibrated layers: 8, 9)" in str(result.exception)


def test_server_cap_percentile_per_request(calibrated, embedded, optimism_vectors) -> None:
    """A steering entry with ``cap_percentile`` steers exactly like ``calibrated_cap`` offline; a vector without a
    calibration, or a percentile cap mixed with another mode, is a 400 naming the problem."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from steerlib.serve import AppOptions, BackgroundServer, create_app

    cal, _ = calibrated
    model, tok = embedded
    app = create_app(model, tok, {"optimistic": optimism_vectors, "plain": optimism_vectors},
                     AppOptions(monitor_traits=(), max_batch=4), calibrations={"optimistic": cal})
    question = "How was your week?"
    entry = {"vector": "optimistic", "layers": LAYERS, "cap_percentile": 50, "cap_side": "min"}
    with BackgroundServer(app) as srv:
        def ask(steering: list[dict]) -> httpx.Response:
            return httpx.post(f"{srv.url}/v1/chat/completions", timeout=60, json={
                "messages": [{"role": "user", "content": question}], "max_tokens": 8, "temperature": 0,
                "steering": steering})

        reply = ask([entry])
        assert reply.status_code == 200, reply.text
        text = reply.json()["choices"][0]["message"]["content"]
        missing = ask([{**entry, "vector": "plain"}])
        mixed = ask([{**entry, "mode": "add"}])
    ops = calibrated_cap(model, optimism_vectors, cal, Percentile(50, "min"), LAYERS)
    [offline] = generate(model, tok, [format_prompt(tok, question)], steering=ops, max_new_tokens=8)
    [free] = generate(model, tok, [format_prompt(tok, question)], max_new_tokens=8)
    assert text == offline.text != free.text
    assert missing.status_code == 400 and "vector 'plain' has no calibration" in missing.text
    assert mixed.status_code == 400 and "cap_percentile is a cap; it cannot be combined with mode 'add'" in mixed.text
