"""Every bad input found by the probe (issue 9) ends in one clear line, never a wrong result or a traceback.

The CLI cases run ``steerlib.cli.main`` in-process and check: exit code 2, exactly one line on stderr that
starts with ``error:`` and names the problem (and the file and line where there is one), no traceback. The
validate-before-work cases run with ``load_model`` replaced by a tripwire, so they also prove that nothing
was loaded or generated before the error. API cases check the same messages from the library.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings

import pytest
import torch
from safetensors.torch import save_file

import steerlib.core.models as models
from steerlib.cli import main
from steerlib.core.loading import load_vectors
from steerlib.core.models import (
    MANIFEST,
    clean_stale_conversions,
    convert_gguf,
    load_model,
    verify_manifest,
    write_manifest,
)
from steerlib.core.vectors import TraitVectors
from steerlib.extraction.extract import ExtractionConfig, extract_trait
from steerlib.steering.dose import dose_response
from steerlib.steering.generation import generate
from steerlib.steering.steer import build_ops, build_readout, steer
from steerlib.store.results import SettingsChanged
from steerlib.store.samples import read_samples
from steerlib.traits.judges import make_judge
from steerlib.traits.library import Trait, load_trait

D_MODEL, N_POS = 576, 31  # the embedded SmolLM2-135M: 30 blocks + embeddings


# -- files the table refers to by name ------------------------------------------------------------------


def _good_vectors(rows: int = N_POS, **meta) -> TraitVectors:
    torch.manual_seed(0)
    return TraitVectors({"response_mean": torch.randn(rows, D_MODEL)}, "SmolLM2-135M-Instruct", "optimistic",
                        metadata={"recommended_layer": min(10, rows - 1), **meta})


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """name -> path of every good and bad input file used below."""
    root = tmp_path_factory.mktemp("bad_input")
    f: dict[str, str] = {}

    def folder(name: str, tv: TraitVectors | None = None):
        path = root / name
        (tv or _good_vectors()).save(path)
        f[name] = str(path)
        return path

    folder("vec")
    folder("vec_shallow", _good_vectors(10))
    (folder("st_truncated") / "vectors.safetensors").write_bytes((root / "vec/vectors.safetensors").read_bytes()[:500])
    (folder("st_empty") / "vectors.safetensors").write_bytes(b"")
    (folder("st_random") / "vectors.safetensors").write_bytes(os.urandom(4096))
    (folder("json_truncated") / "vectors.json").write_text('{\n  "model": "x",\n  "trait": ')
    (folder("json_list") / "vectors.json").write_text("[1, 2]")
    meta = folder("json_dir") / "vectors.json"
    meta.unlink()
    meta.mkdir()
    short = folder("short_norms") / "vectors.json"
    short.write_text(json.dumps({**json.loads(short.read_text()), "residual_norms": [1.0] * 5}))
    save_file({"response_mean": torch.ones(N_POS, D_MODEL, dtype=torch.int64)},
              str(folder("int_vectors") / "vectors.safetensors"))
    save_file({"response_mean": torch.ones(1, D_MODEL)}, str(folder("one_row") / "vectors.safetensors"))
    for name, tensor in {"complex": torch.randn(D_MODEL, dtype=torch.complex64), "rows5": torch.randn(5, D_MODEL),
                         "row1": torch.randn(1, D_MODEL), "nan": torch.full((D_MODEL,), float("nan")),
                         "vec1d": torch.randn(D_MODEL)}.items():
        torch.save(tensor, root / f"{name}.pt")
        f[name] = str(root / f"{name}.pt")
    (root / "garbage.pt").write_bytes(b"not a pickle at all")
    f["garbage"] = str(root / "garbage.pt")

    good = json.dumps({"prompt": "Hi there", "response": "Hello! How can I help?"})
    lines = {
        "data": [good, good],
        "data_latin1": [good, '{"prompt": "caf\xe9", "response": "ok"}'],
        "data_long": [good, json.dumps({"prompt": "word " * 9000, "response": "ok"})],
    }
    for name, rows in lines.items():
        path = root / f"{name}.jsonl"
        path.write_bytes("\n".join(rows).encode("latin-1" if name == "data_latin1" else "utf-8") + b"\n")
        f[name] = str(path)
    (root / "data_bad.csv").write_bytes(b"prompt,response\nhi,there\n\xff\xfe,x\n")
    f["data_bad_csv"] = str(root / "data_bad.csv")
    (root / "datadir").mkdir()
    f["datadir"] = str(root / "datadir")
    conv = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in [("Hi", "Hello there!"), ("How are you?", "Fine, thanks."), ("Bye", "Goodbye!")]]
    (root / "conv.jsonl").write_text("".join(json.dumps(c) + "\n" for c in conv))
    f["conv"] = str(root / "conv.jsonl")
    (root / "a_file").write_text("not a folder")
    f["a_file"] = str(root / "a_file")
    (root / "questions.txt").write_bytes(b"What next?\nWhy \xff?\n")
    f["questions_latin1"] = str(root / "questions.txt")
    (root / "trait_latin1.json").write_bytes(b'{\n"name": "caf\xe9"\n}\n')
    f["trait_latin1"] = str(root / "trait_latin1.json")
    f["out"] = str(root / "out")
    f["root"] = str(root)
    return f


def run_cli(args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """Run ``steerlib ARGS`` through ``main()``; returns (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["steerlib", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


def assert_one_line_error(code: int, out: str, err: str, message: str) -> None:
    assert code == 2, (out, err)
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    assert message in lines[0], f"expected {message!r} in {lines[0]!r}"


def _no_model(*_args, **_kwargs):
    raise AssertionError("a model was loaded before the bad input was reported")


# -- CLI: refused before any model is loaded ----------------------------------------------------------------

EXTRACT = ["extract", "--trait", "optimistic"]
STEER = ["steer", "--vector", "{vec}", "--prompt", "Say hi.", "--layer", "12"]
FLAG = ["flag", "--vector", "{vec}", "--data", "{data}", "--out", "{out}/flag"]
MONITOR = ["monitor", "--vector", "{vec}", "--conversations", "{conv}", "--out", "{out}/mon"]
TRAIN = ["train", "--data", "{data}", "--out", "{out}/lora"]
SERVE = ["serve", "--vector", "{vec}"]

BEFORE_WORK = [
    # numbers that would change meaning
    (EXTRACT + ["--max-questions", "0"], "max_questions must be >= 1, got 0"),
    (EXTRACT + ["--max-questions", "-2"], "max_questions must be >= 1, got -2"),
    (EXTRACT + ["--max-pairs", "-1"], "max_pairs must be >= 1, got -1"),
    (EXTRACT + ["--batch-size", "0"], "batch_size must be >= 1, got 0"),
    (EXTRACT + ["--temperature", "nan"], "temperature must be a finite number, got nan"),
    (EXTRACT + ["--backend", "foo"], "unknown backend 'foo'"),
    (EXTRACT + ["--out", "{a_file}"], "is an existing file, not a folder"),
    (["extract", "--trait", "{trait_latin1}"], "trait_latin1.json line 2: not UTF-8 text (byte 0xe9 at column 13)"),
    ([*STEER, "--sweep", ""], "sweep is empty"),
    ([*STEER, "--sweep", "0,nan"], "sweep coefficient must be a finite number, got nan"),
    ([*STEER, "--coef", "nan"], "coef must be a finite number, got nan"),
    ([*STEER, "--mode", "sideways"], "unknown steering mode 'sideways'"),
    ([*STEER, "--positions", "middle"], "unknown positions 'middle'"),
    (["steer", "--vector", "{vec}", "--prompt", "caf\udce9"], "prompt 0 is not valid UTF-8 text"),
    ([*FLAG, "--top-k", "-3"], "top_k must be >= 1, got -3"),
    ([*FLAG, "--batch-size", "0"], "batch_size must be >= 1, got 0"),
    ([*FLAG, "--on-error", "foo"], "unknown on_error 'foo'"),
    ([*FLAG, "--baseline", "foo"], "unknown baseline 'foo'"),
    (["flag", "--vector", "{vec}", "--data", "{data}", "--out", "{a_file}"], "is an existing file, not a folder"),
    (["flag", "--vector", "{vec}", "--data", "{data_latin1}", "--out", "{out}/f"],
     "data_latin1.jsonl line 2: not UTF-8 text (byte 0xe9 at column 16)"),
    (["flag", "--vector", "{vec}", "--data", "{data_bad_csv}", "--out", "{out}/f"],
     "data_bad.csv line 3: not UTF-8 text (byte 0xff at column 1)"),
    (["flag", "--vector", "{vec}", "--data", "{datadir}", "--out", "{out}/f"], "is a folder, not a data file"),
    ([*MONITOR, "--on-error", "foo"], "unknown on_error 'foo'"),
    (["monitor", "--vector", "{vec}", "--conversations", "{data_latin1}", "--out", "{out}/m"],
     "data_latin1.jsonl line 2: not UTF-8 text (byte 0xe9 at column 16)"),
    ([*MONITOR, "--window", "0"], "window must be a positive int, got 0"),
    ([*MONITOR, "--method", "median"], "unknown drift method 'median'"),
    ([*MONITOR, "--reference-size", "1"], "reference_size must be an int >= 2, got 1"),
    ([*TRAIN, "--coef", "2"], "coef given without vectors: preventative steering needs --vector"),
    ([*TRAIN, "--vector", "{vec}", "--coef", "nan"], "coef must be a finite number, got nan"),
    ([*TRAIN, "--steps", "0"], "steps must be >= 1, got 0"),
    (["train", "--data", "{data}", "--out", "{a_file}"], "is an existing file, not a folder"),
    (["shift", "--finetuned", "{out}", "--vector", "{vec}", "--questions", "{questions_latin1}", "--out",
      "{out}/s"], "questions.txt line 2: not UTF-8 text (byte 0xff at column 5)"),
    (["shift", "--finetuned", "{out}", "--vector", "{vec}", "--layers", "", "--out", "{out}/s"],
     "layers is empty: give the layers to measure"),
    ([*SERVE, "--steer", "999:1"], "--steer layer must be within 1..30, got 999"),
    ([*SERVE, "--steer", "22:nan"], "--steer coefficient at layer 22 must be a finite number, got nan"),
    ([*SERVE, "--port", "99999"], "--port must be within 1..65535, got 99999"),
    (["serve", "--vector", "{vec_shallow}"], "cover 9 blocks but the model has 30"),
    (["traits", "new", "../../evil", "--description", "x", "--base-url", "http://127.0.0.1:9"],
     "trait name '../../evil' must be"),
    (["traits", "new", "ok", "--description", "x", "--base-url", "http://127.0.0.1:9", "--out", "{a_file}/t.json"],
     "is an existing file, not a folder"),
    (["shiftcheck", "--vector", "{vec}", "--n-questions", "2"], "n_questions must be within 3..20, got 2"),
    (["shiftcheck", "--vector", "{vec}", "--shots", "0,-1"], "shots must be >= 0, got -1"),
    (["report", "{out}"], "is not an extraction run folder (no vectors.json"),
    (["report", "{vec}", "--dose-coefs=0,nan"], "dose coefficient must be a finite number, got nan"),
    (["inventory", "--inventory", "no_such_inventory"], "no_such_inventory"),
    (["export", "{vec}", "--out", "{out}/v.gguf", "--format", "ggml"], "unknown format 'ggml'"),
    # damaged vector files: named, with the line where JSON has one
    ([*STEER[:2], "{st_truncated}", *STEER[3:]], "st_truncated/vectors.safetensors: not a readable safetensors"),
    ([*STEER[:2], "{st_empty}", *STEER[3:]], "vectors.safetensors: not a readable safetensors file (the file is "
     "empty)"),
    ([*STEER[:2], "{st_random}", *STEER[3:]], "st_random/vectors.safetensors: not a readable safetensors file"),
    ([*STEER[:2], "{json_truncated}", *STEER[3:]], "json_truncated/vectors.json line 3: invalid JSON"),
    ([*STEER[:2], "{json_list}", *STEER[3:]], "vectors.json: vector metadata must be a JSON object, got list"),
    ([*STEER[:2], "{json_dir}", *STEER[3:]], "json_dir/vectors.json is a folder, not a vectors metadata file"),
    ([*STEER[:2], "{short_norms}", *STEER[3:]], "short_norms/vectors.json: residual_norms must list one norm per residual layer (31), got 5"),
    ([*STEER[:2], "{int_vectors}", *STEER[3:]], "must hold real floating-point values, got dtype int64"),
    ([*STEER[:2], "{one_row}", *STEER[3:]], "cover no block"),
    ([*STEER[:2], "{complex}", *STEER[3:]], "must hold real floating-point values, got dtype complex64"),
    ([*STEER[:2], "{nan}", *STEER[3:]], "nan.pt contains NaN or inf values"),
    ([*STEER[:2], "{garbage}", *STEER[3:]], "garbage.pt: not a torch tensor file that loads safely (UnpicklingError)"),
]


@pytest.mark.parametrize(("args", "message"), BEFORE_WORK, ids=[" ".join(a)[:60] for a, _ in BEFORE_WORK])
def test_cli_refuses_before_work(args, message, files, monkeypatch, capsys):
    monkeypatch.setattr(models, "load_model", _no_model)
    code, out, err = run_cli([a.format(**files) for a in args], monkeypatch, capsys)
    assert_one_line_error(code, out, err, message.format(**files))


def test_cli_cache_that_is_a_file(files, monkeypatch, capsys):
    monkeypatch.setenv("STEERLIB_CACHE", files["a_file"])
    code, out, err = run_cli(["serve", "--vector", files["vec"]], monkeypatch, capsys)
    assert_one_line_error(code, out, err, f"{files['a_file']} is a file, not a folder; set STEERLIB_CACHE")


def test_cli_cache_that_is_read_only(files, tmp_path, monkeypatch, capsys):
    # (the tests may run as root, for whom chmod does not stop writes: the permission answer is simulated)
    cache = tmp_path / "ro-cache"
    cache.mkdir()
    monkeypatch.setenv("STEERLIB_CACHE", str(cache))
    monkeypatch.setattr(models.os, "access", lambda path, mode: False)
    code, out, err = run_cli(["serve", "--vector", files["vec"]], monkeypatch, capsys)
    assert_one_line_error(code, out, err, f"cannot write in {cache} (permission denied); set STEERLIB_CACHE")


# -- CLI: cases that need the model's tokenizer or depth ------------------------------------------------

WITH_MODEL = [
    (["steer", "--vector", "{vec1d}", "--layer", "12", "--prompt", "word " * 9000],
     "prompt 0 is "),
    (["flag", "--vector", "{vec}", "--data", "{data_long}", "--out", "{out}/long"],
     "data_long.jsonl line 2 (prompt + response) is"),
    (["monitor", "--vector", "{vec}", "--conversations", "{conv}", "--out", "{out}/m"],
     "3 responses, fewer than reference_size=50: the monitor would never calibrate"),
    (["steer", "--vector", "{rows5}", "--layer", "3", "--prompt", "hi"],
     "rows5.pt: trait vectors cover 4 blocks but the model has 30"),
    (["steer", "--vector", "{row1}", "--layer", "3", "--prompt", "hi"],
     "row1.pt: vectors of shape (1, 576) cover no block"),
    (["steer", "--vector", "{vec_shallow}", "--layer", "3", "--prompt", "hi"],
     "cover 9 blocks but the model has 30"),
]


@pytest.mark.parametrize(("args", "message"), WITH_MODEL, ids=[" ".join(a)[:40] for a, _ in WITH_MODEL])
def test_cli_refuses_with_model(args, message, files, embedded, monkeypatch, capsys):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: embedded)  # no reload per case
    code, out, err = run_cli([a.format(**files) for a in args], monkeypatch, capsys)
    assert_one_line_error(code, out, err, message)
    if "prompt 0" in message or "data_long" in message:
        assert "more than the model's context of 8192 tokens; shorten it" in err


# -- API -------------------------------------------------------------------------------------------------


def test_api_generation_numbers(embedded):
    model, tok = embedded
    with pytest.raises(ValueError, match=r"^batch_size must be >= 1, got -1$"):
        generate(model, tok, ["hi"], batch_size=-1)
    with pytest.raises(ValueError, match=r"^temperature must be a finite number, got nan$"):
        generate(model, tok, ["hi"], temperature=float("nan"))
    with pytest.raises(ValueError, match=r"^prompt 0 is \d+ tokens \+ 8 new tokens, more than the model's "
                                         r"context of 8192 tokens; shorten it$"):
        generate(model, tok, [" hello" * 9000], max_new_tokens=8)


def test_api_steering_refusals(embedded, optimism_vectors):
    model, _ = embedded
    with pytest.raises(ValueError, match=r"^layers is empty: nothing would be steered"), steer(model, optimism_vectors, []):
        pass
    with pytest.raises(ValueError, match="steering coefficient must be a finite number, got inf"):
        build_ops(model, optimism_vectors, 10, float("inf"))
    # vectors of another depth are refused when passed as objects, not only as paths
    shallow = _good_vectors(10)
    with pytest.raises(ValueError, match=r"cover 9 blocks but the model has 30"):
        build_ops(model, shallow, 5, 1.0)


def test_api_dose_response_checks_every_coefficient_first(embedded, optimism_vectors, monkeypatch):
    model, tok = embedded
    readout = build_readout(model, optimism_vectors, [10])
    monkeypatch.setattr("steerlib.steering.dose.generate", _no_model)  # nothing may be generated
    with pytest.raises(ValueError, match=r"^dose-response coefficient must be a finite number, got nan$"):
        dose_response(model, tok, ["hi"], optimism_vectors, 10, [0.0, 2.0, float("nan")], readout=readout)
    with pytest.raises(ValueError, match="coefs is empty"):
        dose_response(model, tok, ["hi"], optimism_vectors, 10, [], readout=readout)


def test_api_config_numbers():
    for kwargs, message in [({"max_questions": 0}, "max_questions must be >= 1, got 0"),
                            ({"max_pairs": -3}, "max_pairs must be >= 1, got -3"),
                            ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
                            ({"temperature": float("nan")}, "temperature must be a finite number"),
                            ({"backend": "foo"}, "unknown backend 'foo'")]:
        with pytest.raises(ValueError, match=message):
            ExtractionConfig(**kwargs)


def test_byte_order_mark_accepted(files, tmp_path):
    bom = b"\xef\xbb\xbf"
    data = tmp_path / "bom.jsonl"
    data.write_bytes(bom + (json.dumps({"prompt": "Hi", "response": "Hello"}) + "\n").encode())
    assert read_samples(data).samples[0].messages[0]["content"] == "Hi"
    csv = tmp_path / "bom.csv"
    csv.write_bytes(bom + b"prompt,response\nHi,Hello\n")
    assert read_samples(csv).samples[0].response == "Hello"
    trait = tmp_path / "t.json"
    trait.write_bytes(bom + load_trait("optimistic").to_json().encode())
    assert Trait.load(trait).name == "optimistic"
    vec = tmp_path / "v"
    _good_vectors().save(vec)
    (vec / "vectors.json").write_bytes(bom + (vec / "vectors.json").read_bytes())
    assert load_vectors(vec).recommended_layer == 10


def test_non_utf8_line_is_skippable_like_any_bad_line(files):
    with pytest.warns(UserWarning, match="data_latin1.jsonl line 2: not UTF-8 text"):
        read = read_samples(files["data_latin1"], on_error="skip")
    assert len(read.samples) == 1 and [p.line for p in read.problems] == [2]


def test_extract_refuses_resume_under_other_settings(embedded, tmp_path):
    """A rerun into a finished folder must not reuse responses or scores made under other settings."""
    model, tok = embedded
    trait = load_trait("optimistic")
    cfg = {"max_pairs": 1, "max_questions": 1, "evaluate": False}

    def run(judge: str, max_new_tokens: int) -> None:
        j = make_judge(judge, trait)
        try:
            extract_trait(model, tok, trait, tmp_path, judge=j, progress=False, log=lambda _: None,
                          config=ExtractionConfig(max_new_tokens=max_new_tokens, **cfg))
        except SettingsChanged:
            raise
        except ValueError as exc:  # 2 responses cannot make a vector; the run's files are what matter here
            assert "too few responses" in str(exc)

    run("lexicon:optimistic", 4)
    with pytest.raises(SettingsChanged, match=r"responses\.jsonl holds results of a run with other settings "
                                              r"\(max_new_tokens: 4 -> 5\)"):
        run("lexicon:optimistic", 5)
    with pytest.raises(SettingsChanged, match=r"scores\.jsonl .*judge: \"LexiconJudge\(polarity='optimistic'\)\" "
                                              r"-> \"LexiconJudge\(polarity='pessimistic'\)\""):
        run("lexicon:pessimistic", 4)
    run("lexicon:optimistic", 4)  # the same settings resume


# -- the cached model folder ----------------------------------------------------------------------------


def test_damaged_model_folder_is_named(make_tiny, tmp_path):
    folder = tmp_path / "tiny"
    make_tiny("llama").save_pretrained(folder)
    write_manifest(folder)
    assert verify_manifest(folder)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10:] = b"\x00" * 10  # same size, altered content
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"^model folder {folder} is damaged: model.safetensors changed content"):
        load_model(folder)
    weights.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ValueError, match="model.safetensors changed size"):
        load_model(folder)


