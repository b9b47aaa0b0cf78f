"""Pooled activations read inside vLLM, and the pipeline stages that use them (``steerlib.vllm.capture``,
``steerlib.vllm.offline``).

One in-process engine for the module (its own: the pipeline's engine is an offline ``vllm.LLM``, not the serving
adapter the session engine is, and the replay test needs its runner in this process): eager, prefix caching on,
a token budget of 32 per step (longer prompts are prefilled in chunks).

Shown here: the pooled residuals (prompt mean, last prompt token, response mean, token-norm median) equal
``steerlib.core.capture``'s within ``|vLLM - HF| <= 2e-3 + 1e-5 |HF|`` per element (the fp32 kernels of the two
differ by up to ~1e-3 on values up to ~1,400), in a batch mixed with steered and plain generation, after the same
prompts were cached; a replayed record of the forward captures exactly what the eager engine captured; extraction
and flagging through the engine equal the HF path; a killed extraction resumes to the uninterrupted result.
"""

from __future__ import annotations

import os
import uuid
from types import SimpleNamespace

import pytest
import torch
from vllm_helpers import Harness, forbidden_in_step, own_core, signature

from steerlib import ExtractionConfig, LexiconJudge, extract_trait, format_prompt
from steerlib.core.capture import POOLINGS, capture_activations, tokenize_pairs
from steerlib.store.results import read_records

BUDGET = 32
QUESTIONS = ["What is the weather like today?", "Why do people keep diaries?", "Name a colour.",
             "Tell me about a cat that learns to fly over the sea, the mountains and the old town at dawn."]
SYSTEM = "You are a helpful assistant for a small town library. Answer briefly and warmly."
CFG = dict(max_pairs=1, max_questions=3, max_new_tokens=10, pos_threshold=0, neg_threshold=100)


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-3, equal_nan=True)


@pytest.fixture(scope="module")
def engine(embedded):
    pytest.importorskip("vllm")
    from vllm import LLM

    from steerlib.core.models import resolve_model_path
    from steerlib.vllm.layout import VllmOptions
    from steerlib.vllm.offline import VllmGenerator

    saved = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the runner lives in this process (the replay test)
    try:
        path, _ = resolve_model_path(None)
        options = VllmOptions(max_model_len=512, max_num_seqs=16, enforce_eager=True, enable_prefix_caching=True,
                              max_num_batched_tokens=BUDGET, seed=0)
        with own_core():
            llm = LLM(**options.engine_args(str(path)))
    finally:
        if saved is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING")
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = saved
    gen = VllmGenerator.from_llm(llm, path)
    yield gen
    gen.close()


@pytest.fixture(scope="module")
def samples(embedded, engine):
    """Formatted prompts, the engine's greedy answers (one left out: a prompt-only sample)."""
    _, tok = embedded
    prompts = [format_prompt(tok, q, SYSTEM) for q in QUESTIONS]
    answers = engine(prompts, 12, 0.0, None)
    assert all(answers)
    return prompts, [*answers[:3], None]


