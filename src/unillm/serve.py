"""``unillm serve``: one local HTTP endpoint over an Engine, for tools that only speak HTTP.

It speaks the Ollama REST API (``/api/chat``, ``/api/generate``, ``/api/tags``, ``/api/show``, ``/api/ps``,
``/api/version``; NDJSON streaming) and the OpenAI API (``/v1/models``, ``/v1/chat/completions``; SSE
streaming). Models stay loaded in this process. It binds 127.0.0.1 unless told otherwise; with an API key
every request needs ``Authorization: Bearer KEY``. Requests run concurrently; a GGUF model either batches
them (``options.parallel``) or takes them one at a time, never interleaved. A client that disconnects
mid-stream cancels its generation.

Example:
    $ unillm serve --port 11434          # then: OLLAMA_HOST=127.0.0.1:11434 ollama run smollm2 ...
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from . import __version__
from .engine import Engine
from .errors import (
    BackendNotInstalledError,
    BackendUnavailableError,
    InvalidRequestError,
    ModelLoadError,
    UnillmError,
    UnknownModelError,
    UnsupportedFeatureError,
)
from .params import PARAMS
from .structured import loads_arguments
from .types import ChatCompletion, ChatCompletionChunk

#: Ollama ``options`` keys that are unillm chat parameters (from unillm.params.PARAMS).
_OLLAMA_OPTIONS = {p.ollama: name for name, p in PARAMS.items() if p.ollama}
#: OpenAI chat-completion fields that are unillm chat parameters under the same name.
_OPENAI_PARAMS = [name for name in PARAMS if name != "extra"]
#: OpenAI fields accepted when they ask for nothing unillm would do differently, and what that value is.
_OPENAI_NEUTRAL: dict[str, Any] = {
    "n": 1, "logprobs": False, "top_logprobs": 0, "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {},
}
#: OpenAI fields that do not change the answer.
_OPENAI_IGNORED = {"model", "messages", "stream", "stream_options", "user", "max_completion_tokens", "metadata",
                   "store", "service_tier", "parallel_tool_calls"}


def _status(exc: UnillmError) -> int:
    if isinstance(exc, UnknownModelError):
        return 404
    if isinstance(exc, (InvalidRequestError, UnsupportedFeatureError)):
        return 400
    if isinstance(exc, (BackendUnavailableError, BackendNotInstalledError, ModelLoadError)):
        return 503
    return 500


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _ns(seconds: float | None) -> int:
    return int((seconds or 0.0) * 1e9)


def _ollama_params(body: dict[str, Any]) -> dict[str, Any]:
    opts = dict(body.get("options") or {})
    params: dict[str, Any] = {dst: opts.pop(src) for src, dst in _OLLAMA_OPTIONS.items() if src in opts}
    opts.pop("num_ctx", None)  # the registry's context window rules
    if params.get("max_tokens") is not None and params["max_tokens"] < 0:
        del params["max_tokens"]  # Ollama's -1: until the context is full
    fmt = body.get("format")
    if fmt == "json":
        params["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict):
        params["response_format"] = {"type": "json_schema", "json_schema": {"name": "format", "schema": fmt}}
    elif fmt not in (None, ""):
        raise InvalidRequestError(f"format must be \"json\" or a JSON schema object, got {fmt!r}")
    if body.get("tools"):
        params["tools"] = body["tools"]
    if opts:
        params["extra"] = opts
    return params


def _openai_params(body: dict[str, Any]) -> dict[str, Any]:
    """The chat parameters of an OpenAI request; a field unillm would not honour is a 400 naming it."""
    unknown = set(body) - set(_OPENAI_PARAMS) - set(_OPENAI_NEUTRAL) - _OPENAI_IGNORED
    if unknown:
        raise InvalidRequestError(f"unsupported field(s) {sorted(unknown)}")
    for name, neutral in _OPENAI_NEUTRAL.items():
        if body.get(name) not in (None, neutral):
            raise InvalidRequestError(f"{name}={body[name]!r} is not supported by unillm (only {neutral!r})")
    params = {k: body[k] for k in _OPENAI_PARAMS if body.get(k) is not None}
    mt = body.get("max_completion_tokens", body.get("max_tokens"))
    if mt is not None:
        params["max_tokens"] = mt
    return params


def _from_ollama_messages(messages: Any) -> Any:
    """Ollama's message shape to unillm's: ``tool_name`` names a tool result; ``images`` are refused."""
    if not isinstance(messages, list):
        return messages  # validate_messages says what is wrong
    out = []
    for i, m in enumerate(messages):
        if isinstance(m, dict):
            m = dict(m)
            if m.pop("images", None):
                raise InvalidRequestError(f"messages[{i}].images: unillm's models take text only")
            m.pop("thinking", None)  # a thinking model's earlier reasoning: not part of the conversation
            if "tool_name" in m:
                m["name"] = m.pop("tool_name")
        out.append(m)
    return out


def _ollama_message(message: Any) -> dict[str, Any]:
    """An assistant message in Ollama's shape: tool calls with arguments as objects."""
    out: dict[str, Any] = {"role": "assistant", "content": message.content or ""}
    if message.tool_calls:
        out["tool_calls"] = [
            {"function": {"name": c.function.name, "arguments": loads_arguments(c.function.arguments)}} for c in message.tool_calls
        ]
    return out


