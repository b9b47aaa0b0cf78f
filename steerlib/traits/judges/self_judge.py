"""The model under study as its own judge: the LLM judge's logprob method on a local causal LM."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from steerlib.traits.judges.base import (
    MAX_SCORE,
    MIN_SCORE,
    BaseJudge,
    JudgeError,
    integer_value,
    weighted_score,
)
from steerlib.traits.library import check_rubric, fill_rubric

__all__ = ["SelfJudge"]


class _IntegerReader:
    """Reads a distribution over the integers 0..100 from a causal LM's next-token probabilities.

    Two tokenizer families need different handling:

    * "whole": every integer 0..100 is one token (GPT-4o, Llama 3). The score distribution is the
      next-token distribution over those tokens: one forward pass, exactly the API judge's rule.
    * "digits": numbers are split into single digits (SmolLM2, Qwen, Mistral, Gemma). Reading one token
      would confine scores to 0..9, so the number is followed down its digits:
      P(7) = P("7") * P(no digit follows | "7"), P(75) = P("7") * P("5" | "7"),
      P(10) = P("1") P("0" | "1") P(no digit | "10"), P(100) = P("1") P("0" | "1") P("0" | "10").
      Needs the distributions after nine continuations (prompt + "10", prompt + "2" ... "9").
    """

    def __init__(self, tokenizer: Any, vocab_size: int | None = None) -> None:
        n = len(tokenizer)
        texts = tokenizer.batch_decode([[i] for i in range(n)])
        self.vocab_size = max(vocab_size or 0, n)
        by_value: dict[int, list[int]] = {}
        exact_digit: dict[int, int] = {}
        digit_start = [False] * self.vocab_size
        for i, text in enumerate(texts):
            value = integer_value(text)
            if value is not None:
                by_value.setdefault(value, []).append(i)
                if len(text) == 1 and text.isdigit():
                    exact_digit.setdefault(int(text), i)
            digit_start[i] = bool(text) and text[0].isascii() and text[0].isdigit()
        if all(v in by_value for v in range(MIN_SCORE, MAX_SCORE + 1)):
            self.mode = "whole"
        elif all(d in exact_digit for d in range(10)):
            self.mode = "digits"
        else:
            raise JudgeError(
                "the tokenizer has neither a token for every integer 0..100 nor one for every digit 0..9; "
                "it cannot be used as a logprob judge"
            )
        self.by_value = by_value
        self.digit = [exact_digit[d] for d in range(10)] if self.mode == "digits" else []
        self.digit_start = digit_start
        # Root tokens per digit: "7" and any " 7"-style variants all start the number 7.
        self.root = {d: by_value.get(d, []) for d in range(10)}

    def _mask(self, like: Any) -> Any:
        """Boolean tensor over the vocabulary: tokens that start with a digit (cached per device)."""
        import torch

        cached = getattr(self, "_mask_cache", None)
        if cached is None or cached.device != like.device or cached.shape[-1] != like.shape[-1]:
            flags = (self.digit_start + [False] * like.shape[-1])[: like.shape[-1]]
            cached = self._mask_cache = torch.tensor(flags, dtype=torch.bool, device=like.device)
        return cached

    @property
    def suffixes(self) -> list[list[int]]:
        """Token suffixes appended to each prompt; the first one's prompt position gives the root."""
        if self.mode == "whole":
            return [[]]
        return [[self.digit[1], self.digit[0]]] + [[self.digit[d]] for d in range(2, 10)]

    def combine(self, dists: Sequence[Any]) -> dict[int, float]:
        """Integer probabilities from the next-token distributions at each needed position.

        Args:
            dists: for "whole", ``[root]``; for "digits", ``[root, after "1", after "10", after "2", ...,
                after "9"]``; each a 1-D tensor of probabilities over the vocabulary.
        """
        root = dists[0]
        if self.mode == "whole":
            return {v: float(root[ids].sum()) for v, ids in self.by_value.items()}
        mask = self._mask(root)
        after = {1: dists[1], 10: dists[2]}
        for d in range(2, 10):
            after[d] = dists[d + 1]

        def stop(p: Any) -> float:
            return max(0.0, 1.0 - float(p[mask].sum()))

        r = {d: float(root[self.root[d]].sum()) for d in range(10)}
        probs = {0: r[0]}  # "0" cannot be followed by a digit in a canonical number
        for d in range(1, 10):
            probs[d] = r[d] * stop(after[d])
            for e in range(10):
                probs[10 * d + e] = r[d] * float(after[d][self.digit[e]])
        p10 = probs[10]  # P("1") P("0" | "1"): "10" may still grow into "100"
        probs[10] = p10 * stop(after[10])
        probs[100] = p10 * float(after[10][self.digit[0]])
        return probs


