"""Prometheus metrics and per-conversation series: the metrics module on its own, then a live server.

The live tests compare what ``/metrics`` reports with what the same server told its clients (each reply's
``trait_projections``, ``/v1/stats``, ``/v1/monitor``), so a series that counts or sums the wrong thing fails.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator

import httpx
import pytest

pytest.importorskip("prometheus_client")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from steerlib.monitoring.drift import DriftMonitor  # noqa: E402
from steerlib.serve import AppOptions, BackgroundServer, create_app  # noqa: E402
from steerlib.serve.conversations import ConversationLog, check_conversation_id, turn_bucket  # noqa: E402
from steerlib.serve.metrics import DEFAULT_BUCKETS, SERIES, ServerMetrics  # noqa: E402
from steerlib.serve.process import API_KEY_ENV, METRICS_KEY_ENV, resolve_api_key  # noqa: E402
from steerlib.serve.schema import ApiError  # noqa: E402

LAYER = 10
KEY = "sk-main"
SCRAPE_KEY = "sk-scrape"
STEER = [{"vector": "optimistic", "layer": LAYER, "coef": 8.0}]


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """(sample name, labels) -> value of a Prometheus text exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(parsed: dict, name: str, **labels: str) -> float:
    return parsed[(name, frozenset(labels.items()))]


# ----------------------------------------------------------------------------------------------------------
# The pieces alone
# ----------------------------------------------------------------------------------------------------------
def test_conversation_log_is_a_bounded_lru():
    log = ConversationLog(max_conversations=2, max_turns=3)
    for i in range(5):
        log.record("a", {"t": {"mean": float(i), "prompt_last": -float(i)}}, steering="none", completion_tokens=4)
    log.record("b", {"t": {"mean": 10.0, "prompt_last": 0.0}}, steering="steered", completion_tokens=2)
    a = log.get("a")
    assert a["turns"] == 5 and a["kept"] == 3
    assert [t["turn"] for t in a["series"]] == [3, 4, 5]
    assert [t["projections"]["t"]["mean"] for t in a["series"]] == [2.0, 3.0, 4.0]
    log.record("a", {"t": {"mean": 7.0}}, steering="none", completion_tokens=1)  # a becomes the most recent
    log.record("c", {"t": {"mean": 1.0}}, steering="none", completion_tokens=1)  # evicts b, the least recent
    assert log.get("b") is None and len(log) == 2 and log.dropped == 1
    assert [(cid, n) for cid, n, _, _ in log.recent(5)] == [("c", 1), ("a", 6)]
    _, _, first, last = log.recent(5)[1]
    assert (first.turn, last.turn, last.projections["t"]["mean"]) == (4, 6, 7.0)
    off = ConversationLog(max_conversations=0)
    assert off.record("x", {}, steering="none", completion_tokens=0) is None and len(off) == 0


def test_conversation_ids_and_turn_buckets():
    assert check_conversation_id(None, None) is None
    assert check_conversation_id("chat-1", None) == "chat-1" == check_conversation_id(None, "chat-1")
    assert check_conversation_id("chat-1", "chat-1") == "chat-1"
    with pytest.raises(ApiError, match="X-Conversation-Id 'a' and conversation_id 'b' differ"):
        check_conversation_id("a", "b")
    for bad in ("", "x" * 65, "a b", 'a"}', "ü"):
        with pytest.raises(ApiError, match="1-64 characters"):
            check_conversation_id(bad, None)
    assert [turn_bucket(n) for n in (1, 2, 3, 4, 7, 8, 15, 16, 500)] == \
        ["1", "2-3", "2-3", "4-7", "4-7", "8-15", "8-15", "16+", "16+"]


def _metrics(stats: dict, drift: dict | None = None, log: ConversationLog | None = None, **kw) -> ServerMetrics:
    return ServerMetrics(model_name="m", version="0", traits=["opt", "calm"], layer=7, engine_stats=lambda: stats,
                         drift_state=lambda: drift, conversations=log or ConversationLog(), **kw)


