"""``steerlib report`` on hostile run folders (issue 21, classes 5 and 7).

A valid run folder is written by hand (no model): ``vectors.json``, ``sweep.json``, ``dose.json``,
``shiftcheck/shiftcheck.json`` and ``inventory.json``. Then ``<script>`` is planted in every field and every
key of every one of these files, one at a time: the report must either refuse the file in one line naming it, or
write a page in which the payload appears only escaped. Files of the wrong shape (a list, an extra key, a string
where a number belongs) end in one line naming the file, from the API and from the CLI.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest

from steerlib.cli import main
from steerlib.evaluation.report import write_report

PAYLOAD = "<script>alert(1)</script>"

VALID: dict[str, dict] = {
    "vectors.json": {
        "model": "tiny", "trait": "optimistic", "method": "mean_diff", "recommended_layer": 2,
        "layer_rule": "max d", "judge": "vader", "coherence_judge": "self",
        "thresholds": {"positive": 60, "negative": 40}, "config": {"n_questions": 4},
        "probe_train_accuracy": [0.9, 0.8], "library_version": "1", "seconds": 1.5,
        "counts": {"positive": {"generated": 4, "kept": 3, "dropped": 1, "unscored": 0}},
    },
    "sweep.json": {"layers": [1, 2, 3], "cohens_d": [0.1, 0.9, 0.2], "auroc": [0.5, 0.9, 0.6],
                   "probe_accuracy": [0.5, None, 0.7], "evaluated_on": "heldout", "recommended_layer": 2},
    "dose.json": {"coefs": [-0.5, 0.5], "scores": [10.0, None], "projections": [-1.0, 1.0],
                  "samples": [["sad a", "sad b"], ["glad a", "glad b"]], "layer": 2,
                  "questions": ["How are you?", "Plans?"], "relative": True},
    "shiftcheck/shiftcheck.json": {
        "trait": "optimistic", "layers": [1, 2], "r": [0.1, 0.5], "r_responses": [0.2, 0.3],
        "r_family": {"system": [0.1, 0.2]}, "best_layer": 2, "best_r": 0.5,
        "conditions": [{"name": "system -1.0", "family": "system", "level": -1.0, "n": 2, "mean_score": 20.0,
                        "mean_projection": [0.1, -1.0]}],
        "responses": [{"condition": "system -1.0", "family": "system", "question": 0, "score": 20.0,
                       "projections": [0.1, -1.0], "text": "meh"}],
        "settings": {"shots": [0, 1]},
    },
    "inventory.json": {"vectors": ["optimistic"], "scales": ["openness", "neuroticism"],
                       "baseline": {"openness": 3.0, "neuroticism": 3.0},
                       "steered": {"optimistic": {"openness": 3.2, "neuroticism": 2.5}},
                       "effects": [[0.2, -0.5]], "coef": 0.5, "relative": True, "layers": [2],
                       "diagnostics": {"option_mass": 0.5, "rating_sd": 0.3}},
}


def _write(root: Path, files: dict[str, object]) -> Path:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data))
    return root


def _plantings(data: object, where: tuple = ()) -> list[tuple]:
    """Every place in a JSON value where the payload can go: each key and each leaf value (lists: the first item;
    a whole list or object replaced by the payload is refused like any other wrong type, so it is not repeated)."""
    out: list[tuple] = []
    if isinstance(data, dict):
        for key, value in data.items():
            out.append((*where, ("key", key)))
            out += _plantings(value, (*where, key))
    elif isinstance(data, list) and data:
        out += _plantings(data[0], (*where, 0))
    elif where:
        out.append(where)
    return out


def _plant(data: object, where: tuple) -> object:
    data = copy.deepcopy(data)
    parent = data
    for step in where[:-1]:
        parent = parent[step]
    last = where[-1]
    if isinstance(last, tuple):  # rename a key
        parent[PAYLOAD] = parent.pop(last[1])
    else:
        parent[last] = PAYLOAD
    return data


CASES = [(name, where) for name, data in VALID.items() for where in _plantings(data)]


def test_valid_folder_renders_every_section(tmp_path):
    page = write_report(_write(tmp_path, VALID)).read_text()
    assert 'class="missing"' not in page
    assert "at least 60, negative ones when at most 40" in page and "Steering at layer 2" in page


def test_script_planted_in_every_field_is_escaped_or_refused(tmp_path):
    """One folder per planting; together they cover every field and key of every input file.

    Each folder holds ``vectors.json`` and the one planted file (the other sections say "missing"), so each
    report draws at most two plots.
    """
    shown = refused = 0
    for i, (name, where) in enumerate(CASES):
        run = _write(tmp_path / f"run{i}", {"vectors.json": VALID["vectors.json"], name: _plant(VALID[name], where)})
        try:
            page = write_report(run).read_text()
        except ValueError as exc:
            message = str(exc)
            assert "\n" not in message and str(run) in message, (name, where, message)
            refused += 1
            continue
        assert "<script" not in page.lower(), (name, where)
        shown += "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert shown >= 20 and refused >= 20, (shown, refused)  # both paths were taken, many times


@pytest.mark.parametrize(("name", "where"), [
    ("vectors.json", ("thresholds", "positive")),
    ("vectors.json", ("thresholds", "negative")),
    ("sweep.json", ("evaluated_on",)),
    ("dose.json", ("layer",)),
    ("inventory.json", ("layers", 0)),
    ("shiftcheck/shiftcheck.json", ("r_family", ("key", "system"))),
])
def test_fields_found_unescaped_by_the_probe_are_shown_escaped(name, where, tmp_path):
    page = write_report(_write(tmp_path, {**VALID, name: _plant(VALID[name], where)})).read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script" not in page.lower()


ODD = [
    ("vectors.json", [1, 2], r"vectors\.json: the vectors metadata file must be a JSON object, got list"),
    ("vectors.json", "x", r"vectors\.json: the vectors metadata file must be a JSON object, got str"),
    ("sweep.json", {**VALID["sweep.json"], "extra": 1}, r"sweep\.json: malformed layer sweep \(.*extra"),
    ("sweep.json", [1], r"sweep\.json: the layer sweep file must be a JSON object, got list"),
    ("sweep.json", {**VALID["sweep.json"], "recommended_layer": 9}, r"sweep\.json: malformed layer sweep"),
    ("dose.json", {**VALID["dose.json"], "coefs": "abc"}, r"dose\.json: malformed dose-response"),
    ("dose.json", {"layer": 2}, r"dose\.json: malformed dose-response"),
    ("inventory.json", {"vectors": 1}, r"inventory\.json: malformed inventory matrix"),
    ("shiftcheck/shiftcheck.json", [], r"shiftcheck\.json: malformed prompt-shift results"),
    ("vectors.json", {**VALID["vectors.json"], "counts": [1]}, r"vectors\.json: malformed vectors metadata"),
]


@pytest.mark.parametrize(("name", "data", "pattern"), ODD, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(ODD)])
def test_odd_json_is_one_line_naming_the_file(name, data, pattern, tmp_path, monkeypatch, capsys):
    run = _write(tmp_path / "run", {**VALID, name: data})
    with pytest.raises(ValueError, match=pattern):
        write_report(run)
    monkeypatch.setattr(sys, "argv", ["steerlib", "report", str(run)])
    with pytest.raises(SystemExit) as info:
        main()
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert str(run) in err
