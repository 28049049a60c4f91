"""The OpenAI API: ``/v1/models``, ``/v1/chat/completions`` and ``/v1/completions`` (SSE streaming) and
``/v1/embeddings``; its request bodies and their conversion to the engine's parameters (a field unillm would
not honour is a 400).

Example:
    >>> openai_params({"model": "m", "messages": [], "max_completion_tokens": 8, "temperature": 0})
    {'temperature': 0, 'max_tokens': 8}
"""

from __future__ import annotations

import asyncio
import base64
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Optional, Union

from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, StrictStr
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..errors import InvalidRequestError, UnillmError
from ..families import think_of_effort
from ..params import PARAMS
from .wire import sse, typed

if TYPE_CHECKING:
    from .app import Server

#: OpenAI chat-completion fields that are unillm chat parameters under the same name.
OPENAI_PARAMS = [name for name in PARAMS if name != "extra"]
#: OpenAI fields accepted when they ask for nothing unillm would do differently, and what that value is.
NEUTRAL: dict[str, Any] = {
    "logit_bias": {},
}
#: OpenAI fields that do not change the answer.
IGNORED = {"model", "messages", "stream", "stream_options", "user", "max_completion_tokens", "metadata", "store",
           "service_tier", "parallel_tool_calls"}
#: Endpoints of OpenAI's API that unillm does not implement: a 501 that names them.
NOT_IMPLEMENTED: tuple[str, ...] = ()
#: /v1/completions fields that are unillm parameters under the same name.
COMPLETION_PARAMS = ["temperature", "top_p", "max_tokens", "stop", "seed", "presence_penalty", "frequency_penalty", "n"]
#: /v1/completions fields that the handler reads itself, or that do not change the answer.
COMPLETION_OWN = {"model", "prompt", "suffix", "stream", "stream_options", "echo", "logprobs", "best_of", "user",
                  "logit_bias"}


class OpenAIBody(BaseModel):
    """The top-level types of /v1/chat/completions; each parameter's value is checked by unillm.params."""

    model_config = ConfigDict(extra="allow")

    model: StrictStr
    messages: list[Any]
    stream: StrictBool = False
    stream_options: Optional[dict[str, Any]] = None


def openai_params(body: dict[str, Any]) -> dict[str, Any]:
    """The chat parameters of an OpenAI request; a field unillm would not honour is a 400 naming it."""
    unknown = set(body) - set(OPENAI_PARAMS) - set(NEUTRAL) - IGNORED - {"reasoning_effort"}
    if unknown:
        raise InvalidRequestError(f"unsupported field(s) {sorted(unknown)}")
    for name, neutral in NEUTRAL.items():
        if body.get(name) not in (None, neutral):
            raise InvalidRequestError(f"{name}={body[name]!r} is not supported by unillm (only {neutral!r})")
    params = {k: body[k] for k in OPENAI_PARAMS if body.get(k) is not None}
    effort = body.get("reasoning_effort")
    if effort is not None:  # OpenAI's reasoning switch: none (and minimal) is think=false, levels are levels
        if "think" in body:
            raise InvalidRequestError("reasoning_effort and think both set the reasoning: give one")
        params["think"] = think_of_effort(effort)
    mt = body.get("max_completion_tokens", body.get("max_tokens"))
    if mt is not None:
        params["max_tokens"] = mt
    return params


class CompletionBody(BaseModel):
    """The top-level types of /v1/completions."""

    model_config = ConfigDict(extra="allow")

    model: StrictStr
    prompt: Union[StrictStr, list[StrictStr], list[StrictInt], list[list[StrictInt]]]
    suffix: Optional[StrictStr] = None
    stream: StrictBool = False
    echo: StrictBool = False
    logprobs: Optional[StrictInt] = None
    best_of: Optional[StrictInt] = None


def completion_params(body: dict[str, Any]) -> dict[str, Any]:
    """The parameters of a /v1/completions request; a field unillm would not honour is a 400 naming it."""
    unknown = set(body) - set(COMPLETION_PARAMS) - COMPLETION_OWN
    if unknown:
        raise InvalidRequestError(f"unsupported field(s) {sorted(unknown)}")
    if body.get("logit_bias") not in (None, {}):
        raise InvalidRequestError("logit_bias is not supported by unillm (only {})")
    n = body.get("n") or 1
    if body.get("best_of") not in (None, 1, n):
        raise InvalidRequestError(f"best_of={body['best_of']!r} is not supported by unillm (only best_of = n: each "
                                  "choice is returned)")
    params = {k: body[k] for k in COMPLETION_PARAMS if body.get(k) is not None}
    if body.get("logprobs") is not None:  # the number of most likely alternatives per token (OpenAI: 0-5)
        params["logprobs"], params["top_logprobs"] = True, body["logprobs"]
    return params


