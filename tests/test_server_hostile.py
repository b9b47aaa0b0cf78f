"""The server under hostile input and real clients (issue 21, classes 1-3, 5, 8 and 11).

One live server (uvicorn on 127.0.0.1, the embedded model) with a steering preset and a ``--vector-dir``:

- registry: files that resolve outside the allowed folder (symlinks) are 403; damaged files and a NUL in the
  path are 400, never 500;
- ``/api/show`` with bodies that are not a JSON object is 400; ``response_format`` other than text is a 400
  naming the field; a chunked body over the limit is 413;
- a tiny temperature (1e-40) is greedy and leaves the rows beside it untouched; a queued request whose client
  leaves ends, and the server then stops within a bounded time (these two run against whatever engine is in
  the tree: they speak HTTP only);
- real client packages: LiteLLM's ``ollama/``, ``ollama_chat/`` and OpenAI providers and LangChain's
  ``ChatOpenAI`` (steering through ``extra_body``), each answer equal to the same request's greedy text;
- steering presets are listed in ``/v1/models`` and ``/api/tags`` and selected by ``model``.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("fastapi")

from steerlib.core.vectors import TraitVectors  # noqa: E402
from steerlib.serve import AppOptions, BackgroundServer, ServeOptions, create_app  # noqa: E402
from steerlib.serve.schema import SteeringSpec, parse_preset, parse_presets  # noqa: E402

MODEL = "smol-hostile"
LAYER = 15
MAX_TOKENS = 8
PROMPT = "How do you feel about the future?"
UP = [{"vector": "optimistic", "layer": LAYER, "coef": 8.0}]


@pytest.fixture(scope="module")
def vector_dir(embedded, tmp_path_factory) -> Path:
    """An allowed folder with one good vector, plus a good vector outside it that symlinks point at."""
    root = tmp_path_factory.mktemp("hostile_vectors")
    allowed, outside = root / "allowed", root / "outside"
    gen = torch.Generator().manual_seed(0)
    tv = TraitVectors({"response_mean": torch.randn(31, 576, generator=gen)}, "SmolLM2-135M-Instruct",
                      "optimistic", metadata={"recommended_layer": LAYER})
    tv.save(allowed / "optimistic")
    tv.save(outside / "secret")
    return allowed


@pytest.fixture(scope="module")
def live(embedded, vector_dir) -> Iterator[BackgroundServer]:
    model, tok = embedded
    tv = TraitVectors.load(vector_dir / "optimistic", model=model)
    options = AppOptions(model_name=MODEL, monitor_layer=LAYER, max_batch=8, max_tokens_limit=64,
                         default_max_tokens=MAX_TOKENS, vector_dirs=(vector_dir,), max_body_bytes=64_000,
                         presets=(("cheerful", (SteeringSpec(**UP[0]),)),))
    with BackgroundServer(create_app(model, tok, {"optimistic": tv}, options)) as srv:
        yield srv


def _chat(live, content: str = PROMPT, **body) -> httpx.Response:
    payload = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": MAX_TOKENS,
               "temperature": 0, **body}
    return httpx.post(f"{live.url}/v1/chat/completions", json=payload, timeout=300)


def _text(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def greedy(live) -> dict[str, str]:
    """The solo greedy answers every client test compares with: plain and steered with UP."""
    return {"plain": _text(_chat(live)), "up": _text(_chat(live, steering=UP))}


# -- class 3: every file the registry reads resolves inside the allowed folder --------------------------------


def _escape(kind: str, allowed: Path) -> str:
    outside = allowed.parent / "outside" / "secret"
    folder = allowed / f"escape_{kind}"
    folder.mkdir(exist_ok=True)
    if kind == "weights":
        (folder / "vectors.safetensors").symlink_to(outside / "vectors.safetensors")
        (folder / "vectors.json").write_text((outside / "vectors.json").read_text())
    elif kind == "meta":
        save_file({"response_mean": torch.ones(31, 576)}, str(folder / "vectors.safetensors"))
        (folder / "vectors.json").symlink_to(outside / "vectors.json")
    elif kind == "file":
        (folder / "v.safetensors").symlink_to(outside / "vectors.safetensors")
        return f"escape_{kind}/v.safetensors"
    elif kind == "folder":
        folder.rmdir()
        folder.symlink_to(outside, target_is_directory=True)
    return f"escape_{kind}"


@pytest.mark.parametrize(("kind", "file"), [("weights", "vectors.safetensors"), ("meta", "vectors.json"),
                                            ("file", None), ("folder", None)])
def test_registry_refuses_files_that_resolve_outside(live, vector_dir, kind, file):
    path = _escape(kind, vector_dir)
    r = httpx.post(f"{live.url}/v1/vectors", json={"name": f"x_{kind}", "path": path})
    assert r.status_code == 403, r.text
    message = r.json()["error"]["message"]
    assert (f"{file} resolves outside" in message) if file else "is outside the folders" in message
    assert f"x_{kind}" not in httpx.get(f"{live.url}/v1/vectors").json()["vectors"]


def test_registry_symlink_inside_the_folder_is_fine(live, vector_dir):
    (vector_dir / "alias").symlink_to(vector_dir / "optimistic", target_is_directory=True)
    r = httpx.post(f"{live.url}/v1/vectors", json={"name": "alias", "path": "alias"})
    assert r.status_code == 200, r.text
    assert httpx.delete(f"{live.url}/v1/vectors/alias").status_code == 200


def _bad_file(name: str, data: bytes | None, root: Path) -> str:
    path = root / name
    if data is not None:
        path.write_bytes(data)
    return name


BAD_FILES = [
    ("truncated.gguf", b"GGUF" + struct.pack("<IQQ", 3, 1, 1), "tensor count is 1 but only 8 bytes follow"),
    ("huge_header.safetensors", struct.pack("<Q", 2**62) + b"{}", "header length field says"),
    ("header_only.safetensors", struct.pack("<Q", 2) + b"{}", "holds no tensors"),
    ("layers.gguf", b"GGUF" + struct.pack("<IQQ", 3, 2**40, 0), "tensor count is 1099511627776, outside"),
    ("garbage.pt", b"not a zip", "not a torch tensor file"),
]


@pytest.mark.parametrize(("name", "data", "message"), BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_registry_bad_files_are_400(live, vector_dir, name, data, message):
    r = httpx.post(f"{live.url}/v1/vectors", json={"name": "bad", "path": _bad_file(name, data, vector_dir)})
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]["message"] and r.json()["error"]["param"] == "path"


def test_registry_saklas_sidecar_and_nul_path_are_400(live, vector_dir):
    save_file({"layer_3": torch.ones(576)}, str(vector_dir / "prof.safetensors"))
    (vector_dir / "prof.json").write_text('{"provenance": ["a"]}')
    r = httpx.post(f"{live.url}/v1/vectors", json={"name": "prof", "path": "prof.safetensors"})
    assert r.status_code == 400 and "provenance must be a JSON object, got list" in r.text, r.text
    r = httpx.post(f"{live.url}/v1/vectors", json={"name": "nul", "path": "optimistic\x00/x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "path", r.text
    assert "NUL character" in r.json()["error"]["message"]


# -- class 5 (server): /api/show bodies; class 8: silent acceptance and chunked bodies ------------------------

SHOW = [("{", 400, "not valid JSON"), ('"x"', 400, "must be a JSON object, got str"),
        ("[1]", 400, "must be a JSON object, got list"), ("null", 400, "got NoneType"),
        ('{"model": 5}', 400, "model: Input should be a valid string"), ("", 200, None),
        ('{"name": "cheerful:latest"}', 200, None), ('{"model": "nope"}', 404, "model 'nope' not found")]


@pytest.mark.parametrize(("body", "status", "message"), SHOW, ids=[s[0] or "empty" for s in SHOW])
def test_api_show_bodies(live, body, status, message):
    r = httpx.post(f"{live.url}/api/show", content=body)
    assert r.status_code == status, r.text
    if message:
        assert message in r.json()["error"]


@pytest.mark.parametrize("fmt", [{"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "x"}},
                                 "json"])
def test_response_format_other_than_text_is_refused(live, fmt):
    r = _chat(live, response_format=fmt)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "response_format" and "is not supported (structured output" in error["message"]


def test_response_format_text_is_served(live, greedy):
    assert _text(_chat(live, response_format={"type": "text"})) == greedy["plain"]


def test_chunked_body_over_the_limit_is_413_and_under_it_is_served(live, greedy):
    def chunks(data: bytes) -> Iterator[bytes]:
        for i in range(0, len(data), 1000):
            yield data[i:i + 1000]

    big = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * 70_000}]}).encode()
    r = httpx.post(f"{live.url}/v1/chat/completions", content=chunks(big),
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and "over the limit of 64000 bytes" in r.text
    r = httpx.post(f"{live.url}/api/chat", content=chunks(big))
    assert r.status_code == 413 and r.json() == {"error": "request body over the limit of 64000 bytes"}
    small = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": MAX_TOKENS,
                        "temperature": 0}).encode()
    r = httpx.post(f"{live.url}/v1/chat/completions", content=chunks(small),
                   headers={"content-type": "application/json"}, timeout=300)
    assert _text(r) == greedy["plain"]


# -- class 1 and 2 at the HTTP level (they run against whatever engine is in the tree) ------------------------


def test_tiny_temperature_is_greedy_and_leaves_its_neighbours_alone(live, greedy):
    ollama_body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "stream": False,
                   "options": {"temperature": 1e-40, "num_predict": MAX_TOKENS}}
    with ThreadPoolExecutor(6) as pool:
        plain = [pool.submit(_chat, live) for _ in range(2)]
        up = pool.submit(_chat, live, steering=UP)
        tiny = pool.submit(_chat, live, temperature=1e-40, seed=3)
        tiny_steered = pool.submit(_chat, live, temperature=1e-30, steering=UP)
        ollama = pool.submit(httpx.post, f"{live.url}/api/chat", json=ollama_body, timeout=300)
    assert [_text(f.result()) for f in plain] == [greedy["plain"]] * 2
    assert _text(up.result()) == greedy["up"]
    assert _text(tiny.result()) == greedy["plain"] and _text(tiny_steered.result()) == greedy["up"]
    assert ollama.result().status_code == 200 and ollama.result().json()["message"]["content"] == greedy["plain"]


def test_queued_request_whose_client_leaves_ends_and_shutdown_is_bounded(embedded, vector_dir, caplog):
    model, tok = embedded
    tv = TraitVectors.load(vector_dir / "optimistic", model=model)
    app = create_app(model, tok, {"optimistic": tv},
                     AppOptions(model_name=MODEL, monitor_layer=LAYER, max_batch=1, max_tokens_limit=64,
                                default_max_tokens=MAX_TOKENS))
    engine = app.state.engine
    srv = BackgroundServer(app).start()
    try:
        long = threading.Thread(target=_chat, args=(srv,), kwargs={"max_tokens": 48}, daemon=True)
        long.start()
        deadline = time.monotonic() + 60
        while not engine.active_rows():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(httpx.TimeoutException):  # queued behind the long row; the client gives up
            httpx.post(f"{srv.url}/v1/chat/completions", timeout=0.5,
                       json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8})
        long.join(120)
        deadline = time.monotonic() + 60
        while engine.active_rows() or engine.queue_depth():
            assert time.monotonic() < deadline, "a row was left running or queued"
            time.sleep(0.05)
    finally:
        started = time.monotonic()
        uvicorn_log = logging.getLogger("uvicorn.error")  # it does not propagate to caplog's root handler
        uvicorn_log.addHandler(caplog.handler)
        try:
            srv.stop(timeout=30)
        finally:
            uvicorn_log.removeHandler(caplog.handler)
    # uvicorn cancels handlers still waiting after its graceful timeout (5 s) and logs it: a handler that never
    # got its row's end would show here.
    assert not [r.getMessage() for r in caplog.records if "graceful shutdown exceeded" in r.getMessage()]
    assert time.monotonic() - started < 5, "shutdown waited for a request that never ended"


# -- class 11: real client packages ---------------------------------------------------------------------------

# The client packages are imported by the tests that use them (fixtures), not at collection: litellm and
# langchain take ~6 s to import, which every pytest-xdist worker would pay.
@pytest.fixture(scope="module")
def litellm():
    return pytest.importorskip("litellm")


@pytest.fixture(scope="module")
def langchain_openai():
    return pytest.importorskip("langchain_openai")


LITELLM_CASES = [("ollama", {}), ("ollama", {"stream": True}), ("ollama_chat", {}), ("ollama_chat", {"stream": True}),
                 ("ollama_chat", {"seed": 1, "stop": ["zzz"], "top_p": 0.5})]


@pytest.mark.parametrize(("provider", "extra"), LITELLM_CASES,
                         ids=[f"{p}-{'-'.join(e) or 'plain'}" for p, e in LITELLM_CASES])
def test_litellm_ollama_providers(litellm, live, greedy, provider, extra):
    response = litellm.completion(model=f"{provider}/{MODEL}", messages=[{"role": "user", "content": PROMPT}],
                                  api_base=live.url, temperature=0, max_tokens=MAX_TOKENS, **extra)
    if extra.get("stream"):
        text = "".join(chunk.choices[0].delta.content or "" for chunk in response)
    else:
        text = response.choices[0].message.content
    if provider == "ollama_chat":
        assert text == greedy["plain"]
    else:  # ollama/ flattens the chat into one /api/generate prompt in LiteLLM's own "### User:" layout
        direct = httpx.post(f"{live.url}/api/generate", timeout=300, json={
            "model": MODEL, "prompt": f"### User:\n{PROMPT}\n\n", "stream": False,
            "options": {"temperature": 0, "num_predict": MAX_TOKENS}})
        assert text == direct.json()["response"] and text


def test_litellm_ollama_selects_a_preset(litellm, live, greedy):
    for model in ("ollama_chat/cheerful", "ollama_chat/cheerful:latest"):
        response = litellm.completion(model=model, messages=[{"role": "user", "content": PROMPT}],
                                      api_base=live.url, temperature=0, max_tokens=MAX_TOKENS)
        assert response.choices[0].message.content == greedy["up"], model


def test_litellm_openai_provider_and_langchain_steer(litellm, langchain_openai, live, greedy):
    response = litellm.completion(model=f"openai/{MODEL}", messages=[{"role": "user", "content": PROMPT}],
                                  api_base=f"{live.url}/v1", api_key="unused", temperature=0,
                                  max_tokens=MAX_TOKENS, extra_body={"steering": UP})
    assert response.choices[0].message.content == greedy["up"]
    chat = langchain_openai.ChatOpenAI(model=MODEL, base_url=f"{live.url}/v1", api_key="unused", temperature=0,
                                       max_tokens=MAX_TOKENS, max_retries=0, extra_body={"steering": UP})
    assert chat.invoke(PROMPT).content == greedy["up"]
    plain = langchain_openai.ChatOpenAI(model="cheerful", base_url=f"{live.url}/v1", api_key="unused",
                                        temperature=0, max_tokens=MAX_TOKENS, max_retries=0)
    assert plain.invoke(PROMPT).content == greedy["up"]  # the preset, chosen by model alone


def test_presets_are_listed_as_models(live):
    models = httpx.get(f"{live.url}/v1/models").json()["data"]
    assert [m["id"] for m in models] == [MODEL, "cheerful"]
    assert models[1]["steering"] == UP and models[1]["parent"] == MODEL
    tags = httpx.get(f"{live.url}/api/tags").json()["models"]
    assert [m["name"] for m in tags] == [MODEL, "cheerful"] and tags[1]["steering"] == UP


PRESETS = [("cheerful=optimistic@22:+4", ("cheerful", SteeringSpec(vector="optimistic", layer=22, coef=4.0))),
           ("c=v@3:-0.5", ("c", SteeringSpec(vector="v", layer=3, coef=-0.5))),
           ("cheerful=optimistic", "expected NAME=VECTOR@LAYER:COEF"),
           ("cheer ful=v@3:1", "the name may hold letters"),
           ("c=v@x:1", "invalid literal for int()"),
           ("c=v@3:nan", "coef"),
           ("c=v@0:1", "layer")]


@pytest.mark.parametrize(("text", "want"), PRESETS, ids=[p[0] for p in PRESETS])
def test_preset_option_parsing(text, want):
    if isinstance(want, tuple):
        assert parse_preset(text) == want
    else:
        with pytest.raises(ValueError, match=r"^--preset ") as info:
            parse_preset(text)
        assert want in str(info.value) and "\n" not in str(info.value)


def test_presets_group_by_name_and_bad_ones_stop_start_up(embedded, vector_dir):
    grouped = parse_presets(["a=v@2:1", "b=v@3:1", "a=v@4:2"])
    assert [(n, [s.layer for s in specs]) for n, specs in grouped] == [("a", [2, 4]), ("b", [3])]
    model, tok = embedded
    tv = TraitVectors.load(vector_dir / "optimistic", model=model)
    with pytest.raises(ValueError, match=r"unknown steering vector 'nope'"):
        create_app(model, tok, {"optimistic": tv}, AppOptions(presets=(("x", (SteeringSpec(vector="nope"),)),)))
    with pytest.raises(ValueError, match=r"preset 'steerlib' is defined twice \(or is the model's own name\)"):
        create_app(model, tok, {"optimistic": tv}, AppOptions(presets=(("steerlib", (SteeringSpec(**UP[0]),)),)))


def test_serve_checks_presets_before_the_model_loads(vector_dir):
    vectors = {"optimistic": str(vector_dir / "optimistic")}
    with pytest.raises(ValueError, match=r"^--preset c: no vector named 'nope' \(given: \['optimistic'\]\)$"):
        ServeOptions(vectors=vectors, app=AppOptions(presets=parse_presets(["c=nope@3:1"]))).check()
    with pytest.raises(ValueError, match=r"^--preset c layer must be within 1\.\.30, got 31$"):
        ServeOptions(vectors=vectors, app=AppOptions(presets=parse_presets(["c=optimistic@31:1"]))).check()
    ServeOptions(vectors=vectors, app=AppOptions(presets=parse_presets(["c=optimistic@30:1"]))).check()


assert os.sep == "/"  # the symlink cases need a POSIX file system
