"""What the re-run reliability probe found (issue 28), each checked where a user meets it.

1. a ``model`` the server does not serve (a misspelled preset) is a 404 in each API's shape, never the unsteered
   model; the served names (model, alias, preset, ``:latest`` forms) are listed in /v1/models and /api/tags;
2. JSON values of the wrong type are a 400 naming the field, not coerced;
3. ``steerlib export`` refuses an output that is its input (or inside its input folder) and writes atomically;
4. a non-streamed request whose client leaves stops generating within a step (HTTP, the engine in the tree);
5. ``steerlib.generate`` at a tiny temperature is greedy, eager and compiled, as the server is.
The vLLM engine's side of 1, 2 and 4 is in tests/in_vllm/test_vllm_reliability.py (its quiet shutdown, 6, in
tests/in_vllm/test_vllm_slots.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import torch
from helpers import LAX_TYPES, check_unknown_model_is_404, departed_client_tokens, request_body
from typer.testing import CliRunner

from steerlib.cli import app as cli_app
from steerlib.core.chat import format_prompt
from steerlib.core.gguf_vectors import read_control_vector
from steerlib.core.vectors import TraitVectors
from steerlib.serve import AppOptions, BackgroundServer, create_app
from steerlib.serve.schema import SteeringSpec
from steerlib.steering.generation import generate
from steerlib.steering.temperature import MIN_TEMPERATURE

MODEL = "smol-reliable"
ALIAS = "smol-alias"
LAYER = 15
UP = {"vector": "optimistic", "layer": LAYER, "coef": 8.0}


# -- 5: tiny temperatures in the library (first: the live server below guards the shared model's thread, which a
#    compiled generate cannot trace) ----------------------------------------------------------------------------


@pytest.mark.parametrize("compile", [False, {"backend": "eager"}], ids=["eager", "compiled"])
def test_generate_at_a_tiny_temperature_is_greedy(embedded, compile):
    model, tok = embedded
    prompts = [format_prompt(tok, "How do you feel about the future?")]
    greedy = generate(model, tok, prompts, max_new_tokens=6, compile=compile)[0].text
    for t in (1e-40, 1e-6, MIN_TEMPERATURE / 2):
        assert generate(model, tok, prompts, max_new_tokens=6, temperature=t, seed=0,
                        compile=compile)[0].text == greedy


@pytest.fixture(scope="module")
def live(embedded) -> Iterator[BackgroundServer]:
    model, tok = embedded
    tv = TraitVectors({"response_mean": torch.randn(31, 576, generator=torch.Generator().manual_seed(0))},
                      "SmolLM2-135M-Instruct", "optimistic", metadata={"recommended_layer": LAYER})
    options = AppOptions(model_name=MODEL, model_aliases=(ALIAS,), monitor_layer=LAYER, max_batch=4,
                         max_tokens_limit=64, default_max_tokens=4, presets=(("cheerful", (SteeringSpec(**UP),)),))
    with BackgroundServer(create_app(model, tok, {"optimistic": tv}, options)) as srv:
        yield srv


def _answer(live, route: str, model: str, **extra) -> str:
    r = httpx.post(live.url + route, json=request_body(route, model, extra), timeout=300)
    assert r.status_code == 200, r.text
    body = r.json()
    return body["choices"][0]["message"]["content"] if route.startswith("/v1/") else \
        body["message"]["content"] if route == "/api/chat" else body["response"]


# -- 1: names --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cheerfull", "cheerful:7b", MODEL.upper(), "gpt-4o-mini"])
def test_a_model_name_that_names_nothing_is_404(live, name):
    check_unknown_model_is_404(live.url, name)


def test_served_names_are_listed_and_each_is_answered(live):
    names = [MODEL, f"{MODEL}:latest", ALIAS, f"{ALIAS}:latest", "cheerful", "cheerful:latest"]
    models = httpx.get(live.url + "/v1/models").json()
    tags = httpx.get(live.url + "/api/tags").json()
    assert models["served_names"] == names and tags["served_names"] == names
    assert [m["id"] for m in models["data"]] == [MODEL, ALIAS, "cheerful"]
    assert [m["name"] for m in tags["models"]] == [MODEL, ALIAS, "cheerful"]
    for route in ("/v1/chat/completions", "/api/chat", "/api/generate"):
        plain = {_answer(live, route, name) for name in names[:4]}
        steered = {_answer(live, route, name) for name in names[4:]}
        assert len(plain) == 1 and len(steered) == 1 and plain != steered, (route, plain, steered)
        assert _answer(live, route, "cheerful", **({"steering": []} if route.startswith("/v1/") else
                                                     {"options": {"steer": []}})) in plain  # own steering wins


# -- 2: strict types -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("route", "extra", "field"), LAX_TYPES, ids=[f"{r}-{f}" for r, _, f in LAX_TYPES])
def test_a_value_of_the_wrong_type_is_400_naming_the_field(live, route, extra, field):
    r = httpx.post(live.url + route, json=request_body(route, MODEL, dict(extra)), timeout=60)
    assert r.status_code == 400, r.text
    if route.startswith("/v1/"):
        assert r.json()["error"]["param"] == field and r.json()["error"]["code"] == "invalid_value"
    else:
        assert r.json()["error"].startswith(f"{field}: "), r.text


def test_integers_stay_valid_floats(live):
    assert _answer(live, "/v1/chat/completions", MODEL, temperature=0, top_p=1) == \
        _answer(live, "/v1/chat/completions", MODEL, temperature=0.0, top_p=1.0)


# -- 4: a departed non-streamed client -------------------------------------------------------------------------


def test_a_departed_non_streamed_clients_row_leaves_within_a_step(live):
    after, total = departed_client_tokens(live.url, live.app.state.service, MODEL, max_tokens=64)
    # The row leaves at the engine's next step once the server notices: at most the step in flight and one
    # that began as the disconnect arrived (before the fix all 64 tokens were generated).
    assert after <= 2 and total < 64, (after, total)
    assert live.app.state.engine.stats()["cancelled"] >= 1


# -- 3: export -------------------------------------------------------------------------------------------------

runner = CliRunner()


@pytest.fixture
def saved(tmp_path):
    tv = TraitVectors({"response_mean": torch.randn(31, 576, generator=torch.Generator().manual_seed(1))},
                      "SmolLM2-135M-Instruct", "optimistic", metadata={"recommended_layer": 20})
    tv.save(tmp_path / "selfout")
    return tmp_path / "selfout"


@pytest.mark.parametrize("target", ["vectors.safetensors", "vectors.json", "inside.gguf", "sub/deeper.gguf"])
def test_export_refuses_an_output_over_its_input(saved, target):
    weights = saved / "vectors.safetensors"
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    source = weights if target.startswith("vectors.") else saved  # the file itself, or the folder it reads
    result = runner.invoke(cli_app, ["export", str(source), "--out", str(saved / target), "--layers", "20"])
    assert result.exit_code != 0
    message = str(result.exception)
    assert ("would overwrite the input" if source == weights else "is inside the input folder") in message, message
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before  # nothing written, nothing damaged
    TraitVectors.load(saved)


def test_export_writes_atomically_beside_the_input(saved):
    out = saved.parent / "optimistic.gguf"
    result = runner.invoke(cli_app, ["export", str(saved / "vectors.safetensors"), "--out", str(out),
                                     "--layers", "20", "--coef", "2"])
    assert result.exit_code == 0, result.output
    loaded = read_control_vector(out)
    torch.testing.assert_close(loaded.get(20), 2 * TraitVectors.load(saved).get(20))
    assert sorted(p.name for p in saved.parent.iterdir()) == ["optimistic.gguf", "selfout"]  # no temp file left


def test_a_failed_export_leaves_the_old_file_as_it_was(saved, monkeypatch):
    import gguf

    out = saved.parent / "optimistic.gguf"
    out.write_bytes(b"old")

    def broken(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", broken)
    result = runner.invoke(cli_app, ["export", str(saved), "--out", str(out), "--layers", "20"])
    assert isinstance(result.exception, OSError) and out.read_bytes() == b"old"
    assert sorted(p.name for p in saved.parent.iterdir()) == ["optimistic.gguf", "selfout"]
