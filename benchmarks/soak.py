"""Reliability figures, each printed next to its target, in one run (under 10 minutes on 2 CPUs).

- bad inputs through the Python API, HTTP and the CLI: crashes (an exception that is not unillm's, a 500, a
  traceback), hangs, and whether the next request is served;
- ``unillm batch`` SIGKILLed at 10 random moments, then resumed: records lost, duplicated, earlier bytes changed;
- 64 concurrent streams, half closed early: stuck streams, and a request after;
- 100 concurrent HTTP requests, half of the clients leaving early: 500s, and a request after;
- 20 load/unload cycles: RSS growth after the third cycle;
- vLLM (when installed): child processes left after unload, and after SIGTERM of ``unillm serve``, and of a
  plain script that loaded a model;
- hostile requests (issue 26): schemas and grammars that crashed llama.cpp, a backtracking pattern, deep
  schemas, lone surrogates, remote $refs, floods of stop strings, huge enums, a looping chat template,
  half-sent bodies, abandoned requests beyond the queue, a large embedding beside chat: crashes, hangs,
  500s, and how long an ordinary request takes beside them;
- batch outputs removed, shared, the input itself, ids that collide, a full disk, bad bytes: records lost,
  duplicated, reported but not kept;
- a cloned repository's unillm.yaml and dist-info: code run from a project file;
- lifecycle: interrupted loads (RSS), a forked child, close() under a stream, Ctrl-C of unillm chat, a
  context window of 10**9.

    python benchmarks/soak.py [--skip-vllm] [--only hostile,jobs,project,lifecycle]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from unillm import Engine, UnillmError

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from test_lifecycle import alive, children_of  # noqa: E402
from test_ollama_serve import free_port, start_server, stop  # noqa: E402

# SmolLM2-135M names Paris with this short system message (without one it rambles; see tests/conftest.py).
Q = [{"role": "system", "content": "You are a helpful assistant. Answer briefly."},
     {"role": "user", "content": "What is the capital of France?"}]
ROWS: list[tuple[str, str, str]] = []


def report(name: str, value: Any, target: str) -> None:
    ROWS.append((name, str(value), target))
    print(f"  {name}: {value}   (target {target})", flush=True)


# -- bad inputs -------------------------------------------------------------------------------------------

PY_BAD: list[tuple[Any, dict[str, Any]]] = [
    (123, {}), (None, {}), ("smollm", {}), ("", {}), ("smollm2", {"messages": 5}), ("smollm2", {"messages": []}),
    ("smollm2", {"messages": [{"role": "wizard", "content": "x"}]}), ("smollm2", {"messages": [{"role": "user"}]}),
    ("smollm2", {"messages": [{"role": "user", "content": 3}]}), ("smollm2", {"messages": [{"role": "assistant", "content": "x"}]}),
    ("smollm2", {"messages": "\ud800"}), ("smollm2", {"messages": "word " * 3000}),
    ("smollm2", {"temperature": -1}), ("smollm2", {"temperature": math.nan}), ("smollm2", {"temperature": "hot"}),
    ("smollm2", {"top_p": 0}), ("smollm2", {"top_p": 2}), ("smollm2", {"max_tokens": 0}), ("smollm2", {"max_tokens": 2.5}),
    ("smollm2", {"max_tokens": 10**9}), ("smollm2", {"stop": [""]}), ("smollm2", {"stop": 5}), ("smollm2", {"seed": "x"}),
    ("smollm2", {"seed": 2**64}), ("smollm2", {"seed": -5}), ("smollm2", {"extra": 5}), ("smollm2", {"extra": {"top_kk": 1}}),
    ("smollm2", {"extra": {"top_k": "forty"}}), ("smollm2", {"extra": {"min_p": None}}),
    ("smollm2", {"extra": {"repeat_penalty": math.nan}}), ("smollm2", {"extra": {"grammar": "root ::= ("}}),
    ("smollm2", {"extra": {"mirostat_mode": 2}}), ("smollm2", {"extra": {"logits_processor": 5}}),
    ("smollm2", {"response_format": "json"}), ("smollm2", {"response_format": {"type": "xml"}}),
    ("smollm2", {"response_format": {"type": "json_schema"}}),
    ("smollm2", {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}}),
    ("smollm2", {"tools": "x"}), ("smollm2", {"tools": [{"type": "function"}]}), ("smollm2", {"tool_choice": "required"}),
    ("smollm2", {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"function": {"name": "g"}}}),
    ("smollm2", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]}),
    ("smollm2", {"no_such_param": 1}), ("smollm2", {"max_tokens": 4, "response_format": {"type": "json_object"}}),
]

HTTP_BAD: list[tuple[str, bytes | dict[str, Any], dict[str, str]]] = [
    ("/api/chat", {"model": 123, "messages": Q}, {}), ("/api/chat", {"model": "smollm2", "messages": Q, "options": []}, {}),
    ("/api/chat", {"model": "smollm2", "messages": Q, "options": "x"}, {}),
    ("/api/chat", {"model": "smollm2", "messages": Q, "options": {"num_predict": "a"}}, {}),
    ("/api/chat", {"model": "smollm2", "messages": Q, "options": {"top_k": "forty"}, "stream": False}, {}),
    ("/api/chat", b"[" * 50_000 + b"]" * 50_000, {}), ("/api/chat", b"{not json", {}), ("/api/chat", b"", {}),
    ("/api/chat", {"model": "smollm2", "messages": Q}, {"Content-Type": "text/plain"}),
    ("/api/chat", {"model": "smollm2", "messages": Q}, {"Host": "evil.example"}),
    ("/api/chat", {"model": "smollm2", "messages": Q, "images": ["x"]}, {}),
    ("/api/generate", {"model": "smollm2", "prompt": 5}, {}), ("/api/show", {"model": ["x"]}, {}),
    ("/api/chat", {"model": "nope", "messages": Q}, {}), ("/api/chat", {"model": "smollm2", "messages": Q, "format": 5}, {}),
    ("/v1/chat/completions", {"model": "smollm2", "messages": Q, "n": 2}, {}),
    ("/v1/chat/completions", {"model": "smollm2", "messages": Q, "logprobs": True}, {}),
    ("/v1/chat/completions", {"model": "smollm2", "messages": {"role": "user"}}, {}),
    ("/v1/chat/completions", {"model": "smollm2", "messages": Q, "max_tokens": "a"}, {}),
    ("/v1/chat/completions", {"model": "smollm2", "messages": Q, "tools": [{"type": "function"}]}, {}),
    ("/v1/chat/completions", b"x" * (17 * 2**20), {}),
]

CLI_BAD: list[list[str]] = [
    ["chat", "nope", "hi"], ["chat", "smollm2", "hi", "-t", "5"], ["chat", "smollm2", "hi", "--schema", "{bad"],
    ["serve", "--port", "99999"], ["batch", "/no/such.jsonl", "-o", "/tmp/x.jsonl", "-m", "smollm2"],
    ["models", "--config", "/no/such.yaml"], ["recommend", "--task", "nope"],
]


def call(url: str, method: str, path: str, body: bytes | dict[str, Any] | None, headers: dict[str, str]) -> int:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **headers})
    status = conn.getresponse().status
    conn.close()
    return status


def bad_inputs(url: str) -> None:
    tried = crashes = hangs = 0
    with Engine() as engine:
        engine.load("smollm2")
        for model, kw in PY_BAD:
            tried += 1
            kw = dict(kw)
            messages = kw.pop("messages", Q)
            try:
                engine.chat(model, messages, **kw)
            except UnillmError:
                pass
            except Exception as exc:  # noqa: BLE001 - that is what is counted
                crashes += 1
                print(f"    crash: {model!r} {kw}: {exc!r}")
        served = "Paris" in engine.chat("smollm2", Q, max_tokens=24, temperature=0).text
    five_hundreds = 0
    for path, body, headers in HTTP_BAD:
        tried += 1
        try:
            status = call(url, "POST", path, body, headers)
        except TimeoutError:
            hangs += 1
            continue
        except OSError:
            status = 413  # the server may close on an oversized body after answering
        if status >= 500 and status != 503:
            five_hundreds += 1
            print(f"    {status}: {path} {str(body)[:80]}")
    served = served and call(url, "POST", "/api/chat", {"model": "smollm2", "messages": Q, "stream": False}, {}) == 200
    for args in CLI_BAD:
        tried += 1
        try:
            out = subprocess.run([sys.executable, "-m", "unillm", *args], capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired:
            hangs += 1
            continue
        if "Traceback" in out.stderr or out.returncode not in (1, 2):
            crashes += 1
            print(f"    CLI crash: {args}: {out.returncode} {out.stderr[-200:]}")
    report("bad inputs tried", tried, ">= 60")
    report("crashes", crashes, "0")
    report("hangs", hangs, "0")
    report("500s from user input", five_hundreds, "0")
    report("next request served after all of them", served, "True")


# -- batch jobs killed at random moments -------------------------------------------------------------------


def killed_batches(tmp: Path) -> None:
    n = 48
    src = tmp / "in.jsonl"
    src.write_text("".join(json.dumps({"id": f"d{i}", "text": f"Name a fruit number {i}."}) + "\n" for i in range(n)))
    out = tmp / "out.jsonl"
    cmd = [sys.executable, "-m", "unillm", "batch", str(src), "-o", str(out), "-m", "smollm2", "-n", "12", "-t", "0",
           "--no-progress"]
    changed = 0
    rng = random.Random(7)
    for _ in range(10):
        before = out.read_bytes() if out.exists() else b""
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(1.5, 5.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        after = out.read_bytes() if out.exists() else b""
        complete = before[: before.rfind(b"\n") + 1]
        changed += not after.startswith(complete)
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False, timeout=600)
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines() if line.strip()]
    report("batch SIGKILLed at 10 moments: records lost", len({f"d{i}" for i in range(n)} - set(ids)), "0")
    report("records duplicated", len(ids) - len(set(ids)), "0")
    report("earlier bytes changed", changed, "0")


# -- concurrent streams, half closed early ---------------------------------------------------------------


def streams() -> None:
    with Engine() as engine:
        engine.load("smollm2")

        async def one(i: int) -> str:
            stream = await engine.achat("smollm2", f"Tell a story about number {i}.", stream=True, max_tokens=48)
            got = 0
            async for _ in stream:
                got += 1
                if i % 2 and got == 2:
                    await stream.aclose()  # type: ignore[attr-defined]
                    return "closed"
            return "finished"

        async def main() -> list[Any]:
            tasks = [asyncio.ensure_future(asyncio.wait_for(one(i), 300)) for i in range(64)]
            return await asyncio.gather(*tasks, return_exceptions=True)

        results = asyncio.run(main())
        stuck = sum(isinstance(r, asyncio.TimeoutError) for r in results)
        failed = sum(isinstance(r, BaseException) and not isinstance(r, asyncio.TimeoutError) for r in results)
        served = "Paris" in engine.chat("smollm2", Q, max_tokens=24, temperature=0).text
    report("64 streams, half closed early: stuck", stuck, "0")
    report("the other half finished", f"{results.count('finished')}/32 ({failed} failed)", "32/32")
    report("a request after", served, "True")


# -- HTTP clients that leave ------------------------------------------------------------------------------


def http_disconnects(url: str) -> None:
    host, port = url.removeprefix("http://").split(":")
    rng = random.Random(11)
    statuses: list[int] = []

    def one(i: int) -> None:
        body = json.dumps({"model": "smollm2", "messages": [{"role": "user", "content": f"Story {i}."}],
                           "stream": i % 3 == 0, "options": {"num_predict": 32}}).encode()
        leave = i % 2 == 1
        with socket.create_connection((host, int(port)), timeout=120) as s:
            s.sendall(b"POST /api/chat HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                      + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            if leave:
                time.sleep(rng.uniform(0.0, 1.0))
                return
            head = s.recv(64)
            statuses.append(int(head.split()[1]) if head.startswith(b"HTTP/") else 0)

    import threading

    threads = [threading.Thread(target=one, args=(i,)) for i in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    report("100 concurrent HTTP requests, half leaving early: 500s", sum(s >= 500 for s in statuses), "0")
    report("answered of those that stayed", f"{sum(s == 200 for s in statuses)}/50", "50/50")
    report("a request after", call(url, "POST", "/api/chat", {"model": "smollm2", "messages": Q, "stream": False}, {}) == 200, "True")


# -- load / unload cycles -----------------------------------------------------------------------------------


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cycles() -> None:
    rss = []
    with Engine() as engine:
        for _ in range(20):
            engine.load("smollm2")
            engine.chat("smollm2", Q, max_tokens=8)
            engine.unload("smollm2")
            rss.append(rss_mb())
    growth = (rss[-1] - rss[2]) / rss[2] * 100
    report("20 load/unload cycles: RSS growth after the third", f"{growth:+.1f}% ({rss[2]:.0f} -> {rss[-1]:.0f} MB)", "< 5%")


# -- vLLM processes ------------------------------------------------------------------------------------------


def vllm_processes() -> None:
    with Engine() as engine:
        before = rss_mb()
        engine.load("smollm2-vllm")
        engine.chat("smollm2-vllm", Q, max_tokens=16)
        loaded = rss_mb()
        during = children_of(os.getpid())
        engine.unload("smollm2-vllm")
        time.sleep(2)
        after = rss_mb()
        # Python's multiprocessing resource tracker (started by the first spawn) lives as long as this process:
        # it is not one of vLLM's engine processes.
        left = [k for k in during if alive(k) and b"resource_tracker" not in Path(f"/proc/{k}/cmdline").read_bytes()]
        engine.load("smollm2-vllm")
        engine.unload("smollm2-vllm")
        again = rss_mb()
    report("vLLM: engine processes left after unload", f"{len(left)} of {len(during)}", "0")
    report("vLLM: parent RSS before load / loaded / unloaded / after a 2nd cycle",
           f"{before:.0f} / {loaded:.0f} / {after:.0f} / {again:.0f} MB", "unloaded ~ before + imports")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "unillm", "serve", "--port", str(port), "--load", "smollm2-vllm"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    while "serving on" not in (line := proc.stdout.readline()):
        if not line:
            break
    kids = children_of(proc.pid)
    t = time.time()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    while any(alive(k) for k in kids) and time.time() - t < 30:
        time.sleep(0.2)
    report("vLLM: processes left 30 s after SIGTERM of unillm serve", f"{sum(alive(k) for k in kids)} of {len(kids)}", "0")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument("--only", help="comma-separated sections of issue 26 only: hostile, jobs, project, lifecycle")
    args = ap.parse_args()
    t0 = time.time()
    from soak_hostile import SECTIONS

    if args.only:
        for name in args.only.split(","):
            print(name, flush=True)
            SECTIONS[name](ROWS, skip_vllm=args.skip_vllm)
        print_rows(t0)
        return
    proc, url = start_server()
    try:
        print("bad inputs", flush=True)
        bad_inputs(url)
        print("HTTP disconnects", flush=True)
        http_disconnects(url)
    finally:
        stop(proc)
    print("streams", flush=True)
    streams()
    print("killed batch jobs", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        killed_batches(Path(tmp))
    print("load/unload cycles", flush=True)
    cycles()
    import importlib.util

    if not args.skip_vllm and importlib.util.find_spec("vllm"):
        print("vLLM processes", flush=True)
        vllm_processes()
    for name, section in SECTIONS.items():
        print(name, flush=True)
        section(ROWS, skip_vllm=args.skip_vllm)
    print_rows(t0)


def print_rows(t0: float) -> None:
    print(f"\n{'figure':66}{'value':>28}   target")
    for name, value, target in ROWS:
        print(f"{name:66}{value:>28}   {target}")
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
