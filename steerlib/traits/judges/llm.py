"""An OpenAI-compatible endpoint as judge: the probability-weighted score of one generated token, cached."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import httpx

from steerlib.store.results import ResultsStore
from steerlib.traits.judges.base import BaseJudge, JudgeError, integer_value, weighted_score
from steerlib.traits.library import check_rubric, fill_rubric

__all__ = ["LLMJudge", "post_chat_completion"]

# HTTP statuses worth retrying: rate limiting and server-side failures. Other 4xx are our fault.
_RETRY_STATUSES = frozenset({408, 409, 429}) | frozenset(range(500, 600))

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


class _JudgeCache:
    """Finished judge requests, shared by instances and reruns, kept in the one resumable results store.

    Each request is appended (and fsynced) as soon as it returns, so an interrupted run loses nothing.
    """

    def __init__(self, path: Path) -> None:
        self._store = ResultsStore(path)
        self._data = {r["key"]: (r["score"], float(r["mass"])) for r in self._store.records}

    def get(self, key: str) -> tuple[float | None, float] | None:
        return self._data.get(key)

    def put(self, key: str, mean: float | None, mass: float) -> None:
        self._data[key] = (mean, mass)
        self._store.append([{"key": key, "score": mean, "mass": mass}])


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
        self._cache = _JudgeCache(Path(cache_dir) / self.CACHE_FILE) if cache_dir is not None else None

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


