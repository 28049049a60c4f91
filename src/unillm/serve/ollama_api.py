"""The Ollama REST API: ``/api/chat``, ``/api/generate`` (NDJSON streaming), ``/api/embed``,
``/api/embeddings``, ``/api/tags``, ``/api/show``, ``/api/ps``, ``/api/version``; its request bodies, their
conversion to the engine's parameters and messages, and the answers in Ollama's shape.

Example:
    >>> ollama_params({"options": {"num_predict": 8, "temperature": 0}, "format": "json"})
    {'temperature': 0, 'max_tokens': 8, 'response_format': {'type': 'json_object'}}
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Optional, Union

from pydantic import BaseModel, ConfigDict, StrictBool, StrictStr
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .. import __version__
from ..errors import InvalidRequestError, UnillmError
from ..params import PARAMS
from ..structured import loads_arguments
from ..messages import from_ollama_messages
from ..types import ChatCompletion, ChatCompletionChunk, Completion, Message
from .wire import ndjson, now, ns, one, typed

if TYPE_CHECKING:
    from ..registry import ModelSpec
    from .app import Server

#: Ollama ``options`` keys that are unillm chat parameters (from unillm.params.PARAMS).
OLLAMA_OPTIONS = {p.ollama: name for name, p in PARAMS.items() if p.ollama}
#: Ollama features unillm does not implement: accepted only at their neutral value. (``template`` is a Go
#: template of Ollama's; unillm renders the model's own chat template, or with ``raw`` none.)
UNSUPPORTED = ("images", "template", "context")
#: Ollama options that change how fast or where a model runs, never its answer: unillm takes them from the
#: registry entry (options.n_threads, n_gpu_layers...), so a request's values are accepted and not applied.
SPEED_ONLY = ("num_thread", "num_gpu", "main_gpu", "num_batch", "num_keep", "use_mmap", "use_mlock", "numa", "low_vram")
#: Endpoints of Ollama's API that unillm does not implement: a 501 that names them.
NOT_IMPLEMENTED = ("/api/pull", "/api/push", "/api/delete", "/api/create", "/api/copy", "/api/blobs/{digest}")


class OllamaBody(BaseModel):
    """The fields of /api/chat and /api/generate. Those that would change the answer and that unillm cannot
    honour are refused by name (:data:`UNSUPPORTED`); unknown fields are refused too."""

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
    images: Optional[list[Any]] = None
    suffix: Optional[StrictStr] = None
    template: Optional[StrictStr] = None
    raw: Optional[StrictBool] = None
    context: Optional[list[Any]] = None
    think: Union[StrictBool, StrictStr, None] = None


def unloads(keep_alive: Any) -> bool:
    """Ollama's keep_alive of zero ("0", 0, "0s", "0m"): unload the model."""
    if isinstance(keep_alive, (int, float)) and not isinstance(keep_alive, bool):
        return keep_alive == 0
    return isinstance(keep_alive, str) and re.fullmatch(r"0+(\.0+)?[smh]?", keep_alive.strip()) is not None


def ollama_params(body: dict[str, Any]) -> dict[str, Any]:
    """The chat parameters of an /api/chat or /api/generate body."""
    opts = dict(body.get("options") or {})
    params: dict[str, Any] = {dst: opts.pop(src) for src, dst in OLLAMA_OPTIONS.items() if src in opts}
    opts.pop("num_ctx", None)  # the registry's context window rules
    if "mirostat" in opts:  # Ollama's name for llama.cpp's mirostat_mode (0: off, 1, 2)
        opts["mirostat_mode"] = opts.pop("mirostat")
    for name in SPEED_ONLY:  # where and how fast it runs, not what it answers (set in the registry)
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
    if body.get("think") is not None:
        params["think"] = body["think"]
    if opts:
        params["extra"] = opts
    return params


