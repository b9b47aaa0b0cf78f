"""Judges: logprob scoring against a real local HTTP stub, lexicon, callable, self-judging, factory."""

from __future__ import annotations

import math
import re
import socket
from types import SimpleNamespace

import pytest
import torch
from openai_stub import logprob_response
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from steerlib.traits.judges import (
    CallableJudge,
    Judge,
    JudgeError,
    LexiconJudge,
    LLMJudge,
    SelfJudge,
    integer_value,
    make_judge,
    weighted_score,
)
from steerlib.traits.library import load_trait

RUBRIC = "Q: {question}\nA: {answer}\nRate from 0 to 100. Reply with a number only."



def answer_of(request: dict) -> str:
    """The answer slot's content, recovered from the filled RUBRIC."""
    return re.search(r"\nA: (.*)\nRate", request["messages"][0]["content"], re.DOTALL).group(1)


def echo_score(request: dict) -> dict:
    """Stub handler: the answer is a number; reply with all mass on it."""
    return logprob_response({answer_of(request): 1.0})


# -- scoring rule -----------------------------------------------------------------------------------


def test_integer_value():
    assert [integer_value(t) for t in ["7", " 42", "100\n", "0"]] == [7, 42, 100, 0]
    assert [integer_value(t) for t in ["101", "07", "-5", "5.0", "½", "٣", "", "ten"]] == [None] * 8


def test_weighted_score_exact():
    assert weighted_score({80: 0.5, 90: 0.25}) == pytest.approx((40 + 22.5) / 0.75)
    assert weighted_score({70: 0.2}, min_mass=0.25) is None
    assert weighted_score({70: 0.2}, min_mass=0.1) == pytest.approx(70)
    assert weighted_score({}, min_mass=0.0) is None


def test_llm_judge_weighted_mean_and_request_shape(stub):
    server = stub(
        lambda req: logprob_response({"80": 0.5, "90": 0.25, "hello": 0.1, " 100": 0.05, "abc": 0.1})
    )
    judge = LLMJudge(server.base_url, "judge-model", RUBRIC, api_key="sk-test")
    # integer mass 0.8; mean (80*.5 + 90*.25 + 100*.05) / .8
    assert judge.score("Why?", "Because.") == pytest.approx(67.5 / 0.8, abs=1e-9)
    body = server.requests[0]
    assert body["model"] == "judge-model"
    assert body["max_tokens"] == 1 and body["temperature"] == 0
    assert body["logprobs"] is True and body["top_logprobs"] == 20
    assert body["messages"] == [
        {"role": "user", "content": "Q: Why?\nA: Because.\nRate from 0 to 100. Reply with a number only."}
    ]
    assert server.headers[0]["authorization"] == "Bearer sk-test"


def test_llm_judge_same_value_tokens_add_up(stub):
    server = stub(lambda req: logprob_response({"50": 0.3, " 50": 0.2, "0": 0.5}))
    assert LLMJudge(server.base_url, "m", RUBRIC).score("q", "a") == pytest.approx(25.0)


def test_llm_judge_none_below_min_mass(stub):
    server = stub(lambda req: logprob_response({"70": 0.2, "I": 0.7}))
    assert LLMJudge(server.base_url, "m", RUBRIC).score("q", "a") is None
    assert LLMJudge(server.base_url, "m", RUBRIC, min_mass=0.1).score("q", "a") == pytest.approx(70)


def test_llm_judge_no_logprobs_is_clear_error(stub):
    server = stub(lambda req: {"choices": [{"message": {"content": "70"}}]})
    with pytest.raises(JudgeError, match="no logprobs"):
        LLMJudge(server.base_url, "m", RUBRIC).score("q", "a")


# -- retries and errors -----------------------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 503, 429])
def test_llm_judge_retries_then_succeeds(stub, status):
    server = stub(lambda req: logprob_response({"60": 1.0}), fail_first=2, fail_status=status)
    judge = LLMJudge(server.base_url, "m", RUBRIC, backoff=0.01)
    assert judge.score("q", "a") == pytest.approx(60)
    assert server.count == 3


