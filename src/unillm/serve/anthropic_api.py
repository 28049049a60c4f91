"""Anthropic's Messages API: ``POST /v1/messages`` (streamed as Anthropic's events) and ``POST
/v1/messages/count_tokens``. A request becomes a chat call on the engine (the same path as
/v1/chat/completions: tools, the context check, fallbacks); its answer becomes content blocks. Errors come in
Anthropic's shape (``{"type": "error", "error": {"type", "message"}}``, see :mod:`unillm.serve.guard`), and
the key may come as ``x-api-key``.

Example:
    >>> messages_call({"model": "m", "max_tokens": 8, "system": "Be brief.", "stop_sequences": ["."],
    ...                "messages": [{"role": "user", "content": "Hi"}]})[1:3]
    ([{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi'}], {'max_tokens': 8, 'stop': ['.']})
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Optional, Union

from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..errors import InvalidRequestError, UnillmError
from ..types import ChatCompletion, ChatCompletionChunk, Usage
from .guard import error_body
from .wire import sse, status, text_parts, typed

if TYPE_CHECKING:
    from .app import Server

#: Fields that are chat parameters under the same name.
SAME = ("max_tokens", "temperature", "top_p")
#: Fields read by :func:`messages_call`, or that do not change the answer.
OWN = {"model", "messages", "system", "max_tokens", "stop_sequences", "stream", "tools", "tool_choice", "top_k",
       "metadata", "thinking", "service_tier", "context_management", "output_config", "output_format"}
#: Keys of a tool: ``cache_control`` and ``strict`` change nothing (unillm's calls always match the schema);
#: a ``defer_loading`` tool is left out of what the model is offered (it loads through a tool search, which
#: unillm does not run).
TOOL_KEYS = {"name", "description", "input_schema", "type", "cache_control", "strict", "defer_loading"}
#: What count_tokens reads.
COUNT_FIELDS = {"model", "messages", "system", "tools", "tool_choice", "thinking", "context_management", "output_config",
                "output_format"}
#: How a chat answer's finish reason reads in Anthropic's ``stop_reason``.
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


class MessagesBody(BaseModel):
    """The top-level types of /v1/messages."""

    model_config = ConfigDict(extra="allow")

    model: StrictStr
    messages: list[dict[str, Any]]
    max_tokens: StrictInt
    system: Union[StrictStr, list[dict[str, Any]], None] = None
    stop_sequences: Optional[list[StrictStr]] = None


class CountBody(BaseModel):
    """The top-level types of /v1/messages/count_tokens."""

    model_config = ConfigDict(extra="allow")

    model: StrictStr
    messages: list[dict[str, Any]]
    system: Union[StrictStr, list[dict[str, Any]], None] = None


def _refused(where: str, kind: Any) -> InvalidRequestError:
    return InvalidRequestError(f"{where} is a {kind!r} block: unillm's models read text only (text, tool_use and "
                                   "tool_result blocks)")


def _texts(where: str, content: Any) -> str:
    """The text of a string or of text blocks (a tool result's content, the system prompt)."""
    return text_parts(where, content, ("text",), "\n")


def chat_messages(system: Any, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chat messages of Anthropic's ``system`` and ``messages``: ``tool_use`` blocks become an assistant
    message's tool calls, each ``tool_result`` a tool message (``is_error`` marks its text ``Error:``), and
    earlier turns' ``thinking`` blocks their ``reasoning_content`` (the chat template decides what it keeps;
    ``redacted_thinking`` has no text to keep)."""
    out: list[dict[str, Any]] = [{"role": "system", "content": _texts("system", system)}] if system else []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in ("user", "assistant", "system"):  # system: instructions mid-conversation (Claude Code sends them)
            raise InvalidRequestError(f"messages[{i}].role must be user, assistant or system, got {role!r}")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise InvalidRequestError(f"messages[{i}].content must be a string or a list of content blocks")
        texts: list[str] = []
        calls: list[dict[str, Any]] = []
        thoughts: list[str] = []
        for k, block in enumerate(content):
            where = f"messages[{i}].content[{k}]"
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            if kind == "text" and isinstance(block.get("text"), str):
                texts.append(block["text"])
            elif kind == "tool_use" and role == "assistant":
                if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
                    raise InvalidRequestError(f"{where}: a tool_use block needs id and name")
                calls.append({"id": block["id"], "type": "function",
                              "function": {"name": block["name"], "arguments": json.dumps(block.get("input") or {})}})
            elif kind == "tool_result" and role == "user":
                if not isinstance(block.get("tool_use_id"), str):
                    raise InvalidRequestError(f"{where}: a tool_result block needs tool_use_id")
                if texts:  # text before a result stays before it
                    out.append({"role": "user", "content": "\n".join(texts)})
                    texts = []
                text = _texts(f"{where}.content", block.get("content") or "")
                out.append({"role": "tool", "tool_call_id": block["tool_use_id"],
                            "content": f"Error: {text}" if block.get("is_error") else text})
            elif kind == "thinking" and role == "assistant":
                if isinstance(block.get("thinking"), str) and block["thinking"]:
                    thoughts.append(block["thinking"])
            elif kind == "redacted_thinking" and role == "assistant":
                continue
            else:
                raise _refused(where, kind)
        if texts or calls:
            out.append({"role": role, "content": "\n".join(texts) if texts else None, **({"tool_calls": calls} if calls else {}),
                        **({"reasoning_content": "\n".join(thoughts)} if thoughts else {})})
    return out


def _tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise InvalidRequestError("tools must be a list")
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or t.get("type", "custom") != "custom":
            kind = t.get("type") if isinstance(t, dict) else type(t).__name__
            raise InvalidRequestError(f"tools[{i}] is of type {kind!r}: unillm runs client tools with an input_schema "
                                          "(Anthropic's server tools, such as web_search or code_execution, are Anthropic's)")
        if set(t) - TOOL_KEYS:
            raise InvalidRequestError(f"tools[{i}] ({t.get('name')}) has unsupported key(s) {sorted(set(t) - TOOL_KEYS)}")
        if t.get("defer_loading"):
            continue
        fn = {"name": t.get("name"), "parameters": t.get("input_schema") or {"type": "object", "properties": {}}}
        if t.get("description"):
            fn["description"] = t["description"]
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice: Any) -> tuple[Any, bool]:
    """The chat ``tool_choice`` of Anthropic's, and whether it allows one call at most."""
    if choice is None:
        return None, False
    kind = choice.get("type") if isinstance(choice, dict) else None
    single = bool(choice.get("disable_parallel_tool_use")) if isinstance(choice, dict) else False
    if kind == "tool" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}, single
    if kind in ("auto", "any", "none"):
        return {"auto": "auto", "any": "required", "none": "none"}[kind], single
    raise InvalidRequestError(f"tool_choice must be auto, any, tool (with a name) or none, got {choice!r}")


