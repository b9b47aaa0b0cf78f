"""A running ``steerlib serve`` as a pipeline engine: a deployed server's model generates and captures for a job.

``RemoteEngine`` is a ``steerlib.core.pipeline.PipelineEngine`` over HTTP: answers come from
``/v1/completions`` (prompts sent as token ids, unsteered: ``"steering": []`` overrides the server's default and
presets), pooled activations from ``/v1/activations`` (read inside the server's engine). ``steerlib flag --server``
uses it, so a deployed server's logged conversations are scored by the model that produced them, with no second
copy of the model on the client (which loads only the model's shape and tokenizer).

Requests run ``concurrency`` at a time (the server batches them continuously); a 429 (queue full) is retried after
a pause. The tokenizer must be the served model's: the client tokenises, so the prompt/response boundary is the
one the HF path uses (``steerlib.core.capture.tokenize_pairs``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from steerlib.core.capture import Activations, activations_from_pooled, encode_samples
from steerlib.core.pipeline import answers_in_order
from steerlib.serve.schema import MAX_CAPTURE_SAMPLES

__all__ = ["RemoteEngine", "ServerError"]

RETRY_STATUSES = (429, 503)


class ServerError(RuntimeError):
    """The server answered with an error (its message, the route and the status)."""


class RemoteEngine:
    """A steerlib server at ``url`` generating and capturing for a pipeline stage.

    Args:
        url: the server's base URL (``http://127.0.0.1:8000``).
        tokenizer: the served model's tokenizer.
        api_key: the server's API key, if it requires one.
        model: the ``model`` to name in requests (None: the server's model).
        concurrency: requests in flight at once.
        timeout: seconds for one request (a long generation or a window of captures).
        retry_for: seconds to keep retrying a 429/503 before giving up.
    """

    def __init__(self, url: str, tokenizer: Any, *, api_key: str | None = None, model: str | None = None,
                 concurrency: int = 32, timeout: float = 600.0, retry_for: float = 300.0):
        import httpx

        if not url.startswith(("http://", "https://")):
            raise ValueError(f"--server {url!r}: expected an http:// or https:// URL")
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.url = url.rstrip("/")
        self.tokenizer = tokenizer
        self.model = model
        self.concurrency = concurrency
        self.retry_for = retry_for
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout,
                                  limits=httpx.Limits(max_connections=concurrency + 2))
        self.info: dict[str, Any] | None = None

    # -- PipelineEngine ----------------------------------------------------------------------------------
    def start(self, job_tokens: int | None = None) -> None:
        """Check the server is up and serves a model of this tokenizer's vocabulary (once)."""
        if self.info is not None:
            return
        import httpx

        try:
            listed = self._request("GET", "/v1/models")
        except httpx.TransportError as exc:
            raise ServerError(f"{self.url}: cannot reach the server ({exc})") from None
        self.info = listed["data"][0]
        if self.model is not None and self.model not in listed.get("served_names", [self.model]):
            raise ServerError(f"{self.url}: serves {listed.get('served_names')}, not {self.model!r}")

    def check_model(self, n_layers: int, d_model: int) -> None:
        """Refuse a server whose model is not the one the vectors and tokenizer belong to (before any work)."""
        self.start()
        got = (self.info.get("num_layers"), self.info.get("hidden_size"))
        if got != (n_layers, d_model):
            raise ServerError(f"{self.url}: serves a model of {got[0]} layers x {got[1]} wide, the local model "
                              f"is {n_layers} x {d_model}: name the served model's folder with --model")

    def __call__(self, prompts: list[str], max_new_tokens: int, temperature: float,
                 seed: int | None) -> list[str]:
        return answers_in_order(self, prompts, max_new_tokens, temperature, seed)

    def stream(self, prompts: Sequence[str], max_new_tokens: int, temperature: float = 0.0,
               seeds: Sequence[int] | None = None, *, pool: bool = False) -> Iterator[list[tuple[int, str]]]:
        """Every prompt submitted (``concurrency`` in flight); yield ``(index, text)`` as answers finish.
        (``pool`` is ignored: a later ``capture`` asks the server again.)"""
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts")
        self.start()
        # Tokenised here, not in the request threads: a fast tokenizer must not be used from several threads.
        ids = [list(self.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]

        def body(i: int) -> dict[str, Any]:
            req = {"prompt": ids[i], "max_tokens": max_new_tokens, "temperature": temperature, "steering": []}
            if seeds is not None:
                req["seed"] = int(seeds[i])
            if self.model is not None:
                req["model"] = self.model
            return req

        def one(i: int) -> tuple[int, str]:
            got = self._request("POST", "/v1/completions", body(i))
            return i, got["choices"][0]["text"].strip()

        yield from self._pooled_calls(one, range(len(prompts)))

    def capture(self, tokenizer, prompts: Sequence[str], responses: Sequence[str | None],
                layers: Sequence[int] | None = None, *, require_response: bool = False) -> Activations:
        """Pooled activations of (prompt, response) pairs computed by the server's engine."""
        encoded = encode_samples(tokenizer, prompts, responses, require_response)
        self.start()
        windows = [range(s, min(s + MAX_CAPTURE_SAMPLES, len(encoded)))
                   for s in range(0, len(encoded), MAX_CAPTURE_SAMPLES)]

        def one(w: int) -> tuple[int, dict[str, Any]]:
            req: dict[str, Any] = {"samples": [{"token_ids": list(encoded[i][0]), "prompt_tokens": encoded[i][1]}
                                               for i in windows[w]]}
            if layers is not None:
                req["layers"] = sorted({int(x) for x in layers})
            if self.model is not None:
                req["model"] = self.model
            return w, self._request("POST", "/v1/activations", req)

        answers: dict[int, dict[str, Any]] = {}
        for finished in self._pooled_calls(one, range(len(windows))):
            answers.update(finished)
        rows = [row for w in range(len(windows)) for row in answers[w]["data"]]
        return activations_from_pooled(rows, encoded, answers[0]["layers"], meta={"backend": "server",
                                                                                  "url": self.url})

    def close(self) -> None:
        self._http.close()

    # -- HTTP ----------------------------------------------------------------------------------------------
    def _pooled_calls(self, call, items) -> Iterator[list[tuple[int, Any]]]:
        """Run ``call(item)`` for every item, ``concurrency`` at a time; yield results as they complete."""
        items = list(items)
        with ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="steerlib-remote") as pool:
            pending: set[Future] = set()
            it = iter(items)
            try:
                for item in it:
                    pending.add(pool.submit(call, item))
                    if len(pending) >= self.concurrency:
                        break
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for item in it:  # refill one slot per finished request
                        pending.add(pool.submit(call, item))
                        if len(pending) >= self.concurrency:
                            break
                    yield [f.result() for f in done]
            finally:
                for f in pending:
                    f.cancel()

    def _request(self, method: str, path: str, body: dict | None = None) -> dict[str, Any]:
        deadline = time.monotonic() + self.retry_for
        while True:
            response = self._http.request(method, path, json=body)
            if response.status_code in RETRY_STATUSES and time.monotonic() < deadline:
                time.sleep(0.5)
                continue
            if response.status_code != 200:
                try:
                    message = response.json()["error"]["message"]
                except Exception:  # not steerlib's error shape (a proxy's page): show its start
                    message = response.text[:200]
                raise ServerError(f"{self.url}{path}: {response.status_code} {message}")
            return response.json()
