"""A scripted OpenAI-compatible HTTP server for tests (real sockets, stdlib only).

Usage::

    with OpenAIStub(lambda req: logprob_response({"80": 0.5, "90": 0.25})) as stub:
        judge = LLMJudge(stub.base_url, "stub-model", rubric)
        ...
        assert stub.count == 1

``handler`` receives the decoded JSON body of each ``POST /v1/chat/completions`` and returns either a
response dict (sent as 200) or ``(status, body_dict)``. ``fail_first=N`` answers the first N requests with
``fail_status`` before the handler is consulted; ``delay`` sleeps inside each request (to observe
concurrency through ``max_in_flight``). ``GET /v1/models`` lists ``model_name``.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Handler = Callable[[dict[str, Any]], "dict[str, Any] | tuple[int, dict[str, Any]]"]


def logprob_response(probs: Mapping[str, float], model: str = "stub-model") -> dict[str, Any]:
    """A chat completion whose single token has ``probs`` as its top logprobs.

    Args:
        probs: token -> probability (need not sum to 1); the most likely token is the sampled one.
        model: model name echoed back.
    """
    top = [{"token": t, "logprob": math.log(p), "bytes": list(t.encode())} for t, p in probs.items() if p > 0]
    top.sort(key=lambda x: -x["logprob"])
    first = top[0] if top else {"token": "", "logprob": 0.0, "bytes": []}
    return {
        "id": "chatcmpl-stub",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": first["token"]},
                "logprobs": {"content": [{**first, "top_logprobs": top}]},
                "finish_reason": "length",
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


def text_response(content: str, model: str = "stub-model") -> dict[str, Any]:
    """A plain chat completion whose message is ``content``."""
    return {
        "id": "chatcmpl-stub",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


class OpenAIStub:
    """Threaded HTTP server on 127.0.0.1 (free port) speaking enough of the OpenAI chat API.

    Args:
        handler: request body -> response dict, or (status, body) for errors.
        fail_first: answer this many requests with ``fail_status`` first.
        fail_status: status for those failures (500, 429, ...).
        delay: seconds to sleep in every chat request.
        model_name: what ``GET /v1/models`` lists.

    Attributes:
        requests: decoded bodies of all chat requests, in arrival order.
        headers: their headers (lower-cased names).
        max_in_flight: the most chat requests that were being handled at the same time.
    """

    def __init__(
        self,
        handler: Handler | None = None,
        fail_first: int = 0,
        fail_status: int = 500,
        delay: float = 0.0,
        model_name: str = "stub-model",
    ) -> None:
        self.handler: Handler = handler or (lambda req: logprob_response({"50": 1.0}))
        self.fail_first = fail_first
        self.fail_status = fail_status
        self.delay = delay
        self.model_name = model_name
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.max_in_flight = 0
        self._in_flight = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._make_handler())
        self._server.daemon_threads = True
        # A short poll interval makes shutdown() (which waits for the next poll) quick.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def count(self) -> int:
        """Chat requests received so far (failed ones included)."""
        with self._lock:
            return len(self.requests)

    def start(self) -> OpenAIStub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> OpenAIStub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _respond(self, body: dict[str, Any], headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self.requests.append(body)
            self.headers.append(headers)
            index = len(self.requests)
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            if self.delay:
                time.sleep(self.delay)
            if index <= self.fail_first:
                return self.fail_status, {"error": {"message": f"scripted failure {index}", "type": "stub"}}
            result = self.handler(body)
            return result if isinstance(result, tuple) else (200, result)
        finally:
            with self._lock:
                self._in_flight -= 1

    def _make_handler(self) -> type[BaseHTTPRequestHandler]:
        stub = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real servers do

            def log_message(self, *args: Any) -> None:  # keep pytest output clean
                pass

            def _send(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path.rstrip("/") == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": stub.model_name, "object": "model"}]})
                else:
                    self._send(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self._send(404, {"error": {"message": f"no route {self.path}"}})
                    return
                try:
                    body = json.loads(raw)
                except ValueError:
                    self._send(400, {"error": {"message": "invalid JSON body"}})
                    return
                headers = {k.lower(): v for k, v in self.headers.items()}
                status, reply = stub._respond(body, headers)
                self._send(status, reply)

        return _Handler
