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


@pytest.mark.unit
def test_batch_job_records_a_cut_request_as_an_error(tmp_path):
    from unillm.records import result_record
    from unillm.types import BatchResult

    rec = result_record("a", "smollm2", BatchResult(0, error=ModelUnloadedError("smollm2")))
    assert rec["error"]["type"] == "ModelUnloadedError" and "answer" not in rec
    json.dumps(rec)


# -- the Ollama store loader ------------------------------------------------------------------------------


@pytest.mark.unit
def test_store_digest_must_be_sha256_hex(tmp_path, monkeypatch):
    """A digest was used in a path unchecked: '../' in one escaped the store, and params/system blobs were
    read without verification."""
    from test_ollama_serve import make_store

    from unillm import ModelLoadError
    from unillm.ollama_store import find

    monkeypatch.setenv("UNILLM_CACHE", str(tmp_path / "cache"))
    store = make_store(tmp_path / "models", b"GGUF" + b"\0" * 64)
    manifest_path = store / "manifests/registry.ollama.ai/library/smolstore/latest"
    manifest = json.loads(manifest_path.read_text())
    outside = tmp_path / "outside.json"
    outside.write_text('{"temperature": 2}')
    manifest["layers"][1]["digest"] = "sha256:../../../outside.json"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ModelLoadError) as e:
        find("smolstore", store)
    assert "not sha256:<64 hex digits>" in str(e.value)
    # A params blob whose content does not match its digest is refused too.
    good = make_store(tmp_path / "models2", b"GGUF" + b"\0" * 64)
    m2 = json.loads((good / "manifests/registry.ollama.ai/library/smolstore/latest").read_text())
    params_blob = good / "blobs" / m2["layers"][1]["digest"].replace(":", "-")
    params_blob.write_text('{"temperature": 2}')
    with pytest.raises(ModelLoadError) as e:
        find("smolstore", good)
    assert "does not match its manifest" in str(e.value)


@pytest.mark.unit
def test_store_verification_is_cached_by_size_and_mtime(tmp_path, monkeypatch):
    import os

    from test_ollama_serve import make_store

    from unillm import ollama_store

    monkeypatch.setenv("UNILLM_CACHE", str(tmp_path / "cache"))
    store = make_store(tmp_path / "models", b"GGUF" + b"\1" * 4096)
    hashed = []
    real = ollama_store.sha256_file
    monkeypatch.setattr(ollama_store, "sha256_file", lambda p: hashed.append(p) or real(p))
    ollama_store.find("smolstore", store)
    assert len(hashed) == 3  # model, params, system
    ollama_store.find("smolstore", store)
    assert len(hashed) == 3  # nothing hashed again
    gguf = ollama_store.find("smolstore", store).gguf
    os.utime(gguf, ns=(1, 1))  # touched (or replaced): hashed again
    ollama_store.find("smolstore", store)
    assert len(hashed) == 4


def test_stored_num_predict_minus_one_means_no_limit(tmp_path, write_config, monkeypatch):
    """Ollama's num_predict -1 ("no limit") used to fail every call as an invalid max_tokens."""
    from test_ollama_serve import STORE_ENTRY, free_port, make_store

    from unillm.ollama_store import sampling_defaults

    assert sampling_defaults({"num_predict": -1, "seed": -1, "temperature": 0}) == {"temperature": 0}
    monkeypatch.setenv("UNILLM_CACHE", str(tmp_path / "cache"))
    from unillm import Registry
    from unillm.registry import resolve_file

    store = make_store(tmp_path / "models", resolve_file(Registry.load().get("smollm2")).read_bytes())
    manifest_path = store / "manifests/registry.ollama.ai/library/smolstore/latest"
    manifest = json.loads(manifest_path.read_text())
    from test_ollama_serve import blob

    manifest["layers"][1]["digest"] = blob(store, json.dumps({"temperature": 0, "num_predict": -1}).encode())
    manifest_path.write_text(json.dumps(manifest))
    with Engine(write_config(STORE_ENTRY.format(port=free_port(), store=store))) as eng:
        r = eng.chat("from-store", [QUESTION[1]])
        assert "Paris" in r.text and r.finish_reason == "stop"