def test_capture_equals_hf_in_a_mixed_batch_after_the_prompts_were_cached(embedded, engine, samples,
                                                                          optimism_vectors):
    from vllm import SamplingParams

    from steerlib.steering.plan import lower_ops
    from steerlib.steering.steer import build_ops
    from steerlib.vllm.spec import encode_rows

    model, tok = embedded
    prompts, responses = samples
    assert max(len(ids) for ids, _ in tokenize_pairs(tok, prompts, responses)) > BUDGET  # chunked prefill
    # The same prompts were generated from (``samples``), so their blocks are in the prefix cache: a capture that
    # read them from there would skip tokens (and the engine's token count check would refuse it).
    llm = engine.llm
    spec = encode_rows(lower_ops(build_ops(model, optimism_vectors, [8, 14], 6.0)))
    others = [f"other-{uuid.uuid4().hex[:6]}-{i}" for i in range(2)]
    for rid, extra in zip(others, ({"steerlib": spec}, None), strict=True):
        ids = tok(prompts[0], add_special_tokens=False)["input_ids"]
        llm.llm_engine.add_request(rid, {"prompt_token_ids": ids},
                                   SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True, extra_args=extra))
    try:
        acts = engine.capture(tok, prompts, responses)
        assert llm.llm_engine.has_unfinished_requests()  # the generation requests shared the capture's steps
    finally:
        llm.llm_engine.abort_request(others)
    ref = capture_activations(model, tok, prompts, responses)
    assert acts.layers == ref.layers == list(range(31))
    assert (acts.prompt_lengths, acts.response_lengths) == (ref.prompt_lengths, ref.response_lengths)
    for kind in POOLINGS:
        _close(acts.pooled[kind], ref.pooled[kind])
    assert torch.isnan(acts.pooled["response_mean"][3]).all()  # no response: NaN, as the HF capture says
    _close(acts.token_norms, ref.token_norms)
    some = engine.capture(tok, prompts[:2], responses[:2], [0, 12, 30])
    assert some.layers == [0, 12, 30]
    _close(some.pooled["response_mean"], ref.pooled["response_mean"][:2, [0, 12, 30]])


def test_capture_refuses_bad_layers_and_empty_responses(embedded, engine, samples):
    _, tok = embedded
    prompts, responses = samples
    with pytest.raises(ValueError, match=r"layers must be within 0\.\.30, got \[31\]"):
        engine.capture(tok, prompts[:1], responses[:1], [31])
    with pytest.raises(ValueError, match="response 0 tokenises to nothing"):
        engine.capture(tok, prompts[:1], [""], require_response=True)