def _thinking(body: dict[str, Any]) -> bool | None:
    """The ``think`` of ``thinking``: ``disabled`` is false, ``adaptive`` the model's own way (a reasoning
    model thinks); ``enabled`` is refused, as no backend can hold reasoning to its ``budget_tokens``. Claude
    Code's ``clear_thinking`` context edits are accepted (chat templates drop earlier reasoning themselves)."""
    thinking = body.get("thinking")
    if thinking is not None and (not isinstance(thinking, dict) or thinking.get("type") not in ("disabled", "adaptive")):
        raise InvalidRequestError(f"thinking {thinking!r}: unillm cannot hold a model's reasoning to budget_tokens "
                                  "(use {'type': 'adaptive'}: a reasoning model thinks, or 'disabled')")
    edits = (body.get("context_management") or {}).get("edits") or []
    other = [e.get("type") if isinstance(e, dict) else e for e in edits
             if not (isinstance(e, dict) and str(e.get("type", "")).startswith("clear_thinking_"))]
    if other or set(body.get("context_management") or {}) - {"edits"}:
        raise InvalidRequestError(f"context_management {other or body['context_management']}: unillm never edits the "
                                  "context it is sent (only clear_thinking, as chat templates drop earlier thinking)")
    return False if thinking is not None and thinking.get("type") == "disabled" else None


def _output(body: dict[str, Any]) -> dict[str, Any] | None:
    """The ``response_format`` of ``output_config.format`` (or the older ``output_format``); ``effort`` may
    only be Anthropic's default, ``high``: no model in unillm has an effort setting."""
    config = dict(body.get("output_config") or {})
    if config.pop("effort", "high") != "high":
        raise InvalidRequestError(f"output_config.effort {body['output_config']['effort']!r}: model {body.get('model')!r} "
                                  "has no effort setting in unillm (only high, the default)")
    fmt = config.pop("format", None) or body.get("output_format")
    if config:
        raise InvalidRequestError(f"output_config has unsupported field(s) {sorted(config)}")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        raise InvalidRequestError("output_config.format must be {'type': 'json_schema', 'schema': {...}}")
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"]}}


