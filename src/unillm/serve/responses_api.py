"""OpenAI's Responses API: ``POST /v1/responses`` (streamed as the Responses events), ``GET`` and ``DELETE
/v1/responses/{id}``. A request becomes a chat call on the engine (the same path as /v1/chat/completions:
structured output, tools, the context check, fallbacks); its answer becomes ``output`` items.

Responses are kept (``store``, true by default as OpenAI's) in this process's memory only, the last
:data:`KEPT` of them, so that ``previous_response_id`` can continue a conversation; a restart forgets them.

Example:
    >>> responses_call({"model": "m", "input": "Hi", "instructions": "Be brief.", "max_output_tokens": 8})[1:]
    ([{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi'}], {'max_tokens': 8})
"""

from __future__ import annotations

import collections
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Optional, Union

from pydantic import BaseModel, ConfigDict, StrictBool, StrictStr
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..errors import InvalidRequestError, UnillmError
from ..families import think_of_effort
from ..types import ChatCompletion, ChatCompletionChunk, Usage
from .guard import error_body
from .wire import sse, text_parts, typed

if TYPE_CHECKING:
    from .app import Server

#: How many responses a server keeps for ``previous_response_id`` and ``GET /v1/responses/{id}``.
KEPT = 1000
#: Fields that are chat parameters under the same name.
SAME = ("temperature", "top_p", "seed")
#: Fields read by :func:`responses_call`, or that do not change the answer (echoed back, or speed only).
OWN = {"model", "input", "instructions", "max_output_tokens", "tools", "tool_choice", "parallel_tool_calls", "text",
       "stream", "store", "previous_response_id", "reasoning", "metadata", "user", "safety_identifier",
       "prompt_cache_key", "service_tier", "truncation", "include", "stream_options", "top_logprobs", "background",
       "max_tool_calls", "prompt_cache_retention", "client_metadata"}
#: ``include`` values: those that ask for nothing this server would leave out (no encrypted reasoning is ever
#: made), and the one that asks for log probabilities.
INCLUDE_NOTHING = {"reasoning.encrypted_content"}
INCLUDE_LOGPROBS = "message.output_text.logprobs"


class ResponsesBody(BaseModel):
    """The top-level types of /v1/responses; the rest is checked by :func:`responses_call` and the engine."""

    model_config = ConfigDict(extra="allow")

    model: StrictStr
    input: Union[StrictStr, list[dict[str, Any]]]
    instructions: Optional[StrictStr] = None
    stream: StrictBool = False
    store: Optional[StrictBool] = None
    previous_response_id: Optional[StrictStr] = None
    parallel_tool_calls: Optional[StrictBool] = None
    text: Optional[dict[str, Any]] = None
    reasoning: Optional[dict[str, Any]] = None
    include: Optional[list[StrictStr]] = None
    metadata: Optional[dict[str, Any]] = None


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(24)}"


def _text_of(where: str, content: Any, kinds: tuple[str, ...]) -> str:
    """The text of an item's ``content``: a string, or parts of the given types (anything else refused by name)."""
    return text_parts(f"{where}.content", content, kinds)


def input_messages(items: Any) -> list[dict[str, Any]]:
    """The chat messages of a Responses ``input``: a string, or message, ``function_call`` and
    ``function_call_output`` items; a ``reasoning`` item is the ``reasoning_content`` of the assistant turn
    after it (its chat template decides what it keeps). An assistant message and the calls after it are one
    assistant message."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    out: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        where = f"input[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise InvalidRequestError(f"{where}.role must be user, system, developer or assistant, got {role!r}")
            parts = ("output_text", "refusal", "input_text") if role == "assistant" else ("input_text", "text", "output_text")
            text = _text_of(where, item.get("content"), parts)
            last = out[-1] if out else None
            if role == "assistant" and last is not None and _reasoning_only(last):
                last["content"] = text
            else:
                out.append({"role": "system" if role == "developer" else role, "content": text})
        elif kind == "function_call":
            if not isinstance(item.get("name"), str) or not isinstance(item.get("call_id"), str):
                raise InvalidRequestError(f"{where}: a function_call item needs name and call_id")
            name = f"{item['namespace']}.{item['name']}" if item.get("namespace") else item["name"]
            call = {"id": item["call_id"], "type": "function", "function": {"name": name, "arguments": item.get("arguments") or "{}"}}
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise InvalidRequestError(f"{where}: a function_call_output item needs call_id")
            output = text_parts(f"{where}.output", item.get("output"), ("input_text", "output_text"))
            out.append({"role": "tool", "tool_call_id": item["call_id"], "content": output})
        elif kind == "reasoning":  # the reasoning of the assistant turn that follows: its template decides
            text = "\n".join(p["text"] for p in item.get("content") or [] if isinstance(p, dict) and isinstance(p.get("text"), str))
            if text:
                out.append({"role": "assistant", "content": None, "reasoning_content": text})
        else:
            raise InvalidRequestError(f"{where} is a {kind!r} item: unillm takes message, function_call, "
                                          "function_call_output and reasoning items")
    return [m for m in out if not _reasoning_only(m)]


def _reasoning_only(m: dict[str, Any]) -> bool:
    """A reasoning item's turn that no message or call has joined yet."""
    return m["role"] == "assistant" and m["content"] is None and not m.get("tool_calls")


