"""Vectors that travel: llama.cpp control vectors (GGUF) out and in, paper/saklas imports, flagging either pole."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from steerlib import TraitVectors, load_vectors
from steerlib.cli import app
from steerlib.core.gguf_vectors import export_gguf, read_control_vector
from steerlib.core.vector_imports import detect_format, load_persona_vectors, load_saklas_profile
from steerlib.steering.steer import steer

DATA = Path(__file__).parent / "data"


@pytest.fixture
def tiny_vectors() -> TraitVectors:
    """Random [4, 64] vectors shaped like the tiny llama's (3 blocks, width 64)."""
    gen = torch.Generator().manual_seed(7)
    table = torch.randn(4, 64, generator=gen)
    return TraitVectors({"response_mean": table, "prompt_last": -table}, "tiny-llama", "cheer", "mean_diff", {})


def _write_llamacpp_file(path: Path, directions: dict[int, np.ndarray], *, arch: str = "controlvector",
                         dtype=np.float32) -> Path:
    """A control vector written with the gguf writer the way llama.cpp's cvector-generator lays it out."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_string("controlvector.model_hint", "llama")
    writer.add_int32("controlvector.layer_count", len(directions))
    for index, vec in directions.items():
        writer.add_tensor(f"direction.{index}", vec.astype(dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _hidden(model, ids) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return model(ids, output_hidden_states=True).hidden_states


IDS = torch.randint(3, 256, (2, 6), generator=torch.Generator().manual_seed(3))


# -- GGUF export ------------------------------------------------------------------------------------------


def test_export_layout_matches_llamacpp_format(tmp_path, tiny_vectors):
    path = export_gguf(tiny_vectors, tmp_path / "cheer.gguf", layers=[2, 3], coef=1.5)
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["general.architecture"].contents() == "controlvector"
    assert reader.fields["controlvector.model_hint"].contents() == "llama"
    assert reader.fields["controlvector.layer_count"].contents() == 2
    tensors = {t.name: t for t in reader.tensors}
    assert sorted(tensors) == ["direction.1", "direction.2"]  # steerlib layer L -> direction.(L-1)
    for name, layer in (("direction.1", 2), ("direction.2", 3)):
        assert tensors[name].tensor_type == gguf.GGMLQuantizationType.F32
        np.testing.assert_array_equal(np.asarray(tensors[name].data),
                                      (tiny_vectors.vectors["response_mean"][layer] * 1.5).numpy())


def test_round_trip(tmp_path, tiny_vectors, make_tiny):
    path = export_gguf(tiny_vectors, tmp_path / "cheer.gguf", layers=[2, -1])
    back = load_vectors(path, make_tiny("llama"))
    assert (back.trait, back.model_name, back.n_positions, back.d_model) == ("cheer", "tiny-llama", 4, 64)
    table = back.vectors["response_mean"]
    torch.testing.assert_close(table[2:], tiny_vectors.vectors["response_mean"][2:], rtol=0, atol=0)
    assert not table[:2].any()  # not exported: zero rows
    assert back.metadata["layers"] == [2, 3]
    # The prompt_last kind is exported when asked and comes back under its name.
    path = export_gguf(tiny_vectors, tmp_path / "last.gguf", layers=3, kind="prompt_last")
    back = load_vectors(path)
    torch.testing.assert_close(back.get(3, "prompt_last"), -tiny_vectors.vectors["response_mean"][3])
    assert back.recommended_layer == 3


def test_export_refuses_layers_llamacpp_cannot_steer(tmp_path, tiny_vectors):
    with pytest.raises(ValueError, match=r"layer 1 cannot be written as a llama.cpp control vector: direction.N "
                                         r"edits the output of block N \(steerlib layer N \+ 1\)"):
        export_gguf(tiny_vectors, tmp_path / "x.gguf", layers=[1, 2])
    with pytest.raises(ValueError, match=r"layer 4 is out of range: these vectors cover layers 0..3"):
        export_gguf(tiny_vectors, tmp_path / "x.gguf", layers=[4])
    assert not (tmp_path / "x.gguf").exists()


# -- GGUF import: a file laid out by llama.cpp's rules ----------------------------------------------------


def test_llamacpp_file_steers_the_layer_llamacpp_would(tmp_path, make_tiny):
    """direction.N is added by llama.cpp to block N's output: loaded, it must steer output_hidden_states[N + 1]."""
    model = make_tiny("llama")
    gen = np.random.default_rng(0)
    d1, d2 = gen.standard_normal(64), gen.standard_normal(64)
    path = _write_llamacpp_file(tmp_path / "cv.gguf", {1: d1, 2: d2})
    assert detect_format(path) == "gguf"
    tv = load_vectors(path, model)
    assert tv.trait == "cv" and tv.n_positions == 4 and tv.metadata["layers"] == [2, 3]
    base = _hidden(model, IDS)
    with steer(model, tv, layers=2, coef=1.0):
        got = _hidden(model, IDS)
    torch.testing.assert_close(got[1], base[1])
    torch.testing.assert_close(got[2], base[2] + torch.from_numpy(d1).float(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="vector for layer 1 is all zeros"):
        with steer(model, tv, layers=1):
            pass


@pytest.mark.parametrize(
    ("directions", "dtype", "arch", "message"),
    [
        ({0: np.ones(8)}, np.float32, "controlvector", r"direction.0 is invalid \(llama.cpp never steers block 0\)"),
        ({1: np.ones(8)}, np.float16, "controlvector", r"direction.1 is F16, control vectors must be F32"),
        ({1: np.ones(8), 2: np.ones(4)}, np.float32, "controlvector",
         r"direction.2 has width 4 but earlier directions have 8"),
        ({1: np.ones(8)}, np.float32, "llama", r"general.architecture is 'llama', not 'controlvector'"),
    ],
)
def test_loader_rules_enforced(tmp_path, directions, dtype, arch, message):
    path = _write_llamacpp_file(tmp_path / "bad.gguf", directions, arch=arch, dtype=dtype)
    with pytest.raises(ValueError, match=rf"bad.gguf: {message}"):
        read_control_vector(path)


def test_deeper_than_model_refused(tmp_path, make_tiny):
    path = _write_llamacpp_file(tmp_path / "deep.gguf", {3: np.ones(64, dtype=np.float32)})
    with pytest.raises(ValueError, match=r"direction.3 edits layer 4, past the model's 3 blocks"):
        load_vectors(path, make_tiny("llama"))


def test_cli_export(tmp_path, tiny_vectors):
    folder = tmp_path / "vec"
    tiny_vectors.save(folder)
    out = tmp_path / "cheer.gguf"
    result = CliRunner().invoke(app, ["export", str(folder), "--format", "gguf", "--layers", "2,3", "--coef", "2",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "layers [2, 3] as direction.1, direction.2 (coef 2)" in result.output
    back = read_control_vector(out)
    torch.testing.assert_close(back.vectors["response_mean"][2:], 2 * tiny_vectors.vectors["response_mean"][2:])
    bad = CliRunner().invoke(app, ["export", str(folder), "--format", "onnx", "--out", str(out)])
    assert bad.exit_code != 0 and "unknown format 'onnx'; supported: gguf" in str(bad.exception)


# -- imports from other tools ------------------------------------------------------------------------------


def test_persona_vectors_paper_file(tmp_path, make_tiny):
    """The paper's [n_layers + 1, d_model] table: row i = hidden_states[i], steering at L adds row L there."""
    model = make_tiny("llama")
    table = torch.randn(4, 64, generator=torch.Generator().manual_seed(5))
    path = tmp_path / "evil_response_avg_diff.pt"
    torch.save(table, path)
    tv = load_vectors(path, model)
    assert (tv.trait, tv.default_kind, tv.method) == ("evil", "response_mean", "persona_vectors_import")
    torch.testing.assert_close(tv.vectors["response_mean"], table)
    last = tmp_path / "evil_prompt_last_diff.pt"
    torch.save(table, last)
    assert load_persona_vectors(last).default_kind == "prompt_last"
    base = _hidden(model, IDS)
    with steer(model, tv, layers=2, coef=1.0):
        got = _hidden(model, IDS)
    torch.testing.assert_close(got[2], base[2] + table[2], rtol=1e-5, atol=1e-5)
    torch.save(table[:3], path)
    with pytest.raises(ValueError, match=r"3 rows, but the model needs n_layers \+ 1 = 4"):
        load_vectors(path, model)
    torch.save({"not": "a tensor"}, path)
    with pytest.raises(ValueError, match=r"expected a tensor \[n_layers \+ 1, d_model\], got dict"):
        load_persona_vectors(path)


def test_saklas_profile_matches_a_hook_on_that_block(tmp_path, make_tiny):
    """saklas adds layer_i at the output of model.layers[i]; the import must steer that same tensor."""
    model = make_tiny("llama")
    vec = torch.randn(64, generator=torch.Generator().manual_seed(9))
    path = tmp_path / "happy.safetensors"
    save_file({"layer_1": vec}, str(path))
    path.with_suffix(".json").write_text(json.dumps({"format_version": 1, "method": "profile",
                                                     "provenance": {"concept": "happy"}}))
    assert detect_format(path) == "saklas"
    tv = load_vectors(path, model)
    assert tv.trait == "happy" and tv.recommended_layer == 2 and tv.metadata["layers"] == [2]

    def saklas_style(_module, _args, output):
        # In place: transformers records output_hidden_states with its own hook on the block, registered
        # first, so a hook that returned a new tensor would not show at index 2 (only from index 3 on).
        hidden = output[0] if isinstance(output, tuple) else output
        hidden.add_(vec)

    handle = model.model.layers[1].register_forward_hook(saklas_style)
    try:
        want = _hidden(model, IDS)
    finally:
        handle.remove()
    with steer(model, tv, coef=1.0):  # layer = the recommended one, 2
        got = _hidden(model, IDS)
    for layer in range(4):
        torch.testing.assert_close(got[layer], want[layer], rtol=1e-5, atol=1e-5)
    save_file({"layer_1": vec, "bias": vec.clone()}, str(path))
    assert detect_format(path) is None  # not all keys are layer_<i>: not a saklas profile
    with pytest.raises(ValueError, match="key 'bias' is not a saklas profile key layer_<i>"):
        load_saklas_profile(path)


# -- flag with either pole ---------------------------------------------------------------------------------


def test_flag_negate_ranks_the_other_pole_first(tmp_path, embedded):
    """With a pessimism vector negated, the most optimistic (label 0) samples come first and scores flip sign."""
    from steerlib.commands.flag import flag_file
    from steerlib.core.capture import capture_activations
    from steerlib.core.chat import format_prompt

    model, tok = embedded
    contrast = json.loads((DATA / "contrast.json").read_text())
    prompts = [format_prompt(tok, q) for q in contrast["questions"]]
    pes = capture_activations(model, tok, prompts, contrast["pessimistic"], layers=None)
    opt = capture_activations(model, tok, prompts, contrast["optimistic"], layers=None)
    vec_path = tmp_path / "pessimism.pt"
    torch.save(pes.pooled["response_mean"].mean(0) - opt.pooled["response_mean"].mean(0), vec_path)
    data = DATA / "planted.jsonl"
    kw = dict(layer=16, top_k=5, progress=False, device="cpu")
    plain = flag_file(data, vec_path, out_dir=tmp_path / "plain", **kw)
    negated = flag_file(data, vec_path, out_dir=tmp_path / "neg", negate=True, **kw)
    scores = {r["index"]: r["score"] for r in json.loads("[" + ",".join(
        plain.scores_path.read_text().splitlines()) + "]")}
    for row in negated.top:
        assert row["score"] == pytest.approx(-scores[row["index"]], abs=1e-4)
    lowest = sorted(scores, key=lambda i: scores[i])[:5]
    assert [r["index"] for r in negated.top] == lowest
    assert np.mean([r["meta"]["label"] for r in negated.top]) <= 0.2  # the optimistic pole first
    assert np.mean([r["meta"]["label"] for r in plain.top]) >= 0.8
    assert negated.summary["negated"] is True and plain.summary["negated"] is False


def test_cli_flag_passes_negate(tmp_path, monkeypatch):
    """``steerlib flag --negate`` reaches ``flag_file(negate=True)``; without the option it stays False."""
    from steerlib.commands import flag as flag_mod
    from steerlib.commands.flag import FlagReport

    seen: list[bool] = []

    def fake_flag_file(*_args, negate: bool = False, **_kw) -> FlagReport:
        seen.append(negate)
        paths = {k: tmp_path / k for k in ("s", "rj", "rc", "h", "sp")}
        return FlagReport(summary={"negated": negate}, top=[], scores_path=paths["s"], ranked_jsonl=paths["rj"],
                          ranked_csv=paths["rc"], histogram=paths["h"], summary_path=paths["sp"])

    monkeypatch.setattr(flag_mod, "flag_file", fake_flag_file)
    for extra in (["--negate"], []):
        result = CliRunner().invoke(app, ["flag", "--vector", "v.pt", "--data", "d.jsonl", "--layer", "3", *extra])
        assert result.exit_code == 0, result.output
    assert seen == [True, False]


def test_saklas_profile_and_its_gguf_agree(tmp_path, make_tiny):
    """saklas writes profile key layer_i as direction.i; both imports must land on the same steerlib layer."""
    vec = torch.randn(64, generator=torch.Generator().manual_seed(11))
    profile = tmp_path / "calm.safetensors"
    save_file({"layer_2": vec}, str(profile))
    from_profile = load_saklas_profile(profile, model=make_tiny("llama"))
    from_gguf = read_control_vector(_write_llamacpp_file(tmp_path / "calm.gguf", {2: vec.numpy()}), n_layers=3)
    assert from_profile.metadata["layers"] == from_gguf.metadata["layers"] == [3]
    torch.testing.assert_close(from_profile.vectors["response_mean"], from_gguf.vectors["response_mean"])
    # And steerlib's own export of that layer writes the same tensor name saklas would.
    out = export_gguf(from_profile, tmp_path / "again.gguf")  # recommended layer 3
    assert [t.name for t in gguf.GGUFReader(str(out)).tensors] == ["direction.2"]
