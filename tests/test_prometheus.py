"""The monitoring stack for real: promtool runs the alert rules' unit tests, a Prometheus server scrapes a live
``steerlib`` server, and the Grafana dashboard asks only for series the server exports or the rules record.

Prometheus and promtool come from Debian's ``prometheus`` package (``make setup`` installs it where apt is
available); without them these tests skip and say so.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

pytest.importorskip("prometheus_client")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from steerlib.monitoring.drift import DriftMonitor  # noqa: E402
from steerlib.serve import AppOptions, BackgroundServer, create_app  # noqa: E402
from steerlib.serve.metrics import SERIES  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "steerlib-rules.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "steerlib-rules.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "steerlib-dashboard.json"
NOT_INSTALLED = "Debian's prometheus package is not installed (make setup installs it with apt-get where it can)"
LAYER = 10
SCRAPE_KEY = "sk-scrape"
STEER = [{"vector": "optimistic", "layer": LAYER, "coef": 8.0}]
# Names inside PromQL that are not metric names.
PROMQL_WORDS = {"sum", "by", "rate", "increase", "histogram_quantile", "abs", "offset", "bool", "le", "job",
                "instance", "trait", "layer", "turns", "steering", "method", "conversation", "on", "label_values"}

needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None, reason=NOT_INSTALLED)
needs_prometheus = pytest.mark.skipif(shutil.which("prometheus") is None, reason=NOT_INSTALLED)


def _promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def recorded_names() -> set[str]:
    groups = yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]
    return {rule["record"] for group in groups for rule in group["rules"] if "record" in rule}


def metric_names(expr: str) -> set[str]:
    """Metric (and recording-rule) names a PromQL expression reads: identifiers not followed by ``(``, outside
    label matchers and strings."""
    expr = re.sub(r'"[^"]*"', '""', expr)  # drop string literals (label values, legend templates)
    expr = re.sub(r"\{[^}]*\}", "", expr)  # drop label matchers
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)  # drop grouping label lists
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # drop range selectors
    names = set()
    for m in re.finditer(r"(?<![A-Za-z0-9_:.])[A-Za-z_:][A-Za-z0-9_:]*", expr):
        if not expr[m.end():].lstrip().startswith("("):  # a function call, not a series
            names.add(m.group())
    return names - PROMQL_WORDS


def exported_sample_names() -> set[str]:
    """Every sample name Prometheus can see from the server: families plus histogram and counter suffixes."""
    out = set()
    for name, kind in SERIES.items():
        out |= {f"{name}_bucket", f"{name}_count"} if kind == "histogram" else {name}
    return out


# ----------------------------------------------------------------------------------------------------------
# Rules
# ----------------------------------------------------------------------------------------------------------
@needs_promtool
def test_alert_rules_pass_their_promtool_unit_tests():
    check = _promtool("check", "rules", RULES.name, cwd=RULES.parent)
    assert check.returncode == 0, check.stdout + check.stderr
    run = _promtool("test", "rules", RULE_TESTS.name, cwd=RULES.parent)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SUCCESS" in run.stdout


@needs_promtool
@pytest.mark.parametrize("change", [("for: 10m", "for: 20m"), ("> 2 * (steerlib", "> 50 * (steerlib"),
                                    ("== 0\n        for: 15m", "== 0\n        for: 60m")],
                         ids=["drift-duration", "jump-size", "no-traffic-duration"])
def test_rule_tests_catch_a_changed_rule(tmp_path, change):
    """The unit tests pin each alert: loosening one makes them fail."""
    old, new = change
    text = RULES.read_text(encoding="utf-8")
    assert text.count(old) == 1, old
    (tmp_path / RULES.name).write_text(text.replace(old, new), encoding="utf-8")
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    run = _promtool("test", "rules", RULE_TESTS.name, cwd=tmp_path)
    assert run.returncode != 0 and "FAILED" in run.stdout + run.stderr


def test_rules_and_dashboard_read_only_exported_series():
    exported = exported_sample_names() | recorded_names() | {"up"}
    rules = yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]
    rule_names = set().union(*(metric_names(r["expr"]) for g in rules for r in g["rules"]))
    assert rule_names - exported == set()
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["uid"] and dashboard["panels"]
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"] if isinstance(v.get("query"), dict)]
    assert len(exprs) >= 15
    used = set().union(*(metric_names(e) for e in exprs))
    assert used - exported == set(), "the dashboard asks for series the server does not export"
    # The dashboard covers what an operator looks at: projections, alerts, steering mix, engine load, turns.
    for name in ("steerlib_response_projection_bucket", "steerlib_drift_upper_limit", "steerlib_responses_total",
                 "steerlib_engine_queue_depth", "steerlib_turn_projection_bucket"):
        assert name in used
    assert metric_names('sum by (trait) (rate(x_total{a="b"}[5m])) / y offset 5m') == {"x_total", "y"}


# ----------------------------------------------------------------------------------------------------------
# A real Prometheus scraping a live server
# ----------------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def prometheus(tmp_path) -> Iterator[tuple[str, Path]]:
    """A Prometheus on 127.0.0.1 (yields its URL and config path; the test writes the config first)."""
    port = _free_port()
    config = tmp_path / "prometheus.yml"
    procs: list[subprocess.Popen] = []

    def start() -> str:
        log = (tmp_path / "prometheus.log").open("w")
        procs.append(subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"], stdout=log, stderr=log))
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert procs[0].poll() is None, (tmp_path / "prometheus.log").read_text()
            try:
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError("Prometheus did not become ready in 60 s")

    yield start, config
    for p in procs:
        p.terminate()
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()


def _query(url: str, promql: str) -> dict[frozenset, float]:
    r = httpx.get(f"{url}/api/v1/query", params={"query": promql}, timeout=10).json()
    assert r["status"] == "success", r
    return {frozenset(x["metric"].items()): float(x["value"][1]) for x in r["data"]["result"]}


def _wait_for(url: str, promql: str, want: float, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = _query(url, promql)
        if got and list(got.values())[0] == want:
            return
        time.sleep(0.5)
    raise AssertionError(f"{promql} never reached {want} (last: {got})")


@needs_prometheus
@pytest.mark.slow
def test_prometheus_scrapes_a_live_server(embedded, optimism_vectors, prometheus):
    start, config = prometheus
    model, tok = embedded
    options = AppOptions(model_name="m", monitor_layer=LAYER, max_batch=4, default_max_tokens=5, max_tokens_limit=8,
                         api_key="sk-main", metrics_key=SCRAPE_KEY)
    drift = DriftMonitor(["optimistic"], window=2, reference_size=3, robust=True, two_sided=True)
    with BackgroundServer(create_app(model, tok, {"optimistic": optimism_vectors}, options, drift)) as srv:
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": "steerlib", "static_configs": [{"targets": [f"127.0.0.1:{srv.port}"]}],
                                "authorization": {"type": "Bearer", "credentials": SCRAPE_KEY}}],
        }), encoding="utf-8")
        url = start()
        auth = {"Authorization": "Bearer sk-main"}
        with httpx.Client(base_url=srv.url, headers=auth, timeout=120) as http:
            for i, q in enumerate(("Name a colour.", "Name a tree.", "Name a city.", "Name a fruit.", "Name a dog.")):
                body = {"messages": [{"role": "user", "content": q}], "temperature": 0, "max_tokens": 5}
                if i >= 3:
                    body["steering"] = STEER
                r = http.post("/v1/chat/completions", json=body, headers={"X-Conversation-Id": "c-1"})
                assert r.status_code == 200, r.text
            stats = http.get("/v1/stats").json()
            own = {s.name: s.value for f in text_string_to_metric_families(http.get("/metrics").text)
                   for s in f.samples if not s.labels}
        _wait_for(url, 'steerlib_requests_total{job="steerlib",steering="steered"}', 2)
        _wait_for(url, "steerlib_engine_generated_tokens_total", stats["generated_tokens"])
        up = _query(url, 'up{job="steerlib"}')
        assert list(up.values()) == [1.0] and dict(next(iter(up)))["instance"] == f"127.0.0.1:{srv.port}"
        by_steering = {dict(k)["steering"]: v for k, v in
                       _query(url, "sum by (steering) (steerlib_responses_total)").items()}
        assert by_steering == {"none": 3.0, "steered": 2.0, "gated": 0.0}
        count = _query(url, 'steerlib_response_projection_count{trait="optimistic"}')
        assert list(count.values()) == [5.0] and dict(next(iter(count)))["layer"] == str(LAYER)
        assert list(_query(url, 'steerlib_conversation_turns{conversation="c-1"}').values()) == [5.0]
        assert list(_query(url, "steerlib_drift_updates_total").values()) == [own["steerlib_drift_updates_total"]]
        assert list(_query(url, "steerlib_engine_steps_total").values()) == [stats["steps"]]
        # Every family the server documents reached Prometheus.
        names = set(httpx.get(f"{url}/api/v1/label/__name__/values", timeout=10).json()["data"])
        assert exported_sample_names() - names == set()
        # The shipped rules loaded and evaluate without error against real data.
        groups = httpx.get(f"{url}/api/v1/rules", timeout=10).json()["data"]["groups"]
        assert {g["name"] for g in groups} == {"steerlib-recording", "steerlib-alerts"}
        deadline = time.monotonic() + 30
        while any(r.get("health") != "ok" for g in groups for r in g["rules"]) and time.monotonic() < deadline:
            time.sleep(0.5)
            groups = httpx.get(f"{url}/api/v1/rules", timeout=10).json()["data"]["groups"]
        assert [r["name"] for g in groups for r in g["rules"] if r.get("health") != "ok"] == []
