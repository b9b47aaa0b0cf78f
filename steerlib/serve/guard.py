"""The server's front door: every request passes these checks before any route runs.

``Guard`` is a pure ASGI middleware (streaming and disconnects pass straight through): the Host header must name
the bound host unless configured otherwise (DNS rebinding), request bodies are limited (413), and with an API key
every route but ``/health`` and the static page ``/`` needs ``Authorization: Bearer <key>`` (401; open the page as
``/#key=<key>``). A route may also accept a key of its own (``/metrics`` with ``--metrics-key``, so the scraper
holds a key that opens nothing else) or be opened explicitly (``--metrics-no-auth``). ``install_guards`` adds the
guard, and CORS outside it, to an app.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from steerlib.serve.schema import ApiError

__all__ = ["LOCAL_HOSTS", "Guard", "allowed_hosts_for", "install_guards"]

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")

# Routes that answer without a key: the health probe and the static monitor page (it holds no data and sends the
# key from its URL fragment to /v1/monitor).
OPEN_PATHS = ("/health", "/")


class Guard:
    """Refuse requests before any route runs: wrong Host (400), too large a body (413), no key (401)."""

    def __init__(self, app: Any, *, api_key: str | None, allowed_hosts: set[str] | None, max_body: int,
                 route_keys: Mapping[str, str] | None = None, open_paths: Collection[str] = ()):
        """Wrap an ASGI app.

        Args:
            app: the inner ASGI app.
            api_key: bearer token every route but the open ones requires (None: open).
            allowed_hosts: Host header names accepted (None: no check).
            max_body: larger request bodies get 413.
            route_keys: path -> a further key that opens that path (and nothing else), even on a server without
                an API key.
            open_paths: paths opened on purpose, besides ``OPEN_PATHS``.
        """
        self.app = app
        self.api_key = api_key
        self.allowed_hosts = allowed_hosts
        self.max_body = max_body
        self.route_keys = dict(route_keys or {})
        self.open_paths = frozenset(OPEN_PATHS) | frozenset(open_paths)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path = scope.get("path", "")
        if self.allowed_hosts is not None:
            host = _host_name(headers.get("host", ""))
            if host not in self.allowed_hosts:
                await _reply(send, 400, path, f"host {host!r} is not served here (allowed: "
                                              f"{sorted(self.allowed_hosts)}); see --allowed-host")
                return
        keys = [k for k in (self.api_key, self.route_keys.get(path)) if k is not None]
        if keys and path not in self.open_paths and scope.get("method") != "OPTIONS":
            if not any(bearer_matches(headers, k) for k in keys):
                await _reply(send, 401, path, "missing or wrong API key (send Authorization: Bearer <key>)",
                             extra=[(b"www-authenticate", b"Bearer")])
                return
        length = headers.get("content-length")
        if length is not None and not length.isdigit():
            await _reply(send, 400, path, f"invalid Content-Length {length!r}")
            return
        if length is not None and int(length) > self.max_body:
            await _reply(send, 413, path, f"request body over the limit of {self.max_body} bytes")
            return
        if path.startswith("/api/") and "json" not in headers.get("content-type", ""):
            # Ollama reads every body as JSON whatever its Content-Type; clients rely on it (LiteLLM's ollama/
            # and ollama_chat/ providers send none), so the Ollama routes do the same.
            scope = {**scope, "headers": [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-type"]
                     + [(b"content-type", b"application/json")]}
        if length is None:
            # A chunked body has no length to check up front: read it here, up to the limit, so that an
            # over-limit body gets 413 (raising inside the app's body parsing would surface as a 400).
            chunks: list[bytes] = []
            seen = 0
            while True:
                message = await receive()
                if message["type"] != "http.request":  # the client left before sending its body
                    return
                chunks.append(message.get("body", b""))
                seen += len(chunks[-1])
                if seen > self.max_body:
                    await _reply(send, 413, path, f"request body over the limit of {self.max_body} bytes")
                    return
                if not message.get("more_body", False):
                    break
            receive = _replay(b"".join(chunks), receive)
        await self.app(scope, receive, send)


def _replay(body: bytes, receive: Any) -> Any:
    """A ``receive`` that hands the already-read body over once, then passes through (disconnect events)."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def bearer_matches(headers: dict[str, str], key: str) -> bool:
    """Whether ``Authorization: Bearer <token>`` carries ``key`` (constant-time comparison).

    Args:
        headers: request headers, names lower-cased.
        key: the expected token.

    Returns:
        True when the header names the bearer scheme and the token equals ``key``.
    """
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


def _host_name(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):  # [::1]:8000
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


async def _reply(send: Any, status: int, path: str, message: str, extra: list | None = None) -> None:
    if path.startswith("/api/"):
        body = {"error": message}
    else:
        body = ApiError(status, message, type_="invalid_request_error" if status != 401 else "authentication_error"
                        ).body()
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *(extra or [])]})
    await send({"type": "http.response.body", "body": data})


def allowed_hosts_for(host: str, configured: Sequence[str] | None) -> set[str] | None:
    """The Host names to accept: configured ones (``*`` = any), else the bound host (None = no check).

    Args:
        host: the address the server binds.
        configured: the operator's ``--allowed-host`` names, or None.

    Returns:
        The accepted names, or None when nothing is checked.
    """
    if configured is not None:
        names = {h.strip().lower() for h in configured}
        return None if "*" in names else names
    if host in LOCAL_HOSTS:
        return set(LOCAL_HOSTS)
    if host in ("0.0.0.0", "::", ""):
        return None  # every interface: the operator must name the public host to get the check
    return {host.lower()}


def install_guards(app: FastAPI, *, api_key: str | None, host: str, allowed_hosts: Sequence[str] | None,
                   max_body: int, cors_origins: Sequence[str], route_keys: Mapping[str, str] | None = None,
                   open_paths: Collection[str] = ()) -> None:
    """Add the guard and (when origins are given) CORS to ``app``.

    Args:
        app: the FastAPI app.
        api_key, host, allowed_hosts, max_body: as in ``AppOptions``.
        cors_origins: origins allowed by CORS (empty: no CORS headers).
        route_keys, open_paths: as in ``Guard``.
    """
    # Outermost last: CORS answers preflights before the guard asks for a key.
    app.add_middleware(Guard, api_key=api_key, allowed_hosts=allowed_hosts_for(host, allowed_hosts),
                       max_body=max_body, route_keys=route_keys, open_paths=open_paths)
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["*"],
                           allow_headers=["*"])