def test_histograms_count_and_sum_what_was_observed():
    m = _metrics({})
    replies = [({"opt": {"mean": 0.3, "prompt_last": -1.5, "layer": 7}, "calm": {"mean": None, "prompt_last": 2.0,
                                                                              "layer": 7}}, "none"),
               ({"opt": {"mean": 12.0, "prompt_last": 0.25, "layer": 7}, "calm": {"mean": -4.0, "prompt_last": 1.0,
                                                                               "layer": 7}}, "steered")]
    for proj, steering in replies:
        m.observe_response(proj, steering, "length")
    p = samples(m.render(None)[0].decode())
    assert value(p, "steerlib_response_projection_count", trait="opt", layer="7") == 2
    assert value(p, "steerlib_response_projection_count", trait="calm", layer="7") == 1  # None is not a value
    assert value(p, "steerlib_response_projection_bucket", trait="opt", layer="7", le="0.2") == 0
    assert value(p, "steerlib_response_projection_bucket", trait="opt", layer="7", le="0.5") == 1
    assert value(p, "steerlib_response_projection_bucket", trait="opt", layer="7", le="10.0") == 1
    assert value(p, "steerlib_response_projection_bucket", trait="opt", layer="7", le="20.0") == 2
    assert value(p, "steerlib_prompt_projection_bucket", trait="opt", layer="7", le="-1.0") == 1  # -1.5
    assert value(p, "steerlib_prompt_projection_bucket", trait="opt", layer="7", le="-2.0") == 0
    assert value(p, "steerlib_prompt_projection_bucket", trait="calm", layer="7", le="+Inf") == 2
    # Signed values: no _sum (it would not be monotonic); the centre comes from the buckets.
    assert not any(n.endswith("_projection_sum") for n, _ in p)
    assert value(p, "steerlib_responses_total", steering="steered", finish_reason="length") == 1
    assert value(p, "steerlib_responses_total", steering="gated", finish_reason="stop") == 0  # exists from start
    assert value(p, "steerlib_build_info", model="m", version="0") == 1


def test_engine_collector_reads_only_the_keys_an_engine_reports():
    full = _metrics({"steps": 5, "generated_tokens": 40, "step_seconds": 0.5, "queue_depth": 2, "active_rows": 3,
                     "worker_alive": True, "mean_step_ms": 100.0, "some_future_key": 1})
    p = samples(full.render(None)[0].decode())
    assert value(p, "steerlib_engine_steps_total") == 5 and value(p, "steerlib_engine_step_seconds_total") == 0.5
    assert value(p, "steerlib_engine_queue_depth") == 2 and value(p, "steerlib_engine_running_rows") == 3
    assert value(p, "steerlib_engine_worker_alive") == 1
    names = {name for name, _ in p}
    assert "steerlib_engine_rows_failed_total" not in names  # the engine did not report "failed"
    assert not any("future" in n or "mean_step" in n for n in names)
    other = _metrics({"steps": 1})  # a second app in the same process: its own registry, no clash
    assert value(samples(other.render(None)[0].decode()), "steerlib_engine_steps_total") == 1


def test_drift_and_conversation_series():
    log = ConversationLog(max_conversations=10)
    for cid, means in (("old", [1.0]), ("c1", [1.0, 2.0, 4.5]), ("c2", [3.0])):
        for mean in means:
            log.record(cid, {"opt": {"mean": mean, "prompt_last": 0.0}}, steering="none", completion_tokens=1)
    drift = {"method": "zscore", "calibrated": True, "n_updates": 9,
             "traits": {"opt": {"value": 2.5, "lower": None, "upper": 3.0},
                        "calm": {"value": None, "lower": None, "upper": None}}}
    m = _metrics({}, drift, log, conversation_series=2)
    m.count_alerts(["opt", "opt"])
    p = samples(m.render(None)[0].decode())
    assert value(p, "steerlib_drift_value", trait="opt", layer="7", method="zscore") == 2.5
    assert value(p, "steerlib_drift_upper_limit", trait="opt", layer="7", method="zscore") == 3.0
    assert value(p, "steerlib_drift_updates_total") == 9 and value(p, "steerlib_drift_calibrated") == 1
    assert value(p, "steerlib_drift_alerts_total", trait="opt", layer="7") == 2
    assert not any(n == "steerlib_drift_lower_limit" for n, _ in p)  # one-sided: no lower limit
    assert value(p, "steerlib_conversation_turns", conversation="c1") == 3
    assert value(p, "steerlib_conversation_projection_change", conversation="c1", trait="opt", layer="7") == 3.5
    assert value(p, "steerlib_conversations_tracked") == 3
    # Only the 2 most recent conversations carry their id: the label set stays bounded.
    assert {dict(lab)["conversation"] for n, lab in p if n == "steerlib_conversation_turns"} == {"c1", "c2"}
    assert {series_name(n) for n, _ in p} <= set(SERIES)


def series_name(sample: str) -> str:
    """The exported family a sample belongs to (``x_bucket`` -> ``x``; ``x_created`` -> ``x_total`` or ``x``)."""
    for suffix in ("_bucket", "_count", "_sum"):
        if sample.endswith(suffix) and sample.removesuffix(suffix) in SERIES:
            return sample.removesuffix(suffix)
    if sample.endswith("_created"):  # prometheus_client's creation timestamps of counters and histograms
        base = sample.removesuffix("_created")
        return base + "_total" if base + "_total" in SERIES else base
    return sample


