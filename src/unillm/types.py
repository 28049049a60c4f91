"""Typed results in the OpenAI chat-completion shape, plus the timings the model guide talks about.

Code written against an OpenAI-style gateway reads ``r.choices[0].message.content``,
``r.choices[0].finish_reason`` and ``r.usage`` unchanged; ``r.text`` is a shortcut and ``r.timings``
adds time to first token, decode tokens/s and load time.

Example:
    >>> from unillm.types import ChatCompletion, Choice, Message, Usage
    >>> r = ChatCompletion(id="x", model="m", backend="llamacpp",
    ...                    choices=[Choice(0, Message("assistant", "Paris"), "stop")],
    ...                    usage=Usage(10, 1))
    >>> r.text, r.usage.total_tokens
    ('Paris', 11)
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import UnillmError

Role = Literal["system", "user", "assistant", "tool"]
FinishReason = Literal["stop", "length", "tool_calls", "cancelled"]


@dataclass(slots=True)
class FunctionCall:
    """The function a tool call names, and its arguments as a JSON string (OpenAI's shape)."""

    name: str
    arguments: str


@dataclass(slots=True)
class ToolCall:
    """One call of a tool that the model made."""

    id: str
    function: FunctionCall
    type: str = "function"

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "type": self.type, "function": {"name": self.function.name, "arguments": self.function.arguments}}


@dataclass(slots=True)
class Message:
    """One chat message.

    ``content`` is None for an assistant message that only calls tools (``tool_calls``). ``parsed`` holds
    the answer read as JSON when the call asked for ``response_format``: an instance of the pydantic class
    it gave, or the decoded JSON value for a plain schema.
    """

    role: str
    content: str | None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    parsed: Any = None
    #: A reasoning model's reasoning before its answer (the ``<think>`` block), kept out of ``content``.
    reasoning_content: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The OpenAI message shape (what a client sends back in the next turn), with the reasoning as
        ``reasoning_content`` (DeepSeek's and llama.cpp's name) and ``reasoning`` (vLLM's and OpenRouter's)."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.reasoning_content is not None:
            out["reasoning_content"] = out["reasoning"] = self.reasoning_content
        if self.name is not None:
            out["name"] = self.name
        if self.tool_calls:
            out["tool_calls"] = [t.to_dict() for t in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


@dataclass(slots=True)
class Usage:
    """Token counts of one request."""

    prompt_tokens: int
    completion_tokens: int
    #: Prompt tokens not evaluated again: their cache was kept from an earlier request with the same
    #: beginning (llama.cpp's batched models, vLLM's prefix cache). OpenAI's ``prompt_tokens_details``.
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


@dataclass(slots=True)
class Timings:
    """Where the time of one request went, in seconds.

    ``load_s`` is the time this request spent loading the model (0.0 when it was already loaded);
    ``ttft_s`` runs from the request to its first generated token; ``decode_tokens_per_s`` counts the
    tokens after the first over the time after the first.
    """

    load_s: float = 0.0
    ttft_s: float | None = None
    total_s: float = 0.0
    decode_tokens_per_s: float | None = None

    def to_dict(self) -> dict[str, float | None]:
        return dataclasses.asdict(self)


@dataclass(slots=True)
class Choice:
    """One answer of a chat completion."""

    index: int
    message: Message
    finish_reason: str | None
    #: With ``logprobs``: ``{"content": [{"token", "logprob", "bytes", "top_logprobs"}, ...]}``.
    logprobs: dict[str, Any] | None = None
    #: The stop string (``stop``) that ended the answer; None when the end token or the limit did, or on the
    #: Ollama backend, whose daemon does not say.
    stop_sequence: str | None = None


@dataclass(slots=True)
class ChatCompletion:
    """The answer to ``Engine.chat`` (OpenAI ``chat.completion`` shape)."""

    id: str
    model: str
    backend: str
    choices: list[Choice]
    usage: Usage
    timings: Timings = field(default_factory=Timings)
    created: int = field(default_factory=lambda: int(time.time()))
    object: str = "chat.completion"
    #: Set when a fallback served the request: the model that was asked for, and why it did not.
    requested_model: str | None = None
    fallback_reason: str | None = None

    @property
    def text(self) -> str:
        """The first choice's content ("" when the model only called tools)."""
        return self.choices[0].message.content or ""

    @property
    def finish_reason(self) -> str | None:
        return self.choices[0].finish_reason

    def to_dict(self) -> dict[str, Any]:
        """The OpenAI JSON shape (with ``unillm`` extensions under their own keys)."""
        return {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": c.index,
                    "message": c.message.to_dict(),
                    "finish_reason": c.finish_reason,
                    **({"logprobs": c.logprobs} if c.logprobs is not None else {}),
                }
                for c in self.choices
            ],
            "usage": self.usage.to_dict(),
            "unillm": {
                "backend": self.backend,
                "timings": self.timings.to_dict(),
                "requested_model": self.requested_model,
                "fallback_reason": self.fallback_reason,
            },
        }