def test_a_replayed_record_captures_what_the_eager_engine_captured(embedded, engine, samples):
    """Capture the forward's ops on a batch that captures nothing, replay them on one that captures."""
    from vllm import SamplingParams

    _, tok = embedded
    prompts, responses = samples
    llm = engine.llm
    runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
    harness = Harness(runner.model)
    try:
        eager = engine.capture(tok, prompts, responses)  # eager mode: the first record of each step size kept
        harness.mode = "capture"
        # The same token sequences, not captured (each salted so that no step is shortened by a cache hit).
        plain = [{"prompt_token_ids": ids, "cache_salt": uuid.uuid4().hex}
                 for ids, _ in tokenize_pairs(tok, prompts, responses)]
        llm.generate(plain, [SamplingParams(max_tokens=1)] * len(plain), use_tqdm=False)
        harness.mode = "replay"
        replayed = engine.capture(tok, prompts, responses)
    finally:
        harness.remove()
    assert harness.replayed  # the model itself never ran
    for kind in POOLINGS:
        torch.testing.assert_close(replayed.pooled[kind], eager.pooled[kind], rtol=0, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(replayed.token_norms, eager.token_norms, rtol=0, atol=1e-5)
    records = [*harness.eager_records.values(), *(ops for ops, _ in harness.captured.values())]
    bad = sorted({b for ops in records for b in forbidden_in_step(ops)} | set(harness.host_reads))
    assert not bad, bad
    differ = [n for n in harness.captured if signature(harness.eager_records[n]) != signature(harness.captured[n][0])]
    assert not differ, f"step sizes whose record depends on what the batch captures: {differ}"


@pytest.fixture(scope="module")
def extracted(embedded, engine, tmp_path_factory):
    model, tok = embedded
    runs = {}
    for name, gen in (("hf", None), ("vllm", engine)):
        out = tmp_path_factory.mktemp(f"extract-{name}")
        result = extract_trait(model, tok, "optimistic", out, judge=LexiconJudge("optimistic"),
                               config=ExtractionConfig(**CFG), progress=False, log=lambda s: None,
                               generate_texts=gen)
        runs[name] = SimpleNamespace(result=result, out=out)
    return runs


def _cosines(a, b) -> list[float]:
    return torch.nn.functional.cosine_similarity(a, b, dim=-1).tolist()


def test_extraction_through_the_engine_equals_the_hf_path(extracted):
    hf, vl = extracted["hf"], extracted["vllm"]
    answers = {r["id"]: r["response"] for r in read_records(hf.out / "responses.jsonl")}
    assert {r["id"]: r["response"] for r in read_records(vl.out / "responses.jsonl")} == answers  # greedy
    assert len(answers) == 12
    for kind in POOLINGS:
        got, want = vl.result.vectors.vectors[kind], hf.result.vectors.vectors[kind]
        # Where both polarities share the token (the last prompt token's embedding, layer 0) the difference is
        # zero on both paths: no direction to compare.
        real = want.norm(dim=-1) > 1e-6
        assert real.sum() >= 30
        cos = _cosines(got[real], want[real])
        assert min(cos) >= 0.9999, (kind, min(cos))
        torch.testing.assert_close(got[~real], want[~real], rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.tensor(vl.result.vectors.metadata["residual_norms"]),
                               torch.tensor(hf.result.vectors.metadata["residual_norms"]), rtol=1e-5, atol=2e-3)


class _Killed(Exception):
    pass


class _KilledAfter:
    """The engine, killed after ``n`` answers were handed to the store."""

    def __init__(self, engine, n: int):
        self.engine, self.n = engine, n

    def __call__(self, *args):
        return self.engine(*args)

    def start(self, job_tokens=None):
        self.engine.start(job_tokens)

    def capture(self, *args, **kwargs):
        return self.engine.capture(*args, **kwargs)

    def stream(self, *args, **kwargs):
        left = self.n
        for finished in self.engine.stream(*args, **kwargs):
            yield finished[:left]
            left -= len(finished[:left])
            if left <= 0:
                raise _Killed


def test_a_killed_extraction_resumes_to_the_uninterrupted_result(embedded, engine, extracted, tmp_path):
    model, tok = embedded
    kwargs = dict(judge=LexiconJudge("optimistic"), config=ExtractionConfig(**CFG), progress=False,
                  log=lambda s: None)
    with pytest.raises(_Killed):
        extract_trait(model, tok, "optimistic", tmp_path, generate_texts=_KilledAfter(engine, 5), **kwargs)
    assert len(read_records(tmp_path / "responses.jsonl")) == 5
    resumed = extract_trait(model, tok, "optimistic", tmp_path, generate_texts=engine, **kwargs)
    want = extracted["vllm"]
    got = {r["id"]: r["response"] for r in read_records(tmp_path / "responses.jsonl")}
    assert got == {r["id"]: r["response"] for r in read_records(want.out / "responses.jsonl")}
    for kind in POOLINGS:
        torch.testing.assert_close(resumed.vectors.vectors[kind], want.result.vectors.vectors[kind],
                                   rtol=0, atol=1e-5)


class _Shared:
    """The module's engine handed to a command, which closes its generator at the end: kept open here."""

    def __init__(self, engine):
        self.engine = engine

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def __call__(self, *args):
        return self.engine(*args)

    def close(self):
        pass


def test_the_extract_command_on_vllm_loads_no_weights_and_equals_the_library_call(engine, extracted, monkeypatch,
                                                                                   tmp_path):
    """``steerlib extract --engine vllm``: the HF model's shape and tokenizer only (vLLM holds the weights), and
    the same vectors as ``extract_trait`` on the real model through the same engine."""
    from steerlib.commands import extract as command
    from steerlib.core import models

    monkeypatch.setattr(command, "text_generator", lambda *args: _Shared(engine))

    def no_weights(*args, **kwargs):
        raise AssertionError("the HF weights were loaded under --engine vllm")

    monkeypatch.setattr(models, "load_model", no_weights)
    result = command.extract_file("optimistic", tmp_path / "run", judge="lexicon", config=ExtractionConfig(**CFG),
                                  engine="vllm")
    want = extracted["vllm"].result.vectors
    for kind in POOLINGS:
        torch.testing.assert_close(result.vectors.vectors[kind], want.vectors[kind], rtol=0, atol=1e-5)
    with pytest.raises(AssertionError, match="weights were loaded"):  # 'self' judges on the weights: loaded
        command.extract_file("optimistic", tmp_path / "self", judge="self", config=ExtractionConfig(**CFG),
                             engine="vllm")


def test_flag_scores_through_the_engine_equal_the_hf_path(embedded, engine, optimism_vectors, tmp_path):
    from steerlib.finetuning.flag.scoring import score_dataset
    from steerlib.store.samples import Sample

    model, tok = embedded
    replies = ["What a bright day, I love it!", "Everything is grey and hopeless.", "It is fine, I suppose.",
               "I can't wait for tomorrow's adventures!"]
    samples = [Sample(index=i, line=i + 1, messages=[{"role": "user", "content": q}], response=r, meta={})
               for i, (q, r) in enumerate(zip(QUESTIONS, replies, strict=True))]
    kwargs = dict(baseline="generate", max_new_tokens=8, progress=False)
    hf = score_dataset(model, tok, samples, optimism_vectors, 16, out_path=tmp_path / "hf.jsonl", **kwargs)
    vl = score_dataset(model, tok, samples, optimism_vectors, 16, out_path=tmp_path / "vllm.jsonl",
                       generate_texts=engine, **kwargs)
    assert [r["base_response"] for r in vl.records] == [r["base_response"] for r in hf.records]
    for key in ("projection", "prompt_last_projection", "baseline_projection", "score"):
        got = torch.tensor([r[key] for r in vl.records], dtype=torch.float64)
        want = torch.tensor([r[key] for r in hf.records], dtype=torch.float64)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4, msg=key)