class SelfJudge(BaseJudge):
    """A local Hugging Face causal LM as its own judge, with the logprob rule of :class:`LLMJudge`.

    The rubric is wrapped in the model's chat template and the next-token distribution at the start of the
    assistant turn is read for integer tokens (multi-digit numbers are followed digit by digit on
    tokenizers that split them; see ``_IntegerReader``). Prompts are batched with left padding; for
    digit-splitting tokenizers the prompt is encoded once and its KV cache reused for the digit branches.

    Args:
        model: a causal LM returning ``.logits``.
        tokenizer: its tokenizer (with a chat template unless ``format_fn`` is given).
        rubric: prompt with ``{question}``/``{answer}`` slots asking for a 0-100 score.
        min_mass: minimum probability on integers for a score (else None).
        batch_size: answers per forward pass.
        system: optional system prompt for the judge turn.
        answer_prefix: text put at the start of the assistant turn before reading the number, e.g.
            ``"Score: "``; small models rarely open a reply with a number, so without it almost no
            probability lands on integers and every score is None.
        format_fn: ``(tokenizer, user, system) -> str`` building the prompt; defaults to
            :func:`steerlib.core.chat.format_prompt`.
        use_cache: reuse the prompt's KV cache for the digit branches (falls back automatically when the
            model returns no cache); False recomputes each branch from scratch.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        rubric: str,
        min_mass: float = 0.25,
        batch_size: int = 8,
        system: str | None = None,
        answer_prefix: str | None = None,
        format_fn: Callable[[Any, str, str | None], str] | None = None,
        use_cache: bool = True,
    ) -> None:
        try:
            self.rubric = check_rubric(rubric, "rubric")
        except ValueError as e:
            raise JudgeError(f"SelfJudge: {e}") from None
        if format_fn is None:
            from steerlib.core.chat import format_prompt

            format_fn = format_prompt
        self.model = model
        self.tokenizer = tokenizer
        self.min_mass = min_mass
        self.batch_size = max(1, batch_size)
        self.system = system
        self.answer_prefix = answer_prefix
        self.format_fn = format_fn
        self.use_cache = use_cache
        config_vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        self.reader = _IntegerReader(tokenizer, config_vocab)
        self._keep_arg = True  # whether the model accepts logits_to_keep (memory: only the last positions)

    def __repr__(self) -> str:
        return f"SelfJudge({type(self.model).__name__}, mode={self.reader.mode})"

    def _prompt_ids(self, question: str, answer: str) -> list[int]:
        text = self.format_fn(self.tokenizer, fill_rubric(self.rubric, question, answer), self.system)
        text += self.answer_prefix or ""
        # The chat template already carries BOS/special tokens.
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _call(self, keep: int, **kwargs: Any) -> Any:
        """Run the model, asking for logits at the last ``keep`` positions only when it supports that."""
        if self._keep_arg:
            try:
                return self.model(**kwargs, logits_to_keep=keep)
            except TypeError:
                self._keep_arg = False
        return self.model(**kwargs)

    def _batch(self, seqs: list[list[int]]) -> tuple[Any, Any, Any]:
        """Left-padded ids, attention mask and position ids (counting real tokens only) on the model device."""
        import torch

        device = next(self.model.parameters()).device
        width = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else (self.tokenizer.eos_token_id or 0)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[row, width - len(s) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return ids.to(device), mask.to(device), positions.to(device)

    def _dists_recompute(self, prompts: list[list[int]]) -> list[list[Any]]:
        """Per prompt, the distributions ``_IntegerReader.combine`` wants, from full sequences."""
        import torch

        suffixes = self.reader.suffixes
        keep = max(len(s) for s in suffixes) + 1
        ids, mask, positions = self._batch([p + s for p in prompts for s in suffixes])
        logits = self._call(keep, input_ids=ids, attention_mask=mask, position_ids=positions).logits
        # combine() reads ~100 scalars per answer; on CPU that costs no device syncs.
        probs = torch.softmax(logits[:, -keep:, :].float(), dim=-1).cpu()
        out = []
        for i in range(len(prompts)):
            rows = probs[i * len(suffixes) : (i + 1) * len(suffixes)]
            dists: list[Any] = []
            for row, suffix in zip(rows, suffixes, strict=True):
                last = keep - 1 - len(suffix)  # right-aligned: the prompt's last token
                if not dists:
                    dists.append(row[last])  # root: the same in every row, read once
                dists.extend(row[last + k + 1] for k in range(len(suffix)))
            out.append(dists)
        return out

    def _dists_cached(self, prompts: list[list[int]]) -> list[list[Any]] | None:
        """Same as ``_dists_recompute`` for "digits" mode, encoding each prompt once; None if no cache."""
        import torch

        from steerlib.core.compat import cache_keyword, output_cache

        ids, mask, positions = self._batch(prompts)
        first = self._call(1, input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        cache = output_cache(first)
        if cache is None or not hasattr(cache, "batch_repeat_interleave"):
            return None
        root = torch.softmax(first.logits[:, -1, :].float(), dim=-1).cpu()
        # Branch rows per prompt: ["1", "0"], ["2", pad], ..., ["9", pad]. Causal attention keeps the pad
        # from affecting the first position, which is all those rows are read at.
        digit = self.reader.digit
        branches = [[digit[1], digit[0]]] + [[digit[d], digit[d]] for d in range(2, 10)]
        n = len(branches)
        cache.batch_repeat_interleave(n)
        device = ids.device
        step = torch.tensor(branches, dtype=torch.long, device=device).repeat(len(prompts), 1)
        step_mask = torch.cat([mask.repeat_interleave(n, dim=0), torch.ones_like(step)], dim=1)
        start = mask.sum(-1, keepdim=True).repeat_interleave(n, dim=0)
        step_pos = start + torch.arange(2, device=device)
        second = self._call(
            2,
            input_ids=step,
            attention_mask=step_mask,
            position_ids=step_pos,
            use_cache=True,
            **{cache_keyword(self.model): cache},
        )
        probs = torch.softmax(second.logits[:, -2:, :].float(), dim=-1).cpu().view(len(prompts), n, 2, -1)
        return [[root[i], probs[i, 0, 0], probs[i, 0, 1], *probs[i, 1:, 0]] for i in range(len(prompts))]

    def distributions(
        self, pairs: Sequence[tuple[str, str]], progress: bool = False
    ) -> list[dict[int, float]]:
        """Probability of each integer score for each (question, answer) pair.

        Args:
            pairs: (question, answer) tuples.
            progress: show a tqdm progress bar.
        """
        import torch

        starts: Iterable[int] = range(0, len(pairs), self.batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(list(starts), desc="self-judging", unit="batch")
        out: list[dict[int, float]] = []
        with torch.inference_mode():
            for start in starts:
                prompts = [self._prompt_ids(q, a) for q, a in pairs[start : start + self.batch_size]]
                dists = None
                if self.use_cache and self.reader.mode == "digits":
                    dists = self._dists_cached(prompts)
                if dists is None:
                    dists = self._dists_recompute(prompts)
                out.extend(self.reader.combine(d) for d in dists)
        return out

    def score(self, question: str, answer: str) -> float | None:
        return self.score_many([(question, answer)])[0]

    def score_many(self, pairs: Sequence[tuple[str, str]], progress: bool = False) -> list[float | None]:
        """Score answers in batches (left-padded).

        Args:
            pairs: (question, answer) tuples.
            progress: show a tqdm progress bar.
        """
        return [weighted_score(d, self.min_mass) for d in self.distributions(list(pairs), progress)]


# -- factory --------------------------------------------------------------------------------------

