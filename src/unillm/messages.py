"""Chat messages: their type, and the parsing and checking of the shapes clients send (OpenAI's, with
``tool_calls``, ``tool_call_id`` and text parts; Ollama's, with ``tool_name`` and object arguments).

Example:
    >>> validate_messages([{"role": "user", "content": [{"type": "text", "text": "hi"}]}])[0].content
    'hi'
    >>> from_ollama_messages([{"role": "tool", "tool_name": "add", "content": "3"}])
    [{'role': 'tool', 'content': '3', 'name': 'add'}]
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import InvalidRequestError
from .types import FunctionCall, Message, ToolCall

__all__ = ["ROLES", "Message", "from_ollama_messages", "message_from_dict", "new_call_id", "validate_messages"]

ROLES = ("system", "user", "assistant", "tool")


def new_call_id() -> str:
    """A fresh tool-call id in OpenAI's shape (``call_`` and 24 hex digits)."""
    return f"call_{uuid.uuid4().hex[:24]}"


_MESSAGE_KEYS = {"role", "content", "name", "tool_calls", "tool_call_id", "reasoning_content", "reasoning"}


def _content(i: int, content: Any) -> str | None:
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for k, part in enumerate(content):
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise InvalidRequestError(f"messages[{i}].content[{k}] is a {kind!r} part; unillm's models take text parts only")
            texts.append(part["text"])
        return "".join(texts)
    raise InvalidRequestError(f"messages[{i}].content must be a string, got {type(content).__name__}")


def _tool_calls(i: int, calls: Any) -> list[ToolCall] | None:
    if calls is None:
        return None
    if not isinstance(calls, list):
        raise InvalidRequestError(f"messages[{i}].tool_calls must be a list")
    out = []
    for k, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise InvalidRequestError(f"messages[{i}].tool_calls[{k}] needs function.name")
        args = fn.get("arguments", "{}")
        if not isinstance(args, str):
            args = json.dumps(args, ensure_ascii=False)  # Ollama's clients send an object
        out.append(ToolCall(str(c.get("id") or new_call_id()), FunctionCall(fn["name"], args)))
    return out


def message_from_dict(i: int, m: Mapping[str, Any]) -> Message:
    """One message of a request, in the shapes OpenAI code sends."""
    unknown = set(m) - _MESSAGE_KEYS
    if unknown:
        raise InvalidRequestError(f"messages[{i}] has unknown keys {sorted(unknown)}")
    if "role" not in m or ("content" not in m and not m.get("tool_calls")):
        raise InvalidRequestError(f"messages[{i}] needs both 'role' and 'content'")
    role = "system" if m["role"] == "developer" else m["role"]  # OpenAI's newer name for the system role
    calls = _tool_calls(i, m.get("tool_calls"))
    if calls and role != "assistant":
        raise InvalidRequestError(f"messages[{i}] has tool_calls but role {role!r}; only assistant messages call tools")
    tool_call_id = m.get("tool_call_id")
    if tool_call_id is not None and not isinstance(tool_call_id, str):
        raise InvalidRequestError(f"messages[{i}].tool_call_id must be a string")
    name = m.get("name")
    if name is not None and not isinstance(name, str):
        raise InvalidRequestError(f"messages[{i}].name must be a string")
    reasoning = m.get("reasoning_content", m.get("reasoning"))
    if reasoning is not None and not (isinstance(reasoning, str) and role == "assistant"):
        raise InvalidRequestError(f"messages[{i}].reasoning_content must be a string, on an assistant message")
    return Message(role, _content(i, m.get("content")), name, calls, tool_call_id, reasoning_content=reasoning or None)


def validate_messages(messages: Sequence[Mapping[str, Any] | Message] | str) -> list[Message]:
    """Check roles and contents; a plain string is one user message.

    Messages take the shapes OpenAI code sends back: an assistant message with ``tool_calls`` (and
    ``content: None``), a ``tool`` message with ``tool_call_id``, content as a list of ``{"type": "text"}``
    parts, and ``name``.
    """
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if not isinstance(messages, Sequence) or isinstance(messages, (bytes, bytearray)):
        raise InvalidRequestError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    if not messages:
        raise InvalidRequestError("messages is empty: give at least one message")
    out: list[Message] = []
    for i, m in enumerate(messages):
        if isinstance(m, Message):
            msg = m
        elif isinstance(m, Mapping):
            msg = message_from_dict(i, m)
        else:
            raise InvalidRequestError(f"messages[{i}] must be a dict, got {type(m).__name__}")
        if msg.role not in ROLES:
            raise InvalidRequestError(f"messages[{i}] has role {msg.role!r}; use one of {', '.join(ROLES)}")
        if msg.content is None and not msg.tool_calls:
            raise InvalidRequestError(f"messages[{i}].content must be a string, got None")
        if msg.content is not None:
            try:
                msg.content.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise InvalidRequestError(
                    f"messages[{i}].content is not valid Unicode text (a lone surrogate at position {exc.start})"
                ) from None
        out.append(msg)
    if out[-1].role == "assistant":
        raise InvalidRequestError("the last message is from the assistant: end with a user (or tool) message")
    return out


def from_ollama_messages(messages: Any) -> Any:
    """Ollama's message shape to unillm's: ``tool_name`` names a tool result; ``images`` are refused."""
    if not isinstance(messages, list):
        return messages  # validate_messages says what is wrong
    out = []
    for i, m in enumerate(messages):
        if isinstance(m, dict):
            m = dict(m)
            if m.pop("images", None):
                raise InvalidRequestError(f"messages[{i}].images: unillm's models take text only")
            thought = m.pop("thinking", None)  # an earlier answer's reasoning: its chat template decides what it keeps
            if thought and m.get("role") == "assistant":
                m["reasoning_content"] = thought
            if "tool_name" in m:
                m["name"] = m.pop("tool_name")
        out.append(m)
    return out