def _ollama_final(r: ChatCompletion | ChatCompletionChunk, key: str, content: str, message: Any = None) -> dict[str, Any]:
    t = r.timings
    usage = r.usage
    reason = r.finish_reason or "stop"
    out: dict[str, Any] = {"model": r.model, "created_at": _now(), "done": True, "done_reason": "stop" if reason == "tool_calls" else reason}
    if key == "message":
        out[key] = _ollama_message(message) if message is not None else {"role": "assistant", "content": content}
    else:
        out[key] = content
    if t is not None:
        out.update(total_duration=_ns(t.total_s + t.load_s), load_duration=_ns(t.load_s),
                   prompt_eval_duration=_ns(t.ttft_s), eval_duration=_ns((t.total_s or 0) - (t.ttft_s or 0)))
    if usage is not None:
        out.update(prompt_eval_count=usage.prompt_tokens, eval_count=usage.completion_tokens)
    return out


def create_app(engine: Engine, api_key: str | None = None) -> Starlette:
    """The ASGI app over ``engine`` (the caller owns the engine and closes it)."""

    def error(exc: UnillmError, openai: bool) -> JSONResponse:
        body: dict[str, Any] = (
            {"error": {"message": str(exc), "type": type(exc).__name__, "code": _status(exc)}} if openai else {"error": str(exc)}
        )
        return JSONResponse(body, status_code=_status(exc))

    async def body_of(request: Request) -> dict[str, Any]:
        try:
            data = await request.json()
        except ValueError as exc:
            raise InvalidRequestError(f"the request body is not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise InvalidRequestError("the request body must be a JSON object")
        return data

    def ndjson(gen: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
        async def lines() -> AsyncIterator[bytes]:
            async for obj in gen:
                yield (json.dumps(obj) + "\n").encode()

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    async def ollama_chat(request: Request, generate: bool) -> Response:
        try:
            body = await body_of(request)
            model = body.get("model") or ""
            if generate:
                messages = ([{"role": "system", "content": body["system"]}] if body.get("system") else []) + [
                    {"role": "user", "content": body.get("prompt", "")}
                ]
            else:
                messages = _from_ollama_messages(body.get("messages") or [])
            params = _ollama_params(body)
            key = "response" if generate else "message"
            if body.get("stream", True):
                stream = await engine.achat(model, messages, stream=True, **params)
            else:
                r = await engine.achat(model, messages, **params)
                return JSONResponse(_ollama_final(r, key, r.text, r.choices[0].message))
        except UnillmError as exc:
            return error(exc, openai=False)

        async def parts() -> AsyncIterator[dict[str, Any]]:
            try:
                async for c in stream:
                    calls = c.choices[0].delta.tool_calls
                    if calls and key == "message":
                        yield {"model": c.model, "created_at": _now(), "done": False, "message": {
                            "role": "assistant", "content": c.text, "tool_calls": [
                                {"function": {"name": d["function"]["name"], "arguments": loads_arguments(d["function"]["arguments"])}}
                                for d in calls]}}
                    elif c.finish_reason is not None:
                        yield _ollama_final(c, key, c.text)
                    elif c.text:
                        piece = {"role": "assistant", "content": c.text} if key == "message" else c.text
                        yield {"model": c.model, "created_at": _now(), key: piece, "done": False}
            except UnillmError as exc:
                yield {"error": str(exc)}
            finally:
                await stream.aclose()  # type: ignore[attr-defined]

        return ndjson(parts())

    async def api_chat(request: Request) -> Response:
        return await ollama_chat(request, generate=False)

    async def api_generate(request: Request) -> Response:
        return await ollama_chat(request, generate=True)

    def model_entry(name: str) -> dict[str, Any]:
        spec = engine.registry.get(name)
        return {
            "name": spec.name, "model": spec.name, "modified_at": _now(), "size": 0, "digest": "",
            "details": {"format": "gguf" if spec.backend == "llamacpp" else spec.backend, "family": spec.backend,
                        "parameter_size": "", "quantization_level": ""},
        }

    def runnable_names() -> list[str]:
        from .system import why_not_runnable

        return [s.name for s in engine.registry if why_not_runnable(s) is None]

    async def api_tags(request: Request) -> Response:
        return JSONResponse({"models": [model_entry(n) for n in runnable_names()]})

    async def api_show(request: Request) -> Response:
        try:
            body = await body_of(request)
            spec = engine.registry.get(body.get("model") or body.get("name") or "")
        except UnillmError as exc:
            return error(exc, openai=False)
        params = "\n".join(f"{k} {v}" for k, v in spec.defaults.model_dump(exclude_none=True).items())
        return JSONResponse({
            "modelfile": f"# unillm registry entry {spec.name} ({spec.config_file})\nFROM {spec.source.describe()}\n",
            "parameters": params, "template": "", "details": model_entry(spec.name)["details"],
            "model_info": {"unillm.backend": spec.backend, "unillm.context_window": spec.context_window},
        })

    async def api_ps(request: Request) -> Response:
        return JSONResponse({"models": [{**model_entry(n), "expires_at": _now(), "size_vram": 0} for n in engine.loaded()]})

    async def unillm_stats(request: Request) -> Response:
        return JSONResponse(engine.stats())

    async def api_version(request: Request) -> Response:
        return JSONResponse({"version": __version__})

    async def v1_models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": n, "object": "model", "created": 0, "owned_by": "unillm"} for n in runnable_names()]})

    async def v1_chat(request: Request) -> Response:
        try:
            body = await body_of(request)
            model, messages, params = body.get("model") or "", body.get("messages") or [], _openai_params(body)
            if not body.get("stream"):
                return JSONResponse((await engine.achat(model, messages, **params)).to_dict())
            stream = await engine.achat(model, messages, stream=True, **params)
        except UnillmError as exc:
            return error(exc, openai=True)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        async def events() -> AsyncIterator[bytes]:
            try:
                async for c in stream:
                    d = c.to_dict()
                    if not include_usage:
                        d.pop("usage", None)
                    yield f"data: {json.dumps(d)}\n\n".encode()
                yield b"data: [DONE]\n\n"
            except UnillmError as exc:
                yield f"data: {json.dumps({'error': {'message': str(exc), 'type': type(exc).__name__}})}\n\n".encode()
            finally:
                await stream.aclose()  # type: ignore[attr-defined]

        return StreamingResponse(events(), media_type="text/event-stream")

    class Auth(BaseHTTPMiddleware):
        async def dispatch(self, request: Request, call_next: Any) -> Response:
            if api_key and request.headers.get("authorization") != f"Bearer {api_key}":
                body = {"error": "missing or wrong API key (Authorization: Bearer KEY)"}
                if request.url.path.startswith("/v1/"):
                    body = {"error": {"message": body["error"], "type": "authentication_error"}}  # type: ignore[dict-item]
                return JSONResponse(body, status_code=401)
            return await call_next(request)  # type: ignore[no-any-return]

    routes = [
        Route("/api/chat", api_chat, methods=["POST"]),
        Route("/api/generate", api_generate, methods=["POST"]),
        Route("/api/tags", api_tags, methods=["GET"]),
        Route("/api/show", api_show, methods=["POST"]),
        Route("/api/ps", api_ps, methods=["GET"]),
        Route("/api/version", api_version, methods=["GET"]),
        Route("/unillm/stats", unillm_stats, methods=["GET"]),
        Route("/v1/models", v1_models, methods=["GET"]),
        Route("/v1/chat/completions", v1_chat, methods=["POST"]),
        Route("/", lambda r: Response("unillm is running"), methods=["GET", "HEAD"]),
    ]
    return Starlette(routes=routes, middleware=[Middleware(Auth)] if api_key else [])


def serve(host: str = "127.0.0.1", port: int = 11434, api_key: str | None = None, config: Any = None,
          preload: list[str] | None = None) -> None:
    """Run the server until interrupted."""
    import uvicorn

    with Engine(config) as engine:
        for name in preload or []:
            t = time.perf_counter()
            engine.load(name)
            print(f"loaded {name} in {time.perf_counter() - t:.1f} s", flush=True)
        uvicorn.run(create_app(engine, api_key), host=host, port=port, log_level="warning")
