"""Defects found by trying unillm as a hostile user would, each reproduced here before it was fixed."""

from __future__ import annotations

import asyncio
import json

import pytest

from conftest import GREEDY, QUESTION
from unillm import Engine, GenerationError, InvalidRequestError, ModelUnloadedError


@pytest.fixture
def fresh_engine():
    """An engine of its own: these tests unload models and would disturb the shared one."""
    with Engine() as eng:
        eng.load("smollm2")
        yield eng


@pytest.mark.timeout(120)
@pytest.mark.parametrize("extra", [{"top_k": "forty"}, {"min_p": None}, {"repeat_penalty": float("nan")},
                                   {"top_k": 1.5}, {"mirostat_mode": 7}, {"typical_p": [1]}])
def test_a_bad_extra_value_is_refused_and_the_model_keeps_serving(fresh_engine, extra):
    """It used to raise inside the batcher's thread, outside its guarded step: the thread died, and this and
    every later request to the model (and unload) waited forever."""
    key = next(iter(extra))
    with pytest.raises(InvalidRequestError) as e:
        fresh_engine.chat("smollm2", "Say hi", max_tokens=8, extra=extra)
    assert f"extra.{key}" in str(e.value)
    assert "Paris" in fresh_engine.chat("smollm2", QUESTION, max_tokens=32, **GREEDY).text
    assert fresh_engine.unload("smollm2") is True


@pytest.mark.timeout(120)
@pytest.mark.parametrize("model", ["smollm2", "smollm2-single"])
def test_unload_while_requests_run_never_returns_a_cut_answer(model, single_engine):
    """Unloading with 20 requests in flight used to return 16 of them as 1-2 token answers with
    finish_reason "length". A request cut off by unload raises ModelUnloadedError."""
    eng = single_engine if model == "smollm2-single" else Engine()
    try:
        eng.load(model)
        max_tokens = 64

        async def main():
            tasks = [asyncio.ensure_future(eng.achat(model, f"Write a long story about dragon number {i}.",
                                                     max_tokens=max_tokens, **GREEDY)) for i in range(20)]
            await asyncio.sleep(1.0)
            await eng.aunload(model)
            return await asyncio.gather(*tasks, return_exceptions=True)

        results = asyncio.run(main())
        cut = [r for r in results if isinstance(r, ModelUnloadedError)]
        assert cut, "some requests should still have been running"
        for r in results:
            if isinstance(r, BaseException):
                assert isinstance(r, ModelUnloadedError), repr(r)
                assert model in str(r)
            else:
                assert r.finish_reason == "stop" or (r.finish_reason == "length" and r.usage.completion_tokens == max_tokens)
        assert "Paris" in eng.chat(model, QUESTION, max_tokens=32, **GREEDY).text  # loads again
    finally:
        if eng is not single_engine:
            eng.close()


@pytest.mark.timeout(120)
def test_close_during_a_stream_raises_in_the_stream():
    eng = Engine()
    eng.load("smollm2")
    stream = eng.chat("smollm2", "Write a long story about a dragon.", max_tokens=400, stream=True, **GREEDY)
    next(stream)
    import threading

    threading.Thread(target=eng.close).start()
    with pytest.raises((ModelUnloadedError, GenerationError)) as e:
        for c in stream:
            assert c.finish_reason in (None, "stop")
    assert "unloaded" in str(e.value) or "closed" in str(e.value)


def test_batch_job_records_a_cut_request_as_an_error(tmp_path):
    from unillm.jobs import result_record
    from unillm.batch import BatchResult

    rec = result_record("a", "smollm2", BatchResult(0, error=ModelUnloadedError("smollm2")))
    assert rec["error"]["type"] == "ModelUnloadedError" and "answer" not in rec
    json.dumps(rec)
