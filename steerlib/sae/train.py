"""Training a TopK SAE with EleutherAI's sparsify (``eai-sparsify``), fed from steerlib's activation cache.

sparsify's ``Trainer`` owns the optimisation: TopK encoder, unit-norm decoder with the parallel gradient removed,
the AuxK loss on dead latents, its dead-latent bookkeeping, checkpoints and resume. It expects a model and a
dataset of token ids and trains on the output of named modules; here the "model" is ``_Replay``, which takes row
numbers of the cache as its ``input_ids`` and emits those cached activations from one identity module, so no
language model runs while training and the cache is read once per epoch, shuffled.

Why sparsify and not SAELens: ``sae-lens`` 6.54 requires ``transformer-lens<4`` and this project's lock has 4.3;
``eai-sparsify`` 1.3.3 needs no TransformerLens. The trained SAE is written in SAELens's folder format
(``steerlib.core.sae_format``), which SAELens loads.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from steerlib.core.checks import check_int, check_number, load_json
from steerlib.core.sae_format import SparseAutoencoder, load_sae
from steerlib.sae.cache import ActivationCache

__all__ = ["SaeTrainConfig", "train_sae"]

_HOOK = "stream"
_STATE = "train.json"


@dataclass(frozen=True)
class SaeTrainConfig:
    """Knobs of one SAE training run (a resume must match all of them).

    Attributes:
        expansion: latents per residual dimension (d_sae = expansion * d_model).
        k: active latents per token.
        auxk_alpha: weight of the AuxK loss that trains dead latents on the live ones' residual.
        dead_tokens: a latent that has not fired for this many tokens counts as dead (for AuxK).
        tokens_per_step: activations per optimiser step.
        epochs: passes over the training rows.
        holdout: share of the cache kept out of training for the quality numbers.
        seed: initialisation and shuffling seed.
        lr: learning rate (None: sparsify's default for the width).
    """

    expansion: int = 8
    k: int = 32
    auxk_alpha: float = 1 / 32
    dead_tokens: int = 200_000
    tokens_per_step: int = 4096
    epochs: int = 1
    holdout: float = 0.05
    seed: int = 0
    lr: float | None = None

    def __post_init__(self) -> None:
        check_int(self.expansion, "expansion")
        check_int(self.k, "k")
        check_int(self.dead_tokens, "dead_tokens")
        check_int(self.tokens_per_step, "tokens_per_step", minimum=8)
        check_int(self.epochs, "epochs")
        check_int(self.seed, "seed", minimum=0)
        check_number(self.auxk_alpha, "auxk_alpha", minimum=0)
        check_number(self.holdout, "holdout", minimum=0)
        if not self.holdout < 0.5:
            raise ValueError(f"holdout must be below 0.5, got {self.holdout}")
        if self.lr is not None:
            check_number(self.lr, "lr", minimum=0, strict=True)


class _Replay(nn.Module):
    """A stand-in model for sparsify's Trainer: ``input_ids`` [B, T] are cache rows, the output is their activations."""

    def __init__(self, acts: np.ndarray):
        super().__init__()
        self.acts = acts
        self.stream = nn.Identity()
        self._anchor = nn.Parameter(torch.zeros(()), requires_grad=False)  # gives the module a device
        self.config = SimpleNamespace(num_hidden_layers=1)
        self.dummy_inputs = {"input_ids": torch.zeros(1, 1, dtype=torch.long)}

    @property
    def base_model(self) -> nn.Module:
        return self

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    def forward(self, input_ids: torch.Tensor, **_: object) -> torch.Tensor:
        rows = torch.from_numpy(np.ascontiguousarray(self.acts[input_ids.reshape(-1).numpy()]))
        return self.stream(rows.reshape(*input_ids.shape, -1))


class _Rows(torch.utils.data.Dataset):
    """Shuffled cache rows cut into fixed-length "sequences"; ``select`` is how sparsify skips ahead on resume."""

    def __init__(self, order: np.ndarray, width: int):
        self.order, self.width = order, width

    def __len__(self) -> int:
        return len(self.order) // self.width

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.from_numpy(self.order[i * self.width : (i + 1) * self.width].astype(np.int64))}

    def select(self, indices: range) -> _Rows:
        return _Rows(self.order[indices.start * self.width :], self.width)