def test_llm_judge_fails_after_max_retries(stub):
    server = stub(fail_first=100, fail_status=500)
    judge = LLMJudge(server.base_url, "m", RUBRIC, max_retries=2, backoff=0.01)
    with pytest.raises(
        JudgeError,
        match=r"judge endpoint http://127\.0\.0\.1:\d+/v1/chat/completions unreachable "
        r"after 2 retries: HTTP 500",
    ):
        judge.score("q", "a")
    assert server.count == 3  # first attempt + 2 retries


def test_llm_judge_client_error_is_not_retried(stub):
    server = stub(lambda req: (404, {"error": {"message": "model 'nope' does not exist"}}))
    with pytest.raises(JudgeError, match=r"rejected the request: HTTP 404: .*does not exist"):
        LLMJudge(server.base_url, "nope", RUBRIC, backoff=0.01).score("q", "a")
    assert server.count == 1


def test_llm_judge_unreachable_endpoint():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    judge = LLMJudge(f"http://127.0.0.1:{port}/v1", "m", RUBRIC, max_retries=1, backoff=0.01, timeout=2)
    with pytest.raises(
        JudgeError,
        match=rf"http://127\.0\.0\.1:{port}/v1/chat/completions unreachable after 1 "
        r"retries: ConnectError",
    ):
        judge.score("q", "a")


def test_llm_judge_rejects_rubric_without_slots():
    with pytest.raises(JudgeError, match=r"lacks the \{answer\} slot"):
        LLMJudge("http://127.0.0.1:1/v1", "m", "Rate {question} from 0 to 100")


# -- cache ----------------------------------------------------------------------------------------


def test_llm_judge_cache_hits_make_no_requests_and_persist(stub, tmp_path):
    server = stub(echo_score)
    judge = LLMJudge(server.base_url, "m", RUBRIC, cache_dir=tmp_path)
    assert judge.score("q", "42") == pytest.approx(42)
    assert judge.score("q", "42") == pytest.approx(42)
    assert server.count == 1
    fresh = LLMJudge(server.base_url, "m", RUBRIC, cache_dir=tmp_path)  # a rerun: new instance, same folder
    assert fresh.score_many([("q", "42"), ("q", "42")]) == [pytest.approx(42)] * 2
    assert server.count == 1
    assert fresh.score("q", "43") == pytest.approx(43)
    assert server.count == 2
    # The key covers the model and rubric: either change means a new request.
    LLMJudge(server.base_url, "other", RUBRIC, cache_dir=tmp_path).score("q", "42")
    LLMJudge(server.base_url, "m", RUBRIC + " ", cache_dir=tmp_path).score("q", "42")
    assert server.count == 4
    assert len((tmp_path / LLMJudge.CACHE_FILE).read_text().splitlines()) == 4


def test_llm_judge_cache_keeps_mass_so_min_mass_applies_on_hits(stub, tmp_path):
    server = stub(lambda req: logprob_response({"70": 0.2, "no": 0.8}))
    assert LLMJudge(server.base_url, "m", RUBRIC, cache_dir=tmp_path).score("q", "a") is None
    again = LLMJudge(server.base_url, "m", RUBRIC, cache_dir=tmp_path, min_mass=0.1)
    assert again.score("q", "a") == pytest.approx(70)
    assert server.count == 1


def test_llm_judge_cache_survives_a_torn_line(stub, tmp_path):
    server = stub(echo_score)
    LLMJudge(server.base_url, "m", RUBRIC, cache_dir=tmp_path).score("q", "5")
    with (tmp_path / LLMJudge.CACHE_FILE).open("a") as f:
        f.write('{"key": "abc", "sco')  # a run killed mid-write
    assert LLMJudge(server.base_url, "m", RUBRIC, cache_dir=tmp_path).score("q", "5") == pytest.approx(5)
    assert server.count == 1