def test_damaged_conversion_is_redone(tmp_path):
    """A converted folder that no longer matches its record is removed and converted again (with a warning)."""
    out = tmp_path / "models" / "m"
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"x" * 100)
    write_manifest(out)
    (out / "model.safetensors").write_bytes(b"x" * 50)
    with pytest.warns(UserWarning, match=r"changed size since conversion .*; converting missing.gguf again"), \
            pytest.raises(OSError):  # the source GGUF does not exist here: the point is the old folder is gone
        convert_gguf(tmp_path / "missing.gguf", out)
    assert not out.exists()


def test_stale_conversion_folders_are_cleaned(tmp_path):
    stale, fresh = tmp_path / ".m-abc123", tmp_path / ".m-def456"
    for d in (stale, fresh):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    old = time.time() - 3600
    for p in (stale / "model.safetensors", stale):
        os.utime(p, (old, old))
    (tmp_path / "kept").mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        removed = clean_stale_conversions(tmp_path)
    assert removed == [stale]
    assert not stale.exists() and fresh.exists() and (tmp_path / "kept").exists()


def test_manifest_is_recorded_for_the_embedded_model(embedded):
    folder = embedded.model.config._name_or_path
    assert os.path.isfile(os.path.join(folder, MANIFEST)) and verify_manifest(folder)
