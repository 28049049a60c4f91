"""Request validation and parameter merging: plain functions, no I/O.

Example:
    >>> from unillm.params import validate_messages, merge_params
    >>> validate_messages([{"role": "user", "content": "hi"}])[0].content
    'hi'
    >>> merge_params({"temperature": 0.3}, {"max_tokens": 8}).temperature
    0.3
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import ContextWindowExceededError, InvalidRequestError
from .types import Message

ROLES = ("system", "user", "assistant", "tool")
PARAMS = ("temperature", "top_p", "max_tokens", "stop", "seed")


@dataclass(slots=True)
class SamplingParams:
    """The resolved parameters of one request. ``max_tokens_given`` tells whether the caller set it."""

    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    max_tokens_given: bool = False


def validate_messages(messages: Sequence[Mapping[str, Any] | Message] | str) -> list[Message]:
    """Check roles and contents; a plain string is one user message."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if not isinstance(messages, Sequence) or isinstance(messages, (bytes, bytearray)):
        raise InvalidRequestError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    if not messages:
        raise InvalidRequestError("messages is empty: give at least one message")
    out: list[Message] = []
    for i, m in enumerate(messages):
        if isinstance(m, Message):
            role, content = m.role, m.content
        elif isinstance(m, Mapping):
            unknown = set(m) - {"role", "content", "name"}
            if unknown:
                raise InvalidRequestError(f"messages[{i}] has unknown keys {sorted(unknown)}")
            if "role" not in m or "content" not in m:
                raise InvalidRequestError(f"messages[{i}] needs both 'role' and 'content'")
            role, content = m["role"], m["content"]
        else:
            raise InvalidRequestError(f"messages[{i}] must be a dict, got {type(m).__name__}")
        if role not in ROLES:
            raise InvalidRequestError(f"messages[{i}] has role {role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise InvalidRequestError(f"messages[{i}].content must be a string, got {type(content).__name__}")
        out.append(Message(role, content))
    if out[-1].role == "assistant":
        raise InvalidRequestError("the last message is from the assistant: end with a user (or tool) message")
    return out


def _check_number(name: str, value: Any, lo: float, hi: float, *, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise InvalidRequestError(f"{name} must be a number, got {value!r}")
    if value < lo or value > hi or (lo_open and value == lo):
        bracket = "(" if lo_open else "["
        raise InvalidRequestError(f"{name}={value} is out of range {bracket}{lo}, {hi}]")
    return float(value)


def merge_params(defaults: Mapping[str, Any], call: Mapping[str, Any]) -> SamplingParams:
    """Registry defaults under the call's own parameters, each checked."""
    unknown = set(call) - set(PARAMS) - {"extra"}
    if unknown:
        raise InvalidRequestError(
            f"unknown parameter(s) {sorted(unknown)}; use {', '.join(PARAMS)}, "
            "and pass backend-specific options as extra={...}"
        )
    merged = {k: v for k, v in defaults.items() if v is not None}
    merged.update({k: v for k, v in call.items() if v is not None})
    p = SamplingParams(max_tokens_given="max_tokens" in call and call["max_tokens"] is not None)
    if "temperature" in merged:
        p.temperature = _check_number("temperature", merged["temperature"], 0.0, 2.0)
    if "top_p" in merged:
        p.top_p = _check_number("top_p", merged["top_p"], 0.0, 1.0, lo_open=True)
    if "max_tokens" in merged:
        mt = merged["max_tokens"]
        if isinstance(mt, bool) or not isinstance(mt, int) or mt < 1:
            raise InvalidRequestError(f"max_tokens must be a positive integer, got {mt!r}")
        p.max_tokens = mt
    if "stop" in merged:
        stop = merged["stop"]
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            raise InvalidRequestError(f"stop must be a non-empty string or a list of them, got {merged['stop']!r}")
        p.stop = list(stop)
    if "seed" in merged:
        seed = merged["seed"]
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise InvalidRequestError(f"seed must be an integer, got {seed!r}")
        p.seed = seed
    extra = call.get("extra") or {}
    if not isinstance(extra, Mapping):
        raise InvalidRequestError(f"extra must be a dict of backend options, got {type(extra).__name__}")
    p.extra = dict(extra)
    return p


def fit_max_tokens(model: str, prompt_tokens: int, context_window: int, params: SamplingParams) -> int:
    """The number of tokens this request may generate, or :class:`ContextWindowExceededError`.

    A prompt that does not leave room for one token is refused. An explicit ``max_tokens`` that does not
    fit beside the prompt is refused; a default one is lowered to what fits.
    """
    room = context_window - prompt_tokens
    if room < 1:
        raise ContextWindowExceededError(model, prompt_tokens, context_window)
    if params.max_tokens is None:
        return room
    if params.max_tokens > room:
        if params.max_tokens_given:
            raise ContextWindowExceededError(model, prompt_tokens, context_window, params.max_tokens)
        return room
    return params.max_tokens