def split_rows(n_tokens: int, cfg: SaeTrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """(training rows shuffled and repeated per epoch, held-out rows): the same split for every seed."""
    rows = np.random.default_rng(12345).permutation(n_tokens)
    n_hold = int(n_tokens * cfg.holdout)
    held, train = np.sort(rows[:n_hold]), rows[n_hold:]
    rng = np.random.default_rng(cfg.seed)
    return np.concatenate([rng.permutation(train) for _ in range(cfg.epochs)]), held


def _sparsify():
    # sparsify picks a Triton decoder at import when Triton is installed; on CPU that kernel cannot run.
    if not torch.cuda.is_available():
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            import sparsify
            import sparsify.sparse_coder
            import sparsify.utils
    except ImportError:
        raise ImportError("training SAEs needs eai-sparsify: pip install 'steerlib[sae]'") from None
    if not torch.cuda.is_available():  # imported earlier by someone else, before the variable was set
        sparsify.sparse_coder.decoder_impl = sparsify.utils.eager_decode
    return sparsify


def train_sae(cache: ActivationCache | str | Path, out: str | Path, cfg: SaeTrainConfig | None = None, *,
              model_name: str = "unknown", n_layers: int | None = None) -> SparseAutoencoder:
    """Train a TopK SAE on a cache and save it to ``out`` in SAELens's format; an interrupted run resumes.

    Args:
        cache: an ``ActivationCache`` (or its folder).
        out: the SAE folder; sparsify's checkpoints go to ``out/checkpoints``.
        cfg: training settings.
        model_name: recorded in ``cfg.json``'s metadata.
        n_layers: the model's depth, recorded too (a latent read without the model then has the right depth).

    sparsify's own progress bar (on stderr) shows the steps.
    """
    cfg = cfg or SaeTrainConfig()
    cache = cache if isinstance(cache, ActivationCache) else ActivationCache(cache)
    d_model = cache.settings.d_model
    order, held = split_rows(cache.n_tokens, cfg)
    seq = 256
    if len(order) < seq * max(1, cfg.tokens_per_step // seq):
        raise ValueError(f"{cache.folder}: {cache.n_tokens} cached tokens are too few for one step of "
                         f"{cfg.tokens_per_step} tokens; harvest more text")
    if cfg.k > cfg.expansion * d_model:
        raise ValueError(f"k={cfg.k} is larger than the SAE's {cfg.expansion * d_model} latents")
    out = Path(out)
    state = {"cache": str(cache.folder.resolve()), "cache_settings": asdict(cache.settings),
             "n_tokens": cache.n_tokens, "config": asdict(cfg)}
    state_path = out / _STATE
    ckpt_root = out / "checkpoints"
    resume = None
    if state_path.is_file():
        old = load_json(state_path, "SAE training state")
        for key in ("cache_settings", "n_tokens", "config"):
            if old.get(key) != json.loads(json.dumps(state[key])):
                raise ValueError(f"{out}: a training run with other {key.replace('_', ' ')} is here; use another "
                                 "folder (or delete this one)")
        if old.get("done") and (out / "sae_weights.safetensors").is_file():
            return load_sae(out)
        if (ckpt_root / "sae" / "state.pt").is_file():
            resume = ckpt_root / "sae"
    out.mkdir(parents=True, exist_ok=True)
    state_path.write_text(json.dumps(state, indent=2))

    sparsify = _sparsify()
    sae_cfg = sparsify.SaeConfig(expansion_factor=cfg.expansion, k=cfg.k)
    train_cfg = sparsify.TrainConfig(
        sae_cfg, batch_size=max(1, cfg.tokens_per_step // seq), auxk_alpha=cfg.auxk_alpha,
        dead_feature_threshold=cfg.dead_tokens, hookpoints=[_HOOK], init_seeds=[cfg.seed], lr=cfg.lr,
        save_every=50, log_to_wandb=False, save_dir=str(ckpt_root), run_name="sae")
    precision = torch.get_float32_matmul_precision()
    torch.manual_seed(cfg.seed)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # sparsify prints its settings; the bar goes to stderr
            trainer = sparsify.Trainer(train_cfg, _Rows(order, seq), _Replay(cache.acts))
            if resume is not None:
                trainer.load_state(str(resume))
            trainer.fit()
    finally:
        torch.set_float32_matmul_precision(precision)  # sparsify sets it globally
    coder = sparsify.SparseCoder.load_from_disk(ckpt_root / "sae" / _HOOK)  # the schedule-free average weights
    sae = SparseAutoencoder(
        W_enc=coder.encoder.weight.detach().T, W_dec=coder.W_dec.detach(), b_enc=coder.encoder.bias.detach(),
        b_dec=coder.b_dec.detach(), architecture="topk", k=cfg.k, layer=cache.settings.layer,
        metadata={"model_name": model_name, "n_layers": n_layers, "trained_by": "steerlib sae train (eai-sparsify 1.3.3)",
                  "training_tokens": int(len(order)), "heldout_tokens": int(len(held)), **asdict(cfg)})
    sae.save(out)
    state_path.write_text(json.dumps({**state, "done": True}, indent=2))
    return sae
