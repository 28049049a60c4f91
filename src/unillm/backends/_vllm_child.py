"""What runs first in vLLM's engine-core process: a watch on the process that owns the model.

vLLM's ``EngineCore`` is a child process that outlives its parent when the parent ends without shutting it
down (SIGTERM of a plain script, a pytest run, a restarted notebook kernel): it was seen under PID 1, still
computing, ignoring a SIGTERM of its own. :func:`install` makes vLLM start the child through
:func:`run_engine_core`, which starts a thread that ends the process as soon as its parent is gone (it is
then re-parented, so ``os.getppid()`` changes), however the parent ended, SIGKILL included. Nothing here
imports vLLM at import time: a spawned child imports this module by name to find its target.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

_ORIGINAL: Any = None
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


def run_engine_core(*args: Any, **kwargs: Any) -> Any:
    """vLLM's ``EngineCoreProc.run_engine_core``, with the watch on the parent started first."""
    parent = os.getppid()
    if parent == 1:
        os._exit(1)  # the parent ended before this child started
    threading.Thread(target=_watch, args=(parent,), name="unillm-parent-watch", daemon=True).start()
    original = _ORIGINAL
    if original is None:  # a spawned child: vLLM's class is as vLLM defines it
        from vllm.v1.engine.core import EngineCoreProc

        original = EngineCoreProc.run_engine_core
    return original(*args, **kwargs)


def install() -> None:
    """Make vLLM start its engine-core processes through :func:`run_engine_core` (idempotent)."""
    global _ORIGINAL
    from vllm.v1.engine.core import EngineCoreProc

    if _ORIGINAL is None:
        _ORIGINAL = EngineCoreProc.run_engine_core
        EngineCoreProc.run_engine_core = staticmethod(run_engine_core)  # type: ignore[method-assign]