def prompts_of(prompt: Any) -> list[Any]:
    """The prompts of a /v1/completions body: one string or token list, or a list of them."""
    if isinstance(prompt, str) or (prompt and all(isinstance(t, int) for t in prompt)):
        return [prompt]
    if not prompt:
        raise InvalidRequestError("prompt is an empty list")
    return list(prompt)


def chunk_events(body: dict[str, Any]) -> Callable[[Any], list[dict[str, Any]]]:
    """How a streamed chunk goes out: its JSON, with ``usage`` only when ``stream_options.include_usage`` asks
    for it, and unillm's own fields only on the last chunk."""
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

    def events(chunk: Any) -> list[dict[str, Any]]:
        d = chunk.to_dict()
        if not include_usage:
            d.pop("usage", None)
        if chunk.finish_reason is None:
            d.pop("unillm", None)
        return [d]

    return events


def model_object(name: str) -> dict[str, Any]:
    """A model in OpenAI's shape."""
    return {"id": name, "object": "model", "created": 0, "owned_by": "unillm"}


def routes(server: Server) -> list[Route]:
    """The OpenAI API's routes over ``server``."""
    engine = server.engine

    async def chat(request: Request) -> Response:
        try:
            body = await server.body_of(request)
            req = typed(OpenAIBody, body)
            model, messages, params = req.model, req.messages, openai_params(body)
            server.check_not_self(model)
            if not req.stream:
                return JSONResponse((await engine.achat(model, messages, **params)).to_dict())
            stream = await engine.achat(model, messages, stream=True, **params)
        except UnillmError as exc:
            return server.error(exc, api="openai")
        return sse(stream, chunk_events(body))

    async def completions(request: Request) -> Response:
        try:
            body = await server.body_of(request)
            req = typed(CompletionBody, body)
            params, prompts = completion_params(body), prompts_of(req.prompt)
            server.check_not_self(req.model)
            kw = {"suffix": req.suffix, "echo": req.echo, **params}
            if not req.stream:
                results = await asyncio.gather(*(engine.acomplete(req.model, p, **kw) for p in prompts))
                first = results[0].to_dict()
                # several prompts: their choices in order (prompt i's j-th choice at index i * n + j), usage summed
                first["choices"] = [dict(c.to_dict(), index=i * len(r.choices) + c.index)
                                    for i, r in enumerate(results) for c in r.choices]
                for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
                    first["usage"][key] = sum(r.to_dict()["usage"][key] for r in results)
                return JSONResponse(first)
            if len(prompts) > 1:
                raise InvalidRequestError("several prompts are not streamed by unillm: send them one by one, or without stream")
            stream = await engine.acomplete(req.model, prompts[0], stream=True, **kw)
        except UnillmError as exc:
            return server.error(exc, api="openai")
        return sse(stream, chunk_events(body))

    async def v1_completions(request: Request) -> Response:
        return await server.admitted(request, lambda: completions(request), api="openai")

    async def v1_chat(request: Request) -> Response:
        return await server.admitted(request, lambda: chat(request), api="openai")

    async def v1_models(request: Request) -> Response:
        names = await asyncio.to_thread(server.runnable_names)  # may ask an Ollama daemon, or nvidia-smi
        return JSONResponse({"object": "list", "data": [model_object(n) for n in names]})

    async def v1_model(request: Request) -> Response:
        try:
            spec = engine.registry.get(request.path_params["model"])
        except UnillmError as exc:
            return server.error(exc, api="openai")
        return JSONResponse(model_object(spec.name))

    async def v1_embeddings(request: Request) -> Response:
        try:
            body = await server.body_of(request)
            fmt = body.get("encoding_format") or "float"
            if fmt not in ("float", "base64"):
                raise InvalidRequestError(f"encoding_format {fmt!r}: use float or base64")
            r = await server.embeddings(body, "input", {"model", "input", "encoding_format", "user", "dimensions"})
        except UnillmError as exc:
            return server.error(exc, api="openai")
        out = r.to_dict()
        if fmt == "base64":  # what the OpenAI SDK asks for by default: little-endian float32
            for d in out["data"]:
                d["embedding"] = base64.b64encode(struct.pack(f"<{len(d['embedding'])}f", *d["embedding"])).decode()
        return JSONResponse(out)

    return [
        Route("/v1/models", v1_models, methods=["GET"]),
        Route("/v1/models/{model:path}", v1_model, methods=["GET"]),
        Route("/v1/chat/completions", v1_chat, methods=["POST"]),
        Route("/v1/completions", v1_completions, methods=["POST"]),
        Route("/v1/embeddings", v1_embeddings, methods=["POST"]),
    ]
