"""The engine's state machine on the scripted fake backend (tests/fake_backend.py): milliseconds each."""

from __future__ import annotations

import asyncio

import pytest

import fake_backend
from conftest import chunk_gaps
from unillm import Engine, GenerationError, InvalidRequestError, ModelLoadError, ModelUnloadedError

fake_backend.register()

REGISTRY = """models:
  - {name: echo, backend: fake, source: {path: /nowhere}, context_window: 512, options: {delay: 0.002}}
  - {name: slow-echo, backend: fake, source: {path: /nowhere}, context_window: 512, options: {delay: 0.05}}
  - {name: broken, backend: fake, source: {path: /nowhere}, context_window: 512, options: {fail_load: true},
     fallbacks: [echo]}
  - {name: heavy, backend: slow, source: {path: /nowhere}, context_window: 512, options: {load_seconds: 1.5}}
"""

WORDS = " ".join(f"w{i}" for i in range(40))


@pytest.fixture
def eng(write_config):
    with Engine(write_config(REGISTRY), builtin=False) as e:
        yield e


@pytest.mark.unit
def test_echo_and_stream(eng):
    assert eng.chat("echo", "a b c").text == "a b c"
    assert "".join(c.text for c in eng.chat("echo", "a b c", stream=True)) == "a b c"
    r = eng.chat("echo", "a b c d", max_tokens=2)
    assert r.text == "a b" and r.finish_reason == "length"


@pytest.mark.unit
def test_fallback_when_the_model_cannot_load(write_config):
    with Engine(write_config(REGISTRY), builtin=False, fallbacks=True) as e:
        r = e.chat("broken", "x y")
        assert r.model == "echo" and r.requested_model == "broken" and "no such weights" in r.fallback_reason
    with Engine(write_config(REGISTRY), builtin=False) as e:
        with pytest.raises(ModelLoadError) as err:
            e.chat("broken", "x y")
        assert "fallbacks=True" in str(err.value)


def test_unload_during_requests_raises_for_every_running_one(eng):
    async def main():
        tasks = [asyncio.ensure_future(eng.achat("slow-echo", WORDS)) for _ in range(10)]
        stream = await eng.achat("slow-echo", WORDS, stream=True)
        first = await stream.__anext__()
        await asyncio.sleep(0.2)
        await eng.aunload("slow-echo")
        with pytest.raises(ModelUnloadedError):
            async for _ in stream:
                pass
        return first, await asyncio.gather(*tasks, return_exceptions=True)

    first, results = asyncio.run(main())
    assert first.text
    assert all(isinstance(r, ModelUnloadedError) for r in results), results
    assert eng.stats()["requests"].get("length", 0) == 0 and eng.stats()["requests"].get("stop", 0) == 0
    assert eng.chat("slow-echo", "again").text == "again"


@pytest.mark.unit
def test_a_dead_backend_is_unloaded_and_loads_again(eng):
    fake_backend.LOADS.clear()
    assert eng.chat("echo", "one").text == "one"
    with pytest.raises(GenerationError) as e:
        eng.chat("echo", "die")
    assert "died" in str(e.value) and "loads again on the next call" in str(e.value)
    assert "echo" not in eng.loaded()
    assert eng.chat("echo", "two").text == "two"
    assert fake_backend.LOADS == ["echo", "echo"]


@pytest.mark.unit
def test_library_errors_go_through_the_backends_table(eng):
    with pytest.raises(InvalidRequestError) as e:
        eng.chat("echo", "invalid")
    assert "temperature out of range" in str(e.value)
    with pytest.raises(GenerationError) as e:
        eng.chat("echo", "raise")
    assert "RuntimeError: the library broke" in str(e.value)
    assert eng.chat("echo", "fine").text == "fine" and "echo" in eng.loaded()


def test_a_stream_keeps_flowing_while_another_model_imports_and_loads(eng):
    """Backend imports and loads run off the shared loop: a stream's largest gap between chunks stays small
    while a model with a 2-second import and a 1.5-second blocking load comes up in the same engine."""
    gaps = []

    async def main():
        stream = await eng.achat("slow-echo", " ".join(f"w{i}" for i in range(80)), stream=True)
        load = asyncio.ensure_future(eng.aload("heavy"))
        await chunk_gaps(stream, gaps)
        await load

    asyncio.run(main())
    print(f"largest gap between chunks while 'heavy' imported and loaded: {max(gaps) * 1000:.0f} ms")
    assert "heavy" in eng.loaded()
    assert max(gaps) < 0.5


@pytest.mark.unit
def test_a_request_beyond_the_backends_capabilities_is_refused_by_name(eng):
    """The fake backend declares streaming only: tools, a JSON answer and embeddings are refused before it
    sees them, each by name, and the engine still serves the next request."""
    from unillm import UnsupportedFeatureError

    tool = {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}
    with pytest.raises(UnsupportedFeatureError, match="tools"):
        eng.chat("echo", "a", tools=[tool])
    with pytest.raises(UnsupportedFeatureError, match="response_format"):
        eng.chat("echo", "a", response_format={"type": "json_object"})
    with pytest.raises(UnsupportedFeatureError, match="embeddings"):
        eng.embed("echo", "a")
    assert eng.chat("echo", "a b").text == "a b"