def _tools(tools: Any, where: str = "tools", namespace: str | None = None) -> list[dict[str, Any]]:
    """Function tools in the chat shape; a ``namespace`` tool's functions are offered as ``namespace.name``
    (and a call of one comes back with its ``namespace``)."""
    if not isinstance(tools, list):
        raise InvalidRequestError(f"{where} must be a list")
    out = []
    for i, t in enumerate(tools):
        kind = t.get("type") if isinstance(t, dict) else None
        if kind == "namespace" and namespace is None and isinstance(t.get("name"), str):
            out += _tools(t.get("tools"), f"{where}[{i}].tools", t["name"])
            continue
        if kind != "function":
            raise InvalidRequestError(f"{where}[{i}] is of type {kind!r}: unillm runs function tools only "
                                      "(hosted tools such as web_search or file_search are OpenAI's)")
        fn = {k: t[k] for k in ("name", "description", "parameters") if t.get(k) is not None}
        if namespace is not None:
            fn["name"] = f"{namespace}.{fn.get('name')}"
        out.append({"type": "function", "function": fn})
    return out


def split_name(name: str, namespaces: set[str]) -> tuple[str, str | None]:
    """(name, namespace) of a called tool: ``ns.name`` is a function of namespace ``ns``."""
    ns, dot, rest = name.partition(".")
    return (rest, ns) if dot and ns in namespaces else (name, None)


def _tool_choice(choice: Any) -> Any:
    if choice in (None, "auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise InvalidRequestError(f"tool_choice {choice!r}: unillm takes auto, none, required or "
                                  "{'type': 'function', 'name': ...}")


def _text_format(text: dict[str, Any] | None) -> Any:
    text = dict(text or {})
    fmt = text.pop("format", None) or {"type": "text"}
    if text.pop("verbosity", None) not in (None, "medium"):
        raise InvalidRequestError("text.verbosity: unillm's models have no verbosity setting (only medium)")
    if text:
        raise InvalidRequestError(f"text has unsupported field(s) {sorted(text)}")
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        if not isinstance(fmt.get("schema"), dict):
            raise InvalidRequestError("text.format: a json_schema format needs a schema object")
        return {"type": "json_schema", "json_schema": {"name": fmt.get("name") or "response", "schema": fmt["schema"],
                                                         "strict": fmt.get("strict")}}
    raise InvalidRequestError(f"text.format.type must be text, json_object or json_schema, got {kind!r}")


