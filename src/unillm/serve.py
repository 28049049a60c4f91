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

import asyncio
import base64
import contextlib
import hashlib
import json
import re
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timezone
from typing import Any, Optional, Union
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, StrictBool, StrictStr, ValidationError
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
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
from .serve_guard import Guard, error_body
from .structured import loads_arguments
from .types import ChatCompletion, ChatCompletionChunk, EmbeddingResponse

#: Ollama ``options`` keys that are unillm chat parameters (from unillm.params.PARAMS).
_OLLAMA_OPTIONS = {p.ollama: name for name, p in PARAMS.items() if p.ollama}
#: OpenAI chat-completion fields that are unillm chat parameters under the same name.
_OPENAI_PARAMS = [name for name in PARAMS if name != "extra"]
#: OpenAI fields accepted when they ask for nothing unillm would do differently, and what that value is.
_OPENAI_NEUTRAL: dict[str, Any] = {
    "logit_bias": {},
}
#: OpenAI fields that do not change the answer.
_OPENAI_IGNORED = {"model", "messages", "stream", "stream_options", "user", "max_completion_tokens", "metadata",
                   "store", "service_tier", "parallel_tool_calls"}


class _OllamaBody(BaseModel):
    """The fields of /api/chat and /api/generate. Those that would change the answer and that unillm cannot
    honour are refused by name (see :func:`_refuse_unsupported`); unknown fields are refused too."""

    model_config = ConfigDict(extra="forbid")

    model: StrictStr
    messages: Optional[list[Any]] = None
    prompt: Optional[StrictStr] = None
    system: Optional[StrictStr] = None
    stream: StrictBool = True
    format: Union[StrictStr, dict[str, Any], None] = None
    options: Optional[dict[str, Any]] = None
    keep_alive: Union[StrictStr, float, None] = None
    tools: Optional[list[Any]] = None
    # Ollama features unillm does not implement: accepted only at their neutral value.
    images: Optional[list[Any]] = None
    suffix: Optional[StrictStr] = None
    template: Optional[StrictStr] = None
    raw: Optional[StrictBool] = None
    context: Optional[list[Any]] = None
    think: Union[StrictBool, StrictStr, None] = None


class _OpenAIBody(BaseModel):
    """The top-level types of /v1/chat/completions; each parameter's value is checked by unillm.params."""

    model_config = ConfigDict(extra="allow")

    model: StrictStr
    messages: list[Any]
    stream: StrictBool = False
    stream_options: Optional[dict[str, Any]] = None


_OLLAMA_UNSUPPORTED = ("images", "suffix", "template", "raw", "context", "think")
#: Ollama options that change how fast or where a model runs, never its answer: unillm takes them from the
#: registry entry (options.n_threads, n_gpu_layers...), so a request's values are accepted and not applied.
_OLLAMA_SPEED_ONLY = ("num_thread", "num_gpu", "main_gpu", "num_batch", "num_keep", "use_mmap", "use_mlock", "numa",
                      "low_vram")
#: Endpoints of the two APIs that unillm does not implement: a 501 that names them, in the API's own shape.
_NOT_IMPLEMENTED = ("/api/pull", "/api/push", "/api/delete", "/api/create", "/api/copy", "/api/blobs/{digest}",
                    "/v1/completions")


def _unloads(keep_alive: Any) -> bool:
    """Ollama's keep_alive of zero ("0", 0, "0s", "0m"): unload the model."""
    if isinstance(keep_alive, (int, float)) and not isinstance(keep_alive, bool):
        return keep_alive == 0
    return isinstance(keep_alive, str) and re.fullmatch(r"0+(\.0+)?[smh]?", keep_alive.strip()) is not None


