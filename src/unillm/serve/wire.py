"""What every wire API of ``unillm serve`` shares: typed request bodies, HTTP status by error, time fields and
streamed JSON lines.

Example:
    >>> from unillm.errors import UnknownModelError
    >>> status(UnknownModelError("nope", []))
    404
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterable
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.responses import StreamingResponse

from ..errors import (
    BackendNotInstalledError,
    BackendUnavailableError,
    InvalidRequestError,
    ModelLoadError,
    UnillmError,
    UnknownModelError,
    UnsupportedFeatureError,
)


class BodyTimeout(InvalidRequestError):
    """The client did not send its whole body in time (HTTP 408)."""


def status(exc: UnillmError) -> int:
    """The HTTP status of an error."""
    if isinstance(exc, BodyTimeout):
        return 408
    if isinstance(exc, UnknownModelError):
        return 404
    if isinstance(exc, (InvalidRequestError, UnsupportedFeatureError)):
        return 400
    if isinstance(exc, (BackendUnavailableError, BackendNotInstalledError, ModelLoadError)):
        return 503
    return 500


def typed(model: type[BaseModel], data: dict[str, Any]) -> Any:
    """A request body as its typed model; the first problem is an InvalidRequestError naming the field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "body"
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        raise InvalidRequestError(f"{field}: {msg}") from None


def text_parts(where: str, content: Any, kinds: tuple[str, ...], sep: str = "") -> str:
    """The text of a string, or of a list of parts whose ``type`` is one of ``kinds`` (joined with ``sep``);
    any other part is an error naming it and where it is."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequestError(f"{where} must be a string or a list of {' or '.join(kinds)} parts")
    texts = []
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind not in kinds or not isinstance(part.get("text"), str):
            raise InvalidRequestError(f"{where}[{k}] is a {kind!r} part: unillm's models read text only ({', '.join(kinds)})")
        texts.append(part["text"])
    return sep.join(texts)


def now() -> str:
    """The current UTC time as Ollama writes it (``2026-01-01T12:00:00.000000Z``)."""
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def ns(seconds: float | None) -> int:
    """Seconds as integer nanoseconds (Ollama's durations)."""
    return int((seconds or 0.0) * 1e9)


def ndjson(gen: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    """A stream of JSON objects, one per line."""

    async def lines() -> AsyncIterator[bytes]:
        async for obj in gen:
            yield (json.dumps(obj) + "\n").encode()

    return StreamingResponse(lines(), media_type="application/x-ndjson")


async def one(obj: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """A stream of one object."""
    yield obj


def sse(stream: Any, events: Callable[[Any], Iterable[dict[str, Any]]], done: bool = True, *, named: bool = False,
        error: Callable[[UnillmError], Iterable[dict[str, Any]]] | None = None) -> StreamingResponse:
    """A stream of the engine's chunks as server-sent events: each chunk's JSON objects (``events``), then
    OpenAI's ``[DONE]`` when ``done``; with ``named``, each object's ``type`` is also its event name (the
    ``event:`` line that the Responses and Anthropic APIs send). An error midway is an error event (``error``
    makes its objects; OpenAI's shape by default), and the engine's stream is closed however the response ends
    (a client that goes away stops its generation)."""

    def line(obj: dict[str, Any]) -> bytes:
        head = f"event: {obj['type']}\n" if named else ""
        return f"{head}data: {json.dumps(obj)}\n\n".encode()

    async def lines() -> AsyncIterator[bytes]:
        try:
            async for chunk in stream:
                for obj in events(chunk):
                    yield line(obj)
            if done:
                yield b"data: [DONE]\n\n"
        except UnillmError as exc:
            for obj in error(exc) if error is not None else [{"error": {"message": str(exc), "type": type(exc).__name__}}]:
                yield line(obj)
        finally:
            await stream.aclose()

    return StreamingResponse(lines(), media_type="text/event-stream")