# -- concurrency ----------------------------------------------------------------------------------


def test_llm_judge_score_many_runs_concurrently_and_keeps_order(stub):
    server = stub(echo_score, delay=0.2)
    judge = LLMJudge(server.base_url, "m", RUBRIC, concurrency=8)
    pairs = [("q", str(i)) for i in range(16)]
    assert judge.score_many(pairs) == [pytest.approx(i) for i in range(16)]
    assert server.count == 16
    assert 4 <= server.max_in_flight <= 8


def test_llm_judge_score_many_dedupes_and_reports_failure(stub, tmp_path):
    server = stub(echo_score)
    judge = LLMJudge(server.base_url, "m", RUBRIC, cache_dir=tmp_path)
    assert judge.score_many([("q", "1"), ("q", "2"), ("q", "1")]) == [1.0, 2.0, 1.0]
    assert server.count == 2
    broken = stub(fail_first=100)
    judge = LLMJudge(broken.base_url, "m", RUBRIC, max_retries=0, backoff=0.0)
    with pytest.raises(JudgeError, match="unreachable after 0 retries"):
        judge.score_many([("q", "1"), ("q", "2")])


# -- lexicon / callable ---------------------------------------------------------------------------


def test_lexicon_judge_direction():
    happy = "What a wonderful, bright future! I'm so excited and hopeful, everything will be great."
    sad = "This is terrible. Everything is hopeless, awful and miserable, and it will only get worse."
    opt, pes = LexiconJudge("optimistic"), LexiconJudge("pessimistic")
    assert opt.score("ignored", happy) > 80 > 20 > opt.score("ignored", sad)
    assert pes.score("q", happy) == pytest.approx(100 - opt.score("q", happy))
    assert opt.score("q", "") == pytest.approx(50)
    assert opt.score_many([("q", happy), ("q", sad)]) == [opt.score("q", happy), opt.score("q", sad)]
    with pytest.raises(JudgeError, match="polarity"):
        LexiconJudge("cheerful")


def test_callable_judge():
    judge = CallableJudge(lambda q, a: len(a))
    assert judge.score("q", "abcd") == 4.0
    assert judge.score_many([("q", ""), ("q", "ab")]) == [0.0, 2.0]
    assert CallableJudge(lambda q, a: None).score("q", "a") is None
    assert CallableJudge(lambda q, a: math.nan).score("q", "a") is None
    with pytest.raises(JudgeError, match=r"outside \[0, 100\]"):
        CallableJudge(lambda q, a: 140).score("q", "a")
    assert isinstance(judge, Judge)


# -- factory --------------------------------------------------------------------------------------