def _typed(model: type[BaseModel], data: dict[str, Any]) -> Any:
    """A request body as its typed model; the first problem is an InvalidRequestError naming the field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "body"
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        raise InvalidRequestError(f"{field}: {msg}") from None


class _BodyTimeout(InvalidRequestError):
    """The client did not send its whole body in time (HTTP 408)."""


def _status(exc: UnillmError) -> int:
    if isinstance(exc, _BodyTimeout):
        return 408
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
    if "mirostat" in opts:  # Ollama's name for llama.cpp's mirostat_mode (0: off, 1, 2)
        opts["mirostat_mode"] = opts.pop("mirostat")
    for name in _OLLAMA_SPEED_ONLY:  # where and how fast it runs, not what it answers (set in the registry)
        opts.pop(name, None)
    mt = params.get("max_tokens")
    if isinstance(mt, int) and not isinstance(mt, bool) and mt < 0:
        del params["max_tokens"]  # Ollama's -1 (and -2): until the context is full
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

    def error(exc: UnillmError, openai: bool) -> JSONResponse:
        status = _status(exc)
        return JSONResponse(error_body(str(exc), status, openai, type(exc).__name__), status_code=status)

    async def body_of(request: Request) -> dict[str, Any]:
        try:
            raw = await asyncio.wait_for(request.body(), body_timeout)
        except asyncio.TimeoutError:
            raise _BodyTimeout(f"the request body did not arrive within {body_timeout:g} s (--body-timeout)") from None
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

    def check_not_self(model: str) -> None:
        """An Ollama-backend model whose daemon is this very server would call itself forever."""
        from .system import ollama_host

        spec = engine.registry.get(model)
        if spec.backend != "ollama" or spec.options.get("local_store") == "always":
            return
        target = urlsplit(ollama_host(spec))
        local = {"localhost", "127.0.0.1", "::1", bind_host.strip("[]")} | ({"0.0.0.0", "::"} if bind_host in ("0.0.0.0", "::") else set())
        if target.port == bind_port and (target.hostname or "") in local:
            raise BackendUnavailableError(
                f"model {spec.name!r} is served by the Ollama daemon at {ollama_host(spec)}, which is this unillm server "
                "itself: start Ollama on another port, or serve unillm on another one (--port)"
            )

    busy = 0

    async def admitted(request: Request, work: Callable[[], Awaitable[Response]], openai: bool) -> Response:
        """Run a generation endpoint within the queue bound (503 + Retry-After beyond it); a non-streaming
        request whose client disconnects is cancelled. The body is read before the request takes its place
        (a client that sends half a body holds none) and before anything listens for the disconnect."""
        nonlocal busy
        try:
            await body_of(request)  # cached by starlette for the handler
        except UnillmError as exc:
            return error(exc, openai)
        if busy >= max_queue:
            full = error(BackendUnavailableError(f"{busy} requests are queued, the limit (--max-queue) is {max_queue}"), openai)
            full.headers["Retry-After"] = "1"
            return full
        busy += 1
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
                resp.background = BackgroundTask(release)
                held = False
            return resp
        finally:
            if held:
                busy -= 1

    async def release() -> None:
        nonlocal busy
        busy -= 1

    def ndjson(gen: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
        async def lines() -> AsyncIterator[bytes]:
            async for obj in gen:
                yield (json.dumps(obj) + "\n").encode()

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    async def ollama_chat(request: Request, generate: bool) -> Response:
        try:
            body = await body_of(request)
            typed = _typed(_OllamaBody, body)
            for name in _OLLAMA_UNSUPPORTED:
                if getattr(typed, name) not in (None, False, "", []):
                    raise InvalidRequestError(f"{name} is not supported by unillm")
            model = typed.model
            check_not_self(model)
            empty = not (typed.prompt if generate else typed.messages)
            if empty or _unloads(typed.keep_alive):
                # Ollama's idioms: an empty prompt loads the model, keep_alive 0 unloads it; neither generates.
                if _unloads(typed.keep_alive):
                    await engine.aunload(model)
                    reason = "unload"
                else:
                    await engine.aload(model)
                    reason = "load"
                key = "response" if generate else "message"
                done = {"model": model, "created_at": _now(), "done": True, "done_reason": reason,
                        key: "" if generate else {"role": "assistant", "content": ""}}
                return JSONResponse(done) if not typed.stream else ndjson(_one(done))
            if generate:
                messages = ([{"role": "system", "content": typed.system}] if typed.system else []) + [
                    {"role": "user", "content": typed.prompt or ""}
                ]
            else:
                messages = _from_ollama_messages(typed.messages or [])
            params = _ollama_params(body)
            key = "response" if generate else "message"
            if typed.stream:
                stream = await engine.achat(model, messages, stream=True, **params)
            else:
                r = await engine.achat(model, messages, **params)
                return JSONResponse(_ollama_final(r, key, r.text, r.choices[0].message))
        except UnillmError as exc:
            return error(exc, openai=False)

        async def parts() -> AsyncIterator[dict[str, Any]]:
            calls: dict[int, dict[str, str]] = {}  # Ollama sends whole calls: OpenAI's deltas gathered by index
            try:
                async for c in stream:
                    for d in c.choices[0].delta.tool_calls or []:
                        call = calls.setdefault(d["index"], {"name": "", "arguments": ""})
                        call["name"] = d["function"].get("name") or call["name"]
                        call["arguments"] += d["function"].get("arguments") or ""
                    if calls and key == "message" and c.finish_reason is not None:
                        yield {"model": c.model, "created_at": _now(), "done": False, "message": {
                            "role": "assistant", "content": "", "tool_calls": [
                                {"function": {"name": v["name"], "arguments": loads_arguments(v["arguments"])}}
                                for _, v in sorted(calls.items())]}}
                        calls = {}
                    if c.finish_reason is not None:
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
        return await admitted(request, lambda: ollama_chat(request, generate=False), openai=False)

    async def api_generate(request: Request) -> Response:
        return await admitted(request, lambda: ollama_chat(request, generate=True), openai=False)

    def model_entry(name: str) -> dict[str, Any]:
        spec = engine.registry.get(name)
        return {
            "name": spec.name, "model": spec.name, "modified_at": _now(), "size": _size(spec), "digest": _digest(spec),
            "details": {"format": "gguf" if spec.backend == "llamacpp" else spec.backend, "family": spec.backend,
                        "parameter_size": "", "quantization_level": ""},
            "capabilities": ["embedding"] if spec.task == "embed" else ["completion", "tools", "embedding"],
        }

    def runnable_names() -> list[str]:
        from .system import why_not_runnable

        return [s.name for s in engine.registry if why_not_runnable(s) is None]

    async def api_tags(request: Request) -> Response:
        names = await asyncio.to_thread(runnable_names)  # may ask an Ollama daemon, or nvidia-smi
        return JSONResponse({"models": [model_entry(n) for n in names]})

    async def api_show(request: Request) -> Response:
        try:
            body = await body_of(request)
            name: Any = body.get("model") or body.get("name")
            spec = engine.registry.get(name)  # a name that is not a string is refused there
        except UnillmError as exc:
            return error(exc, openai=False)
        params = "\n".join(f"{k} {v}" for k, v in spec.defaults.model_dump(exclude_none=True).items())
        backend = engine.backend(spec.name)
        template = getattr(backend, "_template", None) or ""
        entry = model_entry(spec.name)
        return JSONResponse({
            "modelfile": f"# unillm registry entry {spec.name} ({spec.config_file})\nFROM {spec.source.describe()}\n",
            "parameters": params, "template": template, "details": entry["details"],
            "capabilities": entry["capabilities"], "modified_at": entry["modified_at"],
            "model_info": {"general.architecture": spec.backend, "unillm.backend": spec.backend,
                           "unillm.context_window": spec.context_window},
        })

    async def api_ps(request: Request) -> Response:
        return JSONResponse({"models": [{**model_entry(n), "expires_at": _now(), "size_vram": 0} for n in engine.loaded()]})

    async def embeddings(body: dict[str, Any], text_key: str, allowed: set[str], truncate: bool = False) -> EmbeddingResponse:
        """The embeddings an /api/embed, /api/embeddings or /v1/embeddings body asks for."""
        unknown = set(body) - allowed
        if unknown:
            raise InvalidRequestError(f"unsupported field(s) {sorted(unknown)}")
        if body.get("dimensions") is not None:
            raise InvalidRequestError("dimensions is not supported by unillm (the model's own size only)")
        model: Any = body.get("model")
        texts: Any = body.get(text_key)
        check_not_self(model)  # Registry.get refuses a name that is not a string
        return await engine.aembed(model, texts, truncate=truncate)  # the engine checks the input's type

    async def v1_embeddings(request: Request) -> Response:
        try:
            body = await body_of(request)
            fmt = body.get("encoding_format") or "float"
            if fmt not in ("float", "base64"):
                raise InvalidRequestError(f"encoding_format {fmt!r}: use float or base64")
            r = await embeddings(body, "input", {"model", "input", "encoding_format", "user", "dimensions"})
        except UnillmError as exc:
            return error(exc, openai=True)
        out = r.to_dict()
        if fmt == "base64":  # what the OpenAI SDK asks for by default: little-endian float32
            for d in out["data"]:
                d["embedding"] = base64.b64encode(struct.pack(f"<{len(d['embedding'])}f", *d["embedding"])).decode()
        return JSONResponse(out)

    async def api_embed(request: Request, legacy: bool) -> Response:
        try:
            body = await body_of(request)
            t = time.perf_counter()
            if legacy:
                r = await embeddings(body, "prompt", {"model", "prompt", "options", "keep_alive"})
            else:
                truncate = body.get("truncate", True)  # Ollama's default: cut a long input to the context window
                if not isinstance(truncate, bool):
                    raise InvalidRequestError(f"truncate must be true or false, got {truncate!r}")
                r = await embeddings(body, "input", {"model", "input", "truncate", "options", "keep_alive", "dimensions"},
                                     truncate)
        except UnillmError as exc:
            return error(exc, openai=False)
        if legacy:
            return JSONResponse({"embedding": r.vectors[0]})
        return JSONResponse({"model": r.model, "embeddings": r.vectors, "total_duration": _ns(time.perf_counter() - t),
                             "load_duration": 0, "prompt_eval_count": r.usage.prompt_tokens})

    async def api_embed_new(request: Request) -> Response:
        return await api_embed(request, legacy=False)

    async def api_embed_legacy(request: Request) -> Response:
        return await api_embed(request, legacy=True)

    async def not_implemented(request: Request) -> Response:
        path = request.url.path
        msg = f"{path} is not implemented by unillm serve (its models come from the registry, not a model store)"
        return JSONResponse(error_body(msg, 501, path.startswith("/v1/"), "not_implemented"), status_code=501)

    async def unillm_stats(request: Request) -> Response:
        return JSONResponse(engine.stats())

    async def api_version(request: Request) -> Response:
        return JSONResponse({"version": __version__})

    async def v1_models(request: Request) -> Response:
        names = await asyncio.to_thread(runnable_names)
        return JSONResponse({"object": "list", "data": [
            _openai_model(n) for n in names]})

    async def v1_model(request: Request) -> Response:
        try:
            spec = engine.registry.get(request.path_params["model"])
        except UnillmError as exc:
            return error(exc, openai=True)
        return JSONResponse(_openai_model(spec.name))

    async def v1_chat(request: Request) -> Response:
        return await admitted(request, lambda: openai_chat(request), openai=True)

    async def openai_chat(request: Request) -> Response:
        try:
            body = await body_of(request)
            typed = _typed(_OpenAIBody, body)
            model, messages, params = typed.model, typed.messages, _openai_params(body)
            check_not_self(model)
            if not typed.stream:
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

    routes = [
        Route("/api/chat", api_chat, methods=["POST"]),
        Route("/api/generate", api_generate, methods=["POST"]),
        Route("/api/tags", api_tags, methods=["GET"]),
        Route("/api/show", api_show, methods=["POST"]),
        Route("/api/ps", api_ps, methods=["GET"]),
        Route("/api/version", api_version, methods=["GET"]),
        Route("/unillm/stats", unillm_stats, methods=["GET"]),
        Route("/v1/models", v1_models, methods=["GET"]),
        Route("/v1/models/{model:path}", v1_model, methods=["GET"]),
        Route("/v1/chat/completions", v1_chat, methods=["POST"]),
        Route("/v1/embeddings", v1_embeddings, methods=["POST"]),
        Route("/api/embed", api_embed_new, methods=["POST"]),
        Route("/api/embeddings", api_embed_legacy, methods=["POST"]),
        Route("/", lambda r: Response("unillm is running"), methods=["GET", "HEAD"]),
        *(Route(path, not_implemented, methods=["GET", "POST", "DELETE", "HEAD"]) for path in _NOT_IMPLEMENTED),
    ]
    async def not_found(request: Request, exc: Exception) -> Response:
        path = request.url.path
        msg = f"{request.method} {path} is not an endpoint of unillm serve"
        status = getattr(exc, "status_code", 404)
        return JSONResponse(error_body(msg, status, path.startswith("/v1/")), status_code=status)

    guard = Middleware(Guard, bind_host=bind_host, bind_port=bind_port, allow_hosts=allow_hosts, api_key=api_key,
                       max_body_bytes=max_body_bytes)
    return Starlette(routes=routes, middleware=[guard], exception_handlers={404: not_found, 405: not_found})


def _openai_model(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "unillm"}


async def _one(obj: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    yield obj


def _digest(spec: Any) -> str:
    """A digest that tells registry entries apart (and changes when an entry does)."""
    entry = json.dumps(spec.model_dump(mode="json"), sort_keys=True).encode()
    return hashlib.sha256(entry).hexdigest()


def _size(spec: Any) -> int:
    """The model file's size, when it is a local file."""
    from .registry import resolve_file

    try:
        return resolve_file(spec).stat().st_size if (spec.source.path or spec.source.package) else 0
    except (UnillmError, OSError):
        return 0


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
        with Engine(config) as engine:
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
