"""Steering the embedded model along an optimism direction moves an offline judge's score and the read-out."""

from __future__ import annotations

from steerlib import LexiconJudge, build_readout, dose_response, format_prompt, load_trait

LAYER = 10


def test_optimism_dose_response(embedded, optimism_vectors):
    model, tok = embedded
    questions = list(load_trait("optimistic").eval_questions[:6])  # held out from any extraction
    prompts = [format_prompt(tok, q) for q in questions]
    monitor = build_readout(model, {"optimistic": optimism_vectors}, [LAYER])
    result = dose_response(model, tok, prompts, optimism_vectors, LAYER, [-0.5, 0.0, 0.5], readout=monitor,
                           judge=LexiconJudge("optimistic"), questions=questions, relative=True,
                           max_new_tokens=24)
    print(result.format())
    assert result.is_monotonic("projections")
    assert result.projections[2] - result.projections[0] > 5.0
    assert result.scores[0] < result.scores[1] < result.scores[2]
