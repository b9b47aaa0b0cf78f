"""Issue 28 on the vLLM engine: unknown model names (1), strict types (2) and a departed non-streamed client (4)
over HTTP on the session's engine. A deliberate shutdown that logs nothing at ERROR (6) is the last test of
``test_vllm_slots.py``, on that module's engine (one engine start fewer)."""

from __future__ import annotations

import pytest
from helpers import LAX_TYPES, check_unknown_model_is_404, departed_client_tokens, request_body
from vllm_helpers import READOUT_LAYER, LentEngine

MODEL = "smol"


@pytest.fixture(scope="module")
def live(vllm_engine, embedded, optimism_vectors):
    from steerlib.serve import AppOptions, BackgroundServer, create_app
    from steerlib.serve.schema import SteeringSpec

    model, tok = embedded
    preset = SteeringSpec(vector="optimistic", layer=10, coef=6.0)
    options = AppOptions(model_name=MODEL, monitor_layer=READOUT_LAYER, max_tokens_limit=64, default_max_tokens=8,
                         presets=(("cheerful", (preset,)),))
    app = create_app(model, tok, {"optimistic": optimism_vectors}, options,
                     engine_factory=lambda **kw: LentEngine(vllm_engine))
    with BackgroundServer(app) as server:
        yield server


def test_unknown_model_names_are_404_on_vllm(live):
    import httpx

    check_unknown_model_is_404(live.url, "cheerfull")
    names = httpx.get(live.url + "/v1/models").json()["served_names"]
    assert names == [MODEL, f"{MODEL}:latest", "cheerful", "cheerful:latest"]


@pytest.mark.parametrize(("route", "extra", "field"), LAX_TYPES, ids=[f"{r}-{f}" for r, _, f in LAX_TYPES])
def test_wrong_types_are_400_on_vllm(live, route, extra, field):
    import httpx

    r = httpx.post(live.url + route, json=request_body(route, MODEL, dict(extra)), timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["param"] == field) if route.startswith("/v1/") else error.startswith(f"{field}: "), r.text


def test_a_departed_non_streamed_clients_row_leaves_within_a_step_on_vllm(live, vllm_engine):
    cancelled = vllm_engine.stats()["cancelled"]
    after, total = departed_client_tokens(live.url, live.app.state.service, MODEL, max_tokens=64)
    assert after <= 2 and total < 64, (after, total)
    assert vllm_engine.stats()["cancelled"] == cancelled + 1