def responses_call(body: dict[str, Any]) -> tuple[str, list[dict[str, Any]], dict[str, Any]]:
    """(model, chat messages, chat parameters) of a /v1/responses body, without ``previous_response_id``'s
    history; a field unillm would not honour is an error naming it."""
    req = typed(ResponsesBody, body)
    unknown = set(body) - OWN - set(SAME)
    if unknown:
        raise InvalidRequestError(f"unsupported field(s) {sorted(unknown)}")
    if body.get("background"):
        raise InvalidRequestError("background: unillm answers while the request is open (stream it instead)")
    if body.get("truncation") not in (None, "disabled"):
        raise InvalidRequestError("truncation: unillm never drops input to fit the context window (only disabled; "
                                      "an input over the window is an error naming both)")
    if body.get("max_tool_calls") is not None:
        raise InvalidRequestError("max_tool_calls limits hosted tools, which unillm does not run")
    # reasoning.effort: none (and minimal) is think=false, a level is that level; a summary (Codex asks for one)
    # is not made: the reasoning item holds the reasoning's own text.
    reasoning = {k: v for k, v in (req.reasoning or {}).items() if v is not None and k not in ("summary", "generate_summary")}
    if set(reasoning) - {"effort"}:
        raise InvalidRequestError(f"reasoning {reasoning}: unillm takes reasoning.effort (and summary) only")
    include = set(req.include or [])
    if include - INCLUDE_NOTHING - {INCLUDE_LOGPROBS}:
        raise InvalidRequestError(f"include {sorted(include - INCLUDE_NOTHING - {INCLUDE_LOGPROBS})}: unillm can "
                                      f"include {INCLUDE_LOGPROBS} only")
    params: dict[str, Any] = {k: body[k] for k in SAME if body.get(k) is not None}
    if body.get("max_output_tokens") is not None:
        params["max_tokens"] = body["max_output_tokens"]
    if "effort" in reasoning:
        params["think"] = think_of_effort(reasoning["effort"])
    if body.get("tools"):
        params["tools"] = _tools(body["tools"])
    if body.get("tool_choice") is not None:
        params["tool_choice"] = _tool_choice(body["tool_choice"])
    fmt = _text_format(req.text)
    if fmt is not None:
        params["response_format"] = fmt
    if INCLUDE_LOGPROBS in include or body.get("top_logprobs") is not None:
        params["logprobs"] = True
        params["top_logprobs"] = body.get("top_logprobs") or 0
    messages = ([{"role": "system", "content": req.instructions}] if req.instructions else []) + input_messages(req.input)
    return req.model, messages, params


