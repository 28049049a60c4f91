"""The event loop unillm owns, running in a daemon thread.

The sync API submits coroutines here with ``asyncio.run_coroutine_threadsafe``, so it works from plain
scripts, from many threads, and inside a caller's running loop (Jupyter) without ever touching it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine, Iterator
from typing import Any, TypeVar

from .errors import EngineClosedError

T = TypeVar("T")


class LoopThread:
    """One event loop in one background thread; ``stop()`` is idempotent."""

    def __init__(self, name: str = "unillm-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self._ready.wait()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        try:
            self.loop.run_forever()
        finally:
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self.loop.is_closed()

    def in_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        if not self.running or self._stopping:
            coro.close()
            raise EngineClosedError("the Engine was closed (its loop has stopped)")
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the owned loop and block this thread for its result."""
        if self.in_loop_thread():
            coro.close()
            raise RuntimeError("a blocking unillm call was made from the engine's own loop; use the a* methods")
        fut = self.submit(coro)
        try:
            return fut.result()
        except BaseException:
            fut.cancel()
            raise

    async def run_async(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await a coroutine that runs on the owned loop, from any other loop."""
        if self.in_loop_thread():
            return await coro
        return await asyncio.wrap_future(self.submit(coro))

    def iterate(self, agen: AsyncGenerator[T, None]) -> Iterator[T]:
        """Drive an async iterator living on the owned loop from a blocking caller."""
        try:
            while True:
                try:
                    yield self.run(agen.__anext__())  # type: ignore[arg-type]
                except StopAsyncIteration:
                    return
        finally:
            if self.running:
                self.run(_aclose(agen))

    async def aiterate(self, agen: AsyncGenerator[T, None]) -> AsyncIterator[T]:
        """Drive an async iterator living on the owned loop from another loop."""
        try:
            while True:
                try:
                    yield await self.run_async(agen.__anext__())  # type: ignore[arg-type]
                except StopAsyncIteration:
                    return
        finally:
            if self.running:
                await self.run_async(_aclose(agen))

    def stop(self) -> None:
        self._stopping = True
        if self.loop.is_closed():
            return
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            if not self.in_loop_thread():
                self._thread.join()


async def _aclose(agen: AsyncGenerator[Any, None]) -> None:
    """Close an async generator whose last step may still be running: a caller interrupted (Ctrl-C) while it
    waited for a step cancels that step, which ends on the loop a moment later; closing before then raised
    "aclose(): asynchronous generator is already running"."""
    for _ in range(500):  # 5 s at most; a cancelled step ends at its next await
        try:
            await agen.aclose()
            return
        except RuntimeError as exc:
            if "already running" not in str(exc):
                raise
            await asyncio.sleep(0.01)
    await agen.aclose()
