"""The service's behaviour, written once and run on every engine (the engine contract's test).

``ServiceCases`` holds test bodies over real HTTP; a test module subclasses it and provides the ``served`` fixture:
``tests/test_service_engines.py`` serves with the Hugging Face engine (main suite), and
``tests/in_vllm/test_vllm_service.py`` with the vLLM engine (``.venv-vllm``, one engine per session). Each body
compares what the server answered with ``steerlib.generate`` under the same steering, and what it recorded
(drift, metrics, conversations) with what it answered. Whatever one engine cannot do yet must be refused with the
same 400 (``code == "unsupported_steering"``), never answered differently or dropped.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from steerlib.core.capture import POOLINGS, capture_activations, tokenize_pairs
from steerlib.core.chat import format_messages
from steerlib.core.vectors import TraitVectors
from steerlib.monitoring.drift import DriftMonitor
from steerlib.serve import AppOptions, SteeringSpec
from steerlib.steering.generation import generate
from steerlib.steering.steer import ResidualEditor, When, build_ops, build_readout

READOUT_LAYER = 12  # the vLLM session engine's read-out layer; the HF server reads out there too
N_TOKENS = 8
PROMPT = "How do you feel about the future of your city?"
STEERED = [{"vector": "optimistic", "layer": 10, "coef": 6.0},
           {"vector": "optimistic", "layer": 16, "mode": "cap", "cap_max": 0.0, "positions": "response"}]
PRESET = [{"vector": "optimistic", "layer": 14, "coef": -6.0, "positions": "response"},
          {"vector": "optimistic", "layer": 8, "mode": "ablate"}]
GATE = {"vector": "optimistic", "layer": 10, "coef": 8.0, "when": {"vector": "pessimistic", "above": 4.0}}
RAW_PROMPT = "The best thing about tomorrow is"
# Log-probabilities against a transformers forward pass with the same steering hooks: the HF engine runs the same
# fp32 model (batched with padding), vLLM its own fp32 CPU kernels (measured within 2.4e-5 of it).
LOGPROB_TOL = {"hf": 1e-4, "vllm": 1e-4}
# Pooled activations from /v1/activations against steerlib.core.capture on the HF model, per element (absolute;
# plus 1e-5 relative): the HF engine runs the same capture; vLLM's compiled fp32 CPU kernels differ by up to ~1e-3.
CAPTURE_TOL = {"hf": 1e-4, "vllm": 2e-3}
FLAG_TOL = {"hf": 1e-4, "vllm": 1e-3}
LOGGED = [("How was your week?", "It was wonderful, thank you! I finished a long book and went hiking."),
          ("What do you think about the rain?", "Rain is dreary and it ruins every plan I make."),
          ("Describe the library in a few words.", "")]


def server_vectors(optimism: TraitVectors) -> dict[str, TraitVectors]:
    return {"optimistic": optimism, "pessimistic": -optimism}


def server_options() -> AppOptions:
    """The same options on every engine: read-out of the optimism vector only, a preset, conversations kept."""
    return AppOptions(model_name="smol", monitor_traits=("optimistic",), monitor_layer=READOUT_LAYER, max_batch=8,
                      max_tokens_limit=32, default_max_tokens=N_TOKENS, metrics_conversations=4,
                      presets=(("gloomy", tuple(SteeringSpec(**s) for s in PRESET)),))


def server_drift() -> DriftMonitor:
    return DriftMonitor(["optimistic"], window=2, reference_size=3, robust=True)


@dataclass
class Served:
    """A started server and what its answers are compared with."""

    engine: str  # "hf" or "vllm"
    url: str
    service: Any
    model: Any
    tokenizer: Any
    optimism: TraitVectors

    def chat(self, content: str = PROMPT, steering: list | None = None, headers: dict | None = None,
             **body: Any) -> httpx.Response:
        request = {"model": "smol", "messages": [{"role": "user", "content": content}], "temperature": 0,
                   "max_tokens": N_TOKENS, **body}
        if steering is not None:
            request["steering"] = steering
        return httpx.post(f"{self.url}/v1/chat/completions", json=request, headers=headers or {}, timeout=300)

    def complete(self, prompt: Any = RAW_PROMPT, steering: list | None = None, **body: Any) -> httpx.Response:
        request = {"model": "smol", "prompt": prompt, "temperature": 0, "max_tokens": N_TOKENS, **body}
        if steering is not None:
            request["steering"] = steering
        return httpx.post(f"{self.url}/v1/completions", json=request, timeout=300)

    def prompt_logprobs(self, ids: list[int], specs: list[dict]) -> torch.Tensor:
        """``[len(ids), V]`` log-probabilities of one transformers forward pass over ``ids`` steered by ``specs``."""
        with torch.no_grad(), ResidualEditor(self.model, self.ops(specs)):
            logits = self.model(torch.tensor([ids])).logits[0]
        return torch.log_softmax(logits.float(), dim=-1)

    def get(self, path: str, **params: Any) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", params=params, timeout=60)

    def metrics(self) -> dict[tuple[str, frozenset], float]:
        out = {}
        for family in text_string_to_metric_families(self.get("/metrics").text):
            for s in family.samples:
                out[(s.name, frozenset(s.labels.items()))] = s.value
        return out

    def reference(self, ops: list, content: str = PROMPT):
        """``steerlib.generate`` of the same chat prompt with ``ops``, read out like the server."""
        readout = build_readout(self.model, {"optimistic": self.optimism}, READOUT_LAYER)
        prompt = format_messages(self.tokenizer, [{"role": "user", "content": content}])[0]
        return generate(self.model, self.tokenizer, [prompt], steering=ops, readout=readout,
                        max_new_tokens=N_TOKENS)[0]

    def ops(self, specs: list[dict]) -> list:
        out = []
        for s in specs:
            cap = (s.get("cap_min"), s.get("cap_max")) if s.get("mode") == "cap" else None
            out += build_ops(self.model, self.optimism, s["layer"], s.get("coef", 1.0), mode=s.get("mode", "add"),
                             positions=s.get("positions", "all"), cap=cap)
        return out


def metric(parsed: dict, name: str, **labels: str) -> float:
    return parsed.get((name, frozenset(labels.items())), 0.0)


def responses(parsed: dict, steering: str) -> float:
    return sum(metric(parsed, "steerlib_responses_total", steering=steering, finish_reason=f) for f in ("stop", "length"))


def assert_answers_like(reply: httpx.Response, expected, what: str) -> dict:
    """The reply's text and read-out summary equal ``generate``'s (read-out within 1e-3: vLLM's fp32 kernels)."""
    assert reply.status_code == 200, f"{what}: {reply.text}"
    body = reply.json()
    assert body["choices"][0]["message"]["content"].strip() == expected.text, what
    proj = body["trait_projections"]["optimistic"]
    assert proj["n_tokens"] == len(expected.response_projections(layer=READOUT_LAYER)), what
    assert proj["mean"] == pytest.approx(expected.mean_projection(layer=READOUT_LAYER), abs=1e-3), what
    assert proj["prompt_last"] == pytest.approx(expected.prompt_last_projection(layer=READOUT_LAYER), abs=1e-3), what
    return proj


def answered_or_refused_alike(served: Served, reply: httpx.Response, check: Callable[[httpx.Response], None],
                              what: str) -> bool:
    """The HF engine answers (``check`` it); another engine answers the same, or refuses with the one 400 of
    steering an engine cannot apply. Returns whether it answered."""
    if served.engine == "hf" or reply.status_code == 200:
        check(reply)
        return True
    assert reply.status_code == 400, f"{what}: {reply.status_code} {reply.text}"
    error = reply.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", "steering",
                                                              "unsupported_steering"), what
    assert f"the {served.engine} engine cannot apply" in error["message"].lower(), error["message"]
    return False


