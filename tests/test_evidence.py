"""Prompt-shift experiment, judge-free inventory and the HTML report, on the embedded model."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from steerlib import build_ops, capture_activations, format_prompt, steer
from steerlib.evaluation.inventory import Inventory, administer, inventory_matrix
from steerlib.evaluation.prompt_shift import ShiftCheck, pearson, prompt_shift
from steerlib.evaluation.report import run_dose, write_report
from steerlib.extraction.sweep import layer_sweep

LAYER = 10  # the optimism_vectors fixture's layer


@pytest.fixture(scope="module")
def run_dir(embedded, optimism_vectors, tmp_path_factory):
    """An extraction-like run folder: the quick optimism vectors with a real sweep and counts in the metadata."""
    from helpers import OPTIMISTIC_REPLIES, PESSIMISTIC_REPLIES, QUICK_QUESTIONS

    model, tok = embedded
    prompts = [format_prompt(tok, q) for q in QUICK_QUESTIONS] * 2
    acts = capture_activations(model, tok, prompts, OPTIMISTIC_REPLIES + PESSIMISTIC_REPLIES)
    labels = torch.tensor([True] * 6 + [False] * 6)
    layers = list(range(acts.pooled["response_mean"].shape[1]))
    sweep = layer_sweep(optimism_vectors.vectors["response_mean"], layers, 30, acts.pooled["response_mean"], labels,
                        heldout=False)
    out = tmp_path_factory.mktemp("run")
    counts = {"pos": {"generated": 6, "kept": 6, "dropped": 0, "unscored": 0},
              "neg": {"generated": 6, "kept": 6, "dropped": 0, "unscored": 0}}
    meta = {**optimism_vectors.metadata, "counts": counts, "thresholds": {"positive": 50.0, "negative": 50.0},
            "judge": "hand-written replies"}
    type(optimism_vectors)(optimism_vectors.vectors, optimism_vectors.model_name, "optimistic", "mean_diff",
                           meta).save(out)
    sweep.save(out / "sweep.json")
    return out


@pytest.fixture(scope="module")
def shift(embedded, optimism_vectors, run_dir) -> ShiftCheck:
    model, tok = embedded
    return prompt_shift(model, tok, optimism_vectors, run_dir / "shiftcheck", n_questions=3, shots=(0, 1),
                        negative_shots=False, max_new_tokens=6)


def test_ladder_orders_last_prompt_projection(shift):
    by_name = {c.name: c for c in shift.conditions}
    li = shift.layers.index(LAYER)
    assert by_name["system +1.0"].mean_projection[li] > by_name["system -1.0"].mean_projection[li]
    assert [c.n for c in shift.conditions] == [3] * 6
    assert set(by_name) == {"system -1.0", "system -0.5", "system 0", "system +0.5", "system +1.0", "shots +1"}


def test_shift_correlation_matches_records(shift, run_dir):
    """r per layer equals numpy's Pearson r recomputed from the written records file."""
    rows = [json.loads(line) for line in (run_dir / "shiftcheck" / "records.jsonl").read_text().splitlines()]
    answers = [r for r in rows if r["kind"] == "answer"]
    assert len(answers) == 18 and sum(r["kind"] == "example" for r in rows) == 1
    li = shift.layers.index(LAYER)
    names = sorted({r["condition"] for r in answers})
    proj = [np.mean([r["projections"][li] for r in answers if r["condition"] == n]) for n in names]
    score = [np.mean([r["score"] for r in answers if r["condition"] == n]) for n in names]
    assert shift.r[li] == pytest.approx(np.corrcoef(proj, score)[0, 1], abs=1e-6)
    system = [i for i, n in enumerate(names) if n.startswith("system")]
    assert shift.r_family["system"][li] == pytest.approx(
        np.corrcoef([proj[i] for i in system], [score[i] for i in system])[0, 1], abs=1e-6)
    assert np.isnan(shift.r_family["shots"][li])  # one many-shot condition: no correlation to speak of
    single = np.corrcoef([r["projections"][li] for r in answers], [r["score"] for r in answers])[0, 1]
    assert shift.r_responses[li] == pytest.approx(single, abs=1e-6)
    assert shift.best_r == pytest.approx(np.nanmax(shift.r))
    assert np.isnan(pearson([1, 1, 1], [1, 2, 3]))
    assert ShiftCheck.load(run_dir / "shiftcheck").r == shift.r


def test_shift_resume_and_refusal(embedded, optimism_vectors, shift, run_dir, monkeypatch):
    model, tok = embedded
    import steerlib.evaluation.prompt_shift as sc

    def no_generation(*a, **k):
        raise AssertionError("a complete run must not generate again")

    monkeypatch.setattr(sc, "generate", no_generation)
    again = prompt_shift(model, tok, optimism_vectors, run_dir / "shiftcheck", n_questions=3, shots=(0, 1),
                         negative_shots=False, max_new_tokens=6)
    assert again.r == shift.r
    with pytest.raises(ValueError, match=r"holds results of a run with other settings \(max_new_tokens: 6 -> 7\)"):
        prompt_shift(model, tok, optimism_vectors, run_dir / "shiftcheck", n_questions=3, shots=(0, 1),
                     negative_shots=False, max_new_tokens=7)
    with pytest.raises(ValueError, match="n_questions must be within 3..20"):
        prompt_shift(model, tok, optimism_vectors, run_dir / "other", n_questions=2)


