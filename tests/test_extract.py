"""The extraction pipeline end to end on the embedded model, its resume path and its outputs."""

from __future__ import annotations

import json

import pytest
import torch

import steerlib.extraction.extract as extract_mod
from steerlib import ExtractionConfig, LexiconJudge, TraitVectors, extract_trait, load_trait
from steerlib.extraction.sweep import cohens_d, mean_difference, recommend_layer
from steerlib.store.results import read_records
from steerlib.traits.judges import CallableJudge

CFG = dict(max_pairs=1, max_questions=3, max_new_tokens=10, batch_size=4)


class CountingJudge(LexiconJudge):
    def __init__(self):
        super().__init__("optimistic")
        self.calls = 0

    def score(self, question, answer):
        self.calls += 1
        return super().score(question, answer)


@pytest.fixture(scope="module")
def first_run(embedded, tmp_path_factory):
    model, tok = embedded
    out = tmp_path_factory.mktemp("extract")
    judge = CountingJudge()
    # 10-token answers are too short for the lexicon to score reliably: keep everything here; filtering
    # itself is tested below.
    cfg = ExtractionConfig(**CFG, pos_threshold=0, neg_threshold=100)
    result = extract_trait(model, tok, "optimistic", out, judge=judge, config=cfg, progress=False,
                           log=lambda s: None)
    return result, out, judge, cfg


def test_outputs_and_metadata(first_run, embedded):
    result, out, judge, _ = first_run
    model = embedded.model
    n_pos = model.config.num_hidden_layers + 1
    assert judge.calls == 12  # 1 pair x 3 questions x 2 polarities x (extract + eval)
    for name in ("responses.jsonl", "scores.jsonl", "vectors.safetensors", "vectors.json", "sweep.json",
                 "sweep.png", "probe.safetensors", "summary.txt"):
        assert (out / name).is_file(), name
    tv = TraitVectors.load(out, model=model)
    assert set(tv.vectors) == {"response_mean", "prompt_mean", "prompt_last"}
    assert tv.vectors["response_mean"].shape == (n_pos, 576)
    meta = json.loads((out / "vectors.json").read_text())
    assert meta["trait"] == "optimistic" and meta["method"] == "mean_diff"
    assert meta["counts"]["pos"]["generated"] == 3
    assert meta["counts"]["pos"]["kept"] + meta["counts"]["pos"]["dropped"] == 3
    assert 7 <= meta["recommended_layer"] <= 23
    assert len(meta["residual_norms"]) == n_pos and all(x > 0 for x in meta["residual_norms"][1:])
    assert result.sweep.evaluated_on == "heldout"
    assert len(result.sweep.auroc) == n_pos


def test_vector_is_mean_difference_of_kept_activations(first_run, embedded):
    """Recompute one layer by hand from the saved responses and scores."""
    result, out, _, cfg = first_run
    model, tok = embedded
    rows = [r for r in extract_mod.load_responses(out) if r["split"] == "extract"]
    kept = [r for r in rows if extract_mod._keep(r, r, cfg)]
    acts = extract_mod._capture(model, tok, kept, [12], cfg, progress=False)
    labels = torch.tensor([r["polarity"] == "pos" for r in kept])
    expected = mean_difference(acts.pooled["response_mean"], labels)[0]
    torch.testing.assert_close(result.vectors.get(12), expected, atol=1e-4, rtol=1e-4)


def test_resume_redoes_only_missing_work(first_run, embedded, monkeypatch):
    result, out, _, cfg = first_run
    model, tok = embedded
    scores = (out / "scores.jsonl").read_text().splitlines()
    # Drop the last three scores and leave a torn line, as a killed run would.
    (out / "scores.jsonl").write_text("\n".join(scores[:-3]) + "\n" + scores[-3][:15])

    def no_generation(*args, **kwargs):
        raise AssertionError("responses were regenerated")

    monkeypatch.setattr(extract_mod, "generate", no_generation)
    judge = CountingJudge()
    with pytest.warns(UserWarning, match="half-written line"):
        again = extract_trait(model, tok, "optimistic", out, judge=judge, config=cfg, progress=False,
                              log=lambda s: None)
    assert judge.calls == 3
    torch.testing.assert_close(again.vectors.vectors["response_mean"], result.vectors.vectors["response_mean"])


def test_interrupted_generation_resumes(embedded, tmp_path, monkeypatch):
    model, tok = embedded
    real = extract_mod.generate
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # killed during the second batch
        return real(*args, **kwargs)

    monkeypatch.setattr(extract_mod, "generate", flaky)
    cfg = ExtractionConfig(**CFG, evaluate=False, pos_threshold=0, neg_threshold=100)
    judge = CallableJudge(lambda q, a: 50.0)
    with pytest.raises(KeyboardInterrupt):
        extract_trait(model, tok, "optimistic", tmp_path, judge=judge, config=cfg, progress=False)
    first = {r["id"]: r for r in read_records(tmp_path / "responses.jsonl")}
    assert len(first) == 4
    monkeypatch.setattr(extract_mod, "generate", real)
    extract_trait(model, tok, "optimistic", tmp_path, judge=judge, config=cfg, progress=False, log=lambda s: None)
    done = {r["id"]: r for r in read_records(tmp_path / "responses.jsonl")}
    assert len(done) == 6
    assert all(done[k]["response"] == v["response"] for k, v in first.items())


def test_too_few_kept_is_a_clear_error(embedded, tmp_path):
    model, tok = embedded
    cfg = ExtractionConfig(**CFG, evaluate=False)
    judge = CallableJudge(lambda q, a: 10.0)  # nothing positive survives
    with pytest.raises(ValueError, match="too few responses survive filtering"):
        extract_trait(model, tok, load_trait("optimistic"), tmp_path, judge=judge, config=cfg, progress=False,
                      log=lambda s: None)


def test_filtering_rule():
    cfg = ExtractionConfig(pos_threshold=60, neg_threshold=30, coherence_threshold=50)
    pos, neg = {"polarity": "pos"}, {"polarity": "neg"}
    assert extract_mod._keep(pos, {"score": 70, "coherence": 80}, cfg)
    assert not extract_mod._keep(pos, {"score": 55, "coherence": 80}, cfg)
    assert not extract_mod._keep(pos, {"score": 70, "coherence": 20}, cfg)
    assert not extract_mod._keep(pos, {"score": None, "coherence": 80}, cfg)
    assert extract_mod._keep(neg, {"score": 10, "coherence": 90}, cfg)
    assert not extract_mod._keep(neg, {"score": 40, "coherence": 90}, cfg)


def test_config_validation():
    with pytest.raises(ValueError, match="temperature > 0"):
        ExtractionConfig(n_samples=3)
    with pytest.raises(ValueError, match="pos_threshold"):
        ExtractionConfig(pos_threshold=150)


def test_sweep_helpers():
    import numpy as np

    assert cohens_d(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0])) == 0.0
    assert cohens_d(np.array([4.0, 5.0, 6.0]), np.array([1.0, 2.0, 3.0])) == pytest.approx(3.0)
    # The rule prefers the middle of the network even when a late layer scores higher.
    layers = list(range(31))
    scores = [0.0] * 31
    scores[14], scores[29] = 2.0, 5.0
    assert recommend_layer(layers, scores, 30) == 14