@pytest.fixture
def no_judge_env(monkeypatch):
    for var in ("STEERLIB_JUDGE_BASE_URL", "OPENAI_BASE_URL", "OPENAI_API_KEY", "STEERLIB_JUDGE_MODEL"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_make_judge_lexicon_and_auto_hint(no_judge_env):
    optimistic = load_trait("optimistic")
    for spec in ("lexicon", "auto", "lexicon:optimistic"):
        judge = make_judge(spec, optimistic)
        assert isinstance(judge, LexiconJudge) and judge.polarity == "optimistic"
    assert make_judge("auto", "pessimistic").polarity == "pessimistic"
    assert make_judge("lexicon:pessimistic", "evil").polarity == "pessimistic"


def test_make_judge_errors(no_judge_env):
    evil = load_trait("evil")
    with pytest.raises(JudgeError, match=r"no lexicon polarity; pass 'lexicon:optimistic'"):
        make_judge("lexicon", evil)
    with pytest.raises(
        JudgeError, match=r"no judge configured for trait 'evil'.*STEERLIB_JUDGE_BASE_URL.*'self'"
    ):
        make_judge("auto", evil)
    with pytest.raises(JudgeError, match=r"needs an endpoint: pass base_url or set STEERLIB_JUDGE_BASE_URL"):
        make_judge("openai:gpt-4.1-mini", evil)
    with pytest.raises(JudgeError, match="which judge model"):
        make_judge("openai", evil, base_url="http://127.0.0.1:1/v1")
    with pytest.raises(JudgeError, match="needs the loaded model and tokenizer"):
        make_judge("self", evil)
    with pytest.raises(JudgeError, match=r"unknown judge 'gpt4'; use 'lexicon'"):
        make_judge("gpt4", evil)
    with pytest.raises(JudgeError, match="cannot apply a rubric"):
        make_judge("lexicon:optimistic", evil, rubric=evil.coherence_rubric)
    with pytest.raises(TypeError, match="unexpected options: colour"):
        make_judge("lexicon:optimistic", evil, colour="red")


def test_make_judge_openai(no_judge_env, stub, tmp_path):
    server = stub(echo_score)
    evil = load_trait("evil")
    judge = make_judge("openai:judge-x", evil, base_url=server.base_url, cache_dir=tmp_path, batch_size=3)
    assert isinstance(judge, LLMJudge) and judge.model == "judge-x" and judge.rubric == evil.judge_rubric
    no_judge_env.setenv("STEERLIB_JUDGE_BASE_URL", server.base_url)
    no_judge_env.setenv("STEERLIB_JUDGE_MODEL", "judge-y")
    auto = make_judge("auto", evil, rubric=evil.coherence_rubric)
    assert isinstance(auto, LLMJudge) and auto.model == "judge-y" and auto.rubric == evil.coherence_rubric
    assert auto.base_url == server.base_url
    # The optimistic hint wins for the trait score, but coherence needs an LLM.
    assert isinstance(make_judge("auto", "optimistic"), LexiconJudge)
    assert isinstance(
        make_judge("auto", "optimistic", rubric=load_trait("optimistic").coherence_rubric), LLMJudge
    )


# -- self judge (offline tokenizer + scripted bigram model) ---------------------------------------

SPECIALS = ["<pad>", "</s>", "<unk>", "<|user|>", "<|assistant|>"]
TEMPLATE = "{% for m in messages %}<|{{ m.role }}|> {{ m.content }} {% endfor %}<|assistant|>"


def make_tokenizer(whole_numbers: bool) -> PreTrainedTokenizerFast:
    """Offline word-level tokenizer: digits split one by one, or every 0..100 a single token."""
    words = ["hmm", "Rate", "from", "to", "Q:", "A:"]
    numbers = [str(i) for i in range(101)] if whole_numbers else [str(i) for i in range(10)]
    vocab = {t: i for i, t in enumerate(SPECIALS + words + numbers)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    splitters = [pre_tokenizers.WhitespaceSplit()]
    if not whole_numbers:
        splitters.append(pre_tokenizers.Digits(individual_digits=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(splitters)
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    out.chat_template = TEMPLATE
    return out


class Bigram(torch.nn.Module):
    """Next-token distribution depends only on the current token: lets tests script exact probabilities."""

    def __init__(self, tokenizer, rows: dict[str, dict[str, float]]):
        super().__init__()
        vocab = tokenizer.get_vocab()
        probs = torch.zeros(len(vocab), len(vocab))
        probs[:, vocab["</s>"]] = 1.0  # default: stop
        for current, nxt in rows.items():
            probs[vocab[current]] = 0.0
            for token, p in nxt.items():
                probs[vocab[current], vocab[token]] = p
        self.log_table = torch.nn.Parameter(probs.clamp_min(1e-12).log(), requires_grad=False)

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        return SimpleNamespace(logits=self.log_table[input_ids])


def test_self_judge_whole_number_tokens_exact():
    tok = make_tokenizer(whole_numbers=True)
    model = Bigram(tok, {"<|assistant|>": {"85": 0.5, "100": 0.1, "7": 0.1, "hmm": 0.3}})
    judge = SelfJudge(model, tok, RUBRIC)
    assert judge.reader.mode == "whole"
    assert judge.score("q", "a") == pytest.approx((85 * 0.5 + 100 * 0.1 + 7 * 0.1) / 0.7, abs=1e-4)
    low = Bigram(tok, {"<|assistant|>": {"85": 0.2, "hmm": 0.8}})
    assert SelfJudge(low, tok, RUBRIC).score("q", "a") is None
    assert SelfJudge(low, tok, RUBRIC, min_mass=0.1).score("q", "a") == pytest.approx(85, abs=1e-4)


def test_self_judge_follows_split_digits_exact():
    tok = make_tokenizer(whole_numbers=False)
    model = Bigram(
        tok,
        {
            "<|assistant|>": {"1": 0.2, "7": 0.3, "0": 0.1, "hmm": 0.4},
            "1": {"0": 0.5, "2": 0.25, "</s>": 0.25},  # "1" ends with p .25
            "0": {"0": 0.4, "</s>": 0.6},  # after "10": "100" with p .4
            "7": {"5": 0.5, "</s>": 0.5},
        },
    )
    judge = SelfJudge(model, tok, RUBRIC)
    assert judge.reader.mode == "digits"
    dist = judge.distributions([("q", "a")])[0]
    expected = {0: 0.1, 1: 0.05, 10: 0.06, 100: 0.04, 12: 0.05, 7: 0.15, 75: 0.15}
    for value in range(101):
        assert dist[value] == pytest.approx(expected.get(value, 0.0), abs=1e-6), value
    total = sum(v * p for v, p in expected.items()) / sum(expected.values())
    assert judge.score("q", "a") == pytest.approx(total, abs=1e-4)  # 29.25


@pytest.mark.parametrize("whole_numbers", [False, True])
def test_self_judge_batched_and_cached_match_one_by_one(whole_numbers):
    """Left padding, position ids and the KV-cache branch path must not change any probability."""
    tok = make_tokenizer(whole_numbers=whole_numbers)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    pairs = [("q", "hmm"), ("Rate from 1 to 9", "hmm hmm hmm hmm 4 4 2"), ("q q q q q q q q q q q", "A: 7")]
    reference = SelfJudge(model, tok, RUBRIC, batch_size=1, min_mass=0.0, use_cache=False)
    batched = SelfJudge(model, tok, RUBRIC, batch_size=8, min_mass=0.0)
    one_by_one = [reference.distributions([p])[0] for p in pairs]
    together = batched.distributions(pairs)
    for a, b in zip(one_by_one, together, strict=True):
        assert 0.0 < sum(a.values()) <= 1.0 + 1e-5
        for value in range(101):
            assert a[value] == pytest.approx(b[value], abs=1e-5)
    scores = batched.score_many(pairs)
    assert all(s is not None and 0 <= s <= 100 for s in scores)
    prefixed = SelfJudge(model, tok, RUBRIC, answer_prefix=" hmm")
    assert prefixed._prompt_ids("q", "a")[-1] == tok.get_vocab()["hmm"]
    judge = make_judge(
        "self", load_trait("evil"), model=model, tokenizer=tok, batch_size=3, answer_prefix=" hmm"
    )
    assert isinstance(judge, SelfJudge) and judge.batch_size == 3 and judge.answer_prefix == " hmm"


def test_self_judge_rejects_tokenizer_without_numbers():
    tok = make_tokenizer(whole_numbers=False)
    vocab = {t: i for i, t in enumerate(SPECIALS + ["hmm"])}
    bare = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
        pad_token="<pad>",
        unk_token="<unk>",
    )
    with pytest.raises(JudgeError, match="neither a token for every integer"):
        SelfJudge(Bigram(tok, {}), bare, RUBRIC)
