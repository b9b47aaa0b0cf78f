"""Drift monitoring: alerts exactly at the thresholds, rolling means, persistence, conversation logs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from steerlib.commands.monitor import monitor_file
from steerlib.core.capture import capture_activations
from steerlib.core.chat import format_prompt
from steerlib.monitoring import conversations as drift_mod
from steerlib.monitoring.conversations import monitor_conversations, read_conversations
from steerlib.monitoring.drift import Alert, DriftMonitor, alert_record

DATA = Path(__file__).parent / "data"
LAYER = 16


def _rows(trait: str, values) -> list[dict[str, float]]:
    return [{trait: float(v)} for v in values]


def test_zscore_alerts_exactly_above_threshold(tmp_path):
    alerts_path = tmp_path / "alerts.jsonl"
    mon = DriftMonitor(["a", "b"], window=3, threshold=2.0, alerts_path=alerts_path)
    mon.calibrate([{"a": x, "b": 10 * x} for x in (1, 2, 3, 4, 5)])
    std = np.std([1, 2, 3, 4, 5], ddof=1)  # 1.5811...
    limit = 3 + 2.0 * std  # 6.1623...
    assert mon.limits("a") == (None, pytest.approx(limit))
    assert mon.update({"a": limit - 1e-6, "b": 30.0}, timestamp=1.0) == []
    fired = mon.update({"a": limit + 1e-6, "b": 30.0}, timestamp=2.0, meta={"conv": "x"})
    assert [(a.trait, a.index, a.timestamp, a.meta) for a in fired] == [("a", 1, 2.0, {"conv": "x"})]
    assert fired[0].score == pytest.approx((limit + 1e-6 - 3) / std) and fired[0].score > 2.0
    assert fired[0].value == pytest.approx(limit + 1e-6) and fired[0].method == "zscore"
    assert mon.update({"a": -100.0, "b": -1000.0}) == []  # one-sided: a falling trait is not drift
    b_fire = mon.update({"a": 3.0, "b": 30 + 2.0 * 10 * std + 1e-4})
    assert [a.trait for a in b_fire] == ["b"]
    assert [a.index for a in mon.alerts] == [1, 3]
    written = [json.loads(line) for line in alerts_path.read_text().splitlines()]
    assert [Alert(**w) for w in written] == mon.alerts


def test_two_sided_zscore():
    mon = DriftMonitor(["a"], threshold=1.0, two_sided=True)
    mon.calibrate(_rows("a", [-1, 0, 1]))  # mean 0, std 1
    assert [round(a.score, 6) for a in mon.update({"a": -1.5})] == [-1.5]
    assert mon.update({"a": -0.5}) == [] and mon.update({"a": 1.0}) == []
    assert mon.limits("a") == (pytest.approx(-1.0), pytest.approx(1.0))


def test_percentile_alerts_exactly_above_percentile():
    mon = DriftMonitor(["a"], method="percentile", threshold=95)
    mon.calibrate(_rows("a", range(101)))  # the 95th percentile of 0..100 is 95
    assert mon.limits("a") == (None, 95.0)
    assert mon.update({"a": 95.0}) == []  # at the cut-off, not above it
    fired = mon.update({"a": 95.5})
    assert len(fired) == 1 and fired[0].score == pytest.approx(95.5) and fired[0].threshold == 95
    assert mon.update({"a": 1000.0})[0].score == 100.0  # ranks are clipped to the reference range
    assert mon.update({"a": 10.0}) == []


def test_rolling_method_tests_the_window_mean():
    mon = DriftMonitor(["a"], method="rolling", window=4, threshold=3.0)
    mon.calibrate(_rows("a", [-1, 0, 1]))  # mean 0, std 1: z of a window mean is mean * sqrt(n)
    fired_at = []
    for i, v in enumerate([1, 1, 1, 1, 2, 2, 2]):
        alerts = mon.update({"a": v})
        if alerts:
            fired_at.append((i, alerts[0].value, round(alerts[0].score, 6)))
    # windows: [1] z=1, [1,1] 1.41, [1,1,1] 1.73, [1]*4 2.0, [1,1,1,2] 2.5, [1,1,2,2] 3.0 (not above),
    # then [1,2,2,2] 3.5
    assert fired_at == [(6, 1.75, 3.5)]


def test_auto_calibration_rolling_mean_and_history():
    mon = DriftMonitor(["a"], window=3, reference_size=5, threshold=2.0)
    values = [1.0, 2.0, 3.0, 4.0, 5.0]
    for v in values:
        assert mon.update({"a": v}, timestamp=v) == []  # reference period: no alerts
    assert mon.calibrated
    st = mon.state_dict()["stats"]["a"]
    assert st["mean"] == 3.0 and st["std"] == pytest.approx(np.std(values, ddof=1))
    assert mon.update({"a": 3 + 2 * st["std"] + 0.01})
    hist = mon.history()
    assert [h["index"] for h in hist] == list(range(6))
    assert [h["rolling_mean"]["a"] for h in hist[:5]] == [1.0, 1.5, 2.0, 3.0, 4.0]
    assert hist[5]["rolling_mean"]["a"] == pytest.approx(np.mean([4, 5, 3 + 2 * st["std"] + 0.01]))
    assert [h["index"] for h in mon.history(last=2)] == [4, 5] and mon.history(last=0) == []
    assert hist[0]["timestamp"] == 1.0 and hist[0]["scores"] == {"a": 1.0}


def test_state_dict_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    stream = [{"a": float(x), "b": float(y)} for x, y in rng.normal(size=(80, 2))]
    stream[70]["a"] = 9.0
    original = DriftMonitor(["a", "b"], window=5, reference_size=30, threshold=2.5)
    for i, s in enumerate(stream[:60]):
        original.update(s, timestamp=float(i))
    state = json.loads(json.dumps(original.state_dict()))  # must survive JSON
    restored = DriftMonitor(["a", "b"], alerts_path=tmp_path / "alerts.jsonl")
    restored.load_state_dict(state)
    assert restored.window == 5 and restored.threshold == 2.5 and restored.n_updates == 60
    assert restored.history() == original.history() and restored.alerts == original.alerts
    for i, s in enumerate(stream[60:], start=60):
        assert restored.update(s, timestamp=float(i)) == original.update(s, timestamp=float(i))
    assert restored.state_dict() == original.state_dict()
    assert any(a.index == 70 for a in restored.alerts)
    with pytest.raises(ValueError, match="state is for traits"):
        DriftMonitor(["c"]).load_state_dict(state)


def test_plot_writes_png(tmp_path):
    mon = DriftMonitor(["a", "b"], window=3, reference_size=5, threshold=1.0)
    for i in range(12):
        mon.update({"a": float(i % 3), "b": float(i)})
    png = mon.plot(tmp_path / "timeline.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("kwargs,message", [
    ({"method": "median"}, "unknown drift method"),
    ({"method": "percentile", "threshold": 3.0 * 50}, "percentile threshold must lie in"),
    ({"window": 0}, "window must be a positive int"),
    ({"reference_size": 1}, "reference_size must be an int >= 2"),
])
def test_bad_configuration(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DriftMonitor(["a"], **kwargs)


def test_bad_updates():
    mon = DriftMonitor(["a", "b"])
    with pytest.raises(ValueError, match=r"update 0: no score for trait\(s\) \['b'\]"):
        mon.update({"a": 1.0})
    with pytest.raises(ValueError, match="must be finite"):
        mon.update({"a": 1.0, "b": math.nan})
    with pytest.raises(ValueError, match="must be a number, got str"):
        mon.update({"a": 1.0, "b": "high"})
    with pytest.raises(ValueError, match="at least 2 reference rows"):
        mon.calibrate([{"a": 1.0, "b": 2.0}])
    assert mon.n_updates == 0  # rejected updates leave no trace


def _conv(user: str, reply: str, ts: float | None = None, **extra) -> str:
    rec = {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}], **extra}
    if ts is not None:
        rec["timestamp"] = ts
    return json.dumps(rec)


def test_read_conversations_turns_and_line_numbers(tmp_path):
    log = tmp_path / "logs.jsonl"
    multi = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                          {"role": "user", "content": "c"},
                          {"role": "assistant", "content": "d", "timestamp": "2025-01-01T00:00:10Z"}],
             "timestamp": "2025-01-01T00:00:00Z", "id": "conv-2"}
    log.write_text(_conv("hi", "hello", 5.0) + "\n" + json.dumps(multi) + "\n")
    turns, problems = read_conversations(log)
    assert problems == [] and [(t.line, t.turn, t.response) for t in turns] == [(1, 1, "hello"), (2, 1, "b"),
                                                                                 (2, 3, "d")]
    assert turns[0].timestamp == 5.0 and turns[2].timestamp - turns[1].timestamp == 10.0
    assert turns[2].meta == {"id": "conv-2"} and len(turns[2].messages) == 3

    bad = tmp_path / "bad.jsonl"
    for line, message in [
        ("{not json", "invalid JSON"),
        (json.dumps({"text": "hi"}), "no 'messages' list"),
        (json.dumps({"messages": [{"role": "user", "content": "q"}]}),
         "no assistant response after a prompt"),
        (_conv("q", "a", ts="yesterday"), "timestamp 'yesterday' is neither a number nor an ISO-8601 date"),
        (json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 3}]}),
         "message 1 content must be a string, got int"),
    ]:
        bad.write_text(_conv("q", "a") + "\n\n" + line + "\n")
        with pytest.raises(ValueError, match=r"^bad\.jsonl line 3: ") as info:
            read_conversations(bad)
        assert message in str(info.value)
    with pytest.warns(UserWarning, match="bad.jsonl line 3"):
        turns, problems = read_conversations(bad, on_error="skip")
    assert len(turns) == 1 and [p.line for p in problems] == [3]


# -- end to end on the embedded model --------------------------------------------------------------------


@pytest.fixture(scope="module")
def pessimism(embedded) -> torch.Tensor:
    model, tok = embedded
    contrast = json.loads((DATA / "contrast.json").read_text())
    prompts = [format_prompt(tok, q) for q in contrast["questions"]]
    pes = capture_activations(model, tok, prompts, contrast["pessimistic"], layers=[LAYER])
    opt = capture_activations(model, tok, prompts, contrast["optimistic"], layers=[LAYER])
    return pes.at("response_mean", LAYER).mean(0) - opt.at("response_mean", LAYER).mean(0)


@pytest.fixture(scope="module")
def drifting_log(tmp_path_factory) -> Path:
    """Eight neutral conversations, then four pessimistic ones: the assistant drifts gloomy."""
    rows = [json.loads(line) for line in (DATA / "planted.jsonl").read_text().splitlines()]
    neutral = [r for r in rows if r["label"] == 0][:8]
    gloomy = [r for r in rows if r["label"] == 1][:4]
    path = tmp_path_factory.mktemp("logs") / "conversations.jsonl"
    lines = [json.dumps({"messages": r["messages"], "timestamp": 1000.0 + 60 * i, "conv": i})
             for i, r in enumerate(neutral + gloomy)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_monitor_conversations_end_to_end_and_resume(
    tmp_path, embedded, pessimism, drifting_log, monkeypatch
):
    model, tok = embedded
    vectors = {"pessimistic": pessimism, "optimistic": -pessimism}
    kwargs = dict(window=4, threshold=3.0, reference_size=8, batch_size=4, progress=False)
    report = monitor_conversations(model, tok, vectors, LAYER, drifting_log, out_dir=tmp_path / "full",
                                   **kwargs)
    assert report.n_turns == 12 and report.computed == 12
    fired = sorted({(a.index, a.trait) for a in report.alerts})
    print("drift alerts (index, trait):", fired)
    assert {i for i, _ in fired} == {8, 9, 10, 11}  # every gloomy response, and nothing else
    assert {t for _, t in fired} == {"pessimistic"}
    assert all(a.meta["conv"] == a.index and a.timestamp == 1000.0 + 60 * a.index for a in report.alerts)
    scores = [json.loads(line) for line in report.scores_path.read_text().splitlines()]
    assert [s["index"] for s in scores] == list(range(12))
    assert scores[0]["scores"]["optimistic"] == pytest.approx(-scores[0]["scores"]["pessimistic"], abs=1e-4)
    assert [json.loads(line) for line in report.alerts_path.read_text().splitlines()] == [
        alert_record(a) for a in report.alerts]
    assert report.plot_path.read_bytes()[:4] == b"\x89PNG"
    state = json.loads(report.state_path.read_text())
    assert DriftMonitor.from_state_dict(state).alerts == report.alerts

    # kill during the third batch, then resume: same scores, same alerts, nothing recomputed twice
    calls = {"n": 0}
    real = drift_mod.pooled_activations

    def dying(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(drift_mod, "pooled_activations", dying)
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        monitor_conversations(model, tok, vectors, LAYER, drifting_log, out_dir=out, **kwargs)
    assert len((out / "scores.jsonl").read_text().splitlines()) == 8
    monkeypatch.setattr(drift_mod, "pooled_activations", real)
    resumed = monitor_conversations(model, tok, vectors, LAYER, drifting_log, out_dir=out, **kwargs)
    assert resumed.computed == 4
    assert (out / "scores.jsonl").read_text() == report.scores_path.read_text()
    assert (out / "alerts.jsonl").read_text() == report.alerts_path.read_text()
    assert resumed.monitor.history() == report.monitor.history()

    with pytest.raises(ValueError, match="other settings"):
        monitor_conversations(model, tok, vectors, LAYER, drifting_log, out_dir=out,
                              **{**kwargs, "threshold": 2.0})


def test_monitor_file_cli_entry(tmp_path, pessimism, drifting_log):
    vec_path = tmp_path / "gloom.pt"
    torch.save(pessimism, vec_path)
    report = monitor_file(drifting_log, [f"pessimistic={vec_path}"], out_dir=tmp_path / "out",
                                    layer=LAYER, window=4, reference_size=8, progress=False, device="cpu")
    assert report.monitor.traits == ("pessimistic",) and report.n_turns == 12
    assert {a.index for a in report.alerts} == {8, 9, 10, 11}
    with pytest.raises(ValueError, match="pass layer"):
        monitor_file(drifting_log, [vec_path], out_dir=tmp_path / "out2", device="cpu")


def test_robust_calibration_ignores_an_extreme_reference_value():
    """One absurd value in the reference (a client's 1e30 request) must not switch alerts off."""
    reference = [{"t": v} for v in (1.0, 1.2, 0.9, 1.1, 1.0, 0.95, 1.05, 1e30)]
    plain = DriftMonitor(["t"], method="zscore", threshold=3.0)
    robust = DriftMonitor(["t"], method="zscore", threshold=3.0, robust=True)
    plain.calibrate(reference)
    robust.calibrate(reference)
    assert plain.limits("t")[1] > 1e29  # the mean/std reference is wrecked: nothing below 1e29 alerts
    upper = robust.limits("t")[1]
    assert 1.1 < upper < 1.5  # median 1.0, MAD-based scale 0.074 -> about 1.22
    assert robust.update({"t": 5.0}) and not plain.update({"t": 5.0})
    assert DriftMonitor.from_state_dict(robust.state_dict()).robust
