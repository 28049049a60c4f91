"""The app of ``unillm serve``: routing, admission (the queue bound, the body read first, a disconnect
cancelling a non-streaming request) and error shapes. Each wire API is a module of its own (``ollama_api``,
``openai_api``, ``responses_api``, ``anthropic_api``, ``llamacpp_api``) that gives its routes a :class:`Server`.

Example:
    >>> from unillm import Engine
    >>> from unillm.serve import create_app
    >>> app = create_app(Engine())                      # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..engine import Engine
from ..errors import BackendUnavailableError, InvalidRequestError, UnillmError
from ..types import EmbeddingResponse
from . import anthropic_api, llamacpp_api, ollama_api, openai_api, responses_api
from .guard import Guard, api_of, error_body
from .wire import BodyTimeout, status


class Server:
    """What every handler shares: the engine, the limits, reading a body, admission and error responses."""

    def __init__(self, engine: Engine, *, bind_host: str, bind_port: int, max_queue: int, body_timeout: float) -> None:
        self.engine = engine
        self.bind_host, self.bind_port = bind_host, bind_port
        self.max_queue, self.body_timeout = max_queue, body_timeout
        self.busy = 0  # generation requests admitted and not finished

    def error(self, exc: UnillmError, api: str) -> JSONResponse:
        """An error in the shape of ``api`` (``openai``, ``anthropic``, ``ollama``), with the status of its kind."""
        code = status(exc)
        return JSONResponse(error_body(str(exc), code, api, type(exc).__name__), status_code=code)

    async def body_of(self, request: Request) -> dict[str, Any]:
        """The JSON object a request carries (read once; starlette keeps it for the next read)."""
        try:
            raw = await asyncio.wait_for(request.body(), self.body_timeout)
        except asyncio.TimeoutError:
            raise BodyTimeout(f"the request body did not arrive within {self.body_timeout:g} s (--body-timeout)") from None
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise InvalidRequestError(f"the request body is not JSON: {exc}") from exc
        except RecursionError:
            raise InvalidRequestError("the request body is nested too deeply") from None
        if not isinstance(data, dict):
            raise InvalidRequestError("the request body must be a JSON object")
        try:  # JSON's \ud800 escapes decode to lone surrogates, which no model can read or write
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidRequestError(f"the request body has text that is not valid Unicode (a lone surrogate: "
                                      f"{exc.object[max(exc.start - 20, 0):exc.start]!r} then \\u{ord(exc.object[exc.start]):04x})") from None
        return data

    def check_not_self(self, model: str) -> None:
        """An Ollama-backend model whose daemon is this very server would call itself forever."""
        from ..system import ollama_host

        spec = self.engine.registry.get(model)
        if spec.backend != "ollama" or spec.options.get("local_store") == "always":
            return
        target = urlsplit(ollama_host(spec))
        bind = self.bind_host
        local = {"localhost", "127.0.0.1", "::1", bind.strip("[]")} | ({"0.0.0.0", "::"} if bind in ("0.0.0.0", "::") else set())
        if target.port == self.bind_port and (target.hostname or "") in local:
            raise BackendUnavailableError(
                f"model {spec.name!r} is served by the Ollama daemon at {ollama_host(spec)}, which is this unillm server "
                "itself: start Ollama on another port, or serve unillm on another one (--port)"
            )

    def runnable_names(self) -> list[str]:
        """The registry's models that can run here (blocking: may ask an Ollama daemon, or nvidia-smi)."""
        from ..system import why_not_runnable

        return [s.name for s in self.engine.registry if why_not_runnable(s) is None]

    async def admitted(self, request: Request, work: Callable[[], Awaitable[Response]], api: str) -> Response:
        """Run a generation endpoint within the queue bound (503 + Retry-After beyond it); a non-streaming
        request whose client disconnects is cancelled. The body is read whole before the request takes its
        place (a client that sends half a body holds none) and before anything listens for the disconnect on
        ``receive``, so the two never wait on it together."""
        try:
            await self.body_of(request)  # kept by starlette for the handler
        except UnillmError as exc:
            return self.error(exc, api)
        if self.busy >= self.max_queue:
            full = self.error(BackendUnavailableError(
                f"{self.busy} requests are queued, the limit (--max-queue) is {self.max_queue}"), api)
            full.headers["Retry-After"] = "1"
            return full
        self.busy += 1
        held = True
        try:
            task = asyncio.ensure_future(work())
            gone = asyncio.ensure_future(_disconnected(request))
            done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
            if task not in done:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
                return Response(status_code=499)
            gone.cancel()
            resp = task.result()
            if isinstance(resp, StreamingResponse):  # the stream holds its place until it ends
                resp.background = BackgroundTask(self._release)
                held = False
            return resp
        finally:
            if held:
                self.busy -= 1

    async def _release(self) -> None:
        self.busy -= 1

    async def embeddings(self, body: dict[str, Any], text_key: str, allowed: set[str], truncate: bool = False) -> EmbeddingResponse:
        """The embeddings an /api/embed, /api/embeddings or /v1/embeddings body asks for."""
        unknown = set(body) - allowed
        if unknown:
            raise InvalidRequestError(f"unsupported field(s) {sorted(unknown)}")
        if body.get("dimensions") is not None:
            raise InvalidRequestError("dimensions is not supported by unillm (the model's own size only)")
        model: Any = body.get("model")
        texts: Any = body.get(text_key)
        self.check_not_self(model)  # Registry.get refuses a name that is not a string
        return await self.engine.aembed(model, texts, truncate=truncate)  # the engine checks the input's type


