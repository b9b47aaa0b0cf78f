"""Judges score how strongly an answer shows a trait, on a 0-100 scale.

Every judge has one interface: ``score(question, answer) -> float | None`` (None when the judge cannot
commit to a number) and ``score_many(pairs)``. Implementations:

* :class:`LLMJudge`: an OpenAI-compatible ``/chat/completions`` endpoint. As in the Persona Vectors paper
  the score is not the sampled token but the probability-weighted mean over the integer tokens among the
  top logprobs of a single generated token, which is smoother and cheaper than sampling.
* :class:`SelfJudge`: the same logprob method run on a local Hugging Face causal LM.
* :class:`LexiconJudge`: VADER sentiment, offline, for optimistic/pessimistic demos.
* :class:`CallableJudge`: wraps any Python function.

:func:`make_judge` turns a spec string (``"lexicon"``, ``"self"``, ``"openai:<model>"``, ``"auto"``) into one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import httpx

from steerlib.traits import Trait, check_rubric, fill_rubric, load_trait

__all__ = [
    "CallableJudge",
    "Judge",
    "JudgeError",
    "LLMJudge",
    "LexiconJudge",
    "SelfJudge",
    "make_judge",
    "post_chat_completion",
    "weighted_score",
]

MIN_SCORE, MAX_SCORE = 0, 100
# HTTP statuses worth retrying: rate limiting and server-side failures. Other 4xx are our fault.
_RETRY_STATUSES = frozenset({408, 409, 429}) | frozenset(range(500, 600))


class JudgeError(RuntimeError):
    """A judge could not be built or could not reach its backend."""


@runtime_checkable
class Judge(Protocol):
    """Anything that scores (question, answer) pairs on 0..100; None means "no confident score"."""

    def score(self, question: str, answer: str) -> float | None: ...

    def score_many(self, pairs: Sequence[tuple[str, str]], progress: bool = False) -> list[float | None]: ...


class BaseJudge:
    """Default ``score_many``: a plain loop over ``score`` with an optional progress bar."""

    def score(self, question: str, answer: str) -> float | None:
        raise NotImplementedError

    def score_many(self, pairs: Sequence[tuple[str, str]], progress: bool = False) -> list[float | None]:
        """Score each (question, answer) pair in order.

        Args:
            pairs: (question, answer) tuples.
            progress: show a tqdm progress bar.
        """
        items: Iterable[tuple[str, str]] = pairs
        if progress:
            from tqdm.auto import tqdm

            items = tqdm(pairs, desc=type(self).__name__, unit="answer")
        return [self.score(q, a) for q, a in items]


# -- the logprob scoring rule ---------------------------------------------------------------------


def integer_value(token: str) -> int | None:
    """The integer 0..100 a token spells (surrounding whitespace ignored), else None.

    Only canonical spellings count ("7", " 42", "100"), not "007", "+5", "½" or "٣": those are not what a
    judge asked for "a number from 0 to 100" means.
    """
    text = token.strip()
    if not text or not text.isascii() or not text.isdigit():
        return None
    if len(text) > 1 and text[0] == "0":
        return None
    value = int(text)
    return value if MIN_SCORE <= value <= MAX_SCORE else None


def weighted_score(probs: Mapping[int, float], min_mass: float = 0.25) -> float | None:
    """Probability-weighted mean of integer scores, normalised by the mass they carry.

    Args:
        probs: probability of each integer score (need not sum to 1: the rest went to other tokens).
        min_mass: below this total probability on integers the judge is not answering with a number
            (refusing, rambling), so no score is returned.

    Returns:
        The mean score in [0, 100], or None when the integer mass is below ``min_mass``.
    """
    mass = float(sum(probs.values()))
    if mass <= 0 or mass < min_mass:
        return None
    return float(sum(value * p for value, p in probs.items()) / mass)


def _summarise(probs: Mapping[int, float]) -> tuple[float | None, float]:
    """(weighted mean ignoring min_mass, integer mass): what the disk cache stores."""
    mass = float(sum(probs.values()))
    return (weighted_score(probs, min_mass=0.0) if mass > 0 else None), mass


def _apply_min_mass(mean: float | None, mass: float, min_mass: float) -> float | None:
    return None if mean is None or mass < min_mass else mean


# -- HTTP -----------------------------------------------------------------------------------------


def post_chat_completion(
    client: httpx.Client,
    url: str,
    payload: Mapping[str, Any],
    headers: Mapping[str, str] | None = None,
    max_retries: int = 4,
    backoff: float = 0.5,
    what: str = "judge endpoint",
) -> dict[str, Any]:
    """POST ``payload`` to an OpenAI-compatible endpoint, retrying transient failures.

    Connection errors, timeouts, 429 and 5xx are retried ``max_retries`` times with exponential backoff
    (``backoff * 2**attempt`` seconds plus jitter, or the server's Retry-After if longer); other 4xx fail
    at once since repeating the request cannot help.

    Args:
        client: an httpx client (thread-safe, so one can serve a whole pool).
        url: the full ``.../chat/completions`` URL.
        payload: the JSON request body.
        headers: extra headers (Authorization).
        max_retries: retries after the first attempt.
        backoff: first retry delay in seconds.
        what: how to name the endpoint in errors.

    Raises:
        JudgeError: rejected request, undecodable response, or still failing after the last retry.
    """
    last = ""
    for attempt in range(max_retries + 1):
        delay = backoff * (2**attempt) * (1 + 0.1 * random.random())
        try:
            response = client.post(url, json=payload, headers=dict(headers or {}))
        except httpx.TransportError as e:  # connection refused, reset, timeouts
            last = f"{type(e).__name__}: {e}"
        else:
            if response.status_code == 200:
                try:
                    return response.json()
                except ValueError:
                    raise JudgeError(f"{what} {url} returned invalid JSON: {response.text[:200]!r}") from None
            body = response.text[:300]
            if response.status_code not in _RETRY_STATUSES:
                raise JudgeError(f"{what} {url} rejected the request: HTTP {response.status_code}: {body}")
            last = f"HTTP {response.status_code}: {body}"
            retry_after = response.headers.get("retry-after")
            if retry_after:
                try:
                    delay = max(delay, min(float(retry_after), 60.0))
                except ValueError:
                    pass
        if attempt < max_retries:
            time.sleep(delay)
    raise JudgeError(f"{what} {url} unreachable after {max_retries} retries: {last}")


class _JsonlCache:
    """Append-only JSONL cache of judge results, shared by instances and reruns.

    Each line is one finished request, written (and flushed) as soon as it arrives so that an interrupted
    run loses nothing. Lines that fail to parse (a run killed mid-write) are skipped.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._data: dict[str, tuple[float | None, float]] = {}
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                    self._data[row["key"]] = (row["score"], float(row["mass"]))
                except (ValueError, KeyError, TypeError):
                    continue

    def get(self, key: str) -> tuple[float | None, float] | None:
        return self._data.get(key)

    def put(self, key: str, mean: float | None, mass: float) -> None:
        line = json.dumps({"key": key, "score": mean, "mass": mass}) + "\n"
        with self._lock:
            self._data[key] = (mean, mass)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # One write() per line in append mode keeps concurrent writers from interleaving lines.
            with self.path.open("a", encoding="utf-8") as f:
                f.write(line)


class LLMJudge(BaseJudge):
    """Judge through an OpenAI-compatible chat endpoint using top-token logprobs.

    Args:
        base_url: API root such as ``http://127.0.0.1:8000/v1``; ``/chat/completions`` is appended.
        model: model name sent to the endpoint.
        rubric: prompt with ``{question}`` and ``{answer}`` slots asking for a 0-100 score.
        api_key: bearer token; defaults to ``OPENAI_API_KEY``, none is sent if neither is set.
        min_mass: minimum probability on integer tokens for a score (else None).
        concurrency: requests in flight at once in :meth:`score_many`.
        max_retries: retries per request on 429/5xx/connection errors.
        backoff: first retry delay in seconds (doubles each retry).
        timeout: per-request timeout in seconds.
        cache_dir: folder for ``judge_cache.jsonl``; None disables caching.
        top_logprobs: how many alternatives to request (OpenAI allows up to 20).
    """

    CACHE_FILE = "judge_cache.jsonl"

    def __init__(
        self,
        base_url: str,
        model: str,
        rubric: str,
        api_key: str | None = None,
        min_mass: float = 0.25,
        concurrency: int = 8,
        max_retries: int = 4,
        backoff: float = 0.5,
        timeout: float = 60,
        cache_dir: str | Path | None = None,
        top_logprobs: int = 20,
    ) -> None:
        try:
            self.rubric = check_rubric(rubric, "rubric")
        except ValueError as e:
            raise JudgeError(f"LLMJudge: {e}") from None
        if not base_url:
            raise JudgeError("LLMJudge needs a base_url such as http://127.0.0.1:8000/v1")
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        self.base_url = base_url.rstrip("/")
        self.url = f"{self.base_url}/chat/completions"
        self.model = model
        self.min_mass = min_mass
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.backoff = backoff
        self.top_logprobs = top_logprobs
        key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._client = httpx.Client(
            timeout=timeout,
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        )
        self._cache = _JsonlCache(Path(cache_dir) / self.CACHE_FILE) if cache_dir is not None else None

    def __repr__(self) -> str:
        return f"LLMJudge(model={self.model!r}, base_url={self.base_url!r})"

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self._client.close()

    def __enter__(self) -> LLMJudge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def cache_key(self, question: str, answer: str) -> str:
        """sha256 of (model, rubric, question, answer): what identifies a judge result."""
        blob = json.dumps([self.model, self.rubric, question, answer], ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def distribution(self, question: str, answer: str) -> dict[int, float]:
        """Query the endpoint once (no cache) and return probability per integer score.

        Args:
            question: the question the answer responds to.
            answer: the answer being judged.
        """
        payload = {
            "model": self.model,
            "messages": [{"role": "user", "content": fill_rubric(self.rubric, question, answer)}],
            "max_tokens": 1,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": self.top_logprobs,
        }
        data = post_chat_completion(
            self._client, self.url, payload, self._headers, self.max_retries, self.backoff
        )
        return self._parse(data)

    def _parse(self, data: Mapping[str, Any]) -> dict[int, float]:
        try:
            content = (data["choices"][0].get("logprobs") or {}).get("content") or []
        except (KeyError, IndexError, TypeError, AttributeError):
            raise JudgeError(
                f"judge endpoint {self.url} returned an unexpected body: {str(data)[:200]}"
            ) from None
        if not content:
            raise JudgeError(
                f"judge endpoint {self.url} returned no logprobs; the LLM judge needs a server that supports "
                "logprobs=true and top_logprobs (OpenAI, vLLM, llama.cpp server, ...)"
            )
        first = content[0]
        alternatives = first.get("top_logprobs") or [first]
        probs: dict[int, float] = {}
        seen: set[str] = set()
        for alt in alternatives:
            token = alt.get("token")
            # Some servers repeat the sampled token in the list; count each token once.
            if not isinstance(token, str) or token in seen:
                continue
            seen.add(token)
            value = integer_value(token)
            if value is not None:
                probs[value] = probs.get(value, 0.0) + math.exp(float(alt["logprob"]))
        return probs

    def _lookup_or_query(self, question: str, answer: str) -> tuple[float | None, float]:
        key = self.cache_key(question, answer)
        if self._cache is not None and (hit := self._cache.get(key)) is not None:
            return hit
        mean, mass = _summarise(self.distribution(question, answer))
        if self._cache is not None:
            self._cache.put(key, mean, mass)
        return mean, mass

    def score(self, question: str, answer: str) -> float | None:
        """Score one answer (from cache when possible).

        Args:
            question: the question the answer responds to.
            answer: the answer being judged.
        """
        mean, mass = self._lookup_or_query(question, answer)
        return _apply_min_mass(mean, mass, self.min_mass)

    def score_many(self, pairs: Sequence[tuple[str, str]], progress: bool = False) -> list[float | None]:
        """Score many answers with up to ``concurrency`` requests in flight.

        Cached pairs make no request; duplicate pairs are queried once. Results are cached as they
        arrive, so after a failure a rerun only queries what is still missing.

        Args:
            pairs: (question, answer) tuples.
            progress: show a tqdm progress bar over the requests actually sent.
        """
        results: dict[tuple[str, str], tuple[float | None, float]] = {}
        todo: list[tuple[str, str]] = []
        for pair in dict.fromkeys((q, a) for q, a in pairs):
            hit = self._cache.get(self.cache_key(*pair)) if self._cache is not None else None
            if hit is not None:
                results[pair] = hit
            else:
                todo.append(pair)
        if todo:
            bar = None
            if progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=len(todo), desc="judging", unit="answer")
            pool = ThreadPoolExecutor(max_workers=min(self.concurrency, len(todo)))
            try:
                futures: dict[Future, tuple[str, str]] = {
                    pool.submit(self._lookup_or_query, q, a): (q, a) for q, a in todo
                }
                pending = set(futures)
                while pending:
                    done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                    for fut in done:
                        results[futures[fut]] = fut.result()  # re-raises the first failure
                        if bar is not None:
                            bar.update(1)
            finally:
                # On failure, drop queued requests instead of letting them run after we raised.
                pool.shutdown(wait=True, cancel_futures=True)
                if bar is not None:
                    bar.close()
        return [_apply_min_mass(*results[(q, a)], self.min_mass) for q, a in pairs]


# -- offline sentiment ------------------------------------------------------------------------------


class LexiconJudge(BaseJudge):
    """VADER sentiment as a 0-100 optimism (or pessimism) score; the question is ignored.

    Args:
        polarity: ``"optimistic"`` maps VADER's compound score c in [-1, 1] to ``(c + 1) * 50``;
            ``"pessimistic"`` to ``100 - (c + 1) * 50``.
    """

    POLARITIES = ("optimistic", "pessimistic")

    def __init__(self, polarity: str = "optimistic") -> None:
        if polarity not in self.POLARITIES:
            raise JudgeError(
                f"lexicon polarity must be one of {', '.join(self.POLARITIES)}, got {polarity!r}"
            )
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError as e:  # pragma: no cover - a declared dependency
            raise JudgeError("the lexicon judge needs the vaderSentiment package") from e
        self.polarity = polarity
        self._analyzer = SentimentIntensityAnalyzer()

    def __repr__(self) -> str:
        return f"LexiconJudge(polarity={self.polarity!r})"

    def score(self, question: str, answer: str) -> float | None:
        """Sentiment of ``answer`` on 0..100 (50 is neutral, also for empty answers)."""
        compound = float(self._analyzer.polarity_scores(answer)["compound"])
        value = (compound + 1.0) * 50.0
        return 100.0 - value if self.polarity == "pessimistic" else value


class CallableJudge(BaseJudge):
    """Wrap ``fn(question, answer) -> float | None`` as a judge, checking its range.

    Args:
        fn: any callable; NaN results become None.
        name: label used in ``repr``.
    """

    def __init__(self, fn: Callable[[str, str], float | None], name: str | None = None) -> None:
        if not callable(fn):
            raise TypeError(f"CallableJudge needs a callable, got {type(fn).__name__}")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", type(fn).__name__)

    def __repr__(self) -> str:
        return f"CallableJudge({self.name})"

    def score(self, question: str, answer: str) -> float | None:
        value = self.fn(question, answer)
        if value is None:
            return None
        value = float(value)
        if math.isnan(value):
            return None
        if not MIN_SCORE <= value <= MAX_SCORE:
            raise JudgeError(f"judge {self.name} returned {value}, outside [0, 100]")
        return value


# -- local model as judge -------------------------------------------------------------------------


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
            :func:`steerlib.chat.format_prompt`.
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
            from steerlib.chat import format_prompt

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

        from steerlib.compat import cache_keyword, output_cache

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

_LLM_KW = {
    "api_key",
    "min_mass",
    "concurrency",
    "max_retries",
    "backoff",
    "timeout",
    "cache_dir",
    "top_logprobs",
}
_SELF_KW = {"min_mass", "batch_size", "system", "answer_prefix", "format_fn", "use_cache"}
_FACTORY_KW = {"base_url", "judge_model"}
SPECS_HELP = "'lexicon', 'lexicon:optimistic', 'lexicon:pessimistic', 'self', 'openai:<model>' or 'auto'"


def _base_url(kw: Mapping[str, Any]) -> str | None:
    return (
        kw.get("base_url") or os.environ.get("STEERLIB_JUDGE_BASE_URL") or os.environ.get("OPENAI_BASE_URL")
    )


def make_judge(
    spec: str,
    trait: Trait | str,
    model: Any = None,
    tokenizer: Any = None,
    rubric: str | None = None,
    **kw: Any,
) -> Judge:
    """Build a judge from a spec string.

    Args:
        spec: ``"lexicon"`` (polarity from the trait's ``judge_hint``), ``"lexicon:optimistic"``,
            ``"lexicon:pessimistic"``, ``"self"`` (``model``/``tokenizer`` judge themselves),
            ``"openai:<model>"`` (an OpenAI-compatible endpoint) or ``"auto"`` (the trait's ``judge_hint``,
            else ``openai`` when a base URL is configured).
        trait: the trait (or its name) whose rubric the LLM judges use.
        model: local model for ``"self"``.
        tokenizer: its tokenizer.
        rubric: rubric override, e.g. ``trait.coherence_rubric`` for coherence scoring.
        **kw: ``base_url`` (else ``STEERLIB_JUDGE_BASE_URL``, then ``OPENAI_BASE_URL``), ``judge_model``
            (model for ``"auto"``/``"openai"``; else ``STEERLIB_JUDGE_MODEL``) and the judges' own options
            (``api_key``, ``min_mass``, ``concurrency``, ``cache_dir``, ``batch_size``, ...). Options for
            other judge kinds are ignored, so callers can pass one set for any spec.

    Raises:
        JudgeError: unknown spec or missing configuration, saying what to pass instead.
    """
    unknown = set(kw) - _LLM_KW - _SELF_KW - _FACTORY_KW
    if unknown:
        raise TypeError(f"make_judge got unexpected options: {', '.join(sorted(unknown))}")
    trait = load_trait(trait)
    spec = (spec or "").strip()
    kind, _, arg = spec.partition(":")
    kind = kind.lower()

    if kind == "auto":
        hint = (trait.judge_hint or "").strip()
        if hint and hint.partition(":")[0].lower() != "auto" and rubric in (None, trait.judge_rubric):
            return make_judge(hint, trait, model, tokenizer, rubric, **kw)
        if _base_url(kw):
            return make_judge("openai", trait, model, tokenizer, rubric, **kw)
        what = "coherence" if rubric not in (None, trait.judge_rubric) else f"trait '{trait.name}'"
        raise JudgeError(
            f"no judge configured for {what}: pass 'openai:<model>' and set STEERLIB_JUDGE_BASE_URL to an "
            "OpenAI-compatible endpoint (e.g. http://127.0.0.1:8000/v1), or pass 'self' to let the local "
            "model judge itself"
        )

    if kind == "lexicon":
        if rubric not in (None, trait.judge_rubric):
            raise JudgeError(
                "a lexicon judge only measures sentiment; it cannot apply a rubric such as coherence"
            )
        polarity = arg
        if not polarity:
            hint = trait.judge_hint or ""
            if not hint.startswith("lexicon:"):
                raise JudgeError(
                    f"trait '{trait.name}' has no lexicon polarity; pass 'lexicon:optimistic' or "
                    "'lexicon:pessimistic', or use an LLM judge ('openai:<model>' or 'self')"
                )
            polarity = hint.partition(":")[2]
        return LexiconJudge(polarity)

    if kind == "self":
        if model is None or tokenizer is None:
            raise JudgeError("judge 'self' needs the loaded model and tokenizer")
        opts = {k: v for k, v in kw.items() if k in _SELF_KW}
        return SelfJudge(model, tokenizer, rubric or trait.judge_rubric, **opts)

    if kind == "openai":
        name = arg or kw.get("judge_model") or os.environ.get("STEERLIB_JUDGE_MODEL")
        if not name:
            raise JudgeError(
                "which judge model? pass 'openai:<model>' (e.g. openai:gpt-4.1-mini) or set STEERLIB_JUDGE_MODEL"
            )
        base_url = _base_url(kw)
        if not base_url:
            if not (kw.get("api_key") or os.environ.get("OPENAI_API_KEY")):
                raise JudgeError(
                    f"judge 'openai:{name}' needs an endpoint: pass base_url or set STEERLIB_JUDGE_BASE_URL "
                    "(or OPENAI_BASE_URL), e.g. http://127.0.0.1:8000/v1, or set OPENAI_API_KEY to use "
                    "api.openai.com"
                )
            base_url = "https://api.openai.com/v1"
        opts = {k: v for k, v in kw.items() if k in _LLM_KW}
        return LLMJudge(base_url, name, rubric or trait.judge_rubric, **opts)

    raise JudgeError(f"unknown judge {spec!r}; use {SPECS_HELP}")