SMALL = {
    "name": "small", "options": ["1", "2", "3", "4", "5"],
    "template": "Statement: \"{statement}\"\nRate it 1 (strongly disagree) to 5 (strongly agree). One number.",
    "scales": {
        "openness": [{"text": "I love new ideas.", "key": "+"}, {"text": "Art bores me.", "key": "-"}],
        "neuroticism": [{"text": "I worry a lot.", "key": "+"}],
    },
}


def _hand_scores(model, tok, inv: Inventory) -> dict[str, float]:
    """Option probabilities from one unpadded forward per item, with token ids looked up independently."""
    option_ids = tok.convert_tokens_to_ids(list(inv.options))
    keyed = {}
    for item in inv.items:
        text = tok.apply_chat_template([{"role": "user", "content": inv.question(item)}], tokenize=False,
                                       add_generation_prompt=True)
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            p = torch.softmax(model(ids).logits[0, -1].double(), -1)[option_ids]
        rating = float(sum((k + 1) * p[k] for k in range(5)) / p.sum())
        keyed.setdefault(item.scale, []).append(rating if item.key == "+" else 6 - rating)
    return {s: float(np.mean(v)) for s, v in keyed.items()}


def test_inventory_equals_hand_computation(embedded, optimism_vectors):
    model, tok = embedded
    inv = Inventory.from_dict(SMALL)
    result = administer(model, tok, inv, batch_size=3)  # one left-padded batch
    hand = _hand_scores(model, tok, inv)
    assert result.scales == pytest.approx(hand, abs=1e-4)
    assert result.option_probs.sum(-1) == pytest.approx(torch.ones(3), abs=1e-5)
    # Under steering: same hand computation with the forward inside steer().
    ops = build_ops(model, optimism_vectors, LAYER, 0.5, relative=True)
    steered = administer(model, tok, inv, steering=ops)
    with steer(model, optimism_vectors, LAYER, 0.5, relative=True):
        hand_steered = _hand_scores(model, tok, inv)
    assert steered.scales == pytest.approx(hand_steered, abs=1e-4)
    assert abs(steered.scales["openness"] - result.scales["openness"]) > 1e-3


def test_inventory_file_and_options_errors(embedded, tmp_path):
    model, tok = embedded
    bad = {**SMALL, "scales": {"openness": [{"text": "I love new ideas.", "key": "R"}]}}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"bad.json: scale 'openness' item 0 needs a non-empty 'text' and a 'key'"):
        Inventory.load(path)
    with pytest.raises(ValueError, match="answer option 'agree strongly' is 2 tokens"):
        administer(model, tok, Inventory.from_dict({**SMALL, "options": ["no", "agree strongly"]}))
    builtin = Inventory.load("big_five")
    assert builtin.scales == ("openness", "conscientiousness", "extraversion", "agreeableness", "neuroticism")
    for scale in builtin.scales:
        keys = [it.key for it in builtin.items if it.scale == scale]
        assert len(keys) == 8 and keys.count("-") == 4


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or (
        "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


def test_report_is_self_contained_and_renders(embedded, optimism_vectors, run_dir, shift, tmp_path):
    model, tok = embedded
    page = write_report(run_dir, tmp_path / "before.html").read_text()
    assert "No dose-response in this run folder" in page and "No inventory matrix in this run folder" in page
    run_dose(model, tok, run_dir, [-0.5, 0.0, 0.5], n_questions=2, max_new_tokens=8, capability_items=1)
    small = Inventory.from_dict(SMALL)
    mat = inventory_matrix(model, tok, {"optimistic": optimism_vectors}, inventory=small, layer=LAYER)
    base = administer(model, tok, small)
    up = administer(model, tok, small, steering=build_ops(model, optimism_vectors, LAYER, 0.5, relative=True))
    assert mat.effects[0] == pytest.approx([up.scales[s] - base.scales[s] for s in small.scales], abs=1e-6)
    assert mat.diagnostics["option_mass"] == pytest.approx(np.mean(base.option_mass))
    mat.save(run_dir / "inventory.json")
    path = write_report(run_dir)
    page = path.read_text()
    for heading in ("Layer sweep", "Dose-response", "Prompt-induced shift", "Personality inventory",
                    "Kept and dropped"):
        assert heading in page
    assert "class=\"missing\"" not in page
    assert "capability accuracy (%)" in page and "of unsteered (" in page  # the dose section's capability axis
    assert f"puts {mat.diagnostics['option_mass']:.2f} of its next-token probability" in page
    assert f"Pearson r = <b>{shift.best_r:.2f}</b>" in page
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 5 and all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    assert not re.search(r'(src|href)="(http|//)', page)  # nothing fetched when opened
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed; the page was checked as text only")
    shot = tmp_path / "report.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--no-first-run", "--window-size=1100,2400", f"--screenshot={shot}", path.as_uri()],
                   check=True, capture_output=True, timeout=60)
    assert shot.read_bytes().startswith(b"\x89PNG") and shot.stat().st_size > 20_000
    if os.environ.get("STEERLIB_KEEP_SCREENSHOT"):  # for a person to look at
        shutil.copy(shot, os.environ["STEERLIB_KEEP_SCREENSHOT"])


def test_report_cli(run_dir, tmp_path):
    from typer.testing import CliRunner

    from steerlib.cli import app

    out = tmp_path / "cli.html"
    result = CliRunner().invoke(app, ["report", str(run_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output and "<h2>Layer sweep</h2>" in out.read_text()
    bad = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert bad.exit_code != 0
    assert "is not an extraction run folder (no vectors.json" in str(bad.exception)
