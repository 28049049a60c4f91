"""The guard in front of ``unillm serve``: pure ASGI middleware, so that it covers every route and leaves
streaming responses (and their client-disconnect cancellation) untouched.

In order, before any route sees a request:

- **Host** must be a name this server answers to (localhost names, the bound address, ``--allow-host``):
  a web page that rebinds its own DNS name to 127.0.0.1 sends its own name, and is refused (DNS rebinding).
- **Origin**, when a browser sends one, must be one of those hosts too: a page elsewhere cannot drive the
  models through the user's browser.
- **Content-Type** of a POST must not be one a web page can send without a CORS preflight as a JSON
  carrier (``text/plain``, ``multipart/form-data``, and ``application/x-www-form-urlencoded`` from a browser:
  ``curl -d`` sends that type too, without a browser's ``Origin`` or ``Sec-Fetch-*`` headers): 415.
- **API key** (``Authorization: Bearer KEY``, or Anthropic's ``x-api-key: KEY``) compared with
  :func:`secrets.compare_digest`: 401.
- **Body size**: over ``max_body_bytes`` is 413, from ``Content-Length`` before the app sees it, or while
  reading a body sent without one. The body is read and discarded first (up to ``DRAIN_BYTES``, for at most
  ``DRAIN_SECONDS``), so that the client, still sending, reads the 413 instead of a reset connection.

Example:
    >>> guard = Guard(lambda scope, receive, send: None, bind_host="127.0.0.1", bind_port=11434)
    >>> guard.host_allowed("localhost:11434"), guard.host_allowed("evil.example:11434")
    (True, False)
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

LOCAL_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")
WILDCARDS = ("0.0.0.0", "::", "")
#: Content types a web page can POST cross-origin without a preflight, that could carry a JSON body.
SIMPLE_TYPES = ("text/plain", "multipart/form-data", "application/x-www-form-urlencoded")
#: Of those, the one ``curl -d`` sends (as Ollama's documented examples do): refused only from a browser, which
#: marks every POST with ``Origin`` or ``Sec-Fetch-*``.
CURL_TYPE = "application/x-www-form-urlencoded"
#: How much of a refused body is read (and thrown away) before the 413, and for how long at most.
DRAIN_BYTES = 64 * 2**20
DRAIN_SECONDS = 10.0


class BodyTooLarge(Exception):
    pass


class Guard:
    """Host, Origin, Content-Type, API key and body-size checks (see the module docstring)."""

    def __init__(
        self, app: ASGIApp, *, bind_host: str = "127.0.0.1", bind_port: int = 11434, allow_hosts: list[str] | None = None,
        api_key: str | None = None, max_body_bytes: int = 16 * 2**20,
    ) -> None:
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body = max_body_bytes
        self.allowed = {h.lower().strip("[]") for h in (*LOCAL_NAMES, bind_host, *(allow_hosts or []))}
        #: Bound to every address and no --allow-host: the Host check cannot know the names used to reach it.
        self.any_host = bind_host in WILDCARDS and not allow_hosts or "*" in (allow_hosts or [])

    def host_allowed(self, host: str) -> bool:
        if self.any_host:
            return True
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        return name.lower().strip("[]") in self.allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        api = api_of(scope.get("path", ""))
        host = headers.get("host", "")
        if not self.host_allowed(host):
            await _refuse(send, 403, f"Host {host!r} is not one this server answers to (DNS rebinding guard); "
                                     "start it with --allow-host NAME to add one", api)
            return
        origin = headers.get("origin")
        if origin and origin != "null" and not self.host_allowed(origin.split("://", 1)[-1]):
            await _refuse(send, 403, f"requests from web pages at {origin} are refused; start with --allow-host to allow it", api)
            return
        if origin == "null":
            await _refuse(send, 403, "requests from sandboxed or local web pages (Origin: null) are refused", api)
            return
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        from_browser = origin is not None or any(k.startswith("sec-fetch-") for k in headers)
        if scope.get("method") == "POST" and ctype in SIMPLE_TYPES and (ctype != CURL_TYPE or from_browser):
            await _refuse(send, 415, f"Content-Type {ctype} is refused: send the JSON body as application/json", api)
            return
        if self.api_key is not None:
            auth = headers.get("authorization", "").encode("latin-1")
            key = headers.get("x-api-key", "").encode("latin-1")  # what Anthropic's clients send
            if not (secrets.compare_digest(auth, b"Bearer " + self.api_key) or secrets.compare_digest(key, self.api_key)):
                await _refuse(send, 401, "missing or wrong API key (Authorization: Bearer KEY, or x-api-key: KEY)", api,
                              "authentication_error")
                return
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            if length.isdigit():
                await _drain(receive, int(length))
            await _refuse(send, 413, f"the request body is over the limit of {self.max_body} bytes (--max-body)", api)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_body:
                    raise BodyTooLarge
            return msg

        started = False

        async def tracked(msg: Message) -> None:
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, counted, tracked)
        except BodyTooLarge:
            if not started:
                await _drain(receive, DRAIN_BYTES)
                await _refuse(send, 413, f"the request body is over the limit of {self.max_body} bytes (--max-body)", api)


#: Anthropic's error types by HTTP status (https://docs.anthropic.com/en/api/errors).
ANTHROPIC_ERRORS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}


def api_of(path: str) -> str:
    """Which API a path belongs to, for the shape of its errors: ``anthropic``, ``openai`` or ``ollama``."""
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        return "anthropic"
    return "openai" if path.startswith("/v1/") else "ollama"


def error_body(message: str, status: int, api: str, kind: str = "invalid_request_error") -> dict[str, Any]:
    """An error in the shape of the API asked: OpenAI's ``{"error": {"message", "type", "code"}}``, Anthropic's
    ``{"type": "error", "error": {"type", "message"}}`` (its type from the status) or Ollama's ``{"error":
    message}``."""
    if api == "anthropic":
        return {"type": "error", "error": {"type": ANTHROPIC_ERRORS.get(status, "invalid_request_error" if status < 500 else "api_error"),
                                           "message": message}}
    return {"error": {"message": message, "type": kind, "code": status}} if api == "openai" else {"error": message}


async def _drain(receive: Receive, length: int) -> None:
    """Read and discard up to ``min(length, DRAIN_BYTES)`` bytes of a body, for at most ``DRAIN_SECONDS``."""

    async def read() -> None:
        seen = 0
        while seen < min(length, DRAIN_BYTES):
            msg = await receive()
            if msg["type"] != "http.request":
                return
            seen += len(msg.get("body", b""))
            if not msg.get("more_body"):
                return

    try:
        await asyncio.wait_for(read(), DRAIN_SECONDS)
    except asyncio.TimeoutError:
        pass


async def _refuse(send: Send, status: int, message: str, api: str, kind: str = "invalid_request_error") -> None:
    data = json.dumps(error_body(message, status, api, kind)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})