def _calls(calls: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """Tool calls in Ollama's shape (arguments as objects) from (name, arguments JSON) pairs."""
    return [{"function": {"name": name, "arguments": loads_arguments(args)}} for name, args in calls]


def ollama_message(message: Message) -> dict[str, Any]:
    """An assistant message in Ollama's shape."""
    out: dict[str, Any] = {"role": "assistant", "content": message.content or ""}
    if message.reasoning_content:
        out["thinking"] = message.reasoning_content
    if message.tool_calls:
        out["tool_calls"] = _calls([(c.function.name, c.function.arguments) for c in message.tool_calls])
    return out


def ollama_final(r: ChatCompletion | ChatCompletionChunk | Completion, key: str, content: str, message: Message | None = None) -> dict[str, Any]:
    """The last object of an answer (``done: true``), with its timings and token counts."""
    t = r.timings
    usage = r.usage
    reason = r.finish_reason or "stop"
    out: dict[str, Any] = {"model": r.model, "created_at": now(), "done": True, "done_reason": "stop" if reason == "tool_calls" else reason}
    if key == "message":
        out[key] = ollama_message(message) if message is not None else {"role": "assistant", "content": content}
    else:
        out[key] = content
        if message is not None and message.reasoning_content:
            out["thinking"] = message.reasoning_content  # /api/generate's place for it
    if t is not None:
        out.update(total_duration=ns(t.total_s + t.load_s), load_duration=ns(t.load_s),
                   prompt_eval_duration=ns(t.ttft_s), eval_duration=ns((t.total_s or 0) - (t.ttft_s or 0)))
    if usage is not None:
        out.update(prompt_eval_count=usage.prompt_tokens, eval_count=usage.completion_tokens)
    return out


def digest(spec: ModelSpec) -> str:
    """A digest that tells registry entries apart (and changes when an entry does)."""
    entry = json.dumps(spec.model_dump(mode="json"), sort_keys=True).encode()
    return hashlib.sha256(entry).hexdigest()


def size(spec: ModelSpec) -> int:
    """The model file's size, when it is a local file."""
    from ..registry import resolve_file

    try:
        return resolve_file(spec).stat().st_size if (spec.source.path or spec.source.package) else 0
    except (UnillmError, OSError):
        return 0


def model_facts(server: Server, spec: ModelSpec) -> dict[str, Any]:
    """What /api/show tells of a model (blocking: may read its GGUF's vocabulary): ``architecture``,
    ``file_type``, ``fim`` (the FIM markers' texts, or None), ``template`` (its chat template, once loaded)."""
    from ..registry import resolve_file

    facts: dict[str, Any] = {"fim": None, "template": None}
    registry = server.engine.registry
    gguf_spec = registry.get(spec.source.gguf_of) if spec.source.gguf_of else spec
    if gguf_spec.backend == "llamacpp" or spec.source.gguf_of:
        try:
            from ..backends.llamacpp import gguf_facts

            path = resolve_file(gguf_spec)
            facts.update(gguf_facts(str(path), path.stat().st_mtime))
        except (ImportError, UnillmError, ValueError, OSError):
            pass  # without llama-cpp-python (or the file), the registry's facts only
    if spec.fim is not None:
        facts["fim"] = (spec.fim.prefix, spec.fim.suffix, spec.fim.middle)
    backend = server.engine.backend(spec.name)
    if backend is not None:
        fim = backend.fim()
        if fim is not None and any(fim.names):
            facts["fim"] = fim.names
        tokenizer = getattr(backend, "tokenizer", None)
        facts["template"] = getattr(backend, "_template", None) or getattr(tokenizer, "chat_template", None)
    return facts


def ollama_template(facts: dict[str, Any]) -> str:
    """A template in Ollama's shape: the FIM form that clients look for (``.Suffix``, as Continue does to
    turn fill-in-the-middle on) where the model has one, then the chat template (once the model is loaded)."""
    chat = facts.get("template") or ""
    if not facts.get("fim"):
        return chat
    pre, suf, mid = facts["fim"]
    return f"{{{{- if .Suffix }}}}{pre}{{{{ .Prompt }}}}{suf}{{{{ .Suffix }}}}{mid}{{{{- else }}}}{chat or '{{ .Prompt }}'}{{{{- end }}}}"


def routes(server: Server) -> list[Route]:
    """The Ollama API's routes over ``server``."""
    engine = server.engine

    async def chat(request: Request, generate: bool) -> Response:
        key = "response" if generate else "message"
        try:
            body = await server.body_of(request)
            req = typed(OllamaBody, body)
            for name in UNSUPPORTED:
                if getattr(req, name) not in (None, False, "", []):
                    raise InvalidRequestError(f"{name} is not supported by unillm")
            model = req.model
            server.check_not_self(model)
            if generate and (req.raw or req.suffix is not None) and not (unloads(req.keep_alive) or (not req.prompt and req.suffix is None)):
                return await completion(model, req, body)
            empty = not (req.prompt if generate else req.messages)
            if empty or unloads(req.keep_alive):
                # Ollama's idioms: an empty prompt loads the model, keep_alive 0 unloads it; neither generates.
                if unloads(req.keep_alive):
                    await engine.aunload(model)
                    reason = "unload"
                else:
                    await engine.aload(model)
                    reason = "load"
                done = {"model": model, "created_at": now(), "done": True, "done_reason": reason,
                        key: "" if generate else {"role": "assistant", "content": ""}}
                return JSONResponse(done) if not req.stream else ndjson(one(done))
            if generate:
                messages = ([{"role": "system", "content": req.system}] if req.system else []) + [
                    {"role": "user", "content": req.prompt or ""}
                ]
            else:
                messages = from_ollama_messages(req.messages or [])
            params = ollama_params(body)
            if req.stream:
                stream = await engine.achat(model, messages, stream=True, **params)
            else:
                r = await engine.achat(model, messages, **params)
                return JSONResponse(ollama_final(r, key, r.text, r.choices[0].message))
        except UnillmError as exc:
            return server.error(exc, api="ollama")

        async def parts() -> AsyncIterator[dict[str, Any]]:
            calls: dict[int, list[str]] = {}  # Ollama sends whole calls: OpenAI's deltas gathered by index
            try:
                async for c in stream:
                    for d in c.choices[0].delta.tool_calls or []:
                        call = calls.setdefault(d["index"], ["", ""])
                        call[0] = d["function"].get("name") or call[0]
                        call[1] += d["function"].get("arguments") or ""
                    if calls and key == "message" and c.finish_reason is not None:
                        yield {"model": c.model, "created_at": now(), "done": False, "message": {
                            "role": "assistant", "content": "",
                            "tool_calls": _calls([(n, a) for _, (n, a) in sorted(calls.items())])}}
                        calls = {}
                    thought = c.choices[0].delta.reasoning_content
                    if thought:
                        yield {"model": c.model, "created_at": now(), "done": False, **(
                            {"message": {"role": "assistant", "content": "", "thinking": thought}} if key == "message"
                            else {"response": "", "thinking": thought})}
                    if c.finish_reason is not None:
                        yield ollama_final(c, key, c.text)
                    elif c.text:
                        piece = {"role": "assistant", "content": c.text} if key == "message" else c.text
                        yield {"model": c.model, "created_at": now(), key: piece, "done": False}
            except UnillmError as exc:
                yield {"error": str(exc)}
            finally:
                await stream.aclose()  # type: ignore[attr-defined]

        return ndjson(parts())

    async def completion(model: str, req: OllamaBody, body: dict[str, Any]) -> Response:
        """/api/generate with ``raw`` (the prompt as it is, no template) or a ``suffix`` (fill in the middle
        with the model's FIM tokens; Ollama's ``.Suffix``)."""
        if req.system:
            raise InvalidRequestError("system does not apply to a raw or fill-in-the-middle prompt (raw: true or a "
                                      "suffix): write it into the prompt")
        params = ollama_params(body)
        if not req.stream:
            r = await engine.acomplete(model, req.prompt or "", suffix=req.suffix, **params)
            return JSONResponse(ollama_final(r, "response", r.text))
        stream = await engine.acomplete(model, req.prompt or "", suffix=req.suffix, stream=True, **params)

        async def parts() -> AsyncIterator[dict[str, Any]]:
            try:
                async for c in stream:
                    if c.finish_reason is not None:
                        yield ollama_final(c, "response", c.text)
                    elif c.text:
                        yield {"model": c.model, "created_at": now(), "response": c.text, "done": False}
            except UnillmError as exc:
                yield {"error": str(exc)}
            finally:
                await stream.aclose()  # type: ignore[attr-defined]

        return ndjson(parts())

    async def api_chat(request: Request) -> Response:
        return await server.admitted(request, lambda: chat(request, generate=False), api="ollama")

    async def api_generate(request: Request) -> Response:
        return await server.admitted(request, lambda: chat(request, generate=True), api="ollama")

    def model_entry(name: str, facts: dict[str, Any] | None = None) -> dict[str, Any]:
        spec = engine.registry.get(name)
        facts = facts or {}
        family = facts.get("architecture") or spec.backend
        caps = ["embedding"] if spec.task == "embed" else ["completion", "tools", "embedding"]
        if spec.task != "embed" and (spec.fim is not None or facts.get("fim")):
            caps.insert(1, "insert")  # Ollama's word for fill-in-the-middle (a suffix)
        return {
            "name": spec.name, "model": spec.name, "modified_at": now(), "size": size(spec), "digest": digest(spec),
            "details": {"format": "gguf" if spec.backend == "llamacpp" else spec.backend, "family": family,
                        "families": [family], "parameter_size": "", "quantization_level": facts.get("file_type", "")},
            "capabilities": caps,
        }

    async def api_tags(request: Request) -> Response:
        names = await asyncio.to_thread(server.runnable_names)
        return JSONResponse({"models": [model_entry(n) for n in names]})

    async def api_show(request: Request) -> Response:
        try:
            body = await server.body_of(request)
            name: Any = body.get("model") or body.get("name")
            spec = engine.registry.get(name)  # a name that is not a string is refused there
        except UnillmError as exc:
            return server.error(exc, api="ollama")
        # The registry defaults that apply here, under Ollama's names (max_tokens does not: a client that sets no
        # limit generates until a stop or the end of the context, as with Ollama's num_predict -1).
        defaults = spec.defaults.model_dump(exclude_none=True)
        stops = defaults.pop("stop", None) or []
        params = "\n".join([f"num_ctx {spec.context_window}"]
                           + [f"{PARAMS[k].ollama or k} {v}" for k, v in defaults.items() if k != "max_tokens"]
                           + [f"stop {json.dumps(s)}" for s in ([stops] if isinstance(stops, str) else stops)])
        facts = await asyncio.to_thread(model_facts, server, spec)
        entry = model_entry(spec.name, facts)
        arch = facts.get("architecture") or spec.backend
        info: dict[str, Any] = {"general.architecture": arch, f"{arch}.context_length": spec.context_window,
                                "unillm.backend": spec.backend, "unillm.context_window": spec.context_window}
        if facts.get("file_type"):
            info["general.file_type"] = facts["file_type"]
        return JSONResponse({
            "modelfile": f"# unillm registry entry {spec.name} ({spec.config_file})\nFROM {spec.source.describe()}\n",
            "parameters": params, "template": ollama_template(facts), "details": entry["details"],
            "capabilities": entry["capabilities"], "modified_at": entry["modified_at"], "model_info": info,
        })

    async def api_ps(request: Request) -> Response:
        return JSONResponse({"models": [{**model_entry(n), "expires_at": now(), "size_vram": 0} for n in engine.loaded()]})

    async def api_embed(request: Request, legacy: bool) -> Response:
        try:
            body = await server.body_of(request)
            t = time.perf_counter()
            if legacy:
                r = await server.embeddings(body, "prompt", {"model", "prompt", "options", "keep_alive"})
            else:
                truncate = body.get("truncate", True)  # Ollama's default: cut a long input to the context window
                if not isinstance(truncate, bool):
                    raise InvalidRequestError(f"truncate must be true or false, got {truncate!r}")
                r = await server.embeddings(
                    body, "input", {"model", "input", "truncate", "options", "keep_alive", "dimensions"}, truncate)
        except UnillmError as exc:
            return server.error(exc, api="ollama")
        if legacy:
            return JSONResponse({"embedding": r.vectors[0]})
        return JSONResponse({"model": r.model, "embeddings": r.vectors, "total_duration": ns(time.perf_counter() - t),
                             "load_duration": 0, "prompt_eval_count": r.usage.prompt_tokens})

    async def api_embed_new(request: Request) -> Response:
        return await api_embed(request, legacy=False)

    async def api_embed_legacy(request: Request) -> Response:
        return await api_embed(request, legacy=True)

    async def api_version(request: Request) -> Response:
        return JSONResponse({"version": __version__})

    return [
        Route("/api/chat", api_chat, methods=["POST"]),
        Route("/api/generate", api_generate, methods=["POST"]),
        Route("/api/tags", api_tags, methods=["GET"]),
        Route("/api/show", api_show, methods=["POST"]),
        Route("/api/ps", api_ps, methods=["GET"]),
        Route("/api/version", api_version, methods=["GET"]),
        Route("/api/embed", api_embed_new, methods=["POST"]),
        Route("/api/embeddings", api_embed_legacy, methods=["POST"]),
    ]
