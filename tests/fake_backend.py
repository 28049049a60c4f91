"""A scripted backend for testing the engine's own state machine in milliseconds: fallbacks, unload during
requests, dead-backend eviction, loop lag, error mapping. It sits beside the real-model tests, never
instead of them.

It answers with the words of the last user message, one piece every ``options.delay`` seconds. Messages that
are commands: ``raise`` (a library error), ``invalid`` (a library validation error, mapped to
InvalidRequestError), ``die`` (the backend's engine dies). Options: ``delay``, ``fail_load`` (load raises),
``load_seconds`` (load blocks a worker thread that long).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from collections.abc import AsyncGenerator
from typing import Any

from unillm.backends import BACKENDS, BackendInfo
from unillm.backends.base import Backend, Capabilities, Generation, Piece, Request
from unillm.errors import InvalidRequestError, UnillmError
from unillm.types import Usage

LOADS: list[str] = []


class LibValidationError(Exception):
    """What a backend library raises for a bad request."""


class FakeBackend(Backend):
    name = "fake"
    capabilities = Capabilities(streaming=True)

    def __init__(self, spec: Any) -> None:
        super().__init__(spec)
        self.delay = float(spec.options.get("delay", 0.005))
        self.closed = False
        self._dead: str | None = None

    async def load(self) -> None:
        if self.spec.options.get("fail_load"):
            raise RuntimeError("no such weights")
        await asyncio.to_thread(time.sleep, float(self.spec.options.get("load_seconds", 0)))
        LOADS.append(self.spec.name)

    def dead(self) -> str | None:
        return self._dead

    def map_exception(self, exc: Exception) -> UnillmError | None:
        if isinstance(exc, LibValidationError):
            return InvalidRequestError(f"the fake library refused it: {exc}")
        return None

    async def stream(self, request: Request) -> AsyncGenerator[Piece, None]:
        text = request.messages[-1].content or ""
        if text == "raise":
            raise RuntimeError("the library broke")
        if text == "invalid":
            raise LibValidationError("temperature out of range")
        if text == "die":
            self._dead = "the fake engine process died"
            raise RuntimeError("engine core gone")
        words = text.split()
        limit = request.params.max_tokens or len(words)
        started = time.perf_counter()
        for n, word in enumerate(words[:limit], 1):
            await asyncio.sleep(self.delay)
            if self.closed:
                yield Piece("", "cancelled", Usage(len(words), n - 1), None, None)
                return
            if n == min(limit, len(words)):
                finish = "stop" if n == len(words) else "length"
                yield Piece(word, finish, Usage(len(words), n), time.perf_counter() - started, None)
                return
            yield Piece(word + " ")

    async def generate(self, request: Request) -> Generation:
        parts = []
        async for piece in self.stream(request):
            parts.append(piece.text)
            if piece.finish_reason is not None:
                assert piece.usage is not None
                return Generation("".join(parts), piece.finish_reason, piece.usage, piece.ttft_s, None)
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        self.closed = True
        if marker := self.spec.options.get("closed_marker"):
            Path(marker).write_text(self.spec.name)


class TalkerBackend(FakeBackend):
    """Says the last user message's text verbatim, streamed in the pieces that ``\\x1f`` separates in it: a
    model's answer in its family's own format (registry ``chat_format``), read back by the engine."""

    name = "talker"
    capabilities = Capabilities(streaming=True, json_schema=True, tools=True)

    async def stream(self, request: Request) -> AsyncGenerator[Piece, None]:
        pieces = (request.messages[-1].content or "").split("\x1f")
        for piece in pieces[:-1]:
            yield Piece(piece)
        yield Piece(pieces[-1], "stop", Usage(1, len(pieces)), 0.0, None)


def register() -> None:
    """Register the fake backend as a third-party backend would be (by name, imported when first used)."""
    BACKENDS["fake"] = BackendInfo("fake", "fake_backend:FakeBackend", "fake_backend", "unillm", "test")
    BACKENDS["talker"] = BackendInfo("talker", "fake_backend:TalkerBackend", "fake_backend", "unillm", "test")

    BACKENDS["slow"] = BackendInfo("slow", "fake_slow_import:SlowBackend", "fake_slow_import", "unillm", "test")
