"""Data flagging: reading samples with line-numbered errors, scoring, ranking, resuming after a kill."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from steerlib.commands.flag import flag_file
from steerlib.core.capture import capture_activations, pooled_activations
from steerlib.core.chat import format_prompt
from steerlib.finetuning.flag import scoring as flag_mod
from steerlib.finetuning.flag.report import plot_histogram, rank
from steerlib.finetuning.flag.scoring import dataset_score, score_dataset
from steerlib.store.results import read_records
from steerlib.store.samples import Sample, read_samples

DATA = Path(__file__).parent / "data"
LAYER = 16  # middle of SmolLM2's 30 blocks; the hand-written contrast separates cleanly from layer 10 on


@pytest.fixture(scope="module")
def pessimism(embedded) -> torch.Tensor:
    """[n_layers + 1, d_model] mean difference pessimistic - optimistic of response-mean activations."""
    model, tok = embedded
    contrast = json.loads((DATA / "contrast.json").read_text())
    prompts = [format_prompt(tok, q) for q in contrast["questions"]]
    pes = capture_activations(model, tok, prompts, contrast["pessimistic"], layers=None)
    opt = capture_activations(model, tok, prompts, contrast["optimistic"], layers=None)
    return pes.pooled["response_mean"].mean(0) - opt.pooled["response_mean"].mean(0)


@pytest.fixture(scope="module")
def planted() -> list[Sample]:
    return read_samples(DATA / "planted.jsonl").samples


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _msg(user: str, reply: str) -> str:
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    return json.dumps({"messages": messages})


# -- reading ---------------------------------------------------------------------------------------------


def test_read_messages_fields_and_csv(tmp_path, embedded):
    _, tok = embedded
    jsonl = _write(tmp_path / "mixed.jsonl", [
        _msg("Hi", "Hello!"),
        "",  # blank lines hold no sample
        json.dumps({"prompt": "Name a colour", "response": "Blue.", "system": "Be terse.", "id": 7}),
        json.dumps({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
                                 {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
                                 {"role": "assistant", "content": "d"}]}),
    ])
    samples, problems = read_samples(jsonl)
    assert problems == []
    assert [s.index for s in samples] == [0, 1, 2] and [s.line for s in samples] == [1, 3, 4]
    assert samples[1].meta == {"id": 7} and samples[1].response == "Blue."
    assert samples[1].prompt_text(tok) == format_prompt(tok, "Name a colour", system="Be terse.")
    assert samples[0].prompt_text(tok) == format_prompt(tok, "Hi")
    # multi-turn: everything before the last assistant message is the prompt
    assert samples[2].response == "d" and samples[2].user == "c" and len(samples[2].messages) == 4
    assert samples[2].prompt_text(tok).rstrip().endswith("assistant")

    csv_path = tmp_path / "data.csv"
    csv_path.write_text('prompt,response,system\nHi,"Hello,\nthere",\n"Q2",A2,Be kind\n')
    rows = read_samples(csv_path).samples
    assert [(r.line, r.response) for r in rows] == [(2, "Hello,\nthere"), (4, "A2")]
    assert rows[0].messages == ({"role": "user", "content": "Hi"},)
    assert rows[1].messages[0] == {"role": "system", "content": "Be kind"}


BAD_LINES = [
    ('{"messages": [', "invalid JSON"),
    ('[1, 2]', "expected a JSON object, got list"),
    ('{"prompt": "x"}', "missing field(s) 'response'"),
    ('{"prompt": "x", "response": 3}', "'response' must be a string, got int"),
    ('{"prompt": "x", "response": "  "}', "'response' is empty"),
    ('{"messages": "hi"}', "'messages' must be a non-empty list"),
    ('{"messages": [{"role": "user", "content": "q"}]}', "last message must be the assistant's"),
    ('{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]}',
     "message 0 content must be a string, got int"),
    ('{"messages": [{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}]}',
     "unknown role 'robot'"),
    ('{"messages": [{"role": "assistant", "content": "a"}]}', "no prompt before it"),
]


@pytest.mark.parametrize("bad,message", BAD_LINES, ids=[m for _, m in BAD_LINES])
def test_malformed_line_raises_with_file_and_line(tmp_path, bad, message):
    path = _write(tmp_path / "train.jsonl", [_msg("a", "b"), _msg("c", "d"), bad, _msg("e", "f")])
    with pytest.raises(ValueError, match=r"^train\.jsonl line 3: ") as info:
        read_samples(path)
    assert message in str(info.value)


def test_malformed_lines_skipped_with_warning_and_listed(tmp_path):
    lines = [_msg("a", "b"), "{oops", _msg("c", "d"), '{"prompt": 1, "response": "x"}']
    path = _write(tmp_path / "train.jsonl", lines)
    with pytest.warns(UserWarning) as caught:
        result = read_samples(path, on_error="skip")
    assert [str(w.message) for w in caught] == [
        "skipping train.jsonl line 2: invalid JSON (Expecting property name enclosed in double quotes at "
        "column 2)",
        "skipping train.jsonl line 4: 'prompt' must be a string, got int",
    ]
    assert [s.line for s in result.samples] == [1, 3]
    assert [(p.line, str(p).split(":")[0]) for p in result.problems] == [(2, "train.jsonl line 2"),
                                                                          (4, "train.jsonl line 4")]


def test_csv_problems_and_unknown_suffix(tmp_path):
    bad_header = tmp_path / "d.csv"
    bad_header.write_text("question,answer\nq,a\n")
    with pytest.raises(ValueError, match=r"d\.csv line 1: CSV header lacks column\(s\) 'prompt', 'response'"):
        read_samples(bad_header)
    bad_row = tmp_path / "e.csv"
    bad_row.write_text("prompt,response\nq,a\nq2,a2,extra\n")
    with pytest.raises(ValueError, match=r"e\.csv line 3: expected 2 columns, got 3"):
        read_samples(bad_row)
    with pytest.raises(ValueError, match="unsupported file type"):
        read_samples(_write(tmp_path / "x.txt", ["hi"]))
    with pytest.raises(FileNotFoundError):
        read_samples(tmp_path / "missing.jsonl")


# -- scoring ---------------------------------------------------------------------------------------------


def test_planted_pessimism_ranks_first(tmp_path, embedded, pessimism, planted):
    model, tok = embedded
    labels = np.array([s.meta["label"] for s in planted])
    aurocs = {}
    for baseline in ("none", "prompt_last"):
        result = score_dataset(model, tok, planted, pessimism, LAYER, out_path=tmp_path / f"{baseline}.jsonl",
                               baseline=baseline, batch_size=8, progress=False)
        assert [r["index"] for r in result.records] == list(range(len(planted)))
        aurocs[baseline] = roc_auc_score(labels, result.scores)
        top = rank(result, samples=planted, top_k=int(labels.sum()))
        precision = np.mean([r["meta"]["label"] for r in top])
        assert precision >= 0.8, (baseline, precision)
        if baseline == "prompt_last":
            for r in result.records:
                assert r["projection_diff"] == pytest.approx(r["projection"] - r["prompt_last_projection"])
    print(f"planted pessimism AUROC at layer {LAYER}: {aurocs}")
    assert min(aurocs.values()) > 0.8

    summary = dataset_score(result.records)
    pos = np.mean([r["projection"] for r in result.records if r["meta"]["label"] == 1])
    assert summary["n"] == len(planted) and summary["mean_projection"] == pytest.approx(
        np.mean([r["projection"] for r in result.records]))
    assert pos > summary["mean_projection"]

    ranked_csv = tmp_path / "ranked.csv"
    ranked = rank(result, samples=planted, out_path=ranked_csv)
    assert [r["rank"] for r in ranked] == list(range(1, len(planted) + 1))
    assert ranked[0]["score"] == max(r["score"] for r in result.records)
    assert ranked_csv.read_text().splitlines()[0].startswith("rank,index,line,")
    ranked_jsonl = rank(result, samples=planted, out_path=tmp_path / "ranked.jsonl", top_k=3)
    assert len((tmp_path / "ranked.jsonl").read_text().splitlines()) == 3 == len(ranked_jsonl)
    png = plot_histogram(result, tmp_path / "hist.png", top_k=5, label_key="label")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_projection_matches_capture_and_truncation_changes_nothing(embedded, pessimism, planted):
    model, tok = embedded
    prompts = [s.prompt_text(tok) for s in planted[:4]]
    responses = [s.response for s in planted[:4]]
    resp, last, counts = pooled_activations(model, tok, prompts, responses, LAYER)
    full, full_last, _ = pooled_activations(model, tok, prompts, responses, LAYER, truncate=False)
    ref = capture_activations(model, tok, prompts, responses, layers=[LAYER])
    torch.testing.assert_close(resp, ref.at("response_mean", LAYER), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(last, ref.at("prompt_last", LAYER), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(full, resp, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(full_last, last, rtol=1e-4, atol=1e-4)
    assert counts == ref.response_lengths


def test_generate_baseline_is_projection_difference(tmp_path, embedded, pessimism, planted):
    model, tok = embedded
    subset = planted[:3]
    result = score_dataset(model, tok, subset, pessimism, LAYER, out_path=tmp_path / "gen.jsonl",
                           baseline="generate", max_new_tokens=6, progress=False)
    for r in result.records:
        assert isinstance(r["base_response"], str) and r["base_response"]
        assert r["score"] == r["projection_diff"] == pytest.approx(r["projection"] - r["baseline_projection"])
    # the baseline is the projection of the model's own response, read the same way as the data
    p = subset[0].prompt_text(tok)
    resp, _, _ = pooled_activations(model, tok, [p], [result.records[0]["base_response"]], LAYER)
    unit = pessimism[LAYER] / pessimism[LAYER].norm()
    assert result.records[0]["baseline_projection"] == pytest.approx(float(resp[0] @ unit), abs=1e-3)
    assert "mean_projection_diff" in result.summary()


class _Killed(RuntimeError):
    pass


def test_resume_after_kill_gives_identical_output(tmp_path, embedded, pessimism, planted, monkeypatch):
    model, tok = embedded
    subset = planted[:12]
    kwargs = dict(baseline="prompt_last", batch_size=4, progress=False)
    reference = score_dataset(model, tok, subset, pessimism, LAYER, out_path=tmp_path / "ref.jsonl", **kwargs)

    out = tmp_path / "scores.jsonl"

    def kill_after_two(number, records):
        if number == 1:
            raise _Killed

    with pytest.raises(_Killed):
        score_dataset(model, tok, subset, pessimism, LAYER, out_path=out, on_batch=kill_after_two, **kwargs)
    first = read_records(out)
    assert len(first) == 8
    # a kill in the middle of a write leaves a half line: it is dropped and recomputed
    with out.open("a") as f:
        f.write('{"index": 99, "proj')

    computed: list[int] = []
    real = flag_mod.score_pairs

    def spy(model_, tok_, prompts, responses, *args, **kw):
        computed.append(len(prompts))
        return real(model_, tok_, prompts, responses, *args, **kw)

    monkeypatch.setattr(flag_mod, "score_pairs", spy)
    with pytest.warns(UserWarning, match="half-written"):
        resumed = score_dataset(model, tok, subset, pessimism, LAYER, out_path=out, **kwargs)
    assert sum(computed) == 4 and resumed.computed == 4  # only the missing batch
    lines = read_records(out)
    indices = [r["index"] for r in lines]
    assert len(indices) == len(set(indices)) == 12
    assert lines[:8] == first  # finished lines were kept as they were
    assert resumed.records == reference.records  # identical, float for float

    computed.clear()
    again = score_dataset(model, tok, subset, pessimism, LAYER, out_path=out, **kwargs)
    assert computed == [] and again.computed == 0 and again.records == reference.records


def test_resume_refuses_other_settings(tmp_path, embedded, pessimism, planted):
    model, tok = embedded
    out = tmp_path / "s.jsonl"
    score_dataset(model, tok, planted[:2], pessimism, LAYER, out_path=out, progress=False)
    with pytest.raises(ValueError, match=r"other settings \(layer: 16 -> 12"):
        score_dataset(model, tok, planted[:2], pessimism, 12, out_path=out, progress=False)
    fresh = score_dataset(model, tok, planted[:2], pessimism, 12, out_path=out, progress=False, resume=False)
    assert fresh.computed == 2 and len(read_records(out)) == 2


def test_flag_file_end_to_end(tmp_path, pessimism):
    vec_path = tmp_path / "pessimism.pt"
    torch.save(pessimism, vec_path)
    data = _write(tmp_path / "train.jsonl", (DATA / "planted.jsonl").read_text().splitlines()[:6] + ["{bad"])
    with pytest.warns(UserWarning, match="train.jsonl line 7"):
        report = flag_file(data, vec_path, out_dir=tmp_path / "out", layer=LAYER, top_k=2,
                                    on_error="skip", progress=False, device="cpu", label_key="label")
    assert report.summary["n"] == 6 and report.summary["problems"] == ["train.jsonl line 7: invalid JSON "
                                                                       "(Expecting property name enclosed in "
                                                                       "double quotes at column 2)"]
    assert len(report.top) == 2 and report.top[0]["rank"] == 1
    for path in (report.scores_path, report.ranked_csv, report.ranked_jsonl, report.histogram,
                 report.summary_path):
        assert path.is_file()
