"""How good an SAE is: explained variance, L0 and dead latents on held-out activations, and the language
model's loss increase when the reconstruction replaces the residual stream at the SAE's layer."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from steerlib.core.arch import get_layout
from steerlib.core.capture import pad_batch, pad_token_id, tokenize_pairs
from steerlib.core.hooks import HookHandles
from steerlib.core.models import unwrap_model
from steerlib.core.sae_format import SparseAutoencoder
from steerlib.sae.cache import ActivationCache
from steerlib.sae.corpus import Sample

__all__ = ["Quality", "lm_loss", "reconstruction_quality", "spliced"]


@dataclass(frozen=True)
class Quality:
    """Held-out numbers: explained variance (1 - FVU), mean active latents per token, share of latents that never
    fired, and the mean next-token loss without and with the reconstruction spliced in (nats per token)."""

    explained_variance: float
    l0: float
    dead_fraction: float
    n_tokens: int
    loss_clean: float | None = None
    loss_spliced: float | None = None

    @property
    def loss_increase(self) -> float | None:
        return None if self.loss_clean is None else self.loss_spliced - self.loss_clean  # type: ignore[operator]


@torch.no_grad()
def reconstruction_quality(sae: SparseAutoencoder, acts: ActivationCache | Tensor, rows: np.ndarray | None = None,
                           *, batch: int = 8192) -> Quality:
    """Explained variance, L0 and dead fraction over ``rows`` of a cache (or over a [n, d_in] tensor)."""
    total = acts.n_tokens if isinstance(acts, ActivationCache) else acts.shape[0]
    rows = np.arange(total) if rows is None else np.asarray(rows)
    if len(rows) == 0:
        raise ValueError("no activations to measure the SAE on")
    fired = torch.zeros(sae.d_sae, dtype=torch.bool)
    err = 0.0
    sum_x = torch.zeros(sae.d_in, dtype=torch.float64)
    sum_sq = 0.0
    active = 0
    for start in range(0, len(rows), batch):
        idx = rows[start : start + batch]
        x = acts.rows(idx) if isinstance(acts, ActivationCache) else acts[torch.as_tensor(idx)].float()
        f = sae.encode(x)
        err += float((sae.decode(f) - x).double().pow(2).sum())
        sum_x += x.double().sum(0)
        sum_sq += float(x.double().pow(2).sum())
        nz = f > 0
        active += int(nz.sum())
        fired |= nz.any(0)
    n = len(rows)
    variance = sum_sq - float(sum_x.pow(2).sum()) / n  # sum over tokens of ||x - mean||^2
    return Quality(explained_variance=1.0 - err / variance, l0=active / n,
                   dead_fraction=float((~fired).float().mean()), n_tokens=n)


@contextlib.contextmanager
def spliced(model: nn.Module, sae: SparseAutoencoder, skip_first: int = 1) -> Iterator[None]:
    """Replace the residual stream at the SAE's layer by its reconstruction in every forward pass of the block.

    The first ``skip_first`` columns are left as they are (their norms are far outside what the SAE saw).
    """
    layout = get_layout(unwrap_model(model))
    if not 1 <= sae.layer < layout.n_layers:
        raise ValueError(f"splicing needs a layer between 1 and {layout.n_layers - 1}, the SAE reads {sae.layer}")
    block = layout.blocks[sae.layer - 1]

    def hook(_module: nn.Module, _args: tuple, output: object) -> object:
        hidden = output[0] if isinstance(output, tuple) else output
        new = hidden.clone()
        new[:, skip_first:] = sae.reconstruct(hidden[:, skip_first:]).to(hidden.dtype)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handles = HookHandles()
    try:
        handles.add(block.register_forward_hook(hook))
        yield
    finally:
        handles.remove()


@torch.no_grad()
def lm_loss(model: nn.Module, tokenizer, samples: Sequence[Sample], *, batch_size: int = 8,
            skip_first: int = 1, responses_only: bool = False) -> float:
    """Mean next-token cross-entropy (nats) over every token after the first ``skip_first + 1`` of each sample
    (over the response tokens only with ``responses_only``; ``exp`` of it is the perplexity)."""
    encoded = tokenize_pairs(tokenizer, [s.prompt for s in samples], [s.response for s in samples])
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        part = encoded[start : start + batch_size]
        ids, mask, positions, _ = pad_batch([seq for seq, _ in part], pad_token_id(tokenizer), "right")
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                       position_ids=positions.to(device)).logits.float().cpu()
        target = ids[:, 1:]
        keep = mask[:, 1:].bool() & (positions[:, 1:] > skip_first)
        if responses_only:  # the target at column j is token j + 1
            starts = torch.tensor([p_len for _, p_len in part])[:, None]
            keep &= positions[:, 1:] >= starts
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), target, reduction="none")
        total += float(nll[keep].sum())
        count += int(keep.sum())
    if count == 0:
        raise ValueError("the samples hold no tokens to score")
    return total / count
