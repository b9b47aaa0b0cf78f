"""A capability axis: what steering costs the model, measured beside the trait at every coefficient.

Two measures, both by log-likelihood under the steering (no generation, no judge):

* **accuracy** on steerlib's shipped multiple-choice set (``steerlib/data/capability/capability.jsonl``, made by
  ``scripts/make_capability_set.py``): arithmetic, copying, ordering, facts stated in the prompt, sequences, the
  alphabet. An item is right when its correct choice has the highest summed log-probability after the question
  (lm-evaluation-harness's ``acc``; the context and continuation split the same way).
* **perplexity of held-out unsteered answers**: the unsteered model's own greedy answers to a few general questions
  (generated once), scored under the steering. 1.0 would be certainty; it rises as steering pulls the model away
  from what it would have said.

``CapabilityProbe`` builds the unsteered answers once and is then called with each coefficient's ops; the dose
sweep (``steerlib.steering.dose.dose_response(capability=...)``), ``steerlib steer --sweep``, the report and
``train --preventative`` use it. Scoring is one forward pass over question and answer, so every op must steer
every position (``positions="all"``, what the dose sweep uses).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from steerlib.core.chat import format_prompt
from steerlib.steering.generation import generate
from steerlib.steering.plan import SteerOp, position_rule
from steerlib.steering.steer import ResidualEditor

__all__ = ["HELD_OUT_QUESTIONS", "Capability", "CapabilityItem", "CapabilityProbe", "answer_nll",
           "choice_loglikelihoods", "load_capability_set"]

# General questions whose unsteered answers are the perplexity reference (none is about a steered trait).
HELD_OUT_QUESTIONS = (
    "Explain how a bicycle works.",
    "What is the water cycle?",
    "Describe how to boil an egg.",
    "Why do we have seasons on Earth?",
    "What does a librarian do?",
    "How do plants make their food?",
)


@dataclass(frozen=True)
class CapabilityItem:
    """One multiple-choice item: ``question`` (ends with ``"Answer:"``), ``choices`` (each starts with a space),
    ``answer`` (index of the right choice)."""

    id: str
    kind: str
    question: str
    choices: tuple[str, ...]
    answer: int


@dataclass(frozen=True)
class Capability:
    """One steering setting's capability: multiple-choice accuracy (0..1) and the held-out answers' perplexity."""

    accuracy: float
    perplexity: float | None
    n_items: int

    def format(self) -> str:
        ppl = "-" if self.perplexity is None else f"{self.perplexity:.2f}"
        return f"capability {100 * self.accuracy:.1f}% of {self.n_items} items, held-out perplexity {ppl}"


def load_capability_set(path: str | Path | None = None, *, kinds: Sequence[str] | None = None,
                        limit: int | None = None) -> list[CapabilityItem]:
    """The shipped capability set (or a JSONL file of the same shape).

    Args:
        path: a JSONL file of ``{"id", "kind", "question", "choices", "answer"}`` (default: the shipped set).
        kinds: keep only these kinds.
        limit: keep at most this many items per kind (the first ones), for a quicker measure.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    text = (Path(path).read_text() if path is not None else
            resources.files("steerlib").joinpath("data/capability/capability.jsonl").read_text())
    items, per_kind = [], {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        raw = json.loads(line)
        try:
            item = CapabilityItem(str(raw["id"]), str(raw["kind"]), str(raw["question"]),
                                  tuple(str(c) for c in raw["choices"]), int(raw["answer"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path or 'capability set'} line {n}: not an item ({exc})") from None
        if not 0 <= item.answer < len(item.choices) or len(item.choices) < 2:
            raise ValueError(f"{path or 'capability set'} line {n}: answer {item.answer} is not one of "
                             f"{len(item.choices)} choices")
        if kinds is not None and item.kind not in kinds:
            continue
        if limit is not None and per_kind.get(item.kind, 0) >= limit:
            continue
        per_kind[item.kind] = per_kind.get(item.kind, 0) + 1
        items.append(item)
    if kinds is not None and not items:
        raise ValueError(f"no items of kinds {list(kinds)}")
    return items


def _check_ops(ops: Sequence[SteerOp]) -> None:
    for op in ops:
        if position_rule(op.positions).spec() != "all":
            raise ValueError(f"capability scoring steers every position in one pass; an op with positions="
                             f"{op.positions!r} cannot be scored (use positions='all')")


@torch.no_grad()
def _continuation_logprobs(model: nn.Module, pairs: Sequence[tuple[list[int], list[int]]],
                           ops: Sequence[SteerOp], batch_size: int) -> list[list[float]]:
    """Per (context ids, continuation ids) pair, each continuation token's log-probability under ``ops``."""
    _check_ops(ops)
    device = next(model.parameters()).device
    out: list[list[float]] = []
    with ResidualEditor(model, list(ops)) if ops else contextlib.nullcontext():
        for start in range(0, len(pairs), batch_size):
            batch = pairs[start:start + batch_size]
            seqs = [ctx + cont for ctx, cont in batch]
            width = max(len(s) for s in seqs)
            ids = torch.zeros((len(seqs), width), dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for i, s in enumerate(seqs):  # right padding: a causal pass never lets a real token see it
                ids[i, :len(s)] = torch.tensor(s)
                mask[i, :len(s)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            lp = torch.log_softmax(logits, dim=-1)
            for i, (ctx, cont) in enumerate(batch):
                pos = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1, device=lp.device)
                out.append(lp[i, pos, torch.tensor(cont, device=lp.device)].tolist())
    return out


def _split(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation ids as lm-evaluation-harness splits them: the whole string encoded once, the
    continuation being what follows the context's own encoding."""
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    if whole[:len(ctx)] != ctx:  # the boundary merged into one token: encode the parts apart
        return ctx, tokenizer(continuation, add_special_tokens=False)["input_ids"]
    return ctx, whole[len(ctx):]


def choice_loglikelihoods(model: nn.Module, tokenizer: Any, items: Sequence[CapabilityItem],
                          ops: Sequence[SteerOp] = (), *, batch_size: int = 32) -> list[list[float]]:
    """Per item, each choice's summed log-probability after the question, under ``ops``."""
    pairs = [_split(tokenizer, item.question, c) for item in items for c in item.choices]
    sums = [sum(x) for x in _continuation_logprobs(model, pairs, ops, batch_size)]
    out, at = [], 0
    for item in items:
        out.append(sums[at:at + len(item.choices)])
        at += len(item.choices)
    return out


def answer_nll(model: nn.Module, tokenizer: Any, prompts: Sequence[str], answers: Sequence[str],
               ops: Sequence[SteerOp] = (), *, batch_size: int = 16) -> tuple[float, int]:
    """Summed negative log-likelihood of ``answers`` after their (formatted) ``prompts`` under ``ops``, and the
    number of answer tokens."""
    pairs = [(tokenizer(p, add_special_tokens=False)["input_ids"], tokenizer(a, add_special_tokens=False)["input_ids"])
             for p, a in zip(prompts, answers, strict=True)]
    pairs = [(p, a) for p, a in pairs if a]
    values = _continuation_logprobs(model, pairs, ops, batch_size)
    return -sum(sum(v) for v in values), sum(len(v) for v in values)


class CapabilityProbe:
    """Measures ``Capability`` under any steering: build once (it generates the unsteered answers), call per setting.

    Args:
        model, tokenizer: the model steered.
        items: the multiple-choice items (default: the shipped set).
        questions: held-out questions whose unsteered answers are scored (default ``HELD_OUT_QUESTIONS``; empty:
            no perplexity).
        max_new_tokens: length of each unsteered answer.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, items: Sequence[CapabilityItem] | None = None,
                 questions: Sequence[str] | None = HELD_OUT_QUESTIONS, *, max_new_tokens: int = 32):
        self.model, self.tokenizer = model, tokenizer
        self.items = list(items) if items is not None else load_capability_set()
        if not self.items:
            raise ValueError("no capability items to score")
        questions = list(questions or ())
        self.prompts = [format_prompt(tokenizer, q) for q in questions]
        self.answers = ([g.text for g in generate(model, tokenizer, self.prompts, max_new_tokens=max_new_tokens)]
                        if self.prompts else [])

    def __call__(self, ops: Sequence[SteerOp] = (), *, model: nn.Module | None = None) -> Capability:
        """Capability under ``ops``; ``model``: score another model (e.g. after finetuning) against the same
        items and the same unsteered answers of the model the probe was built with."""
        model = model if model is not None else self.model
        scores = choice_loglikelihoods(model, self.tokenizer, self.items, ops)
        right = sum(int(max(range(len(s)), key=s.__getitem__) == item.answer)
                    for s, item in zip(scores, self.items, strict=True))
        ppl = None
        if self.prompts:
            nll, n = answer_nll(model, self.tokenizer, self.prompts, self.answers, ops)
            ppl = math.exp(nll / n) if n else None
        return Capability(right / len(self.items), ppl, len(self.items))
