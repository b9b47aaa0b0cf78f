"""The SAE commands end to end on the embedded model at toy size: sae train (resumes), sae decompose, diff."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

if importlib.util.find_spec("sparsify") is None:
    pytest.skip("needs the sae extra (eai-sparsify)", allow_module_level=True)

from typer.testing import CliRunner  # noqa: E402

from steerlib.cli import app  # noqa: E402
from steerlib.core.sae_format import load_sae  # noqa: E402
from steerlib.evaluation.report import write_report  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("sae")
    # a toy corpus: README paragraphs of at most ~60 tokens
    paragraphs = [p.strip()[:240] for p in README.read_text().split("\n\n") if len(p.strip()) > 80][:48]
    (root / "toy.txt").write_text("\n\n".join(paragraphs))
    # the LM loss (clean and spliced) on 3 of the 11 samples: two full forward passes are most of the command's time
    toy = ["--layer", "4", "--text", str(root / "toy.txt"), "--no-neutral", "--tokens-per-step", "512",
           "--expansion", "2", "--k", "8", "--loss-samples", "3"]
    out = root / "sae"
    result = CliRunner().invoke(app, ["sae", "train", "--out", str(out), *toy])
    assert result.exit_code == 0, result.output
    return out, result.output, toy


def test_sae_train_writes_a_saelens_folder_and_prints_its_quality(trained):
    out, output, _ = trained
    assert "explained variance" in output and "dead" in output and "nats/token" in output
    quality = json.loads((out / "quality.json").read_text())
    assert 0 < quality["explained_variance"] <= 1 and quality["l0"] <= 8
    assert quality["loss_spliced"] > quality["loss_clean"] > 0
    sae = load_sae(out)
    assert sae.layer == 4 and sae.d_sae == 2 * 576 and sae.k == 8


def test_sae_train_resumes_and_refuses_other_settings(trained, monkeypatch):
    import steerlib.sae.run as run

    out, output, toy = trained
    before = (out / "sae_weights.safetensors").read_bytes()
    quality = json.loads((out / "quality.json").read_text())

    def no_scoring(*args, **kwargs):
        raise AssertionError("a finished run's quality was computed again")

    monkeypatch.setattr(run, "lm_loss", no_scoring)  # the quality of these very weights is read back
    again = CliRunner().invoke(app, ["sae", "train", "--out", str(out), *toy])
    assert again.exit_code == 0, again.output
    assert (out / "sae_weights.safetensors").read_bytes() == before  # nothing left to harvest or train
    stored = json.loads((out / "quality.json").read_text())
    assert {k: stored[k] for k in ("explained_variance", "l0", "loss_clean", "loss_spliced")} == {
        k: quality[k] for k in ("explained_variance", "l0", "loss_clean", "loss_spliced")}
    monkeypatch.undo()
    other = CliRunner().invoke(app, ["sae", "train", "--out", str(out), *toy[:-4], "--k", "4", *toy[-2:]])
    assert other.exit_code != 0
    assert "a training run with other config is here" in str(other.exception)


def test_sae_train_refuses_a_bad_loss_sample_count_before_loading_the_model(tmp_path, monkeypatch):
    import steerlib.sae.run as run

    monkeypatch.setattr(run, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    bad = CliRunner().invoke(app, ["sae", "train", "--out", str(tmp_path / "sae"), "--layer", "4",
                                   "--loss-samples", "0"])
    assert bad.exit_code != 0 and str(bad.exception) == "loss_samples must be >= 1, got 0"


def test_sae_decompose_lists_latents_against_the_null(trained, optimism_vectors, tmp_path):
    out = trained[0]
    vectors = tmp_path / "vec"
    optimism_vectors.save(vectors)
    run = CliRunner().invoke(app, ["sae", "decompose", str(vectors), "--sae", str(out), "--top", "4",
                                   "--snippets", "1", "--out", str(vectors / "sae_decompose.json")])
    assert run.exit_code == 0, run.output
    assert "null best cosine" in run.output and run.output.count("latent ") == 4
    data = json.loads((vectors / "sae_decompose.json").read_text())
    cosines = [abs(r["latent"]) for r in data["latents"]]
    assert len(cosines) == 4 and all(len(r["snippets"]) == 1 for r in data["latents"])
    assert abs(data["latents"][0]["cosine"]) >= abs(data["latents"][-1]["cosine"])
    assert "<h2>SAE decomposition</h2>" in write_report(vectors).read_text()


def test_steer_accepts_a_latent(trained):
    out = trained[0]
    run = CliRunner().invoke(app, ["steer", "--vector", f"sae:{out}#3", "--prompt", "Hi", "--coef", "20",
                                   "--max-new-tokens", "4"])
    assert run.exit_code == 0, run.output
    assert "layer=4" in run.output


def test_diff_ranks_latents_of_a_lora(trained, optimism_vectors, tmp_path):
    from steerlib.core.models import load_model
    from steerlib.finetuning.training import lora_finetune
    from steerlib.store.samples import Sample

    out = trained[0]
    model, tok = load_model()
    samples = [Sample(index=i, line=i + 1, messages=({"role": "user", "content": q},), response=a)
               for i, (q, a) in enumerate([("How is today?", "Wonderful, bright and full of hope!")] * 4)]
    adapter = tmp_path / "lora"
    lora_finetune(model, tok, samples, steps=3, batch_size=2, lr=5e-3).model.save_pretrained(adapter)
    vectors = tmp_path / "run"
    optimism_vectors.save(vectors)
    run = CliRunner().invoke(app, ["diff", "embedded", str(adapter), "--sae", str(out), "--top", "3",
                                   "--vector", f"optimistic={vectors}", "--max-questions", "4",
                                   "--max-new-tokens", "8", "--out", str(vectors / "sae_diff.json")])
    assert run.exit_code == 0, run.output
    data = json.loads((vectors / "sae_diff.json").read_text())["diff"]
    assert len(data["increased"]) == 3 and data["increased"][0]["diff"] >= data["increased"][-1]["diff"]
    assert data["decreased"][0]["diff"] <= 0 <= data["increased"][0]["diff"]
    assert data["baseline_norm"] > 0 and -1 <= data["baseline_cosines"]["optimistic"] <= 1
    assert "<h2>Model diff through the SAE</h2>" in write_report(vectors).read_text()