def create_app(
    engine: Engine, api_key: str | None = None, *, bind_host: str = "127.0.0.1", bind_port: int = 11434,
    allow_hosts: list[str] | None = None, max_body_bytes: int = 16 * 2**20, max_queue: int = 256,
    body_timeout: float = 30.0,
) -> Starlette:
    """The ASGI app over ``engine`` (the caller owns the engine and closes it).

    ``bind_host``/``bind_port`` are where it listens (for the Host check and to refuse proxying an Ollama
    model into itself); ``allow_hosts`` adds names it answers to; bodies over ``max_body_bytes`` are a 413;
    beyond ``max_queue`` generation requests in flight, a 503 with ``Retry-After``; a body that has not arrived
    whole within ``body_timeout`` seconds, a 408."""
    server = Server(engine, bind_host=bind_host, bind_port=bind_port, max_queue=max_queue, body_timeout=body_timeout)

    async def not_implemented(request: Request) -> Response:
        path = request.url.path
        msg = f"{path} is not implemented by unillm serve (its models come from the registry, not a model store)"
        return JSONResponse(error_body(msg, 501, api_of(path), "not_implemented"), status_code=501)

    async def unillm_stats(request: Request) -> Response:
        return JSONResponse(engine.stats())

    async def not_found(request: Request, exc: Exception) -> Response:
        path = request.url.path
        msg = f"{request.method} {path} is not an endpoint of unillm serve"
        code = getattr(exc, "status_code", 404)
        return JSONResponse(error_body(msg, code, api_of(path)), status_code=code)

    unimplemented = ollama_api.NOT_IMPLEMENTED + openai_api.NOT_IMPLEMENTED
    routes = [
        *ollama_api.routes(server),
        *openai_api.routes(server),
        *responses_api.routes(server),
        *anthropic_api.routes(server),
        *llamacpp_api.routes(server),
        Route("/unillm/stats", unillm_stats, methods=["GET"]),
        Route("/", lambda r: Response("unillm is running"), methods=["GET", "HEAD"]),
        *(Route(path, not_implemented, methods=["GET", "POST", "DELETE", "HEAD"]) for path in unimplemented),
    ]
    guard = Middleware(Guard, bind_host=bind_host, bind_port=bind_port, allow_hosts=allow_hosts, api_key=api_key,
                       max_body_bytes=max_body_bytes)
    return Starlette(routes=routes, middleware=[guard], exception_handlers={404: not_found, 405: not_found})


async def _disconnected(request: Request) -> None:
    """Return when the client of a request whose body was read goes away."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything else happens (so a port in use is a one-line error)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(host: str = "127.0.0.1", port: int = 11434, api_key: str | None = None, config: Any = None,
          preload: list[str] | None = None, on_ready: Callable[[], None] | None = None, *, keep_alive: int = 5,
          max_connections: int = 1024, **limits: Any) -> None:
    """Run the server until interrupted (Ctrl-C or SIGTERM: the Engine is closed, and every model with it).
    ``limits``: ``allow_hosts``, ``max_body_bytes``, ``max_queue``, ``body_timeout``. An idle keep-alive
    connection is closed after ``keep_alive`` seconds; beyond ``max_connections`` open connections and
    requests, new ones get a 503 (uvicorn's ``limit_concurrency``). ``on_ready`` is called once the socket is
    bound and the ``preload`` models are loaded."""
    import uvicorn

    sock = _bind(host, port)
    try:
        with Engine(config, registry_max_tokens=False) as engine:
            for name in preload or []:
                t = time.perf_counter()
                engine.load(name)
                print(f"loaded {name} in {time.perf_counter() - t:.1f} s", flush=True)
            app = create_app(engine, api_key, bind_host=host, bind_port=port, **limits)
            server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=10,
                                                   timeout_keep_alive=keep_alive, limit_concurrency=max_connections))
            if on_ready is not None:
                on_ready()
            server.run(sockets=[sock])
    finally:
        sock.close()