class ServiceCases:
    """Service test bodies; a subclass provides ``served`` (a ``Served``) for its engine."""

    def test_replies_equal_generate_and_feed_drift_metrics_and_stats(self, served: Served):
        before, monitor0 = served.metrics(), served.get("/v1/monitor").json()
        plain = served.chat()
        steered = served.chat(steering=STEERED)
        plain_proj = assert_answers_like(plain, served.reference([]), "unsteered")
        assert_answers_like(steered, served.reference(served.ops(STEERED)), "steered")
        assert steered.json()["choices"][0]["message"]["content"] != plain.json()["choices"][0]["message"]["content"]
        after, monitor = served.metrics(), served.get("/v1/monitor").json()
        # Every finished reply reaches the service's callback: response metrics and the drift monitor are fed.
        assert responses(after, "none") - responses(before, "none") == 1
        assert responses(after, "steered") - responses(before, "steered") == 1
        tl = {"trait": "optimistic", "layer": str(READOUT_LAYER)}
        assert metric(after, "steerlib_response_projection_count", **tl) - \
            metric(before, "steerlib_response_projection_count", **tl) == 2
        calibrating = not monitor0["drift"]["calibrated"]
        # Until the reference is fixed only unsteered replies enter it; the steered one is judged once it is.
        assert monitor["drift"]["n_updates"] - monitor0["drift"]["n_updates"] == (1 if calibrating else 2)
        if calibrating:
            assert monitor["history"][-1]["scores"]["optimistic"] == pytest.approx(plain_proj["mean"])
        stats = served.get("/v1/stats").json()
        assert stats["engine"] == served.engine and stats["finish_callback_errors"] == 0
        assert metric(after, "steerlib_engine_finish_callback_errors_total") == 0
        assert metric(after, "steerlib_engine_rows_completed_total") == stats["completed"]

    def test_streamed_token_projections_pair_with_their_tokens(self, served: Served):
        """Each streamed value is read at the position that produced its token (the first at the last prompt
        token); a reply that did not end at EOS streams its last token's own value, from the closing pass, last."""
        body = {"model": "smol", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": N_TOKENS,
                "temperature": 0, "stream": True, "steering": STEERED}
        with httpx.stream("POST", f"{served.url}/v1/chat/completions", json=body, timeout=300) as resp:
            chunks = [json.loads(line[6:]) for line in resp.iter_lines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
        values = [v for c in chunks for v in c.get("token_projections", {}).get("optimistic", [])]
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        expected = served.reference(served.ops(STEERED))
        assert text.strip() == expected.text
        paired = expected.token_projections(layer=READOUT_LAYER).float().tolist()
        if expected.token_ids and expected.token_ids[-1] in served.service.engine.eos_ids:
            paired = paired[:-1]  # EOS is not streamed; its value (the last token's own) is in the summary
        else:
            paired.append(float(expected.closing[expected.layers.index(READOUT_LAYER), 0]))
        assert values == pytest.approx(paired, abs=1e-3)
        summary = chunks[-1]["trait_projections"]["optimistic"]
        assert summary["mean"] == pytest.approx(expected.mean_projection(layer=READOUT_LAYER), abs=1e-3)

    def test_conversation_turns_follow_the_replies(self, served: Served):
        cid = f"conv-{served.engine}"
        replies = [served.chat(q, headers={"X-Conversation-Id": cid}) for q in ("Name a colour.", "Name a tree.")]
        assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
        found = served.get(f"/v1/conversations/{cid}").json()
        assert found["turns"] == 2 and found["layer"] == READOUT_LAYER
        assert [t["projections"]["optimistic"]["mean"] for t in found["series"]] == \
            pytest.approx([r.json()["trait_projections"]["optimistic"]["mean"] for r in replies])
        assert metric(served.metrics(), "steerlib_conversation_turns", conversation=cid) == 2

    def test_presets_and_caps_steer_like_the_explicit_steering(self, served: Served):
        models = served.get("/v1/models").json()["data"]
        assert [m["id"] for m in models] == ["smol", "gloomy"] and models[1]["steering"] == PRESET
        by_preset = served.chat(model="gloomy")
        explicit = served.chat(steering=PRESET)
        expected = served.reference(served.ops(PRESET))
        assert_answers_like(by_preset, expected, "preset")
        assert_answers_like(explicit, expected, "explicit")
        assert by_preset.json()["steering"] == PRESET
        assert expected.text != served.reference([]).text  # the preset changes the answer (else vacuous)
        # Ollama clients pick the preset by model name too.
        r = httpx.post(f"{served.url}/api/chat", timeout=300, json={
            "model": "gloomy:latest", "messages": [{"role": "user", "content": PROMPT}], "stream": False,
            "options": {"temperature": 0, "num_predict": N_TOKENS}})
        assert r.status_code == 200 and r.json()["message"]["content"].strip() == expected.text

    def test_gated_steering_equals_generate_or_is_refused_alike(self, served: Served):
        before = served.metrics()
        answered = []
        for latch in (False, True):
            reply = served.chat(steering=[{**GATE, "latch": latch}])
            when = When(-served.optimism, above=GATE["when"]["above"], latch=latch)
            ops = build_ops(served.model, served.optimism, GATE["layer"], GATE["coef"], when=when)
            answered.append(answered_or_refused_alike(
                served, reply, lambda r, ops=ops: assert_answers_like(r, served.reference(ops), "gated"),
                f"gate latch={latch}"))
        # Refused before any engine sees it, alike everywhere: a condition at another layer than its edit.
        wrong = served.chat(steering=[{**GATE, "when": {**GATE["when"], "layer": 12}}])
        assert wrong.status_code == 400 and "a condition is evaluated at the layer of the edit it gates" in wrong.text
        after = served.metrics()
        assert metric(after, "steerlib_requests_total", steering="gated") - \
            metric(before, "steerlib_requests_total", steering="gated") == sum(answered)
        assert responses(after, "gated") - responses(before, "gated") == sum(answered)

    @pytest.mark.parametrize(("body", "param", "code"), [
        ({"steering": [{"vector": "grumpy", "layer": 10}]}, "steering.0.vector", "unknown_vector"),
        ({"steering": [{"vector": "optimistic", "layer": 99}]}, "steering.0", None),
        ({"steering": [{"vector": "optimistic", "layer": 10, "coef": 1e30}]}, "steering.0.coef", "invalid_value"),
        ({"steering": [{"vector": "optimistic", "layer": 10, "mode": "cap", "cap_min": 2.0, "cap_max": 1.0}]},
         "steering.0", "invalid_value"),
        ({"steering": [{"vector": "optimistic", "layer": 10, "latch": True}]}, "steering.0", "invalid_value"),
        ({"top_logprobs": 2}, "top_logprobs", "invalid_value"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "invalid_value"),
        ({"max_tokens": 10_000}, "max_tokens", None),
        ({"n": 0}, "n", "invalid_value"),
    ], ids=["unknown-vector", "layer-out-of-range", "absurd-coef", "cap-bounds-reversed", "latch-without-when",
            "top-logprobs-alone", "top-logprobs-too-many", "over-limit", "n-zero"])
    def test_hostile_requests_get_the_same_400(self, served: Served, body, param, code):
        reply = served.chat(**body)
        assert reply.status_code == 400, reply.text
        error = reply.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"].startswith(param) and error["message"]
        if code is not None:
            assert error["code"] == code

    def test_raw_bodies_stops_n_and_a_client_that_leaves(self, served: Served):
        nan = ('{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, '
               '"steering": [{"vector": "optimistic", "layer": 10, "coef": NaN}]}')
        for raw in (nan, "{not json"):
            r = httpx.post(f"{served.url}/v1/chat/completions", content=raw, timeout=60,
                           headers={"content-type": "application/json"})
            assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text
        full = served.chat().json()["choices"][0]["message"]["content"]
        words = full.split()
        assert len(words) > 2, full
        stop = " " + words[2]
        two = served.chat(n=2, stop=[stop]).json()
        assert [c["message"]["content"] for c in two["choices"]] == [full[:full.index(stop)]] * 2
        assert [c["finish_reason"] for c in two["choices"]] == ["stop", "stop"]
        cancelled = served.get("/v1/stats").json()["cancelled"]
        body = {"model": "smol", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 32,
                "stream": True, "temperature": 0}
        with httpx.Client(base_url=served.url, timeout=120) as http, \
                http.stream("POST", "/v1/chat/completions", json=body) as resp:
            for n, _ in enumerate(resp.iter_lines()):
                if n >= 4:
                    break  # the client goes away mid-stream
        deadline = time.monotonic() + 120
        while served.get("/v1/stats").json()["cancelled"] == cancelled:
            assert time.monotonic() < deadline, "the abandoned row kept generating"
            time.sleep(0.05)
        assert served.chat("Say hello.", max_tokens=3).status_code == 200
        assert served.get("/v1/stats").json()["finish_callback_errors"] == 0

    # -- /v1/completions and log-probabilities ------------------------------------------------------------------
    def test_prompt_logprobs_under_steering_equal_a_steered_forward_pass(self, served: Served):
        """``echo`` + ``logprobs`` with ``max_tokens`` 0 (what lm-eval's local-completions asks for): every prompt
        token's log-probability and top-k are the steered model's, steering at prompt positions included."""
        ids = served.tokenizer(RAW_PROMPT, add_special_tokens=False)["input_ids"]
        for specs in ([], STEERED):
            reply = served.complete(ids, steering=specs, max_tokens=0, echo=True, logprobs=3)
            assert reply.status_code == 200, reply.text
            choice = reply.json()["choices"][0]
            lp = choice["logprobs"]
            assert choice["text"] == served.tokenizer.decode(ids) and choice["finish_reason"] == "length"
            assert lp["tokens"] == [served.tokenizer.decode([t]) for t in ids]
            assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
            ref = served.prompt_logprobs(ids, specs)
            want = [float(ref[q, ids[q + 1]]) for q in range(len(ids) - 1)]
            assert lp["token_logprobs"][1:] == pytest.approx(want, abs=LOGPROB_TOL[served.engine]), specs
            worst = max(abs(a - b) for a, b in zip(lp["token_logprobs"][1:], want, strict=True))
            print(f"\n{served.engine}: prompt logprobs vs a steered forward pass ({len(specs)} edits): max |d| "
                  f"{worst:.2e}")
            for q, top in enumerate(lp["top_logprobs"][1:]):
                best = torch.topk(ref[q], 3)
                expected = {served.tokenizer.decode([int(t)]): float(v) for v, t in zip(*best, strict=True)}
                assert set(expected) <= set(top) and len(top) <= 4, (q, top, expected)
                assert [top[t] for t in expected] == pytest.approx(list(expected.values()),
                                                                   abs=LOGPROB_TOL[served.engine])
            assert reply.json()["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0,
                                             "total_tokens": len(ids)}
        steered, plain = served.prompt_logprobs(ids, STEERED), served.prompt_logprobs(ids, [])
        assert float((steered - plain).abs().max()) > 0.1  # the steering moves them (else the check is vacuous)

    def test_completions_shapes_text_ids_batches_and_echo(self, served: Served):
        ids = served.tokenizer(RAW_PROMPT, add_special_tokens=False)["input_ids"]
        steering = STEERED[:1]  # at every position: one forward pass over prompt + answer is its reference
        reply = served.complete([ids, ids], n=2, echo=True, logprobs=1, steering=steering)
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["object"] == "text_completion" and body["steering"] == steering
        assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
        texts = {c["text"] for c in body["choices"]}
        assert len(texts) == 1, texts  # greedy: every prompt and choice answers alike
        choice = body["choices"][0]
        lp = choice["logprobs"]
        n = len(lp["tokens"])
        assert len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == n
        assert n == len(ids) + N_TOKENS and choice["finish_reason"] == "length"
        assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(n)]
        assert choice["text"].startswith(RAW_PROMPT)
        generated = lp["token_logprobs"][len(ids):]
        # Greedy decoding picks the most likely token: its log-probability is the top one's.
        assert [max(top.values()) for top in lp["top_logprobs"][len(ids):]] == pytest.approx(generated, abs=1e-6)
        assert body["usage"]["prompt_tokens"] == 4 * len(ids) and body["usage"]["completion_tokens"] == 4 * N_TOKENS
        # A text prompt answers as its token ids; without echo: only the generated tokens, and no prompt text.
        plain = served.complete(RAW_PROMPT, logprobs=0, steering=steering).json()["choices"][0]
        assert RAW_PROMPT + plain["text"] == choice["text"]
        assert plain["logprobs"]["token_logprobs"] == pytest.approx(generated, abs=LOGPROB_TOL[served.engine])
        assert all(len(top) == 1 for top in plain["logprobs"]["top_logprobs"])
        # The generated tokens' log-probabilities are the steered model's too.
        gen_ids = served.tokenizer(choice["text"], add_special_tokens=False)["input_ids"]
        if gen_ids[:len(ids)] == ids:  # the text re-tokenises to the same tokens (then the check is exact)
            ref = served.prompt_logprobs(gen_ids[:len(ids) + N_TOKENS], steering)
            want = [float(ref[q - 1, gen_ids[q]]) for q in range(len(ids), min(len(gen_ids), len(ids) + N_TOKENS))]
            assert generated[:len(want)] == pytest.approx(want, abs=LOGPROB_TOL[served.engine])

    def test_completions_stream_presets_and_stops(self, served: Served):
        whole = served.complete(model="gloomy", logprobs=2)
        assert whole.status_code == 200, whole.text
        expected = whole.json()["choices"][0]
        assert whole.json()["steering"] == PRESET
        body = {"model": "gloomy", "prompt": RAW_PROMPT, "max_tokens": N_TOKENS, "temperature": 0, "stream": True,
                "logprobs": 2, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", f"{served.url}/v1/completions", json=body, timeout=300) as resp:
            chunks = [json.loads(line[6:]) for line in resp.iter_lines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
        text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
        assert text == expected["text"]
        last = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]][-1]
        assert last["choices"][0]["logprobs"] == expected["logprobs"]
        assert chunks[-1]["usage"]["completion_tokens"] == N_TOKENS
        unsteered = served.complete().json()["choices"][0]["text"]
        assert unsteered != expected["text"]  # the preset steers completions as it steers chat
        words = unsteered.split()
        stopped = served.complete(stop=[words[1]]).json()["choices"][0]
        assert stopped["text"] == unsteered[:unsteered.index(words[1])] and stopped["finish_reason"] == "stop"

    def test_chat_logprobs_follow_the_content(self, served: Served):
        reply = served.chat(steering=STEERED, logprobs=True, top_logprobs=2)
        assert reply.status_code == 200, reply.text
        choice = reply.json()["choices"][0]
        content = choice["logprobs"]["content"]
        assert "".join(e["token"] for e in content).strip() == choice["message"]["content"].strip()
        for e in content:
            assert bytes(e["bytes"]).decode("utf-8", "replace") == e["token"].encode().decode()
            assert len(e["top_logprobs"]) == 2 and e["top_logprobs"][0]["logprob"] == pytest.approx(e["logprob"])
        assert served.chat(logprobs=False).json()["choices"][0]["logprobs"] is None

    @pytest.mark.parametrize(("body", "param"), [
        ({"logprobs": 21}, "logprobs"),
        ({"logprobs": -1}, "logprobs"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 10_000}, "max_tokens"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [[1, 2], []]}, "prompt"),
        ({"prompt": [10_000_000]}, "prompt"),
        ({"prompt": [-3]}, "prompt"),
        ({"suffix": "the end"}, "suffix"),
        ({"best_of": 3}, "best_of"),
        ({"n": 9}, "n"),
        ({"echo": "yes"}, "echo"),
        ({"steering": [{"vector": "grumpy", "layer": 10}]}, "steering.0.vector"),
        ({"model": "cheerful"}, "model"),
    ], ids=["logprobs-21", "logprobs-negative", "max-tokens-negative", "over-limit", "empty", "empty-in-batch",
            "id-out-of-vocab", "id-negative", "suffix", "best-of", "n-9", "echo-not-bool", "unknown-vector",
            "unknown-model"])
    def test_bad_completions_get_an_openai_error(self, served: Served, body, param):
        reply = served.complete(**body)
        assert reply.status_code in (400, 404), reply.text
        error = reply.json()["error"]
        assert error["param"].startswith(param) and error["message"], error
        assert error["type"] == "invalid_request_error"

    # -- pooled activations of logged conversations (POST /v1/activations, steerlib flag --server) -----------
    def test_activations_of_logged_conversations_equal_the_hf_capture(self, served: Served):
        tok, layers = served.tokenizer, [0, READOUT_LAYER, 30]
        prompts = [format_messages(tok, [{"role": "user", "content": q}])[0] for q, _ in LOGGED]
        responses = [r or None for _, r in LOGGED]
        encoded = tokenize_pairs(tok, prompts, responses)
        samples = [{"token_ids": encoded[0][0], "prompt_tokens": encoded[0][1]},  # the three forms of a sample
                   {"prompt": prompts[1], "response": responses[1]},
                   {"messages": [{"role": "user", "content": LOGGED[2][0]}]}]
        with ThreadPoolExecutor(1) as pool:  # a steered row served beside the capture
            busy = pool.submit(served.chat, steering=STEERED)
            reply = httpx.post(f"{served.url}/v1/activations", json={"model": "smol", "samples": samples,
                                                                    "layers": layers}, timeout=300)
            answered = busy.result()
        assert reply.status_code == 200, reply.text
        # The capture neither steered nor was steered by the row beside it.
        assert_answers_like(answered, served.reference(served.ops(STEERED)), "steered beside a capture")
        body = reply.json()
        assert body["layers"] == layers and [d["index"] for d in body["data"]] == [0, 1, 2]
        assert [(d["prompt_tokens"], d["response_tokens"]) for d in body["data"]] == [
            (p, len(ids) - p) for ids, p in encoded]
        ref = capture_activations(served.model, tok, prompts, responses, layers)
        for kind in POOLINGS:
            have = torch.tensor([[[math.nan if x is None else x for x in row] for row in d[kind]]
                                 for d in body["data"]])
            torch.testing.assert_close(have, ref.pooled[kind], rtol=1e-5, atol=CAPTURE_TOL[served.engine],
                                       equal_nan=True, msg=kind)
        assert body["data"][2]["response_mean"][0][0] is None  # no response: null, never a number
        norms = torch.tensor([d["token_norms"] for d in body["data"]])
        torch.testing.assert_close(norms, ref.token_norms, rtol=1e-5, atol=CAPTURE_TOL[served.engine])

    def test_flag_through_the_server_equals_the_local_path(self, served: Served, tmp_path):
        from steerlib.commands.flag import flag_file

        data = tmp_path / "logs.jsonl"
        data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                         {"role": "assistant", "content": r}]}) + "\n"
                                for q, r in LOGGED if r))
        vectors = tmp_path / "optimistic"
        served.optimism.save(vectors)
        kwargs = dict(layer=READOUT_LAYER, baseline="generate", max_new_tokens=N_TOKENS, progress=False)
        remote = flag_file(data, vectors, out_dir=tmp_path / "server", server=served.url, **kwargs)
        local = flag_file(data, vectors, out_dir=tmp_path / "local", **kwargs)

        def records(path):
            return sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda r: r["index"])

        got, want = records(remote.scores_path), records(local.scores_path)
        assert [r["base_response"] for r in got] == [r["base_response"] for r in want]
        for key in ("projection", "prompt_last_projection", "baseline_projection", "score"):
            torch.testing.assert_close(torch.tensor([r[key] for r in got], dtype=torch.float64),
                                       torch.tensor([r[key] for r in want], dtype=torch.float64),
                                       rtol=0, atol=FLAG_TOL[served.engine], msg=key)

    @pytest.mark.parametrize(("body", "status", "param"), [
        ({"samples": []}, 400, "samples"),
        ({"samples": [{"token_ids": [1, 2, 3], "prompt_tokens": 5}]}, 400, "samples.0"),
        ({"samples": [{"token_ids": [1, 2, 3]}]}, 400, "samples.0"),
        ({"samples": [{"prompt": "Hi", "messages": [{"role": "user", "content": "Hi"}]}]}, 400, "samples.0"),
        ({"samples": [{"token_ids": [10_000_000], "prompt_tokens": 1}]}, 400, "samples.0.token_ids"),
        ({"samples": [{"prompt": "Hi"}], "layers": [31]}, 400, "layers"),
        ({"samples": [{"prompt": "Hi"}], "model": "cheerful"}, 404, "model"),
    ], ids=["empty", "prompt-longer-than-ids", "ids-without-prompt-length", "two-forms", "id-out-of-vocab",
            "layer-out-of-range", "unknown-model"])
    def test_bad_activation_requests_get_an_openai_error(self, served: Served, body, status, param):
        reply = httpx.post(f"{served.url}/v1/activations", json=body, timeout=60)
        assert reply.status_code == status, reply.text
        error = reply.json()["error"]
        assert error["param"].startswith(param) and error["message"], error
