"""Many prompts through one model: results in input order, one failure isolated, a progress bar.

Example:
    >>> from unillm import Engine
    >>> with Engine() as engine:                                      # doctest: +SKIP
    ...     results = engine.batch("smollm2", ["Summarise: ...", "Summarise: ..."], max_tokens=64)
    ...     [r.text for r in results if r.ok]
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import UnillmError
from .types import ChatCompletion, EmbeddingResponse

if TYPE_CHECKING:
    from .engine import Messages, _Core


@dataclass(slots=True)
class BatchResult:
    """The outcome of one item: a response, or the error that item alone met."""

    index: int
    response: ChatCompletion | EmbeddingResponse | None = None
    error: UnillmError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def text(self) -> str | None:
        return self.response.text if isinstance(self.response, ChatCompletion) else None


@dataclass
class BatchStats:
    done: int = 0
    failed: int = 0
    completion_tokens: int = 0
    started: float = 0.0

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.elapsed if self.elapsed > 0 else 0.0


async def run_batch(
    core: _Core,
    model: str,
    items: Sequence[Messages],
    params: dict[str, Any],
    *,
    progress: bool = True,
    concurrency: int | None = None,
    on_result: Callable[[BatchResult], None] | None = None,
) -> list[BatchResult]:
    """Run on the engine's loop. Loads the model first: a model that cannot load fails the whole batch."""
    from tqdm.auto import tqdm

    _, backend, _, _ = await core.serving(model)
    limit = concurrency or backend.max_concurrency() or len(items) or 1
    gate = asyncio.Semaphore(limit)
    stats = BatchStats()
    stats.started = time.perf_counter()
    bar = tqdm(total=len(items), desc=model, unit="doc", disable=not progress, dynamic_ncols=True)
    # on_result (a job appends and fsyncs each record) runs on one thread of its own, in completion order:
    # never on the loop that all models share.
    callbacks = ThreadPoolExecutor(1, thread_name_prefix="unillm-on-result") if on_result is not None else None
    loop = asyncio.get_running_loop()

    async def one(i: int, item: Messages) -> BatchResult:
        async with gate:
            try:
                res = BatchResult(i, response=await core.chat(model, item, params))
            except UnillmError as exc:
                res = BatchResult(i, error=exc)
        if res.response is not None:
            stats.done += 1
            stats.completion_tokens += res.response.usage.completion_tokens
        else:
            stats.failed += 1
        bar.update(1)
        bar.set_postfix_str(f"{stats.tokens_per_s:.1f} tok/s, {stats.failed} failed", refresh=False)
        if on_result is not None:
            await loop.run_in_executor(callbacks, on_result, res)
        return res

    tasks = [asyncio.ensure_future(one(i, item)) for i, item in enumerate(items)]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:  # on_result failed (a job cannot keep its output) or the caller gave up: stop them all
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    finally:
        bar.close()
        if callbacks is not None:
            callbacks.shutdown(wait=False)
