"""The capability axis (``steerlib.evaluation.capability``): the shipped set, its scoring, and what steering does
to it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from steerlib.evaluation.capability import (
    CapabilityProbe,
    answer_nll,
    choice_loglikelihoods,
    load_capability_set,
)
from steerlib.steering.steer import build_ops

ROOT = Path(__file__).resolve().parents[1]


def _generator():
    spec = importlib.util.spec_from_file_location("make_capability_set", ROOT / "scripts" / "make_capability_set.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_frozen_set_is_what_the_generator_makes():
    gen = _generator()
    shipped = (ROOT / "steerlib" / "data" / "capability" / "capability.jsonl").read_text()
    assert gen.render(gen.build()) == shipped
    items = load_capability_set()
    assert len(items) == 120 and len({i.id for i in items}) == 120
    kinds = {i.kind for i in items}
    assert kinds == {"arithmetic", "copying", "ordering", "facts", "sequence", "alphabet"}
    for item in items:
        assert item.question.endswith("\nAnswer:") and all(c.startswith(" ") for c in item.choices)
        assert len(set(item.choices)) == len(item.choices) >= 3
    sums = [i for i in items if "plus" in i.question]
    for item in sums:  # the answer key is right
        a, b = (int(x) for x in item.question.removeprefix("What is ").split("?")[0].split(" plus "))
        assert item.choices[item.answer] == f" {a + b}"
    assert [i.id for i in load_capability_set(kinds=["copying"], limit=3)] == [f"copying-0{n}" for n in range(3)]


def test_a_bad_item_file_is_one_line(tmp_path):
    bad = tmp_path / "items.jsonl"
    bad.write_text('{"id": "a", "kind": "k", "question": "q", "choices": [" x", " y"], "answer": 2}\n')
    with pytest.raises(ValueError, match=r"line 1: answer 2 is not one of 2 choices"):
        load_capability_set(bad)
    bad.write_text('{"id": "a", "kind": "k", "choices": [" x", " y"], "answer": 0}\n')
    with pytest.raises(ValueError, match=r"line 1: not an item"):
        load_capability_set(bad)


def test_choice_loglikelihoods_equal_one_pass_per_choice(embedded, optimism_vectors):
    """Batched, padded scoring under steering equals one unpadded forward pass per (question, choice)."""
    model, tok = embedded
    items = load_capability_set(kinds=["arithmetic", "facts"], limit=1)
    ops = build_ops(model, optimism_vectors, 10, 4.0)
    got = choice_loglikelihoods(model, tok, items, ops, batch_size=3)
    from steerlib.steering.steer import ResidualEditor

    for item, row in zip(items, got, strict=True):
        for choice, value in zip(item.choices, row, strict=True):
            ctx = tok(item.question, add_special_tokens=False)["input_ids"]
            whole = tok(item.question + choice, add_special_tokens=False)["input_ids"]
            assert whole[:len(ctx)] == ctx
            with torch.no_grad(), ResidualEditor(model, ops):
                lp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
            want = sum(float(lp[q - 1, whole[q]]) for q in range(len(ctx), len(whole)))
            assert value == pytest.approx(want, abs=1e-4)


def test_strong_steering_costs_capability(embedded, optimism_vectors):
    model, tok = embedded
    probe = CapabilityProbe(model, tok, load_capability_set(kinds=["copying"], limit=4),
                            questions=["What is the water cycle?", "Describe how to boil an egg."], max_new_tokens=12)
    plain = probe()
    assert plain.accuracy == 1.0 and 1.0 < plain.perplexity < 5.0  # the model copies words; its own answers are likely
    nll, n = answer_nll(model, tok, probe.prompts, probe.answers)
    assert plain.perplexity == pytest.approx(float(torch.tensor(nll / n).exp()))
    broken = probe(build_ops(model, optimism_vectors, 10, 2.0, relative=True))
    assert broken.perplexity > 2 * plain.perplexity and broken.accuracy < plain.accuracy, broken
    with pytest.raises(ValueError, match="positions='response' cannot be scored"):
        probe(build_ops(model, optimism_vectors, 10, 4.0, positions="response"))


def test_dose_response_reports_capability_beside_the_trait(embedded, optimism_vectors, tmp_path):
    from steerlib.core.chat import format_prompt
    from steerlib.steering.dose import DoseResponse, dose_response
    from steerlib.steering.steer import build_readout

    model, tok = embedded
    seen = []

    def probe(ops):
        seen.append([op.coef for op in ops])
        return _Cost({1: 0.7, 2: 0.6, 3: 0.5}[len(seen)], 2.0 + len(seen))

    readout = build_readout(model, {"optimistic": optimism_vectors}, [10])
    dose = dose_response(model, tok, [format_prompt(tok, "Name a colour.")], optimism_vectors, 10, [-4.0, 0.0, 4.0],
                         readout=readout, max_new_tokens=2, capability=probe, plot_path=tmp_path / "dose.png")
    assert seen == [[], [-4.0], [4.0]]  # the unsteered baseline once, then each steered coefficient
    assert dose.capability_base == pytest.approx(0.7)
    assert dose.capability == pytest.approx([0.6, 0.7, 0.5]) and dose.perplexity == [4.0, 3.0, 5.0]
    assert dose.capability_drops() == [-4.0, 4.0]  # 0.6 and 0.5 are below 90% of 0.7
    table = dose.format()
    assert "capability  perplexity" in table and "   60.0%        4.00" in table
    assert table.splitlines()[-1] == "capability below 90% of unsteered (70.0%) at coef -4, 4"
    assert (tmp_path / "dose.png").stat().st_size > 0
    kept = DoseResponse(dose.coefs, dose.scores, dose.projections, dose.samples, 10, [0.7, 0.7, 0.65],
                        [3.0, 3.0, 3.1], 0.7)
    assert kept.format().splitlines()[-1] == "capability stays within 90% of unsteered (70.0%) at every coefficient"


class _Cost:
    def __init__(self, accuracy: float, perplexity: float):
        self.accuracy, self.perplexity = accuracy, perplexity
