"""Trait definitions: the built-in library, validation messages, round trips, LLM-drafted traits."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
from helpers import RUBRIC, generated_reply
from openai_stub import text_response

from steerlib.traits.generate import extract_json_object, generate_trait
from steerlib.traits.judges import JudgeError
from steerlib.traits.library import (
    DEFAULT_COHERENCE_RUBRIC,
    InstructionPair,
    Trait,
    TraitError,
    fill_rubric,
    list_traits,
    load_trait,
)

BUILTINS = {
    "evil",
    "sycophantic",
    "hallucinating",
    "optimistic",
    "pessimistic",
    "impolite",
    "apathetic",
    "humorous",
    "openness",
    "conscientiousness",
    "extraversion",
    "agreeableness",
    "neuroticism",
}


def minimal(**overrides) -> dict:
    data = {
        "name": "tidy",
        "description": "Keeps things neat.",
        "instruction_pairs": [{"positive": "Be tidy.", "negative": "Be messy."}],
        "extraction_questions": ["How do you store socks?", "What is on your desk?"],
        "eval_questions": ["How do you pack a bag?"],
        "judge_rubric": RUBRIC,
    }
    data.update(overrides)
    return data


def write(tmp_path, data, name="x.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data, indent=2))
    return path


# -- built-in library -----------------------------------------------------------------------------


def test_builtin_names():
    assert set(list_traits()) == BUILTINS
    assert list_traits() == sorted(list_traits())


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_builtin_trait_is_complete(name):
    trait = load_trait(name)
    assert trait.name == name and trait.description.strip()
    assert len(trait.instruction_pairs) >= 5
    assert len(set(trait.instruction_pairs)) == len(trait.instruction_pairs)
    assert len(trait.extraction_questions) == 20 and len(trait.eval_questions) == 20
    assert len(set(trait.extraction_questions)) == 20 and len(set(trait.eval_questions)) == 20
    assert not set(trait.extraction_questions) & set(trait.eval_questions)
    for rubric in (trait.judge_rubric, trait.coherence_rubric):
        assert "{question}" in rubric and "{answer}" in rubric and "100" in rubric
    filled = trait.judge_prompt("QQQ", "AAA")
    assert "QQQ" in filled and "AAA" in filled and "{answer}" not in filled
    assert trait.judge_hint in (None, f"lexicon:{name}")


def test_optimistic_and_pessimistic_mirror_each_other():
    opt, pes = load_trait("optimistic"), load_trait("pessimistic")
    assert (opt.judge_hint, pes.judge_hint) == ("lexicon:optimistic", "lexicon:pessimistic")
    assert [(p.negative, p.positive) for p in opt.instruction_pairs] == [
        (p.positive, p.negative) for p in pes.instruction_pairs
    ]
    assert opt.eval_questions == pes.eval_questions
    # Short questions keep the tiny demo model on topic.
    assert max(len(q) for q in opt.extraction_questions + opt.eval_questions) < 80


def test_load_trait_variants(tmp_path):
    assert load_trait("Optimistic") == load_trait("optimistic")
    trait = load_trait("evil")
    assert load_trait(trait) is trait
    path = trait.save(tmp_path / "evil.json")
    assert load_trait(str(path)) == trait


# -- validation messages --------------------------------------------------------------------------


def test_invalid_json_reports_line(tmp_path):
    path = write(tmp_path, '{\n  "name": "x",\n  "description": oops\n}')
    with pytest.raises(TraitError, match=rf"^{re.escape(str(path))}: invalid JSON at line 3, column 18"):
        load_trait(path)


def test_missing_field(tmp_path):
    data = minimal()
    del data["judge_rubric"]
    path = write(tmp_path, data)
    with pytest.raises(TraitError, match=rf"^{re.escape(str(path))}: missing field 'judge_rubric'$"):
        Trait.load(path)


def test_wrong_type_names_field_and_item(tmp_path):
    path = write(tmp_path, minimal(eval_questions=["a?", "b?", 42]))
    expected = f"{path}: field 'eval_questions' must be a list of non-empty strings (item 3 is 42)"
    with pytest.raises(TraitError) as err:
        Trait.load(path)
    assert str(err.value) == expected
    with pytest.raises(
        TraitError, match=r"field 'extraction_questions' must be a list of non-empty strings \(got str\)"
    ):
        Trait.from_dict(minimal(extraction_questions="one question?"))
    with pytest.raises(TraitError, match=r"field 'name' must be a non-empty string"):
        Trait.from_dict(minimal(name=""))
    with pytest.raises(TraitError, match=r"a trait must be a JSON object, got list"):
        Trait.from_dict([1, 2])


def test_missing_slot(tmp_path):
    path = write(tmp_path, minimal(judge_rubric="Rate {question} from 0 to 100."))
    with pytest.raises(
        TraitError, match=rf"^{re.escape(str(path))}: judge_rubric lacks the \{{answer\}} slot$"
    ):
        Trait.load(path)
    with pytest.raises(TraitError, match=r"coherence_rubric lacks the \{question\} slot"):
        Trait.from_dict(minimal(coherence_rubric="Rate {answer} from 0 to 100."))
    with pytest.raises(TraitError, match=r"must ask for a score from 0 to 100"):
        Trait.from_dict(minimal(judge_rubric="Rate {question} {answer} from 1 to 10."))


def test_overlapping_questions(tmp_path):
    path = write(tmp_path, minimal(eval_questions=["How do you pack a bag?", "what is on your  desk?"]))
    with pytest.raises(
        TraitError,
        match=rf"^{re.escape(str(path))}: question 'what is on your  desk\?' appears in both "
        r"extraction_questions and eval_questions$",
    ):
        Trait.load(path)
    with pytest.raises(TraitError, match=r"field 'eval_questions' repeats question 'A\?' \(item 2\)"):
        Trait.from_dict(minimal(eval_questions=["A?", "A?"]))


def test_pairs_unknown_fields_and_direct_construction():
    with pytest.raises(TraitError, match=r"'instruction_pairs' item 1 needs a non-empty 'negative' string"):
        Trait.from_dict(minimal(instruction_pairs=[{"positive": "Be tidy."}]))
    with pytest.raises(TraitError, match=r"item 1 has identical positive and negative prompts"):
        Trait.from_dict(minimal(instruction_pairs=[["Same.", "Same."]]))
    assert Trait.from_dict(minimal(instruction_pairs=[["Be tidy.", "Be messy."]])).instruction_pairs == (
        InstructionPair("Be tidy.", "Be messy."),
    )
    with pytest.raises(TraitError, match=r"unknown field 'eval_question' \(known fields: name, "):
        Trait.from_dict({**minimal(), "eval_question": []})
    trait = Trait.from_dict(minimal())
    with pytest.raises(TraitError, match="appears in both"):
        dataclasses.replace(trait, eval_questions=trait.extraction_questions)


def test_unknown_trait_and_missing_file(tmp_path):
    with pytest.raises(TraitError) as err:
        load_trait("foo")
    assert str(err.value).startswith("unknown trait 'foo'; built-in traits are: agreeableness, apathetic, ")
    with pytest.raises(TraitError, match=r"trait file .*nope\.json not found"):
        load_trait(tmp_path / "nope.json")


# -- round trip -----------------------------------------------------------------------------------


def test_round_trip(tmp_path):
    trait = Trait.from_dict(minimal(judge_hint="lexicon:optimistic"))
    assert trait.coherence_rubric == DEFAULT_COHERENCE_RUBRIC
    assert "coherence_rubric" not in trait.to_dict()
    path = trait.save(tmp_path / "sub" / "tidy.json")
    assert Trait.load(path) == trait
    custom = dataclasses.replace(
        trait, coherence_rubric="Is it fluent? {question} {answer} 0-100", judge_hint=None
    )
    assert Trait.from_dict(custom.to_dict()) == custom
    assert "judge_hint" not in custom.to_dict()
    for name in BUILTINS:
        builtin = load_trait(name)
        assert Trait.from_json(builtin.to_json()) == builtin


def test_fill_rubric_is_single_pass():
    rubric = 'Q={question} A={answer} {"format": "json"} 0-100'
    assert fill_rubric(rubric, "has {answer}", "x") == 'Q=has {answer} A=x {"format": "json"} 0-100'


# -- generate_trait against the stub server -------------------------------------------------------


def test_generate_trait(stub, tmp_path):
    server = stub(lambda req: text_response(generated_reply()))
    trait = generate_trait("sarcastic", "Mocking irony.", server.base_url, "drafter", api_key="k")
    assert trait.name == "sarcastic" and trait.description == "Mocking irony."
    assert len(trait.instruction_pairs) == 5
    assert trait.extraction_questions[:4] == tuple(f"Everyday question number {i}?" for i in range(4))
    assert len(trait.extraction_questions) == 20 and len(trait.eval_questions) == 20
    assert trait.eval_questions[-1] == "Everyday question number 39?"
    assert trait.judge_rubric == RUBRIC
    request = server.requests[0]
    assert request["model"] == "drafter" and "sarcastic" in request["messages"][-1]["content"]
    assert "40 distinct" in request["messages"][-1]["content"]
    assert server.headers[0]["authorization"] == "Bearer k"
    assert Trait.load(trait.save(tmp_path / "sarcastic.json")) == trait


def test_generate_trait_reports_what_the_endpoint_got_wrong(stub):
    server = stub(lambda req: text_response(generated_reply(n_questions=30)))
    with pytest.raises(
        TraitError,
        match=r"did not produce a usable trait after 1 attempt\(s\): the reply has 30 "
        r"distinct questions, 40 were asked for",
    ):
        generate_trait("sarcastic", "Mocking irony.", server.base_url, "drafter", attempts=1)
    server = stub(lambda req: text_response(generated_reply(rubric="Rate {question} from 0 to 100")))
    with pytest.raises(TraitError, match=r"judge_rubric lacks the \{answer\} slot"):
        generate_trait("sarcastic", "Mocking irony.", server.base_url, "drafter", attempts=1)
    server = stub(lambda req: text_response(generated_reply(n_pairs=2)))
    with pytest.raises(TraitError, match=r"the reply has 2 instruction pairs, 5 were asked for"):
        generate_trait("sarcastic", "Mocking irony.", server.base_url, "drafter", attempts=1)
    server = stub(lambda req: text_response("I'd rather not."))
    with pytest.raises(TraitError, match=r"no JSON object found"):
        generate_trait("sarcastic", "Mocking irony.", server.base_url, "drafter", attempts=1)


def test_generate_trait_retries_bad_replies_and_http_errors(stub):
    replies = iter([text_response('{"questions": [1, 2'), text_response(generated_reply())])
    server = stub(lambda req: next(replies), fail_first=1, fail_status=503)
    trait = generate_trait("sarcastic", "Mocking irony.", server.base_url, "drafter", backoff=0.01)
    assert len(trait.eval_questions) == 20
    assert server.count == 3  # one 503, one unusable reply, one good reply
    broken = stub(fail_first=10)
    with pytest.raises(JudgeError, match=r"trait generation endpoint .* unreachable after 1 retries"):
        generate_trait("sarcastic", "Mocking irony.", broken.base_url, "drafter", max_retries=1, backoff=0.01)


def test_extract_json_object():
    assert extract_json_object('{"a": 1}') == {"a": 1}
    assert extract_json_object('```json\n{"a": 1}\n```') == {"a": 1}
    assert extract_json_object('Here you go: {"a": {"b": 2}} Hope it helps') == {"a": {"b": 2}}
    with pytest.raises(TraitError, match=r"invalid JSON at line 1"):
        extract_json_object('{"a": }')