@dataclass(slots=True)
class Delta:
    """The part of a message that one stream chunk adds."""

    role: str | None = None
    content: str | None = ""
    #: Tool calls in OpenAI's delta shape: ``[{"index", "id", "type", "function": {"name", "arguments"}}]``.
    tool_calls: list[dict[str, Any]] | None = None
    #: Reasoning text this chunk adds (see :attr:`Message.reasoning_content`).
    reasoning_content: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.role is not None:
            out["role"] = self.role
        if self.reasoning_content:
            out["reasoning_content"] = out["reasoning"] = self.reasoning_content
        if self.content is not None or not (self.tool_calls or self.reasoning_content):
            out["content"] = self.content
        if self.tool_calls:
            out["tool_calls"] = self.tool_calls
        return out


@dataclass(slots=True)
class ChunkChoice:
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: dict[str, Any] | None = None
    #: On the last chunk: the stop string that ended the answer (see :attr:`Choice.stop_sequence`).
    stop_sequence: str | None = None


@dataclass(slots=True)
class ChatCompletionChunk:
    """One piece of a streamed answer (OpenAI ``chat.completion.chunk`` shape).

    The last chunk of a stream has ``finish_reason`` set and carries ``usage`` and ``timings``.
    """

    id: str
    model: str
    backend: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    timings: Timings | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    object: str = "chat.completion.chunk"
    requested_model: str | None = None
    fallback_reason: str | None = None

    @property
    def text(self) -> str:
        """The content this chunk adds."""
        return self.choices[0].delta.content or ""

    @property
    def finish_reason(self) -> str | None:
        return self.choices[0].finish_reason

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": c.index,
                    "delta": c.delta.to_dict(),
                    "finish_reason": c.finish_reason,
                    **({"logprobs": c.logprobs} if c.logprobs is not None else {}),
                }
                for c in self.choices
            ],
        }
        if self.usage is not None:
            out["usage"] = self.usage.to_dict()
        return out


@dataclass(slots=True)
class CompletionChoice:
    """One continuation of a completion (or, in a stream, the text one chunk adds)."""

    index: int
    text: str
    finish_reason: str | None = None
    #: With ``logprobs``: OpenAI's completion shape, ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``.
    logprobs: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "text": self.text, "logprobs": self.logprobs, "finish_reason": self.finish_reason}


@dataclass(slots=True)
class Completion:
    """The answer to ``Engine.complete`` (OpenAI ``text_completion`` shape): ``choices[i].text``,
    ``finish_reason``, ``usage``; ``r.text`` is the first choice's text. In a stream each chunk is a Completion
    too, whose last one has ``finish_reason``, ``usage`` and ``timings``."""

    id: str
    model: str
    backend: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    timings: Timings | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    object: str = "text_completion"
    requested_model: str | None = None
    fallback_reason: str | None = None

    @property
    def text(self) -> str:
        return self.choices[0].text if self.choices else ""

    @property
    def finish_reason(self) -> str | None:
        return self.choices[0].finish_reason if self.choices else None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                               "choices": [c.to_dict() for c in self.choices]}
        if self.usage is not None:
            out["usage"] = self.usage.to_dict()
        out["unillm"] = {"backend": self.backend, "timings": self.timings.to_dict() if self.timings else None,
                         "requested_model": self.requested_model, "fallback_reason": self.fallback_reason}
        return out


@dataclass(slots=True)
class Embedding:
    """One input's vector."""

    index: int
    embedding: list[float]
    object: str = "embedding"


@dataclass(slots=True)
class EmbeddingResponse:
    """The answer to ``Engine.embed`` (OpenAI ``list`` of ``embedding`` shape): one vector per input, in order."""

    model: str
    backend: str
    data: list[Embedding]
    usage: Usage
    object: str = "list"

    @property
    def vectors(self) -> list[list[float]]:
        return [d.embedding for d in self.data]

    def to_dict(self) -> dict[str, Any]:
        return {
            "object": self.object, "model": self.model,
            "data": [{"object": d.object, "index": d.index, "embedding": d.embedding} for d in self.data],
            "usage": {"prompt_tokens": self.usage.prompt_tokens, "total_tokens": self.usage.prompt_tokens},
        }


@dataclass(slots=True)
class BatchResult:
    """The outcome of one item of a batch: a response, or the error that item alone met.

    Example:
        >>> r = BatchResult(0, error=None, response=None)
        >>> r.ok, r.text
        (True, None)
    """

    index: int
    response: ChatCompletion | Completion | EmbeddingResponse | None = None
    error: UnillmError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def text(self) -> str | None:
        return self.response.text if isinstance(self.response, (ChatCompletion, Completion)) else None
