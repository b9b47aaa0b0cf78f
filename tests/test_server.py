"""End-to-end tests of the serving stack: a real uvicorn on 127.0.0.1, the embedded model, continuous batching
with per-row steering, and the ``openai`` and ``ollama`` client packages.

One server serves most of the module. Timing-dependent arrivals are driven by streamed tokens (a request is sent
when another has produced its n-th token), so the overlap is certain without sleeping.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip("openai")
ollama = pytest.importorskip("ollama")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from steerlib.core.capture import capture_activations  # noqa: E402
from steerlib.core.chat import format_messages, format_prompt  # noqa: E402
from steerlib.core.vectors import TraitVectors  # noqa: E402
from steerlib.monitoring.drift import DriftMonitor  # noqa: E402
from steerlib.serve import AppOptions, BackgroundServer, ServeOptions, create_app  # noqa: E402
from steerlib.serve.process import API_KEY_ENV, resolve_api_key  # noqa: E402
from steerlib.steering.generation import generate  # noqa: E402
from steerlib.steering.steer import build_ops, build_readout  # noqa: E402

pytestmark = pytest.mark.slow

LAYER = 15
MAX_TOKENS = 16
MODEL = "smollm2-test"
KEY = "sk-test-key"
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
# Four distinct steering configurations (+ unsteered); one acts on the prompt only, one on the response only,
# so a prefill row and decoding rows in one step need different positions.
CONFIGS = {
    "plain": [],
    "up": [{"vector": "optimistic", "layer": LAYER, "coef": 6.0}],
    "down-response": [{"vector": "optimistic", "layer": LAYER, "coef": -6.0, "positions": "response"}],
    "cap-prompt": [{"vector": "optimistic", "layer": 10, "mode": "cap", "cap_max": -2.0, "positions": "prompt"}],
    "two-layers": [{"vector": "optimistic", "layer": 12, "coef": 3.0},
                   {"vector": "optimistic", "layer": 18, "mode": "ablate"}],
}


@pytest.fixture(scope="module")
def vector_dir(embedded, tmp_path_factory) -> Path:
    """A quick optimism vector (mean difference of response-mean activations), saved under an allowed folder."""
    model, tok = embedded
    prompts = [format_prompt(tok, q) for q in QUESTIONS] * 2
    acts = capture_activations(model, tok, prompts, OPTIMISTIC + PESSIMISTIC)
    pooled = acts.pooled["response_mean"]
    n = len(OPTIMISTIC)
    diff = pooled[:n].mean(0) - pooled[n:].mean(0)
    tv = TraitVectors({"response_mean": diff}, model_name="SmolLM2-135M-Instruct", trait="optimistic",
                      metadata={"recommended_layer": LAYER, "residual_norms": acts.token_norms.mean(0).tolist()})
    root = tmp_path_factory.mktemp("vectors")
    tv.save(root / "optimistic")
    return root


@pytest.fixture(scope="module")
def optimism(embedded, vector_dir) -> TraitVectors:
    return TraitVectors.load(vector_dir / "optimistic", model=embedded.model)


@pytest.fixture(scope="module")
def live(embedded, optimism, vector_dir) -> Iterator[BackgroundServer]:
    model, tok = embedded
    options = AppOptions(model_name=MODEL, monitor_layer=LAYER, max_batch=8, max_tokens_limit=64,
                         default_max_tokens=MAX_TOKENS, vector_dirs=(vector_dir,), max_body_bytes=64_000)
    app = create_app(model, tok, {"optimistic": optimism}, options,
                     DriftMonitor(["optimistic"], window=3, reference_size=500, robust=True))
    with BackgroundServer(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def service(live):
    return live.app.state.service


@pytest.fixture(scope="module")
def client(live):
    # max_retries=0: the client would otherwise retry deliberate errors and hide them.
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, timeout=300)


def _ask(client, content: str = PROMPT, **kwargs):
    request = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": MAX_TOKENS,
               "temperature": 0, **kwargs}
    return client.chat.completions.create(**request)


def _extra(obj, name: str):
    return (obj.model_extra or {})[name]


def _wait_idle(service, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while service.engine.active_rows() or service.engine.queue_depth():
        assert time.monotonic() < deadline, "the engine never went idle"
        time.sleep(0.01)


class _Streamer(threading.Thread):
    """Streams one chat completion on its own thread, recording text, chunks and when each token came."""

    def __init__(self, client, steering: list, content: str = PROMPT, max_tokens: int = MAX_TOKENS):
        super().__init__(daemon=True)
        self.client, self.steering, self.content, self.max_tokens = client, steering, content, max_tokens
        self.pieces: list[str] = []
        self.token_times: list[float] = []
        self.final = None
        self.error: BaseException | None = None
        self.tokens_seen = threading.Condition()

    def run(self) -> None:
        try:
            for chunk in _ask(self.client, self.content, max_tokens=self.max_tokens, stream=True,
                              extra_body={"steering": self.steering}):
                choice = chunk.choices[0]
                if choice.delta.content:
                    with self.tokens_seen:
                        self.pieces.append(choice.delta.content)
                        self.token_times.append(time.monotonic())
                        self.tokens_seen.notify_all()
                if choice.finish_reason:
                    self.final = chunk
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            with self.tokens_seen:
                self.tokens_seen.notify_all()

    def wait_tokens(self, n: int, timeout: float = 120) -> None:
        with self.tokens_seen:
            assert self.tokens_seen.wait_for(lambda: len(self.pieces) >= n or not self.is_alive(), timeout)

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def test_models_and_vectors_listed(client, live):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    info = models.data[0].model_extra
    assert info["trait_vectors"]["optimistic"]["recommended_layer"] == LAYER
    assert info["monitored_traits"] == ["optimistic"]


def test_concurrent_distinct_steering_shares_steps_and_equals_solo(client, service):
    """4 steering configurations + unsteered, arriving at different times, share decode steps; each equals the
    greedy text of the same request served alone."""
    solo = {}
    for name, steering in CONFIGS.items():
        resp = _ask(client, extra_body={"steering": steering})
        assert _extra(resp, "batch")["max_size"] == 1, "a solo request must run alone"
        solo[name] = resp.choices[0].message.content
    assert solo["up"] != solo["plain"] and solo["down-response"] != solo["plain"]
    _wait_idle(service)
    before = service.engine.stats()

    streams = {name: _Streamer(client, steering) for name, steering in CONFIGS.items()}
    order = list(CONFIGS)
    streams[order[0]].start()
    for prev, name in zip(order, order[1:], strict=False):
        streams[prev].wait_tokens(2)  # each request arrives while the previous ones are decoding
        streams[name].start()
    for s in streams.values():
        s.join(300)
        assert s.error is None, s.error

    steps = {}
    for name, s in streams.items():
        batch = _extra(s.final, "batch")
        steps[name] = {step for step, _ in batch["steps"]}
        assert s.text == solo[name], f"{name}: batched text differs from the same request served alone"
        assert batch["max_size"] > 1, f"{name} never shared a step"
    # Every later arrival shared at least one step with the first request.
    assert all(steps[order[0]] & steps[name] for name in order[1:])
    after = service.engine.stats()
    assert after["mixed_steps"] > before["mixed_steps"], "no step mixed a prefill row with decoding rows"
    assert after["max_batch_seen"] >= 3


@pytest.mark.parametrize("name", ["down-response", "cap-prompt"])
def test_per_row_steering_equals_the_library_steer(client, embedded, optimism, name):
    """The engine's per-row steering and read-out agree with ``steerlib.generate`` under ``steer``'s hooks,
    positions included (response-only and prompt-only edits)."""
    model, tok = embedded
    ops = []
    for spec in CONFIGS[name]:
        cap = (spec.get("cap_min"), spec.get("cap_max")) if spec.get("mode") == "cap" else None
        ops += build_ops(model, optimism, spec["layer"], spec.get("coef", 1.0), mode=spec.get("mode", "add"),
                         positions=spec.get("positions", "all"), cap=cap)
    monitor = build_readout(model, {"optimistic": optimism}, LAYER)
    prompt = format_messages(tok, [{"role": "user", "content": PROMPT}])[0]
    gen = generate(model, tok, [prompt], steering=ops, readout=monitor, max_new_tokens=MAX_TOKENS, temperature=0)[0]
    served = _ask(client, extra_body={"steering": CONFIGS[name]})
    assert served.choices[0].message.content.strip() == gen.text
    proj = _extra(served, "trait_projections")["optimistic"]
    # One meaning of a response's projection: the mean over the response tokens' own positions.
    assert proj["n_tokens"] == len(gen.response_projections("optimistic"))
    assert proj["prompt_last"] == pytest.approx(gen.prompt_last_projection("optimistic"), rel=1e-4, abs=1e-3)
    assert proj["mean"] == pytest.approx(gen.mean_projection("optimistic"), rel=1e-4, abs=1e-3)


def test_streaming_chunks_carry_token_projections_and_match_non_streaming(client):
    chunks = list(_ask(client, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    plain = _ask(client)
    assert text == plain.choices[0].message.content
    values = [v for c in chunks if c.choices and c.choices[0].delta.content
              for v in _extra(c, "token_projections")["optimistic"]]
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(final) == 1
    summary = _extra(final[0], "trait_projections")["optimistic"]
    # Streamed values are paired with the token they produced (the first is the last prompt token's); the
    # summary's mean is over the response tokens' own positions, one read-out per response token.
    assert summary["n_tokens"] == len(values) and summary["prompt_last"] == pytest.approx(values[0])
    assert summary["mean"] != pytest.approx(sum(values) / len(values))
    assert summary == _extra(plain, "trait_projections")["optimistic"]
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_stream_arriving_during_long_requests_starts_before_they_finish(client, service):
    long_done: list[float] = []

    def long_request(q: str) -> None:
        _ask(client, q, max_tokens=48)
        long_done.append(time.monotonic())

    threads = [threading.Thread(target=long_request, args=(q,)) for q in ("Describe the sea.", "Describe a city.")]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while service.engine.active_rows() < 2:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    late = _Streamer(client, [], "Say hi.", max_tokens=4)
    late.start()
    late.join(120)
    for t in threads:
        t.join(120)
    assert late.error is None and late.token_times
    assert late.token_times[0] < min(long_done), "the late stream waited for the running requests to finish"
    assert _extra(late.final, "batch")["max_size"] >= 3


def test_client_disconnect_leaves_the_batch(live, client, service):
    before = service.engine.stats()["cancelled"]
    body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 64, "stream": True,
            "temperature": 0}
    with httpx.Client(base_url=live.url, timeout=60) as http, \
            http.stream("POST", "/v1/chat/completions", json=body) as resp:
        for n, _ in enumerate(resp.iter_lines()):
            if n >= 4:
                break  # the client goes away mid-stream
    deadline = time.monotonic() + 30
    while service.engine.stats()["cancelled"] == before:
        assert time.monotonic() < deadline, "the abandoned row kept generating"
        time.sleep(0.01)
    _wait_idle(service)
    assert service.engine.stats()["generated_tokens"] > 0
    assert _ask(client, "Say hello.", max_tokens=3).choices[0].message.content


def test_stop_sequences_and_n(client):
    full = _ask(client).choices[0].message.content
    words = full.split()
    assert len(words) > 4
    stop = " " + words[3]
    cut = _ask(client, stop=[stop, "@@@"])
    assert cut.choices[0].message.content == full[:full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in _ask(client, stop=stop, stream=True) if c.choices)
    assert streamed == full[:full.index(stop)]
    two = _ask(client, n=2)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.choices[0].message.content == two.choices[1].message.content == full  # greedy: same text
    assert two.usage.completion_tokens == 2 * _ask(client).usage.completion_tokens
    chunks = [c for c in _ask(client, n=2, stream=True) if c.choices]
    for i in (0, 1):
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices[0].index == i) == full
    sampled = _ask(client, n=2, temperature=1.0, seed=7)
    again = _ask(client, n=2, temperature=1.0, seed=7)
    assert [c.message.content for c in sampled.choices] == [c.message.content for c in again.choices]


def test_a_failing_step_fails_its_rows_and_the_server_goes_on(client, service, monkeypatch):
    real_step = service.engine._step
    calls = {"n": 0}

    def flaky_step() -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected failure")
        real_step()

    _wait_idle(service)
    monkeypatch.setattr(service.engine, "_step", flaky_step)
    with pytest.raises(openai.InternalServerError) as info:
        _ask(client, "Say hi.", max_tokens=3)
    assert info.value.status_code == 500 and "injected failure" in info.value.body["message"]
    assert _ask(client, "Say hello.", max_tokens=3).choices[0].message.content
    assert service.engine.alive


def test_ollama_client_chat_generate_and_models(live, client):
    oc = ollama.Client(host=live.url)
    assert [m.model for m in oc.list().models] == [MODEL]
    assert oc.show(MODEL).capabilities == ["completion"]
    greedy = {"temperature": 0, "num_predict": MAX_TOKENS}
    messages = [{"role": "user", "content": PROMPT}]
    reply = oc.chat(MODEL, messages=messages, options=greedy)
    assert reply.message.content == _ask(client).choices[0].message.content
    assert reply.done and reply.eval_count == _ask(client).usage.completion_tokens
    steer = [{"vector": "optimistic", "layer": LAYER, "coef": 6.0}]
    parts = list(oc.chat(MODEL, messages=messages, options={**greedy, "steer": steer}, stream=True))
    assert parts[-1].done and "".join(p.message.content for p in parts) == \
        _ask(client, extra_body={"steering": steer}).choices[0].message.content
    gen = oc.generate(MODEL, prompt=PROMPT, options=greedy)
    assert gen.response == reply.message.content
    with pytest.raises(ollama.ResponseError) as info:
        oc.chat(MODEL, messages=messages, options={**greedy, "steer": [{"vector": "nope"}]})
    assert info.value.status_code == 400 and "unknown steering vector 'nope'" in info.value.error


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"extra_body": {"steering": [{"vector": "grumpy", "layer": LAYER, "coef": 2.0}]}}, "steering.0.vector"),
        ({"extra_body": {"steering": [{"vector": "optimistic", "layer": 99, "coef": 2.0}]}}, "steering.0"),
        ({"extra_body": {"steering": [{"vector": "optimistic", "layer": LAYER, "coef": 1e30}]}}, "steering.0.coef"),
        ({"extra_body": {"steering": [{"vector": "optimistic", "layer": LAYER, "mode": "cap", "cap_min": 2.0,
                                       "cap_max": 1.0}]}}, "steering.0"),
        ({"messages": []}, "messages"),
        ({"max_tokens": 10_000}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ],
    ids=["bad-role", "negative-max-tokens", "unknown-vector", "layer-out-of-range", "absurd-coef",
         "cap-bounds-reversed", "no-messages", "over-limit", "n-zero", "too-many-stops"],
)
def test_invalid_requests_get_openai_errors(client, kwargs, param):
    request = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0,
               **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**request)
    body = info.value.body
    assert info.value.status_code == 400 and body["type"] == "invalid_request_error"
    assert body["param"].startswith(param) and body["message"]


def test_raw_http_hardening(live, service):
    url = "/v1/chat/completions"
    nan = ('{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, '
           '"steering": [{"vector": "optimistic", "layer": 15, "coef": NaN}]}')
    surrogate = '{"messages": [{"role": "user", "content": "x\\udc80y"}], "max_tokens": 2}'
    with httpx.Client(base_url=live.url, timeout=60) as http:
        for body in (nan, nan.replace("NaN", "Infinity"), surrogate, "{not json"):
            r = http.post(url, content=body, headers={"content-type": "application/json"})
            assert r.status_code == 400, (body, r.text)
            assert r.json()["error"]["type"] == "invalid_request_error"
        r = http.post(url, content=b"x" * 70_000, headers={"content-type": "application/json"})
        assert r.status_code == 413 and "limit of 64000 bytes" in r.json()["error"]["message"]
        r = http.post("/api/chat", content=b"x" * 70_000)
        assert r.status_code == 413 and "limit" in r.json()["error"]
        r = http.get("/v1/models", headers={"host": "evil.example:8000"})
        assert r.status_code == 400 and "evil.example" in r.json()["error"]["message"]
        assert http.get("/v1/models", headers={"host": "localhost"}).status_code == 200
        assert http.get("/v1/nothing-here").status_code == 404
        assert http.get("/health").json()["worker_alive"] is True


def test_steered_requests_cannot_poison_drift_calibration(client, service, live):
    service.drift = drift = DriftMonitor(["optimistic"], window=3, reference_size=4, robust=True)
    n0 = drift.n_updates
    strong = [{"vector": "optimistic", "layer": LAYER, "coef": 40.0}]
    _ask(client, "Name a colour.", max_tokens=4, extra_body={"steering": strong})
    assert drift.n_updates == n0, "a steered response entered the calibration reference"
    for q in ("Name a colour.", "Name a tree.", "Name a city.", "Name a dog."):
        _ask(client, q, max_tokens=4)
    assert drift.calibrated
    steered = _ask(client, "Name a fruit.", max_tokens=4, extra_body={"steering": strong})
    data = httpx.get(f"{live.url}/v1/monitor", params={"last": 500}, timeout=60).json()
    assert data["drift"]["calibrated"] and data["drift"]["robust"]
    assert data["history"][-1]["scores"]["optimistic"] == pytest.approx(
        _extra(steered, "trait_projections")["optimistic"]["mean"])
    assert data["alerts"] and data["alerts"][-1]["meta"]["steering"][0]["coef"] == 40.0


def test_vector_registry_load_use_unload(live, client, vector_dir):
    with httpx.Client(base_url=live.url, timeout=60) as http:
        r = http.post("/v1/vectors", json={"name": "opt2", "path": "optimistic"})
        assert r.status_code == 200 and r.json()["recommended_layer"] == LAYER
        for bad in ("../../etc", str(vector_dir.parent)):
            r = http.post("/v1/vectors", json={"name": "evil", "path": bad})
            assert r.status_code == 403 and "outside the folders" in r.json()["error"]["message"]
        r = http.post("/v1/vectors", json={"name": "opt2", "path": "optimistic"})
        assert r.status_code == 409
        steer2 = [{"vector": "opt2", "layer": LAYER, "coef": 6.0}]
        steer1 = [{"vector": "optimistic", "layer": LAYER, "coef": 6.0}]
        assert _ask(client, extra_body={"steering": steer2}).choices[0].message.content == \
            _ask(client, extra_body={"steering": steer1}).choices[0].message.content
        assert http.delete("/v1/vectors/optimistic").status_code == 409  # monitored
        assert http.delete("/v1/vectors/opt2").status_code == 200
        assert "opt2" not in http.get("/v1/vectors").json()["vectors"]
    with pytest.raises(openai.BadRequestError):
        _ask(client, extra_body={"steering": steer2})


def test_api_key_cors_and_options(embedded, optimism, live, service, monkeypatch):
    _wait_idle(service)  # one engine steps the shared model at a time
    model, tok = embedded
    app = create_app(model, tok, {"optimistic": optimism},
                     AppOptions(model_name=MODEL, api_key=KEY, cors_origins=("http://app.example",),
                                default_max_tokens=4, max_tokens_limit=8))
    with BackgroundServer(app) as srv:
        bad = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=KEY, max_retries=0)
        assert good.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                            temperature=0).choices[0].message.content is not None
        with pytest.raises(ollama.ResponseError) as info:
            ollama.Client(host=srv.url).list()
        assert info.value.status_code == 401
        assert ollama.Client(host=srv.url, headers={"Authorization": f"Bearer {KEY}"}).list().models
        with httpx.Client(base_url=srv.url) as http:
            assert http.get("/health").status_code == 200
            assert http.get("/").status_code == 200  # the static page; its data needs the key
            assert http.get("/v1/stats").status_code == 401
            pre = http.options("/v1/chat/completions", headers={"origin": "http://app.example",
                                                               "access-control-request-method": "POST"})
            assert pre.headers["access-control-allow-origin"] == "http://app.example"
    assert resolve_api_key(None, {API_KEY_ENV: KEY}) == KEY and resolve_api_key("x", {API_KEY_ENV: KEY}) == "x"
    assert resolve_api_key(None, {}) is None and resolve_api_key(None, {API_KEY_ENV: " "}) is None
    with pytest.raises(ValueError, match="--port must be within 0..65535, got 99999"):
        ServeOptions(port=99999).check()
    with pytest.raises(ValueError, match="--steer coefficient at layer 22 must be a finite number, got nan"):
        ServeOptions(steer=((22, math.nan),)).check()


def test_index_page_is_self_contained(live):
    page = httpx.get(f"{live.url}/", timeout=30).text
    assert "/v1/monitor" in page
    assert "http://" not in page and "https://" not in page, "the page must not load anything from the network"


def test_stats_report_batches(live):
    stats = json.loads(httpx.get(f"{live.url}/v1/stats", timeout=30).text)
    assert stats["steps"] > 0 and stats["max_batch_seen"] > 1 and stats["mean_batch_size"] > 1


def test_a_responses_projection_means_the_same_on_the_server_and_in_steerlib_monitor(client, embedded, optimism,
                                                                                        tmp_path):
    """The drift feed and ``steerlib monitor`` measure one quantity: the mean over the response tokens."""
    from steerlib.monitoring.conversations import monitor_conversations

    model, tok = embedded
    served = _ask(client)
    text = served.choices[0].message.content
    summary = _extra(served, "trait_projections")["optimistic"]
    log = tmp_path / "log.jsonl"
    line = json.dumps({"messages": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": text}]})
    log.write_text(line + "\n" + line + "\n")
    monitor_conversations(model, tok, {"optimistic": optimism}, LAYER, log, out_dir=tmp_path / "monitor",
                          reference_size=2, progress=False)
    scored = json.loads((tmp_path / "monitor" / "scores.jsonl").read_text().splitlines()[-1])
    assert summary["mean"] == pytest.approx(scored["scores"]["optimistic"], rel=1e-4, abs=1e-3)