def messages_call(body: dict[str, Any]) -> tuple[str, list[dict[str, Any]], dict[str, Any], bool]:
    """(model, chat messages, chat parameters, one call at most) of a /v1/messages body; a field unillm would
    not honour is an error naming it."""
    req = typed(MessagesBody, body)
    unknown = set(body) - OWN - set(SAME)
    if unknown:
        raise InvalidRequestError(f"unsupported field(s) {sorted(unknown)}")
    think = _thinking(body)
    params: dict[str, Any] = {k: body[k] for k in SAME if body.get(k) is not None}
    if think is not None:
        params["think"] = think
    fmt = _output(body)
    if fmt is not None:
        params["response_format"] = fmt
    if req.stop_sequences:
        params["stop"] = req.stop_sequences
    if body.get("top_k") is not None:
        params["extra"] = {"top_k": body["top_k"]}
    single = False
    tools = _tools(body["tools"]) if body.get("tools") else []
    if tools:
        params["tools"] = tools
        choice, single = _tool_choice(body.get("tool_choice"))
        if choice is not None:
            params["tool_choice"] = choice
    elif body.get("tool_choice") not in (None, {"type": "none"}, {"type": "auto"}):
        raise InvalidRequestError(f"tool_choice {body['tool_choice']!r} needs tools")
    if req.messages and req.messages[-1].get("role") == "assistant":
        raise InvalidRequestError("the messages end with an assistant turn: Anthropic's prefill (the answer continuing "
                                  "that text) is not supported by unillm; end with a user turn")
    return req.model, chat_messages(req.system, req.messages), params, single


def usage_of(usage: Usage | None) -> dict[str, int]:
    """Anthropic's usage: ``input_tokens`` are those not read from the prompt cache."""
    if usage is None:
        return {"input_tokens": 0, "output_tokens": 0}
    return {"input_tokens": usage.prompt_tokens - usage.cached_tokens, "output_tokens": usage.completion_tokens,
            "cache_read_input_tokens": usage.cached_tokens, "cache_creation_input_tokens": 0}


def stop_of(finish: str | None, stop: str | None, asked: list[str]) -> tuple[str, str | None]:
    """(``stop_reason``, ``stop_sequence``) of how an answer ended."""
    if finish == "stop" and stop is not None and stop in asked:
        return "stop_sequence", stop
    return STOP_REASONS.get(finish or "stop", "end_turn"), None


def message_of(r: ChatCompletion, single: bool, asked: list[str]) -> dict[str, Any]:
    """A chat completion as Anthropic's message."""
    choice = r.choices[0]
    content: list[dict[str, Any]] = [thinking_block(choice.message.reasoning_content)] if choice.message.reasoning_content else []
    if choice.message.content:
        content.append({"type": "text", "text": choice.message.content})
    calls = choice.message.tool_calls or []
    for tc in calls[:1] if single else calls:
        content.append({"type": "tool_use", "id": tc.id, "name": tc.function.name, "input": json.loads(tc.function.arguments or "{}")})
    reason, seq = stop_of(choice.finish_reason, choice.stop_sequence, asked)
    return {"id": f"msg_{r.id.split('-')[-1]}", "type": "message", "role": "assistant", "model": r.model,
            "content": content, "stop_reason": reason, "stop_sequence": seq, "usage": usage_of(r.usage)}


