"""Embeddings on the real SmolLM2 (pooled: SmolLM2 is a chat model, and no embedding GGUF is shipped on
PyPI here), through the Python API, `unillm serve` and the official openai and ollama clients."""

from __future__ import annotations

import json
import math

import pytest

from unillm import Engine, InvalidRequestError, UnsupportedFeatureError

CAT, CAT2, MONEY = "The cat sits on the mat.", "A cat is sitting on a mat.", "Quarterly revenue rose five percent."


def cos(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def check(vectors: list[list[float]]) -> None:
    assert len(vectors) == 3 and len({len(v) for v in vectors}) == 1 and len(vectors[0]) >= 64
    for v in vectors:
        assert math.isclose(math.sqrt(sum(x * x for x in v)), 1.0, rel_tol=1e-3)  # L2-normalized
    assert cos(vectors[0], vectors[1]) > cos(vectors[0], vectors[2])  # a paraphrase is closer than another topic


def test_llamacpp_embeddings(engine):
    r = engine.embed("smollm2", [CAT, CAT2, MONEY])
    check(r.vectors)
    assert r.model == "smollm2" and r.backend == "llamacpp" and r.usage.prompt_tokens > 10
    assert engine.embed("smollm2", CAT).vectors[0] == pytest.approx(r.vectors[0], abs=1e-5)  # order kept
    d = r.to_dict()
    assert d["object"] == "list" and d["data"][2]["index"] == 2 and d["usage"]["total_tokens"] == r.usage.prompt_tokens
    assert "Paris" in engine.chat("smollm2", [{"role": "system", "content": "You are a helpful assistant. Answer briefly."},
                                             {"role": "user", "content": "What is the capital of France?"}],
                                  max_tokens=32, temperature=0).text  # chat unaffected


def test_llamacpp_embeddings_leave_no_openmp_team_behind():
    """An embedding call left an OpenMP team (a worker thread) on the model's worker thread for the life of
    the process. Once a process holds more OpenMP threads than CPUs, libgomp stops spin-waiting at every
    barrier of every team, the batcher's too: ``Engine.batch`` on smollm2 went from 357 to 266-274 tok/s
    after one ``embed`` call (2 CPUs, measured). The process's threads after an embedding call are those
    before it."""
    import os
    import time

    def threads() -> int:
        return len(os.listdir("/proc/self/task"))

    def settled(before: int) -> int:  # a thread that ended can take a moment to leave /proc on a busy machine
        deadline = time.time() + 5
        while threads() != before and time.time() < deadline:
            time.sleep(0.05)
        return threads()

    with Engine() as eng:
        eng.load("smollm2")
        eng.chat("smollm2", "Hi.", max_tokens=2)
        before = threads()
        for _ in range(2):
            eng.embed("smollm2", [CAT, MONEY])
            assert settled(before) == before
        assert eng.chat("smollm2", "Hi.", max_tokens=2).text


@pytest.mark.parametrize(("texts", "error", "fragment"), [
    ([], InvalidRequestError, "non-empty"), ([""], InvalidRequestError, "non-empty"), ([1, 2], InvalidRequestError, "strings"),
    (["word " * 3000], InvalidRequestError, "context window"),
])
def test_bad_embedding_inputs(engine, texts, error, fragment):
    with pytest.raises(error) as e:
        engine.embed("smollm2", texts)
    assert fragment in str(e.value)


@pytest.mark.unit
def test_a_backend_without_embeddings_says_so(write_config):
    import fake_backend

    fake_backend.register()
    cfg = write_config("models:\n  - {name: echo, backend: fake, source: {path: /x}, context_window: 64}\n")
    with Engine(cfg, builtin=False) as eng:
        with pytest.raises(UnsupportedFeatureError) as e:
            eng.embed("echo", "hi")
    assert "embeddings" in str(e.value) and "'echo'" in str(e.value)


def test_transformers_embeddings():
    pytest.importorskip("transformers")
    with Engine() as eng:
        r = eng.embed("smollm2-hf", [CAT, CAT2, MONEY])
    check(r.vectors)
    assert r.backend == "hf"


def test_embeddings_over_http_with_the_official_clients(write_config):
    openai = pytest.importorskip("openai")
    ollama = pytest.importorskip("ollama")
    from test_ollama_serve import start_server, stop, via

    proc, url = start_server()
    try:
        with openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as client:
            r = client.embeddings.create(model="smollm2", input=[CAT, CAT2, MONEY])  # base64 on the wire
            check([d.embedding for d in r.data])
            floats = client.embeddings.create(model="smollm2", input=CAT, encoding_format="float")
            assert floats.data[0].embedding == pytest.approx(r.data[0].embedding, abs=1e-5)
            with pytest.raises(openai.BadRequestError) as e:
                client.embeddings.create(model="smollm2", input=CAT, dimensions=8)
            assert "dimensions" in str(e.value)
        with ollama.Client(host=url) as c:
            r2 = c.embed(model="smollm2", input=[CAT, CAT2, MONEY])
            check([list(v) for v in r2.embeddings])
            assert r2.prompt_eval_count > 10
            assert c.embeddings(model="smollm2", prompt=CAT).embedding == pytest.approx(r2.embeddings[0], abs=1e-5)
        with Engine(write_config(via(url))) as eng:  # the Ollama backend, through /api/embed
            r3 = eng.embed("remote", [CAT, CAT2, MONEY])
            check(r3.vectors)
            assert r3.backend == "ollama"
    finally:
        stop(proc)
    json.dumps(r3.vectors)


def test_batch_job_with_embed_writes_vectors_and_resumes(tmp_path):
    import subprocess
    import sys

    src = tmp_path / "in.jsonl"
    records = [{"id": "a", "text": CAT}, {"id": "b", "text": CAT2}, {"id": "c", "text": MONEY},
               {"id": "d", "messages": [{"role": "user", "content": "hi"}]}]
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "unillm", "batch", str(src), "-o", str(out), "-m", "smollm2", "--embed", "--no-progress"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert first.returncode == 1, first.stderr  # record d is an error record; the others are done
    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    check([rows[k]["embedding"] for k in "abc"])
    assert all(rows[k]["usage"]["prompt_tokens"] > 3 for k in "abc")
    assert "text field" in rows["d"]["error"]["message"]
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert "4 skipped" in again.stderr and len(out.read_text().splitlines()) == 4  # resumed: nothing to do
    retry = subprocess.run(cmd + ["--retry-failed"], capture_output=True, text=True, timeout=300)
    assert "3 skipped" in retry.stderr and len(out.read_text().splitlines()) == 5  # only d was tried again
    bad = subprocess.run(cmd + ["-t", "0"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "no chat parameters" in bad.stderr


@pytest.mark.parametrize("has_bf16", [True, False], ids=["bf16-cpu", "float32-cpu"])
def test_vllm_pooling_runner_embeddings(monkeypatch, has_bf16):
    """An entry with task: embed starts vLLM's pooling runner; a chat entry says how to get one. Under both
    dtypes that dtype auto picks on a CPU (the shipped entry's KV cache was too small for float32, which a
    CPU without AVX512-BF16 gets)."""
    pytest.importorskip("vllm")
    from unillm.backends import vllm as vb

    monkeypatch.setattr(vb, "cpu_has_bf16", lambda: has_bf16)
    with Engine() as eng:
        r = eng.embed("smollm2-vllm-embed", [CAT, CAT2, MONEY])
        assert eng.backend("smollm2-vllm-embed").info().get("dtype", "") in ("", "bfloat16" if has_bf16 else "float32")
        check(r.vectors)
        assert r.backend == "vllm" and r.usage.prompt_tokens > 10
        with pytest.raises(UnsupportedFeatureError) as e:
            eng.chat("smollm2-vllm-embed", "hi")
        assert "embedding model" in str(e.value)
    with Engine() as eng:
        with pytest.raises(UnsupportedFeatureError) as e:
            eng.embed("smollm2-vllm", CAT)
        assert "task: embed" in str(e.value)


def test_an_embedding_prints_nothing_on_stderr():
    """Every embed() printed llama.cpp's 'model default pooling_type is [-1], but [1] was specified' (an
    error-level line about a model that names no pooling of its own) despite verbose=False."""
    from conftest import run_py

    out = run_py("import sys\nfrom unillm import Engine\nwith Engine() as e:\n    e.load('smollm2')\n"
                 "    print('---', file=sys.stderr, flush=True)\n    print(len(e.embed('smollm2', ['a cat']).vectors[0]))\n")
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) > 64 and out.stderr.split("---", 1)[1].strip() == "", out.stderr