class _HoldsLastAnswer:
    """The engine, holding back its last answers until the judge has been asked about the first ones (an engine
    still generating while an HTTP judge works); records whether that happened."""

    def __init__(self, engine, stub):
        self.engine, self.stub, self.judged_during_generation = engine, stub, False

    def __call__(self, *args):
        return self.engine(*args)

    def start(self, job_tokens=None):
        self.engine.start(job_tokens)

    def capture(self, *args, **kwargs):
        return self.engine.capture(*args, **kwargs)

    def stream(self, *args, **kwargs):
        import time

        answers = [a for finished in self.engine.stream(*args, **kwargs) for a in finished]
        yield answers[:4]
        deadline = time.monotonic() + 60
        while self.stub.count == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        self.judged_during_generation = self.stub.count > 0
        yield answers[4:]


def test_an_http_judge_scores_while_the_engine_generates(embedded, engine, tmp_path):
    from openai_stub import OpenAIStub, logprob_response

    from steerlib.traits.judges.llm import LLMJudge

    model, tok = embedded
    stub = OpenAIStub(lambda req: logprob_response({"60": 1.0})).start()
    try:
        judge = LLMJudge(stub.base_url, "stub-model", "Q: {question}\nA: {answer}\nRate 0-100.", concurrency=2)
        held = _HoldsLastAnswer(engine, stub)
        result = extract_trait(model, tok, "optimistic", tmp_path, judge=judge, config=ExtractionConfig(**CFG),
                               progress=False, log=lambda s: None, generate_texts=held)
    finally:
        stub.stop()
    assert held.judged_during_generation
    scores = read_records(tmp_path / "scores.jsonl")
    assert sorted(r["id"] for r in scores) == sorted(r["id"] for r in read_records(tmp_path / "responses.jsonl"))
    distinct = {(r["question"], r["response"]) for r in read_records(tmp_path / "responses.jsonl")}
    assert {r["score"] for r in scores} == {60.0} and stub.count == len(distinct)  # each answer judged once
    assert result.counts["pos"]["kept"] == 3