class Answer:
    """One response being made: the request fields it echoes, its output items and how it ended."""

    def __init__(self, body: dict[str, Any], model: str) -> None:
        self.id = new_id("resp")
        self.created = int(time.time())
        self.body, self.model = body, model
        self.single_call = body.get("parallel_tool_calls") is False
        self.namespaces = {t["name"] for t in body.get("tools") or [] if isinstance(t, dict) and t.get("type") == "namespace"}
        self.logprobs = INCLUDE_LOGPROBS in (body.get("include") or [])

    def response(self, status: str, output: list[dict[str, Any]], usage: Usage | None = None) -> dict[str, Any]:
        b = self.body
        out: dict[str, Any] = {
            "id": self.id, "object": "response", "created_at": self.created, "status": status, "model": self.model,
            "output": output, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": b.get("instructions"), "max_output_tokens": b.get("max_output_tokens"),
            "parallel_tool_calls": b.get("parallel_tool_calls", True), "previous_response_id": b.get("previous_response_id"),
            "reasoning": {"effort": None, "summary": None}, "store": b.get("store", True),
            "temperature": b.get("temperature"), "top_p": b.get("top_p"), "text": b.get("text") or {"format": {"type": "text"}},
            "tool_choice": b.get("tool_choice", "auto"), "tools": b.get("tools") or [], "truncation": "disabled",
            "metadata": b.get("metadata") or {}, "user": b.get("user"), "usage": None,
        }
        if status != "in_progress":
            out["completed_at"] = int(time.time())
        if usage is not None:
            out["usage"] = {"input_tokens": usage.prompt_tokens, "input_tokens_details": {"cached_tokens": usage.cached_tokens},
                            "output_tokens": usage.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                            "total_tokens": usage.total_tokens}
        return out

    @staticmethod
    def status_of(finish: str | None) -> str:
        return "incomplete" if finish == "length" else "completed"

    def message_item(self, text: str, status: str, logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        part: dict[str, Any] = {"type": "output_text", "text": text, "annotations": []}
        if self.logprobs:
            part["logprobs"] = logprobs or []
        return {"type": "message", "id": new_id("msg"), "status": status, "role": "assistant", "content": [part]}

    @staticmethod
    def reasoning_item(text: str, status: str = "completed") -> dict[str, Any]:
        """The model's reasoning in the clear (``reasoning_text``; no summary is made, nothing is encrypted)."""
        return {"type": "reasoning", "id": new_id("rs"), "status": status, "summary": [],
                "content": [{"type": "reasoning_text", "text": text}]}

    def call_item(self, call_id: str, name: str, arguments: str, status: str = "completed") -> dict[str, Any]:
        name, namespace = split_name(name, self.namespaces)
        item = {"type": "function_call", "id": new_id("fc"), "call_id": call_id, "name": name, "arguments": arguments,
                "status": status}
        return dict(item, namespace=namespace) if namespace else item

    def of(self, r: ChatCompletion) -> dict[str, Any]:
        """The response object of a chat completion."""
        choice = r.choices[0]
        status = self.status_of(choice.finish_reason)
        output = []
        if choice.message.reasoning_content:
            output.append(self.reasoning_item(choice.message.reasoning_content))
        if choice.message.content:
            output.append(self.message_item(choice.message.content, status, (choice.logprobs or {}).get("content")))
        calls = choice.message.tool_calls or []
        for tc in calls[:1] if self.single_call else calls:
            output.append(self.call_item(tc.id, tc.function.name, tc.function.arguments))
        return self.response(status, output, r.usage)


class Events:
    """Chat chunks as the Responses stream: ``response.created`` and ``response.in_progress``, then per output
    item ``output_item.added``, its deltas (``output_text.delta``, ``function_call_arguments.delta``) and its
    ``...done`` events, and ``response.completed`` (or ``response.incomplete``) with usage."""

    def __init__(self, answer: Answer, on_done: Callable[[dict[str, Any]], None]) -> None:
        self.a, self.on_done = answer, on_done
        self.seq = 0
        self.items: list[dict[str, Any]] = []
        self.text_at: int | None = None  # the output index of the message item
        self.reasoning_at: int | None = None  # the output index of the reasoning item
        self.calls: dict[int, int] = {}  # a call's index in the chunks -> its output index
        self.logprobs: list[dict[str, Any]] = []

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        self.seq += 1
        return {"type": kind, "sequence_number": self.seq - 1, **fields}

    def add(self, item: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        self.items.append(item)
        at = len(self.items) - 1
        return at, self.event("response.output_item.added", output_index=at, item=dict(item))

    def __call__(self, chunk: ChatCompletionChunk) -> list[dict[str, Any]]:
        out = []
        if self.seq == 0:
            start = self.a.response("in_progress", [])
            out += [self.event("response.created", response=start), self.event("response.in_progress", response=start)]
        choice = chunk.choices[0]
        if choice.delta.reasoning_content:
            if self.reasoning_at is None:
                self.reasoning_at, added = self.add(self.a.reasoning_item("", "in_progress"))
                out.append(added)
            item = self.items[self.reasoning_at]
            item["content"][0]["text"] += choice.delta.reasoning_content
            out.append(self.event("response.reasoning_text.delta", item_id=item["id"], output_index=self.reasoning_at,
                                  content_index=0, delta=choice.delta.reasoning_content))
        text = choice.delta.content
        lp = (choice.logprobs or {}).get("content") or []
        if text or lp:
            if self.text_at is None:
                at, added = self.add(dict(self.a.message_item("", "in_progress"), content=[]))
                part = {"type": "output_text", "text": "", "annotations": []}
                out += [added, self.event("response.content_part.added", item_id=self.items[at]["id"], output_index=at,
                                          content_index=0, part=part)]
                self.items[at]["content"] = [part]
                self.text_at = at
            part = self.items[self.text_at]["content"][0]
            part["text"] += text or ""
            self.logprobs += lp
            out.append(self.event("response.output_text.delta", item_id=self.items[self.text_at]["id"],
                                  output_index=self.text_at, content_index=0, delta=text or "", logprobs=lp if self.a.logprobs else []))
        for d in choice.delta.tool_calls or []:
            i = d["index"]
            if self.a.single_call and i > 0:
                continue
            if i not in self.calls:
                at, added = self.add(self.a.call_item(d["id"], d["function"]["name"], "", "in_progress"))
                self.calls[i] = at
                out.append(added)
            args = d["function"].get("arguments") or ""
            if args:
                item = self.items[self.calls[i]]
                item["arguments"] += args
                out.append(self.event("response.function_call_arguments.delta", item_id=item["id"], output_index=self.calls[i], delta=args))
        if choice.finish_reason is not None:
            out += self.end(chunk)
        return out

    def end(self, chunk: ChatCompletionChunk) -> list[dict[str, Any]]:
        status = self.a.status_of(chunk.finish_reason)
        out = []
        for at, item in enumerate(self.items):
            item["status"] = status if item["type"] == "message" else "completed"
            if item["type"] == "reasoning":
                out.append(self.event("response.reasoning_text.done", item_id=item["id"], output_index=at, content_index=0,
                                      text=item["content"][0]["text"]))
            elif item["type"] == "message":
                part = item["content"][0]
                if self.a.logprobs:
                    part["logprobs"] = self.logprobs
                out += [self.event("response.output_text.done", item_id=item["id"], output_index=at, content_index=0,
                                   text=part["text"], logprobs=part.get("logprobs", [])),
                        self.event("response.content_part.done", item_id=item["id"], output_index=at, content_index=0, part=part)]
            else:
                out.append(self.event("response.function_call_arguments.done", item_id=item["id"], output_index=at,
                                      name=item["name"], arguments=item["arguments"]))
            out.append(self.event("response.output_item.done", output_index=at, item=item))
        final = self.a.response(status, self.items, chunk.usage)
        self.on_done(final)
        out.append(self.event(f"response.{status}", response=final))
        return out

    def failed(self, exc: UnillmError) -> list[dict[str, Any]]:
        """An error after the stream began: OpenAI's ``error`` event, then ``response.failed``."""
        message = str(exc)
        final = dict(self.a.response("failed", self.items), error={"code": "server_error", "message": message})
        return [self.event("error", code=type(exc).__name__, message=message, param=None),
                self.event("response.failed", response=final)]


def output_messages(output: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chat messages that a response's output items are, for the next turn."""
    return input_messages([item for item in output if item["type"] in ("reasoning", "message", "function_call")])


def routes(server: Server) -> list[Route]:
    """The Responses API's routes over ``server``."""
    engine = server.engine
    kept: collections.OrderedDict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = collections.OrderedDict()

    def keep(body: dict[str, Any], history: list[dict[str, Any]], response: dict[str, Any]) -> None:
        if body.get("store") is False or response["status"] == "failed":
            return
        kept[response["id"]] = (response, history + output_messages(response["output"]))
        while len(kept) > KEPT:
            kept.popitem(last=False)

    def history_of(previous: str | None) -> list[dict[str, Any]]:
        if previous is None:
            return []
        if previous not in kept:
            raise InvalidRequestError(f"previous_response_id {previous!r} is not a response this server keeps (it keeps the "
                                      f"last {KEPT} stored ones in memory, until it restarts)")
        kept.move_to_end(previous)
        return list(kept[previous][1])

    async def create(request: Request) -> Response:
        try:
            body = await server.body_of(request)
            model, messages, params = responses_call(body)
            server.check_not_self(model)
            history = history_of(body.get("previous_response_id"))
            system, turn = (messages[:1], messages[1:]) if body.get("instructions") else ([], messages)
            answer = Answer(body, model)
            if not body.get("stream"):
                r = answer.of(await engine.achat(model, system + history + turn, **params))
                keep(body, history + turn, r)
                return JSONResponse(r)
            stream = await engine.achat(model, system + history + turn, stream=True, **params)
        except UnillmError as exc:
            return server.error(exc, "openai")
        events = Events(answer, lambda r: keep(body, history + turn, r))
        return sse(stream, events, done=False, named=True, error=events.failed)

    async def v1_responses(request: Request) -> Response:
        return await server.admitted(request, lambda: create(request), api="openai")

    async def kept_response(request: Request) -> Response:
        rid = request.path_params["id"]
        if rid not in kept:
            msg = f"no response {rid!r} is kept by this server (it keeps the last {KEPT} stored ones, until it restarts)"
            return JSONResponse(error_body(msg, 404, "openai"), status_code=404)
        if request.method == "DELETE":
            del kept[rid]
            return JSONResponse({"id": rid, "object": "response.deleted", "deleted": True})
        return JSONResponse(kept[rid][0])

    return [
        Route("/v1/responses", v1_responses, methods=["POST"]),
        Route("/v1/responses/{id}", kept_response, methods=["GET", "DELETE"]),
    ]
