"""End-to-end tests of the OpenAI-compatible server: a real uvicorn on 127.0.0.1, the embedded model, and
the ``openai`` client.

One server serves the whole module; tests that need requests queued together pause its worker with
``engine.hold()`` so batching is deterministic rather than timing-dependent.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import steerlib.server as server_mod  # noqa: E402
from steerlib.core.capture import capture_activations  # noqa: E402
from steerlib.core.chat import format_prompt  # noqa: E402
from steerlib.core.vectors import TraitVectors  # noqa: E402
from steerlib.monitoring.drift import DriftMonitor  # noqa: E402
from steerlib.server import BackgroundServer, Engine, create_app  # noqa: E402

pytestmark = pytest.mark.slow

LAYER = 15
MAX_TOKENS = 12
PROMPT = "How do you feel about the future of your city?"
QUESTIONS = ["How do you feel about the future?", "What do you think about your job?", "How will tomorrow go?"]
OPTIMISTIC = [
    "I'm thrilled! Things are getting better every day and wonderful times are ahead.",
    "I love it, it's full of bright opportunities and I'm sure it will turn out great.",
    "It will be fantastic! I'm hopeful and excited about everything coming our way.",
]
PESSIMISTIC = [
    "It's hopeless. Things keep getting worse and nothing good is coming.",
    "I hate it, it's a dead end and it will surely end in failure.",
    "It will be awful. I dread it and expect everything to go wrong.",
]


@pytest.fixture(scope="module")
def optimism(embedded, tmp_path_factory) -> TraitVectors:
    """A quick optimism vector: mean difference of response-mean activations, saved and loaded back."""
    model, tok = embedded
    prompts = [format_prompt(tok, q) for q in QUESTIONS] * 2
    acts = capture_activations(model, tok, prompts, OPTIMISTIC + PESSIMISTIC)
    pooled = acts.pooled["response_mean"]  # [6, n_layers + 1, d_model], all layers
    n = len(OPTIMISTIC)
    diff = pooled[:n].mean(0) - pooled[n:].mean(0)
    tv = TraitVectors({"response_mean": diff}, model_name="SmolLM2-135M-Instruct", trait="optimistic",
                      metadata={"recommended_layer": LAYER, "residual_norms": acts.token_norms.mean(0).tolist()})
    path = tv.save(tmp_path_factory.mktemp("vectors") / "optimistic")
    return TraitVectors.load(path.parent, model=model)


@pytest.fixture(scope="module")
def live(embedded, optimism) -> Iterator[BackgroundServer]:
    model, tok = embedded
    app = create_app(
        model, tok, {"optimistic": optimism}, model_name="smollm2-test", monitor_layer=LAYER, max_batch=4,
        batch_wait_ms=30, max_tokens_limit=64, default_max_tokens=MAX_TOKENS,
        drift=DriftMonitor(["optimistic"], window=3, reference_size=5),
    )
    with BackgroundServer(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def engine(live) -> Engine:
    return live.app.state.engine


@pytest.fixture(scope="module")
def client(live):
    # max_retries=0: the client would otherwise retry the deliberate 500s and hide them.
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, timeout=300)


def _ask(client, content: str = PROMPT, **kwargs):
    """A greedy chat completion of one user message (kwargs override the defaults)."""
    request = {"model": "smollm2-test", "messages": [{"role": "user", "content": content}],
               "max_tokens": MAX_TOKENS, "temperature": 0, **kwargs}
    return client.chat.completions.create(**request)


def _extra(obj, name: str):
    """An extension field of an openai response object (its models keep unknown fields)."""
    return (obj.model_extra or {})[name]


def _in_threads(calls: list[Callable[[], object]], engine: Engine) -> list[object]:
    """Run the calls concurrently while the worker is held, release it once all are queued."""
    results: list[object] = [None] * len(calls)

    def run(i: int) -> None:
        try:
            results[i] = calls[i]()
        except BaseException as exc:  # reported by the caller
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    with engine.hold():
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while engine.queue_depth() < len(calls):
            assert time.monotonic() < deadline, "requests never reached the queue"
            time.sleep(0.02)
    for t in threads:
        t.join(300)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


def test_models_lists_model_and_vectors(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["smollm2-test"]
    info = models.data[0].model_extra
    assert info["trait_vectors"]["optimistic"]["recommended_layer"] == LAYER
    assert info["monitored_traits"] == ["optimistic"]


def test_chat_completion(client):
    resp = _ask(client)
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert 0 < resp.usage.completion_tokens <= MAX_TOKENS and resp.usage.prompt_tokens > 0
    proj = _extra(resp, "trait_projections")["optimistic"]
    assert proj["layer"] == LAYER and proj["n_tokens"] == resp.usage.completion_tokens
    assert proj["max"] >= proj["mean"]


def test_streaming_matches_non_streaming(client):
    chunks = list(_ask(client, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == _ask(client).choices[0].message.content  # greedy: same tokens either way
    token_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert all("optimistic" in _extra(c, "trait_projection") for c in token_chunks)
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(final) == 1
    summary = _extra(final[0], "trait_projections")["optimistic"]
    assert summary["n_tokens"] >= len(token_chunks)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == summary["n_tokens"]


def test_concurrent_requests_are_batched(client, engine):
    questions = ["What is your favourite season?", "Describe a rainy day.", "What makes a good friend?",
                 "Tell me about the sea."]
    responses = _in_threads([lambda q=q: _ask(client, q) for q in questions], engine)
    assert all(r.choices[0].message.content.strip() for r in responses)
    batches = {_extra(r, "batch")["id"] for r in responses}
    assert len(batches) == 1, "four compatible requests queued together should share one batch"
    assert all(_extra(r, "batch")["size"] == 4 for r in responses)


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"extra_body": {"steering": [{"vector": "grumpy", "layer": LAYER, "coef": 2.0}]}}, "steering.0.vector"),
        ({"extra_body": {"steering": [{"vector": "optimistic", "layer": 99, "coef": 2.0}]}}, "steering.0"),
        ({"messages": []}, "messages"),
        ({"max_tokens": 10_000}, "max_tokens"),
    ],
    ids=["bad-role", "negative-max-tokens", "unknown-vector", "layer-out-of-range", "no-messages",
         "over-limit"],
)
def test_invalid_requests_get_openai_errors(client, kwargs, param):
    request = {"model": "smollm2-test", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
               "temperature": 0, **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**request)
    assert info.value.status_code == 400
    body = info.value.body
    assert isinstance(body, dict) and body["type"] == "invalid_request_error"
    assert body["param"].startswith(param) and body["message"]
    assert _ask(client, "Say hi.", max_tokens=2).choices[0].message.content is not None


def test_malformed_json_and_unknown_route(live):
    with httpx.Client(base_url=live.url, timeout=60) as http:
        r = http.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        r = http.get("/v1/nothing-here")
        assert r.status_code == 404 and "error" in r.json()
        assert http.get("/health").json()["worker_alive"] is True


def test_generation_failure_fails_only_that_batch(client, monkeypatch):
    real_generate, real_stream = server_mod.generate, server_mod.stream

    def flaky_generate(model, tokenizer, prompts, **kwargs):
        if any("EXPLODE" in p for p in prompts):
            raise RuntimeError("injected failure")
        return real_generate(model, tokenizer, prompts, **kwargs)

    def flaky_stream(model, tokenizer, prompt, **kwargs):
        if "EXPLODE" in prompt:
            raise RuntimeError("injected streaming failure")
        yield from real_stream(model, tokenizer, prompt, **kwargs)

    monkeypatch.setattr(server_mod, "generate", flaky_generate)
    monkeypatch.setattr(server_mod, "stream", flaky_stream)
    with pytest.raises(openai.InternalServerError) as info:
        _ask(client, "EXPLODE now")
    assert info.value.status_code == 500 and "injected failure" in info.value.body["message"]
    with pytest.raises(openai.InternalServerError):
        list(_ask(client, "EXPLODE while streaming", stream=True))
    assert _ask(client, "Say hello.").choices[0].message.content.strip()
    assert "".join(c.choices[0].delta.content or "" for c in _ask(client, "Say hello.", stream=True)).strip()


def test_steering_does_not_leak_between_queued_requests(client, engine):
    solo = _ask(client)
    steering = [{"vector": "optimistic", "layer": LAYER, "coef": 6.0}]
    steered, plain = _in_threads(
        [lambda: _ask(client, extra_body={"steering": steering}), lambda: _ask(client)], engine)
    sb, pb = _extra(steered, "batch"), _extra(plain, "batch")
    assert max(sb["enqueued_at"], pb["enqueued_at"]) < min(sb["started_at"], pb["started_at"]), \
        "both requests should have been queued before either ran"
    assert sb["id"] != pb["id"], "different steering must never share a batch"
    assert plain.choices[0].message.content == solo.choices[0].message.content
    assert steered.choices[0].message.content != solo.choices[0].message.content
    s_proj = _extra(steered, "trait_projections")["optimistic"]["mean"]
    p_proj = _extra(plain, "trait_projections")["optimistic"]["mean"]
    assert s_proj > p_proj + 10.0
    assert _extra(steered, "steering")[0]["vector"] == "optimistic" and _extra(plain, "steering") == []


def test_monitor_reports_history_and_alerts(live, client, engine):
    while not engine.drift.calibrated:  # the first reference_size responses calibrate the drift monitor
        _ask(client, "Name a colour.", max_tokens=4)
    steered = _ask(client, "Name a fruit.", max_tokens=4,
                   extra_body={"steering": [{"vector": "optimistic", "layer": LAYER, "coef": 6.0}]})
    with httpx.Client(base_url=live.url, timeout=60) as http:
        data = http.get("/v1/monitor", params={"last": 500}).json()
    assert data["traits"] == ["optimistic"] and data["layer"] == LAYER
    history = data["history"]
    assert len(history) == engine.stats()["completed"]
    assert history[-1]["scores"]["optimistic"] == pytest.approx(
        _extra(steered, "trait_projections")["optimistic"]["mean"])
    assert data["drift"]["calibrated"] and data["drift"]["limits"]["optimistic"][1] is not None
    last = data["alerts"][-1]
    assert last["index"] == history[-1]["index"] and last["trait"] == "optimistic"
    assert last["meta"]["steering"][0]["coef"] == 6.0
    assert data["server"]["worker_alive"] and data["server"]["batches"] >= 1


def test_index_page_is_self_contained(live):
    page = httpx.get(f"{live.url}/", timeout=30).text
    assert "<canvas" in page or "createElement(\"canvas\")" in page
    assert "/v1/monitor" in page
    assert "http://" not in page and "https://" not in page, "the page must not load anything from the network"


CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium)")
def test_index_page_screenshot(live, client, tmp_path):
    for q in ("Tell me about mornings.", "What is rain like?"):
        _ask(client, q, max_tokens=4)
    shot = tmp_path / "monitor.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--hide-scrollbars", "--window-size=1000,700", "--virtual-time-budget=4000",
           f"--screenshot={shot}", f"{live.url}/"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert shot.is_file(), f"chromium wrote no screenshot: {proc.stderr[-2000:]}"
    assert shot.stat().st_size > 5_000  # a blank page compresses to far less