def test_answers_pooled_while_generated_equal_the_hf_capture_and_need_no_prefill(embedded, engine, samples):
    """``stream(pool=True)``: the same answers as without, and a ``capture`` of them
    reads the pools the decode steps made: no prefill request, and the HF capture's values. Cut answers (the
    ``max_new_tokens`` limit) and finished ones (an end-of-turn token) both."""
    from steerlib.core.pipeline import answers_in_order

    model, tok = embedded
    prompts = [*samples[0][:2], format_prompt(tok, "What is 2+2? Answer with a number only.", SYSTEM)]
    engine.clear_pools()
    try:
        plain = answers_in_order(engine, prompts, 12, 0.0, None)
        pooled = answers_in_order(engine, prompts, 12, 0.0, None, pool=True)
        assert pooled == plain
        # This engine prefills in chunks of 32 tokens (the pipeline's own engine does not, on CPU): vLLM's CPU
        # runner would fail inside the step on a seeded request; refused before anything is submitted.
        with pytest.raises(ValueError, match="seeded sampling on vLLM's CPU build needs whole-prompt prefill"):
            answers_in_order(engine, prompts, 12, 1.0, 7, pool=True)
        lengths = [len(tok(a, add_special_tokens=False)["input_ids"]) for a in pooled]
        assert max(lengths) == 12 and min(lengths) < 12, lengths  # some cut by the limit, some finished
        hits = engine.pool_hits
        requests = []
        original = engine._run

        def counting(reqs, **kwargs):
            requests.extend(reqs)
            return original(reqs, **kwargs)

        engine._run = counting
        try:
            acts = engine.capture(tok, prompts, pooled)
            other = engine.capture(tok, prompts[:1], [pooled[0] + " Indeed."])  # not generated: prefilled
        finally:
            del engine._run
        assert engine.pool_hits - hits == len(prompts)
        assert len(requests) == 1
        ref = capture_activations(model, tok, [*prompts, prompts[0]], [*pooled, pooled[0] + " Indeed."])
        assert acts.response_lengths == ref.response_lengths[:-1]
        for kind in POOLINGS:
            _close(acts.pooled[kind], ref.pooled[kind][:-1])
            _close(other.pooled[kind], ref.pooled[kind][-1:])
        _close(acts.token_norms, ref.token_norms[:-1])
    finally:
        engine.clear_pools()


def test_calibration_and_corpus_answers_through_the_engine_equal_the_hf_path(embedded, engine, optimism_vectors,
                                                                            tmp_path):
    """Calibration's reference answers and the SAE corpus's neutral answers from one engine submission: the HF
    path's greedy answers, so the same calibration (projections are captured on the HF model either way)."""
    from steerlib.sae.corpus import answer_samples
    from steerlib.steering.calibration import calibrate

    model, tok = embedded
    questions = [*QUESTIONS[:3], "What is 2+2? Answer with a number only."]
    kwargs = dict(layers=[8, 16], questions=questions, max_new_tokens=10, batch_size=3)
    hf = calibrate(model, tok, optimism_vectors, tmp_path / "hf" / "calibration.json", **kwargs)
    vl = calibrate(model, tok, optimism_vectors, tmp_path / "vllm" / "calibration.json", generate_texts=engine,
                   **kwargs)
    answers = {name: {r["id"]: r["response"] for r in read_records(tmp_path / name / "calibration.jsonl")}
               for name in ("hf", "vllm")}
    assert answers["vllm"] == answers["hf"]  # stored as they finished: the engine's order is not the questions'
    assert len(answers["hf"]) == 4
    assert (vl.n_answers, vl.n_tokens) == (hf.n_answers, hf.n_tokens)
    for layer in (8, 16):
        torch.testing.assert_close(torch.tensor(vl.percentiles[layer]), torch.tensor(hf.percentiles[layer]),
                                   rtol=0, atol=1e-4)
    want = answer_samples(model, tok, questions, max_new_tokens=10)
    assert answer_samples(model, tok, questions, max_new_tokens=10, generate_texts=engine) == want
