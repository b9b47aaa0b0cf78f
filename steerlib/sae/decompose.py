"""A trait vector seen through an SAE: which latents it points along, against a random-direction null.

Reported beside the plain vector, not instead of it (AxBench finds difference-of-means at least as good as SAE
latents for detecting a concept): the decoder cosines, the cosine a random direction reaches against the same
dictionary, the share of the vector rebuilt from its top latents, the latents whose encoded activation differs
most between positive and negative answers, logit-lens names and top-activating snippets from the corpus.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from steerlib.core.sae_format import SparseAutoencoder
from steerlib.core.vectors import check_vector
from steerlib.sae.cache import ActivationCache

__all__ = ["Decomposition", "cosine_null", "decompose", "logit_names", "rebuilt_share", "top_snippets"]


@dataclass(frozen=True)
class Decomposition:
    """Top latents of one vector. ``latents``: one dict per latent (``latent``, ``cosine``, and where measured
    ``pos_minus_neg``, ``names``, ``snippets``); ``null``: the random-vector null's mean and 99th percentile of the
    best cosine; ``rebuilt``: k -> share of the vector's squared norm rebuilt from its top-k latents."""

    layer: int
    latents: list[dict]
    null: dict[str, float]
    rebuilt: dict[int, float]
    by_activation: list[dict] = field(default_factory=list)
    vector_names: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def cosine_null(sae: SparseAutoencoder, *, draws: int = 1000, seed: int = 0) -> dict[str, float]:
    """The best |cosine| of ``draws`` random unit vectors against the decoder: mean and 99th percentile."""
    gen = torch.Generator().manual_seed(seed)
    rand = torch.nn.functional.normalize(torch.randn(draws, sae.d_in, generator=gen), dim=1)
    best = (rand @ sae.unit_decoder().T).abs().max(dim=1).values
    return {"mean": float(best.mean()), "p99": float(best.quantile(0.99)), "draws": draws}


def rebuilt_share(vector: Tensor, sae: SparseAutoencoder, latents: list[int]) -> float:
    """Share of ``||vector||^2`` explained by least squares on the decoder rows of ``latents``."""
    rows = sae.W_dec[latents].T  # [d_in, k]
    coef = torch.linalg.lstsq(rows, vector.float().unsqueeze(1)).solution
    resid = vector.float() - (rows @ coef).squeeze(1)
    return 1.0 - float(resid.pow(2).sum() / vector.float().pow(2).sum())


def logit_names(model: nn.Module, tokenizer, direction: Tensor, n: int = 8) -> list[str]:
    """Top tokens of the unembedding applied to the unit direction (logit lens, no final norm)."""
    unembed = model.get_output_embeddings().weight.detach().float().cpu()  # [vocab, d]
    scores = unembed @ (direction.float() / direction.float().norm())
    return [tokenizer.decode([int(t)]) for t in scores.topk(n).indices]


def top_snippets(cache: ActivationCache, sae: SparseAutoencoder, latent: int, tokenizer, *, n: int = 5,
                 before: int = 12, after: int = 2, batch: int = 65536) -> list[dict]:
    """The ``n`` cached tokens with the largest pre-activation of ``latent``, each with the text around it."""
    w, b = sae.W_enc[:, latent], float(sae.b_enc[latent])
    shift = sae.b_dec if sae.apply_b_dec_to_input else torch.zeros(sae.d_in)
    best_v, best_i = torch.empty(0), torch.empty(0, dtype=torch.long)
    for start in range(0, cache.n_tokens, batch):
        x = cache.rows(slice(start, start + batch))
        pre = (x - shift) @ w + b
        k = min(n, len(pre))
        v, i = pre.topk(k)
        best_v, best_i = torch.cat([best_v, v]), torch.cat([best_i, i + start])
        keep = best_v.topk(min(n, len(best_v))).indices
        best_v, best_i = best_v[keep], best_i[keep]
    out = []
    for v, row in zip(best_v.tolist(), best_i.tolist(), strict=True):
        sample = cache.samples[row]
        lo = row
        while lo > 0 and row - lo < before and cache.samples[lo - 1] == sample:
            lo -= 1
        hi = row + 1
        while hi < cache.n_tokens and hi - row <= after and cache.samples[hi] == sample:
            hi += 1
        ids = [int(t) for t in cache.tokens[lo:hi]]
        out.append({"activation": v, "row": row, "sample": int(sample),
                    "text": tokenizer.decode(ids[: row - lo]) + "[[" + tokenizer.decode([ids[row - lo]]) + "]]"
                            + tokenizer.decode(ids[row - lo + 1 :])})
    return out


def decompose(vector: Tensor, sae: SparseAutoencoder, *, top: int = 10, positive: Tensor | None = None,
              negative: Tensor | None = None, model: nn.Module | None = None, tokenizer=None,
              cache: ActivationCache | None = None, snippets: int = 0, null_draws: int = 1000,
              seed: int = 0) -> Decomposition:
    """Decompose a [d_in] direction at the SAE's layer.

    Args:
        vector: the direction (e.g. a trait vector's row at ``sae.layer``).
        sae: the dictionary.
        top: how many latents to list.
        positive, negative: token activations [n, d_in] of positive and negative answers at ``sae.layer``; with
            them, latents are also ranked by mean encoded activation positive minus negative.
        model, tokenizer: for logit-lens names of the vector and each latent.
        cache, snippets: with a cache, each listed latent gets its ``snippets`` top-activating contexts.
        null_draws, seed: the random-vector null.
    """
    vector = check_vector(vector.detach().float(), sae.d_in, "the vector to decompose")
    top = max(1, min(int(top), sae.d_sae))
    cos = sae.unit_decoder() @ (vector / vector.norm())
    order = cos.abs().argsort(descending=True)[:top].tolist()
    rows = [{"latent": i, "cosine": float(cos[i])} for i in order]
    by_activation: list[dict] = []
    if positive is not None and negative is not None:
        diff = sae.encode(positive).mean(0) - sae.encode(negative).mean(0)
        for row in rows:
            row["pos_minus_neg"] = float(diff[row["latent"]])
        by_activation = [{"latent": int(i), "pos_minus_neg": float(diff[i]), "cosine": float(cos[i])}
                         for i in diff.argsort(descending=True)[:top].tolist()]
    names: list[str] = []
    if model is not None and tokenizer is not None:
        names = logit_names(model, tokenizer, vector)
        for row in rows:
            row["names"] = logit_names(model, tokenizer, sae.W_dec[row["latent"]])
    if cache is not None and snippets > 0 and tokenizer is not None:
        for row in rows:
            row["snippets"] = top_snippets(cache, sae, row["latent"], tokenizer, n=snippets)
    rebuilt = {k: rebuilt_share(vector, sae, order[:k]) for k in (1, 3, 10) if k <= len(order)}
    return Decomposition(layer=sae.layer, latents=rows, null=cosine_null(sae, draws=null_draws, seed=seed),
                         rebuilt=rebuilt, by_activation=by_activation, vector_names=names)