# -- Ollama hosts that do not behave ---------------------------------------------------------------------


def test_a_silent_ollama_host_times_out_and_falls_back(write_config):
    """A host that accepts connections and never answers used to hold the call for 300 s, then raise a
    GenerationError that did not trigger fallbacks."""
    import socket
    import time

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)  # accepts (the kernel does), never answers
        port = listener.getsockname()[1]
        cfg = write_config(
            "models:\n  - name: silent\n    backend: ollama\n    source: {ollama: smollm2}\n    context_window: 2048\n"
            f"    options: {{host: '127.0.0.1:{port}', timeout: 1, local_store: never}}\n    fallbacks: [smollm2]\n"
        )
        from unillm import BackendUnavailableError

        with Engine(cfg) as eng:
            t = time.time()
            with pytest.raises(BackendUnavailableError) as e:
                eng.chat("silent", QUESTION)
            assert time.time() - t < 10
            assert f"127.0.0.1:{port}" in str(e.value) and "'silent'" in str(e.value) and "1 s" in str(e.value)
        with Engine(cfg, fallbacks=True) as eng:
            r = eng.chat("silent", QUESTION, max_tokens=32, **GREEDY)
            assert r.model == "smollm2" and r.requested_model == "silent" and "Paris" in r.text


def test_a_host_that_is_not_ollama_is_named_so(write_config):
    import http.server
    import threading

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            self.send_response(404)
            self.end_headers()
            self.wfile.write(b"404 page not found")

        do_GET = do_POST  # noqa: N815

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        port = srv.server_address[1]
        cfg = write_config(
            "models:\n  - name: web\n    backend: ollama\n    source: {ollama: smollm2}\n    context_window: 2048\n"
            f"    options: {{host: '127.0.0.1:{port}', local_store: never}}\n"
        )
        from unillm import BackendUnavailableError

        with Engine(cfg) as eng:
            with pytest.raises(BackendUnavailableError) as e:
                eng.chat("web", QUESTION)
        assert "does not look like an Ollama server" in str(e.value) and "ollama pull" not in str(e.value)
    finally:
        srv.shutdown()
        srv.server_close()


# -- inputs that slipped through ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "error", "fragment"),
    [
        (lambda e: e.chat(123, QUESTION), InvalidRequestError, "model must be"),
        (lambda e: e.chat("smollm2", "\ud800 hi"), InvalidRequestError, "lone surrogate"),
        (lambda e: e.chat("smollm2", QUESTION, extra={"repeat_penalty": float("nan")}), InvalidRequestError, "extra.repeat_penalty"),
        (lambda e: e.chat("smollm2", QUESTION, seed=2**64), InvalidRequestError, "seed=18446744073709551616 is out of range"),
        (lambda e: e.chat("smollm2", QUESTION, seed=-1), InvalidRequestError, "out of range"),
    ],
)
def test_inputs_get_the_right_error_class(engine, call, error, fragment):
    with pytest.raises(error) as e:
        call(engine)
    assert fragment in str(e.value)
    assert "Paris" in engine.chat("smollm2", QUESTION, max_tokens=32, **GREEDY).text


@pytest.mark.unit
def test_a_misspelled_required_registry_key_is_named(write_config):
    from unillm import ConfigError, Registry

    cfg = write_config("models:\n  - name: a\n    backend: llamacpp\n    source: {path: /a}\n    contxt_window: 8\n")
    with pytest.raises(ConfigError) as e:
        Registry.load(cfg)
    assert "contxt_window" in str(e.value) and "did you mean 'context_window'" in str(e.value)
