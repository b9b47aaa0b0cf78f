"""SAEs (issue 25): training through eai-sparsify on steerlib's cache, SAELens's folder format, latents as vectors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

if importlib.util.find_spec("sparsify") is None:
    pytest.skip("needs the sae extra (eai-sparsify)", allow_module_level=True)

from steerlib.core.chat import format_prompt  # noqa: E402
from steerlib.core.loading import load_vectors  # noqa: E402
from steerlib.core.sae_format import SparseAutoencoder, latent_vectors, load_sae, parse_sae_spec  # noqa: E402
from steerlib.sae.cache import ActivationCache, harvest, write_rows  # noqa: E402
from steerlib.sae.corpus import text_samples  # noqa: E402
from steerlib.sae.decompose import decompose  # noqa: E402
from steerlib.sae.quality import reconstruction_quality  # noqa: E402
from steerlib.sae.train import SaeTrainConfig, split_rows, train_sae  # noqa: E402
from steerlib.steering.steer import steer  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"


def _planted(n: int = 60_000, d: int = 32, m: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    dictionary = torch.nn.functional.normalize(torch.randn(m, d, generator=gen), dim=1)
    active = (torch.rand(n, m, generator=gen) < 3 / m).float()
    return (active * (1 + 2 * torch.rand(n, m, generator=gen))) @ dictionary, dictionary


@pytest.fixture(scope="module")
def synthetic_sae(tmp_path_factory) -> tuple[SparseAutoencoder, torch.Tensor, Path]:
    root = tmp_path_factory.mktemp("synthetic")
    x, dictionary = _planted()
    cache = write_rows(root / "cache", x, layer=5)
    sae = train_sae(cache, root / "sae", SaeTrainConfig(expansion=4, k=4, tokens_per_step=1024, dead_tokens=20_000))
    return sae, dictionary, root


def test_planted_dictionary_is_recovered(synthetic_sae):
    sae, dictionary, root = synthetic_sae
    best = (dictionary @ sae.unit_decoder().T).max(dim=1).values
    assert float(best.mean()) >= 0.9
    cache = ActivationCache(root / "cache")
    _, held = split_rows(cache.n_tokens, SaeTrainConfig())
    q = reconstruction_quality(sae, cache, held)
    assert q.explained_variance > 0.8 and q.l0 <= 4 and 0 <= q.dead_fraction < 1


def test_folder_matches_saelens_format_and_encode_follows_its_definition(synthetic_sae):
    sae, _, root = synthetic_sae
    folder = root / "sae"
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 4 and cfg["d_in"] == 32 and cfg["d_sae"] == 128
    assert cfg["metadata"]["hook_name"] == "model.layers.4"  # steerlib layer 5 = output of block 4
    assert cfg["dtype"] == "float32" and cfg["device"] == "cpu"
    assert cfg["apply_b_dec_to_input"] is True and cfg["normalize_activations"] == "none"
    weights = load_file(str(folder / "sae_weights.safetensors"))
    assert {k: tuple(v.shape) for k, v in weights.items()} == {
        "W_enc": (32, 128), "W_dec": (128, 32), "b_enc": (128,), "b_dec": (32,)}
    x = torch.randn(7, 32)
    pre = (x - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"]
    top = pre.topk(4, dim=-1)
    by_hand = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    loaded = load_sae(folder)
    assert torch.allclose(loaded.encode(x), by_hand, atol=1e-6)
    assert torch.allclose(loaded.decode(by_hand), by_hand @ weights["W_dec"] + weights["b_dec"], atol=1e-6)
    assert loaded.layer == 5


def test_loads_a_saelens_folder_it_did_not_write(tmp_path):
    gen = torch.Generator().manual_seed(1)
    w = {"W_enc": torch.randn(16, 40, generator=gen), "W_dec": torch.randn(40, 16, generator=gen),
         "b_enc": torch.randn(40, generator=gen), "b_dec": torch.randn(16, generator=gen)}
    save_file(w, str(tmp_path / "sae_weights.safetensors"))
    # the fields SAELens 6 writes for a ReLU ("standard") SAE on a TransformerLens hook
    (tmp_path / "cfg.json").write_text(json.dumps({
        "d_in": 16, "d_sae": 40, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
        "normalize_activations": "none", "reshape_activations": "none", "architecture": "standard",
        "metadata": {"sae_lens_version": "6.54.12", "sae_lens_training_version": "6.54.12",
                     "model_name": "gpt2", "hook_name": "blocks.3.hook_resid_post", "hook_head_index": None,
                     "prepend_bos": True, "context_size": 128, "dataset_path": "x", "neuronpedia_id": None}}))
    sae = load_sae(tmp_path)
    assert sae.layer == 4 and sae.architecture == "standard"
    x = torch.randn(5, 16, generator=gen)
    assert torch.allclose(sae.encode(x), torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]), atol=1e-5)
    tv = latent_vectors(f"sae:{tmp_path}#7")
    assert tv.recommended_layer == 4 and torch.equal(tv.get(4), w["W_dec"][7])


def test_bad_specs_and_folders_fail_in_one_line(tmp_path, synthetic_sae):
    with pytest.raises(ValueError, match=r"^'sae:x' is not an SAE latent: write sae:<folder>#<latent id>"):
        parse_sae_spec("sae:x")
    with pytest.raises(FileNotFoundError, match="no SAE at"):
        load_vectors(f"sae:{tmp_path}#0")
    folder = synthetic_sae[2] / "sae"
    with pytest.raises(ValueError, match=r"latent 128 is out of range: this SAE has latents 0\.\.127"):
        load_vectors(f"sae:{folder}#128")
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file({"W_enc": torch.zeros(4, 8), "W_dec": torch.zeros(8, 4), "b_enc": torch.zeros(8),
               "b_dec": torch.zeros(4)}, str(bad / "sae_weights.safetensors"))
    (bad / "cfg.json").write_text(json.dumps({"architecture": "jumprelu", "metadata": {"hook_name": "model.layers.1"}}))
    with pytest.raises(ValueError, match="architecture 'jumprelu' is not supported"):
        load_sae(bad)
    (bad / "cfg.json").write_text(json.dumps({"architecture": "standard", "metadata": {"hook_name": "blocks.1.attn"}}))
    with pytest.raises(ValueError, match="hook_name 'blocks.1.attn' is not a residual-stream hook"):
        load_sae(bad)
    with pytest.raises(ValueError, match="k=999 is larger than the SAE's 128 latents"):
        train_sae(synthetic_sae[2] / "cache", tmp_path / "other", SaeTrainConfig(expansion=4, k=999))


def test_training_refuses_to_resume_under_other_settings(synthetic_sae):
    root = synthetic_sae[2]
    with pytest.raises(ValueError, match="a training run with other config is here"):
        train_sae(root / "cache", root / "sae", SaeTrainConfig(expansion=4, k=8, tokens_per_step=1024))


@pytest.fixture(scope="module")
def readme_cache(embedded, tmp_path_factory):
    model, tok = embedded
    samples = text_samples([README])[:40]
    folder = tmp_path_factory.mktemp("readme") / "cache"
    return harvest(model, tok, samples, 6, folder, chunk=8, batch_size=8), samples


def test_harvest_resumes_and_refuses_other_settings(embedded, readme_cache, tmp_path):
    model, tok = embedded
    full, samples = readme_cache
    part = samples[:12]
    first = harvest(model, tok, part, 6, tmp_path / "c", chunk=4, max_tokens=1)  # stops after one chunk
    assert first.done_samples == 4 and not first.complete
    done = harvest(model, tok, part, 6, tmp_path / "c", chunk=4)
    assert done.complete
    n = done.n_tokens
    assert np.allclose(done.acts, full.acts[:n], atol=1e-4) and np.array_equal(done.tokens, full.tokens[:n])
    with pytest.raises(ValueError, match=r"this cache was made with layer=6, not 7; use another folder"):
        harvest(model, tok, part, 7, tmp_path / "c")
    with pytest.raises(ValueError, match="this cache was made with corpus="):
        harvest(model, tok, part[:5], 6, tmp_path / "c")


def test_a_direction_planted_in_real_activations_is_found_by_one_latent(readme_cache, tmp_path):
    cache, _ = readme_cache
    x = cache.rows(slice(None))
    gen = torch.Generator().manual_seed(3)
    direction = torch.nn.functional.normalize(torch.randn(x.shape[1], generator=gen), dim=0)
    planted = torch.rand(x.shape[0], generator=gen) < 0.015
    scale = float(x.norm(dim=1).median())
    x = x + planted[:, None].float() * direction * scale * (0.5 + torch.rand(x.shape[0], 1, generator=gen))
    sae = train_sae(write_rows(tmp_path / "planted", x, layer=6), tmp_path / "sae",
                    SaeTrainConfig(expansion=2, k=8, epochs=10, tokens_per_step=512, dead_tokens=5_000))
    cos = sae.unit_decoder() @ direction
    best = int(cos.argmax())
    assert float(cos[best]) >= 0.9
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(planted.numpy(), sae.encode(x)[:, best].numpy()) >= 0.95
    found = decompose(direction, sae, top=3)
    assert found.latents[0]["latent"] == best and found.latents[0]["cosine"] > found.null["p99"]


def test_a_latent_steers_exactly_like_its_decoder_row(embedded, synthetic_sae, tmp_path):
    model, tok = embedded
    d = model.config.hidden_size
    gen = torch.Generator().manual_seed(4)
    sae = SparseAutoencoder(W_enc=torch.randn(d, 64, generator=gen), W_dec=torch.randn(64, d, generator=gen),
                            b_enc=torch.zeros(64), b_dec=torch.zeros(d), architecture="topk", k=8, layer=9)
    sae.save(tmp_path / "sae")
    ids = tok(format_prompt(tok, "Name a colour."), return_tensors="pt").input_ids
    with torch.no_grad():
        clean = model(ids).logits
        with steer(model, f"sae:{tmp_path / 'sae'}#5", coef=3.0):
            by_spec = model(ids).logits
        with steer(model, sae.W_dec[5], layers=9, coef=3.0):
            by_hand = model(ids).logits
    assert torch.equal(by_spec, by_hand)
    read_first = load_vectors(f"sae:{tmp_path / 'sae'}#5")  # read before the model, as the CLI does
    assert load_vectors(read_first, model).n_positions == model.config.num_hidden_layers + 1
    assert not torch.allclose(by_spec, clean, atol=1e-3)
