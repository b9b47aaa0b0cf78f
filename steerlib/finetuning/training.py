"""Preventative steering during finetuning (paper section 5.2), and the CAFT-style ablation variant.

Adding ``coef * v`` along the trait direction during training forward passes supplies the trait "for free",
so the optimiser has less reason to move the weights toward it; steering is off at inference. The ablation
variant (``mode="ablate"``, concept-ablation finetuning) removes the direction from the residual stream
while training instead.

Both are thin wrappers over ``steerlib.steering.steer.steer``, which edits out of place whenever autograd records the
pass, so gradients flow through the edit. PEFT-wrapped models are unwrapped to place the hooks.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import TrainerCallback

from steerlib.core.capture import pad_batch, pad_token_id, tokenize_pairs
from steerlib.core.models import unwrap_model
from steerlib.core.vectors import VectorSource
from steerlib.steering.plan import method_named
from steerlib.steering.steer import ResidualEditor, steer
from steerlib.store.samples import ReadResult, Sample, as_samples

__all__ = [
    "PreventativeSteeringCallback",
    "TrainResult",
    "lora_finetune",
    "preventative_steering",
]

TrainMode = str  # a registered steering method: "add" (preventative steering), "ablate" (CAFT) or another


@contextlib.contextmanager
def preventative_steering(
    model: nn.Module,
    vectors: VectorSource | str | Path,
    layer: int,
    coef: float = 1.0,
    *,
    mode: TrainMode = "add",
    kind: str | None = None,
) -> Iterator[ResidualEditor]:
    """Steer every forward pass (training steps included) inside the ``with`` block.

    Args:
        model: HF causal LM or a PEFT model wrapping one.
        vectors: TraitVectors, a tensor ([D] or [n_layers + 1, D]) or a saved vectors path.
        layer: residual-stream layer to edit (1..n_layers).
        coef: scale of the added vector for ``mode="add"`` (the paper steers *toward* the trait during
            training, coef > 0, to keep the finetune from learning it).
        mode: a registered steering method: "add" (preventative steering), "ablate" (CAFT: project the
            direction out), or another (``register_method``).
        kind: TraitVectors pooling kind.
    """
    method_named(mode)
    with steer(unwrap_model(model), vectors, layers=layer, coef=coef, mode=mode, kind=kind) as editor:
        yield editor


class PreventativeSteeringCallback(TrainerCallback):
    """``transformers.Trainer`` callback applying ``preventative_steering`` from train begin to train end.

    Evaluation run by the Trainer during training is steered too; evaluate after ``train()`` returns for
    unsteered numbers.

    The Trainer tells callbacks when training ends but not when it raises, so a callback alone cannot clean up
    after a failed run. Use it as a context manager around ``train()``: the hooks are removed when the block
    exits, whether training finished or raised (``close()`` does the same by hand)::

        with PreventativeSteeringCallback(vectors, layer=16, coef=4.0) as steering:
            Trainer(model=model, args=args, train_dataset=data, callbacks=[steering]).train()

    Args:
        vectors: TraitVectors, a tensor or a saved vectors path.
        layer: layer to edit.
        coef: steering coefficient for ``mode="add"``.
        mode: a registered steering method ("add", "ablate"...).
        kind: TraitVectors pooling kind.
    """

    def __init__(self, vectors: VectorSource | str | Path, layer: int, coef: float = 1.0, *,
                 mode: TrainMode = "add", kind: str | None = None) -> None:
        method_named(mode)
        self.vectors, self.layer, self.coef, self.mode, self.kind = vectors, layer, coef, mode, kind
        self._stack: contextlib.ExitStack | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("the Trainer passed no model to PreventativeSteeringCallback.on_train_begin")
        self.close()
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(
            preventative_steering(model, self.vectors, self.layer, self.coef, mode=self.mode, kind=self.kind)
        )

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def close(self) -> None:
        """Remove the steering hooks (idempotent)."""
        if self._stack is not None:
            stack, self._stack = self._stack, None
            stack.close()

    def __enter__(self) -> PreventativeSteeringCallback:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()  # the exception, if any, propagates


# -- a small LoRA finetuning loop ------------------------------------------------------------------------


@dataclass
class TrainResult:
    """A finetuned PEFT model and its loss curve."""

    model: nn.Module
    losses: list[float] = field(default_factory=list)


def _collate(tokenizer, prompts: Sequence[str], responses: Sequence[str], device) -> dict[str, torch.Tensor]:
    eos = tokenizer.eos_token or ""
    encoded = tokenize_pairs(tokenizer, prompts, [r + eos for r in responses])
    pad_id = pad_token_id(tokenizer)
    ids, mask, positions, offsets = pad_batch([e[0] for e in encoded], pad_id, "right")
    labels = ids.clone()
    labels[mask == 0] = -100
    for row, (_, p_len) in enumerate(encoded):
        labels[row, :p_len] = -100  # learn the responses only, as in chat finetuning
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device),
            "position_ids": positions.to(device), "labels": labels.to(device)}


def lora_finetune(
    model: nn.Module,
    tokenizer,
    samples: Sequence[Sample] | ReadResult | str | Path,
    *,
    steps: int = 40,
    batch_size: int = 8,
    lr: float = 1e-3,
    r: int = 8,
    alpha: int = 16,
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
    steering: dict | None = None,
    seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Finetune LoRA adapters on (prompt, response) samples with a plain AdamW loop, optionally steered.

    The model is wrapped in place with PEFT (its modules gain LoRA layers): pass a fresh copy if the
    original must stay untouched.

    Args:
        model: HF causal LM.
        tokenizer: its tokenizer.
        samples: ``Sample`` list, a ``ReadResult`` or a data file path.
        steps: optimiser steps (batches are drawn cyclically from a seeded shuffle).
        batch_size: samples per step.
        lr: AdamW learning rate.
        r: LoRA rank.
        alpha: LoRA alpha.
        target_modules: module names that get adapters.
        steering: keyword arguments of ``preventative_steering`` (``vectors``, ``layer``, ``coef``, ``mode``,
            ``kind``) to steer every training step, or None.
        seed: seed for adapter initialisation and batch order.
        on_step: called as ``on_step(step, loss)``.
    """
    from peft import LoraConfig, get_peft_model

    samples = as_samples(samples, what="training samples")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=0.0,
                        bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    device = next(peft_model.parameters()).device
    prompts = [s.prompt_text(tokenizer) for s in samples]
    responses = [s.response for s in samples]
    order: list[int] = []
    losses: list[float] = []
    ctx = preventative_steering(peft_model, **steering) if steering else contextlib.nullcontext()
    peft_model.train()
    try:
        with ctx:
            for step in range(steps):
                if len(order) < batch_size:
                    more = list(range(len(samples)))
                    rng.shuffle(more)
                    order.extend(more)
                batch, order = order[:batch_size], order[batch_size:]
                inputs = _collate(tokenizer, [prompts[i] for i in batch], [responses[i] for i in batch],
                                  device)
                loss = peft_model(**inputs, use_cache=False).loss
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise FloatingPointError(f"loss became {value} at step {step}; lower the learning rate "
                                             "or the steering coefficient")
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                losses.append(value)
                if on_step is not None:
                    on_step(step, value)
    finally:
        peft_model.eval()
    return TrainResult(model=peft_model, losses=losses)