class Events:
    """Chat chunks as Anthropic's stream: ``message_start``, per content block ``content_block_start``, its
    ``text_delta`` or ``input_json_delta`` deltas and ``content_block_stop``, then ``message_delta`` (the stop
    reason and the usage) and ``message_stop``.

    Blocks follow one another, as Anthropic's do: text streams until the first tool call begins, whose
    arguments then stream; a later call, and text after the calls, are held and sent whole at the end (the
    engine may still add to the first call then)."""

    def __init__(self, model: str, single: bool, asked: list[str]) -> None:
        self.model, self.single, self.asked = model, single, asked
        self.started = False
        self.open: int | None = None  # the index of the block being written
        self.blocks = 0
        self.live: int | None = None  # the call whose block streams
        self.held: dict[int, list[str]] = {}  # later calls: id, name, arguments
        self.tail = ""  # text after the first call
        self.thinking: int | None = None  # the index of the thinking block

    def _start(self, block: dict[str, Any]) -> list[dict[str, Any]]:
        out = self._stop()
        self.open, self.blocks = self.blocks, self.blocks + 1
        return out + [{"type": "content_block_start", "index": self.open, "content_block": block}]

    def _stop(self) -> list[dict[str, Any]]:
        if self.open is None:
            return []
        at, self.open = self.open, None
        return [{"type": "content_block_stop", "index": at}]

    def _text(self, text: str) -> list[dict[str, Any]]:
        start = self._start({"type": "text", "text": ""}) if self.open is None or self.open == self.thinking else []
        return start + [{"type": "content_block_delta", "index": self.open, "delta": {"type": "text_delta", "text": text}}]

    def _args(self, args: str) -> dict[str, Any]:
        return {"type": "content_block_delta", "index": self.open, "delta": {"type": "input_json_delta", "partial_json": args}}

    def __call__(self, chunk: ChatCompletionChunk) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if not self.started:
            self.started = True
            out.append({"type": "message_start", "message": {
                "id": f"msg_{chunk.id.split('-')[-1]}", "type": "message", "role": "assistant", "model": self.model,
                "content": [], "stop_reason": None, "stop_sequence": None, "usage": usage_of(None)}})
        choice = chunk.choices[0]
        if choice.delta.reasoning_content:  # reasoning comes first, in a block of its own
            if self.thinking is None:
                out += self._start(thinking_block(""))
                self.thinking = self.open
            out.append({"type": "content_block_delta", "index": self.open,
                        "delta": {"type": "thinking_delta", "thinking": choice.delta.reasoning_content}})
        if choice.delta.content:
            if self.live is None:
                out += self._text(choice.delta.content)
            else:
                self.tail += choice.delta.content
        for d in choice.delta.tool_calls or []:
            i = d["index"]
            if self.single and i > 0:
                continue
            if d.get("id") is not None and self.live is None:
                self.live = i
                out += self._start({"type": "tool_use", "id": d["id"], "name": d["function"]["name"], "input": {}})
            elif d.get("id") is not None:
                self.held[i] = [d["id"], d["function"]["name"], ""]
            args = d["function"].get("arguments") or ""
            if args and i == self.live:
                out.append(self._args(args))
            elif args:
                self.held[i][2] += args
        if choice.finish_reason is not None:
            for call_id, name, args in (self.held[i] for i in sorted(self.held)):
                out += self._start({"type": "tool_use", "id": call_id, "name": name, "input": {}})
                out.append(self._args(args))
            if self.tail.strip():
                out += self._stop() + self._text(self.tail)
            reason, seq = stop_of(choice.finish_reason, choice.stop_sequence, self.asked)
            out += self._stop()
            out += [{"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": seq}, "usage": usage_of(chunk.usage)},
                    {"type": "message_stop"}]
        return out


def thinking_block(text: str) -> dict[str, Any]:
    """A thinking block: the model's reasoning in the clear. Its ``signature`` is empty: nothing here signs it."""
    return {"type": "thinking", "thinking": text, "signature": ""}


def error_events(exc: UnillmError) -> list[dict[str, Any]]:
    """An error after the stream began, as Anthropic sends one."""
    return [error_body(str(exc), status(exc), "anthropic")]


def routes(server: Server) -> list[Route]:
    """The Messages API's routes over ``server``."""
    engine = server.engine

    async def create(request: Request) -> Response:
        try:
            body = await server.body_of(request)
            model, messages, params, single = messages_call(body)
            server.check_not_self(model)
            asked = params.get("stop", [])
            if not body.get("stream"):
                return JSONResponse(message_of(await engine.achat(model, messages, **params), single, asked))
            stream = await engine.achat(model, messages, stream=True, **params)
        except UnillmError as exc:
            return server.error(exc, "anthropic")
        return sse(stream, Events(model, single, asked), done=False, named=True, error=error_events)

    async def v1_messages(request: Request) -> Response:
        return await server.admitted(request, lambda: create(request), api="anthropic")

    async def count_tokens(request: Request) -> Response:
        try:
            body = await server.body_of(request)
            req = typed(CountBody, body)
            unknown = set(body) - COUNT_FIELDS
            if unknown:
                raise InvalidRequestError(f"unsupported field(s) {sorted(unknown)}")
            _thinking(body)
            server.check_not_self(req.model)
            tools = _tools(body["tools"]) if body.get("tools") else None
            n = await engine.acount_tokens(req.model, chat_messages(req.system, req.messages), tools=tools)
        except UnillmError as exc:
            return server.error(exc, "anthropic")
        return JSONResponse({"input_tokens": n})

    return [
        Route("/v1/messages", v1_messages, methods=["POST"]),
        Route("/v1/messages/count_tokens", count_tokens, methods=["POST"]),
    ]
