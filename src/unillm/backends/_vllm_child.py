"""What runs first in vLLM's engine-core process and its workers: a watch on the process that owns the model,
and a record of the errors they log.

vLLM's ``EngineCore`` is a child process that outlives its parent when the parent ends without shutting it
down (SIGTERM of a plain script, a pytest run, a restarted notebook kernel): it was seen under PID 1, still
computing, ignoring a SIGTERM of its own. :func:`install` makes vLLM start the child through
:func:`run_engine_core`, which starts a thread that ends the process as soon as its parent is gone (it is
then re-parented, so ``os.getppid()`` changes), however the parent ended, SIGKILL included. Nothing here
imports vLLM at import time: a spawned child imports this module by name to find its target.

A start that fails in those processes reached the owner only as "Engine core initialization failed. See root
cause above": the cause was in their log. Each of them (the engine core, and the workers it starts through
:func:`run_worker`) appends the errors it logs to a file named in ``UNILLM_VLLM_ERRORS``, one per owning
process, which :func:`errors_since` reads back for the :class:`~unillm.errors.ModelLoadError`.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import tempfile
import threading
import time
from typing import Any

_ORIGINAL: Any = None
#: The environment variable that names the errors file of the process that owns the engine.
ERRORS_ENV = "UNILLM_VLLM_ERRORS"
#: Lines of vLLM's that say only that the cause is elsewhere.
_NO_CAUSE = ("EngineCore failed to start.", "WorkerProc failed to start.")
#: How often the child looks at its parent, in seconds.
POLL_S = 0.5


def _descendants(pid: int) -> list[int]:
    """Every live descendant of a process, from /proc (vLLM's workers are this process's children)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [k for k, v in parents.items() if v == p]
        out.extend(kids)
        todo.extend(kids)
    return out


def _watch(parent: int) -> None:
    while True:
        time.sleep(POLL_S)
        if os.getppid() != parent:  # its parent is gone: nothing will read what it computes
            for pid in _descendants(os.getpid()):  # its workers first: killed, it could not stop them
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            os.kill(os.getpid(), signal.SIGKILL)


def _write_error(path: str, record: logging.LogRecord) -> None:
    """Append an error vLLM logs (its message and exception, on one line) to the owner's errors file."""
    try:
        text = record.getMessage()
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:
            text += f" {type(exc).__name__}: {exc}"
        with open(path, "a", encoding="utf-8") as f:
            f.write(" ".join(text.split())[:2000] + "\n")
    except Exception:  # noqa: BLE001 - a log record that cannot be kept must not break vLLM
        pass


def _record_errors() -> None:
    """Record vLLM's errors through the log-record factory: vLLM reconfigures its loggers' handlers in its
    processes, and wraps (keeps) the factory it finds."""
    path = os.environ.get(ERRORS_ENV)
    previous = logging.getLogRecordFactory()
    if not path or getattr(previous, "unillm_errors", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        if record.levelno >= logging.ERROR and record.name.startswith("vllm"):
            _write_error(path, record)
        return record

    factory.unillm_errors = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


def run_engine_core(*args: Any, **kwargs: Any) -> Any:
    """vLLM's ``EngineCoreProc.run_engine_core``, with the watch on the parent started first, its errors
    recorded, and its workers started through :func:`run_worker`."""
    parent = os.getppid()
    if parent == 1:
        os._exit(1)  # the parent ended before this child started
    threading.Thread(target=_watch, args=(parent,), name="unillm-parent-watch", daemon=True).start()
    _record_errors()
    original = _ORIGINAL
    if original is None:  # a spawned child: vLLM's classes are as vLLM defines them
        from vllm.v1.engine.core import EngineCoreProc
        from vllm.v1.executor.multiproc_executor import WorkerProc

        original = EngineCoreProc.run_engine_core
        global _WORKER
        _WORKER = WorkerProc.worker_main
        WorkerProc.worker_main = staticmethod(run_worker)  # type: ignore[method-assign]
    return original(*args, **kwargs)


_WORKER: Any = None


def run_worker(*args: Any, **kwargs: Any) -> Any:
    """vLLM's ``WorkerProc.worker_main``, with its errors recorded (it logs them and exits)."""
    _record_errors()
    from vllm.v1.executor.multiproc_executor import WorkerProc

    original = _WORKER or WorkerProc.worker_main  # in the worker itself, vLLM's own
    return original(*args, **kwargs)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def errors_mark() -> int:
    """Where the errors file ends now (what :func:`errors_since` reads from)."""
    try:
        return os.path.getsize(os.environ[ERRORS_ENV])
    except (KeyError, OSError):
        return 0


def errors_since(mark: int) -> list[str]:
    """The errors vLLM's processes logged since ``mark``, those that only point elsewhere left out, each once."""
    try:
        with open(os.environ[ERRORS_ENV], encoding="utf-8", errors="replace") as f:
            f.seek(mark)
            lines = f.read().splitlines()
    except (KeyError, OSError):
        return []
    out: list[str] = []
    for line in lines:
        for prefix in _NO_CAUSE:
            line = line.removeprefix(prefix).strip()
        if line and line not in out and "See stack trace for root cause" not in line:
            out.append(line)
    return out


def install() -> None:
    """Make vLLM start its engine-core processes through :func:`run_engine_core` (idempotent)."""
    global _ORIGINAL
    from vllm.v1.engine.core import EngineCoreProc

    if _ORIGINAL is None:
        _ORIGINAL = EngineCoreProc.run_engine_core
        EngineCoreProc.run_engine_core = staticmethod(run_engine_core)  # type: ignore[method-assign]
    if ERRORS_ENV not in os.environ:  # inherited by the processes vLLM spawns
        path = os.path.join(tempfile.gettempdir(), f"unillm-vllm-errors-{os.getpid()}.log")
        os.environ[ERRORS_ENV] = path
        atexit.register(_remove, path)
