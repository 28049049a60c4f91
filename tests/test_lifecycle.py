"""Process lifecycle and the CLI's edges: models are closed however the process ends; bad ports, files and
folders are one-line errors with exit code 2."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import run_py
from test_ollama_serve import free_port

TESTS = Path(__file__).resolve().parent


def unillm(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "unillm", *args], capture_output=True, text=True, timeout=timeout)


def test_a_process_that_exits_without_close_still_closes_its_models(tmp_path):
    marker = tmp_path / "closed"
    code = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(TESTS)!r})
        import fake_backend; fake_backend.register()
        from unillm import Engine, Registry
        from unillm.registry import parse_file
        cfg = {str(tmp_path / "r.yaml")!r}
        open(cfg, "w").write("models:\\n  - {{name: echo, backend: fake, source: {{path: /x}}, context_window: 64, "
                             "options: {{closed_marker: {str(marker)!r}}}}}\\n")
        engine = Engine(cfg, builtin=False)
        print(engine.chat("echo", "hello there").text)
        # no close(): the interpreter exits
    """)
    out = run_py(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "hello there"
    assert marker.read_text() == "echo"


@pytest.mark.parametrize("port", ["99999", "0", "http"])
def test_serve_refuses_a_port_that_is_not_one(port):
    out = unillm("serve", "--port", port)
    assert out.returncode == 2 and "port" in out.stderr
    assert "serving on" not in out.stdout and "Traceback" not in out.stderr


@pytest.mark.unit
def test_serve_on_a_port_in_use_is_a_one_line_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        out = unillm("serve", "--port", str(port), "--load", "smollm2")
    assert out.returncode == 2, out
    assert f"cannot listen on 127.0.0.1:{port}" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert "serving on" not in out.stdout and "loaded" not in out.stdout


def test_serve_prints_its_banner_once_bound_and_exits_cleanly_on_sigterm():
    port = free_port()
    with subprocess.Popen([sys.executable, "-m", "unillm", "serve", "--port", str(port)], stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True) as proc:
        try:
            line = proc.stdout.readline()
            assert f"serving on http://127.0.0.1:{port}" in line
            with socket.create_connection(("127.0.0.1", port), timeout=10):
                pass  # bound when the banner said so
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 128 + signal.SIGTERM
        finally:
            if proc.poll() is None:
                proc.kill()


@pytest.mark.unit
@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda d: ["batch", str(d / "missing.jsonl"), "-o", str(d / "out.jsonl"), "-m", "smollm2"], "missing.jsonl"),
        (lambda d: ["batch", str(d / "in.jsonl"), "-o", str(d), "-m", "smollm2"], "Is a directory"),
        (lambda d: ["batch", str(d / "in.jsonl"), "-o", str(d / "o.jsonl"), "-m", "smollm2", "--template",
                    str(d / "nope.txt")], "nope.txt"),
    ],
)
def test_batch_file_problems_are_one_line_errors(tmp_path, make, fragment):
    (tmp_path / "in.jsonl").write_text('{"id": 1, "text": "hi"}\n')
    out = unillm(*make(tmp_path))
    assert out.returncode == 2, out
    assert fragment in out.stderr and "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def children_of(pid: int) -> set[int]:
    """Every live descendant of a process (from /proc)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        kids = {c for c, pp in parents.items() if pp == p}
        out |= kids
        todo.extend(kids)
    return out


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_a_forgotten_engine_with_a_real_model_exits_without_a_traceback():
    """Python shuts its thread pools down before atexit handlers run, and closing a llama.cpp model uses them:
    every script that forgot close() ended with "Exception ignored in atexit callback ... cannot schedule new
    futures after shutdown" (the fake backend's test never uses a thread pool)."""
    code = ("from unillm import Engine\n"
            "e = Engine()\n"
            "print(e.chat('smollm2', 'Hi', max_tokens=4).usage.completion_tokens)\n"
            "# no close(): the interpreter exits\n")
    out = run_py(code)
    assert out.returncode == 0 and out.stdout.strip() == "4"
    assert "Traceback" not in out.stderr and "Exception ignored" not in out.stderr, out.stderr[-2000:]
