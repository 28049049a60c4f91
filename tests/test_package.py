"""Package hygiene: light import, explicit sorted public API, docstrings, CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import QUESTION, ROOT, run_py

SYSTEM = QUESTION[0]["content"]

HEAVY = ("torch", "vllm", "llama_cpp", "transformers", "ollama")


@pytest.mark.unit
def test_import_unillm_imports_no_heavy_library():
    out = run_py("import sys, unillm; print(' '.join(m for m in %r if m in sys.modules))" % (HEAVY,))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


@pytest.mark.unit
def test_public_api_is_sorted_and_documented():
    import unillm

    assert unillm.__all__ == sorted(unillm.__all__)
    for name in unillm.__all__:
        obj = getattr(unillm, name)
        if name != "__version__":
            assert obj.__doc__, f"{name} has no docstring"


@pytest.mark.unit
def test_py_typed_ships():
    import importlib.resources

    assert importlib.resources.files("unillm").joinpath("py.typed").is_file()


def unillm_cli(*args, input=None):
    return subprocess.run([sys.executable, "-m", "unillm", *args], capture_output=True, text=True, input=input, timeout=300)


def test_cli_chat_streams_the_answer():
    out = unillm_cli("chat", "smollm2", "What is the capital of France?", "-s", SYSTEM, "-t", "0", "--seed", "0", "-n", "32", "--stats")
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
    assert "TTFT" in out.stderr and "tok/s" in out.stderr


def test_cli_chat_reads_stdin():
    out = unillm_cli("chat", "smollm2", "-", "-s", SYSTEM, "-t", "0", "-n", "32", input="What is the capital of France?")
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout


def test_cli_errors_are_one_line_and_exit_2():
    out = unillm_cli("chat", "smolm2", "hi")
    assert out.returncode == 2
    assert "Unknown model 'smolm2'" in out.stderr and "smollm2" in out.stderr
    assert "Traceback" not in out.stderr


def test_cli_models_lists_registry_and_why_not():
    out = unillm_cli("models")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:4] == ["NAME", "BACKEND", "CONTEXT", "RUNS"]
    smol = next(line for line in lines if line.startswith("smollm2 "))
    assert " yes " in smol and "2048" in smol
    at = next(i for i, line in enumerate(lines) if line.startswith("qwen-coder-vllm"))
    assert " no " in lines[at] and lines[at + 1].lstrip().startswith("why not:")
    # It was 204 columns wide whatever the terminal: it fits COLUMNS, the reasons wrapped below their row.
    import os

    narrow = subprocess.run([sys.executable, "-m", "unillm", "models"], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "COLUMNS": "80"})
    assert narrow.returncode == 0 and max(map(len, narrow.stdout.splitlines())) <= 80, narrow.stdout
    assert "needs an NVIDIA GPU" in " ".join(narrow.stdout.split())
    out = unillm_cli("models", "--json")
    import json

    rows = {r["name"]: r for r in map(json.loads, out.stdout.splitlines())}
    assert rows["smollm2"]["runs_here"] is True
    assert rows["qwen-coder-vllm"]["runs_here"] is False and rows["qwen-coder-vllm"]["why_not"]


def test_mypy_is_clean_on_src():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "mypy"], cwd=root, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.unit
def test_the_readme_lists_every_limit_with_its_default():
    from unillm.limits import LIMITS

    readme = (ROOT / "README.md").read_text()
    for lim in LIMITS.values():
        default = f"{int(lim.default):,}" if lim.integer else f"{lim.default} s"
        assert f"| `{lim.env}` | {default} |" in readme, lim.env