def test_bad_metrics_options_fail_at_start():
    with pytest.raises(ValueError, match="either a metrics key or metrics without auth"):
        AppOptions(metrics_key="k", metrics_no_auth=True)
    with pytest.raises(ValueError, match="metrics_key is empty"):
        AppOptions(metrics_key=" ")
    with pytest.raises(ValueError, match="distinct finite numbers"):
        AppOptions(metrics_buckets=(1.0, 1.0))
    with pytest.raises(ValueError, match="distinct finite numbers"):
        AppOptions(metrics_buckets=(1.0, math.inf))
    with pytest.raises(ValueError, match="conversation_turns >= 1"):
        AppOptions(conversation_turns=0)
    assert resolve_api_key(None, {METRICS_KEY_ENV: "k", API_KEY_ENV: "a"}, env=METRICS_KEY_ENV) == "k"


@pytest.mark.parametrize(("args", "message"), [
    (["--metrics-key", "k", "--metrics-no-auth"], "give either a metrics key or metrics without auth, not both"),
    (["--metrics-buckets", "1,1"], "metrics buckets must be distinct finite numbers, got [1.0, 1.0]"),
    (["--metrics-buckets", "1,x"], "expected comma-separated numbers, got '1,x'"),
    (["--conversation-turns", "0"], "conversation_turns >= 1"),
])
def test_cli_refuses_bad_metrics_flags_before_loading(args, message, optimism_vectors, tmp_path, monkeypatch,
                                                       capsys):
    import steerlib.core.models as models
    from steerlib.cli import main

    def no_model(*_a, **_k):
        raise AssertionError("a model was loaded before the bad input was reported")

    monkeypatch.setattr(models, "load_model", no_model)
    path = optimism_vectors.save(tmp_path / "optimistic")
    monkeypatch.setattr(sys, "argv", ["steerlib", "serve", "--vector", f"optimistic={path.parent}", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.count("\n") == 0 and err.startswith("error: ") and message in err, err


# ----------------------------------------------------------------------------------------------------------
# A live server on the embedded model
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def live(embedded, optimism_vectors) -> Iterator[BackgroundServer]:
    model, tok = embedded
    options = AppOptions(model_name="m", monitor_layer=LAYER, max_batch=4, default_max_tokens=6, max_tokens_limit=16,
                         api_key=KEY, metrics_key=SCRAPE_KEY, metrics_conversations=5)
    drift = DriftMonitor(["optimistic"], window=2, reference_size=3, robust=True)
    with BackgroundServer(create_app(model, tok, {"optimistic": optimism_vectors}, options, drift)) as srv:
        yield srv


def _chat(http: httpx.Client, content: str, steering: list | None = None, headers: dict | None = None,
          **body) -> dict:
    request = {"messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 6, **body}
    if steering is not None:
        request["steering"] = steering
    r = http.post("/v1/chat/completions", json=request, headers=headers or {})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.slow
def test_metrics_match_what_the_server_answered(live):
    auth = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=live.url, headers=auth, timeout=120) as http:
        before = samples(http.get("/metrics").text)
        plain = [_chat(http, q) for q in ("Name a colour.", "Name a tree.", "Name a city.")]
        steered = [_chat(http, q, STEER) for q in ("Name a fruit.", "Name a dog.")]
        r = http.post("/api/generate", json={"prompt": "Name a bird.", "stream": False, "options": {"num_predict": 4}})
        assert r.status_code == 200
        replies = [c["trait_projections"]["optimistic"] for c in plain + steered] + \
            [r.json()["trait_projections"]["optimistic"]]
        after = samples(http.get("/metrics").text)
        stats = http.get("/v1/stats").json()
        monitor = http.get("/v1/monitor").json()

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    tl = {"trait": "optimistic", "layer": str(LAYER)}
    assert delta("steerlib_requests_total", steering="none") == 4  # 3 OpenAI + 1 Ollama
    assert delta("steerlib_requests_total", steering="steered") == 2
    finished = sum(delta("steerlib_responses_total", steering=s, finish_reason=f)
                   for s in ("none", "steered") for f in ("stop", "length"))
    assert finished == 6
    assert delta("steerlib_response_projection_count", **tl) == 6
    # Each reply landed in the buckets its reported projections belong to.
    for le in DEFAULT_BUCKETS:
        key = repr(float(le))
        assert delta("steerlib_response_projection_bucket", le=key, **tl) == sum(p["mean"] <= le for p in replies)
        assert delta("steerlib_prompt_projection_bucket", le=key, **tl) == \
            sum(p["prompt_last"] <= le for p in replies)
    # Engine series are the engine's own counters.
    assert value(after, "steerlib_engine_generated_tokens_total") == stats["generated_tokens"]
    assert value(after, "steerlib_engine_steps_total") == stats["steps"]
    assert value(after, "steerlib_engine_max_batch") == 4
    # The drift monitor (calibrated on the 3 plain replies) as /v1/monitor shows it.
    drift = monitor["drift"]
    assert value(after, "steerlib_drift_calibrated") == 1
    assert value(after, "steerlib_drift_updates_total") == drift["n_updates"]
    assert value(after, "steerlib_drift_upper_limit", method="zscore", **tl) == \
        pytest.approx(drift["limits"]["optimistic"][1])
    assert value(after, "steerlib_drift_value", method="zscore", **tl) == \
        pytest.approx(monitor["history"][-1]["scores"]["optimistic"])
    assert value(after, "steerlib_drift_alerts_total", **tl) == len(monitor["alerts"])


@pytest.mark.slow
def test_conversation_series_over_turns(live):
    auth = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=live.url, headers=auth, timeout=120) as http:
        turns = [_chat(http, "Hello!", headers={"X-Conversation-Id": "conv-1"}),
                 _chat(http, "How are you?", STEER, conversation_id="conv-1"),
                 _chat(http, "And tomorrow?", headers={"X-Conversation-Id": "conv-1"}, conversation_id="conv-1")]
        r = http.post("/api/chat", json={"messages": [{"role": "user", "content": "Hi"}], "stream": False,
                                         "options": {"num_predict": 3}}, headers={"X-Conversation-Id": "conv-2"})
        assert r.status_code == 200
        bad = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                      "conversation_id": "a"}, headers={"X-Conversation-Id": "b"})
        assert bad.status_code == 400 and "differ" in bad.json()["error"]["message"]
        conv = http.get("/v1/conversations/conv-1").json()
        listing = http.get("/v1/conversations").json()
        missing = http.get("/v1/conversations/nope")
        p = samples(http.get("/metrics").text)
    assert conv["turns"] == 3 and conv["layer"] == LAYER
    assert [t["steering"] for t in conv["series"]] == ["none", "steered", "none"]
    for turn, reply in zip(conv["series"], turns, strict=True):
        want = reply["trait_projections"]["optimistic"]
        assert turn["projections"]["optimistic"] == {"mean": want["mean"], "prompt_last": want["prompt_last"]}
    assert [c["id"] for c in listing["conversations"]][:2] == ["conv-2", "conv-1"]
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "conversation_not_found"
    means = [t["projections"]["optimistic"]["mean"] for t in conv["series"]]
    tl = {"trait": "optimistic", "layer": str(LAYER)}
    assert value(p, "steerlib_conversation_turns", conversation="conv-1") == 3
    assert value(p, "steerlib_conversation_projection", conversation="conv-1", **tl) == pytest.approx(means[-1])
    assert value(p, "steerlib_conversation_projection_change", conversation="conv-1", **tl) == \
        pytest.approx(means[-1] - means[0])
    assert value(p, "steerlib_turn_projection_count", turns="2-3", **tl) >= 2
    assert value(p, "steerlib_turn_projection_count", turns="16+", **tl) == 0


@pytest.mark.slow
def test_metrics_auth(live, embedded, optimism_vectors):
    with httpx.Client(base_url=live.url, timeout=60) as http:
        assert http.get("/metrics").status_code == 401
        assert http.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert http.get("/metrics", headers={"Authorization": f"Bearer {SCRAPE_KEY}"}).status_code == 200
        assert http.get("/metrics", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        # The scrape key opens /metrics and nothing else.
        assert http.get("/v1/stats", headers={"Authorization": f"Bearer {SCRAPE_KEY}"}).status_code == 401
        r = http.get("/metrics", headers={"Authorization": f"Bearer {SCRAPE_KEY}"})
        assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    model, tok = embedded
    for options, metrics_status, stats_status in (
            (AppOptions(api_key=KEY, metrics_no_auth=True), 200, 401),
            (AppOptions(metrics_key=SCRAPE_KEY), 401, 200),  # an otherwise open server still guards /metrics
            (AppOptions(metrics=False), 404, 200)):
        app = create_app(model, tok, {"optimistic": optimism_vectors}, options)
        with BackgroundServer(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
            assert http.get("/metrics").status_code == metrics_status, options
            assert http.get("/v1/stats").status_code == stats_status, options
