"""Facts about this machine and whether a registry model can run on it. No heavy imports.

Example:
    >>> from unillm.system import cpu_count
    >>> cpu_count() >= 1
    True
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .backends import backend_info
from .errors import UnillmError
from .registry import ModelSpec, resolve_file


def cpu_count() -> int:
    """CPUs this process may run on (respects affinity and cgroup-limited containers)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_threads() -> int:
    """llama.cpp threads of a one-sequence model: ``UNILLM_N_THREADS``, else half the CPUs (at least 1).

    On a 2-CPU machine two threads stall decoding for seconds at random (OpenMP spin-waits against
    the rest of the process), one thread does not.
    """
    return llamacpp_threads(None, 1)[0]


def llamacpp_threads(n_threads: int | None, parallel: int) -> tuple[int, str, bool]:
    """The threads a llama.cpp model runs: (count, why, tuned). ``options.n_threads``, else
    ``UNILLM_N_THREADS``, else for a batching context (``parallel`` > 1) every CPU, tuned down to one while
    that decodes faster (another process is taking a CPU: see ``ThreadTuner``), else half the CPUs."""
    if n_threads:
        return n_threads, "options.n_threads", False
    env = os.environ.get("UNILLM_N_THREADS")
    if env:
        try:
            return max(1, int(env)), "UNILLM_N_THREADS", False
        except ValueError:
            raise UnillmError(f"UNILLM_N_THREADS must be a whole number of threads, got {env!r}") from None
    if parallel > 1:
        n = cpu_count()
        return n, (f"all {n} CPUs (batching), down to 1 while that decodes faster" if n > 1 else "1 CPU"), n > 1
    return max(1, cpu_count() // 2), "half the CPUs (one sequence at a time)", False


def memory_gb() -> float | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return None


def available_memory_bytes() -> int | None:
    """The memory the kernel says a new allocation can have without swapping (``MemAvailable``)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@dataclass(frozen=True, slots=True)
class GPU:
    index: int
    name: str
    memory_gb: float


@functools.lru_cache(maxsize=1)
def gpus() -> tuple[GPU, ...]:
    """NVIDIA GPUs, from NVML when installed, else ``nvidia-smi``; empty when there are none."""
    try:
        import pynvml  # from nvidia-ml-py

        pynvml.nvmlInit()
        try:
            out = []
            for i in range(pynvml.nvmlDeviceGetCount()):
                h = pynvml.nvmlDeviceGetHandleByIndex(i)
                name = pynvml.nvmlDeviceGetName(h)
                name = name.decode() if isinstance(name, bytes) else name
                out.append(GPU(i, name, pynvml.nvmlDeviceGetMemoryInfo(h).total / 1024**3))
            return tuple(out)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no NVML library, no driver: fall through to nvidia-smi
        pass
    smi = shutil.which("nvidia-smi")
    if not smi:
        return ()
    try:
        res = subprocess.run(
            [smi, "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return ()
    found = []
    for line in res.stdout.strip().splitlines():
        idx, name, mem = (s.strip() for s in line.split(","))
        found.append(GPU(int(idx), name, float(mem) / 1024))
    return tuple(found)


def hardware_problem(spec: ModelSpec) -> str | None:
    """Why this machine's GPUs cannot hold the model (``requires: cuda``, ``min_gpu_memory_gb``), or None."""
    if spec.requires != "cuda" and not spec.min_gpu_memory_gb:
        return None
    found = gpus()
    if not found:
        need = f" with >= {spec.min_gpu_memory_gb:g} GB" if spec.min_gpu_memory_gb else ""
        quant = spec.options.get("quantization")
        what = f"{quant.upper()} on {spec.backend}" if isinstance(quant, str) else spec.backend
        return f"needs an NVIDIA GPU{need} ({what} needs CUDA); none found on this machine"
    largest = max(g.memory_gb for g in found)
    if spec.min_gpu_memory_gb and largest < spec.min_gpu_memory_gb:
        return f"needs a GPU with >= {spec.min_gpu_memory_gb:g} GB; the largest here has {largest:.0f} GB"
    return None


def ollama_host(spec: ModelSpec | None = None) -> str:
    """The Ollama daemon's URL: the entry's ``options.host``, else ``OLLAMA_HOST``, else 127.0.0.1:11434."""
    host = (spec.options.get("host") if spec is not None else None) or os.environ.get("OLLAMA_HOST") or "127.0.0.1:11434"
    host = str(host)
    if "://" not in host:
        host = "http://" + host
    return host.rstrip("/")


def ollama_version(host: str, timeout: float = 0.5) -> str | None:
    """The version an Ollama daemon reports at ``host``, or None when nothing answers there."""
    try:
        with urllib.request.urlopen(f"{host}/api/version", timeout=timeout) as resp:  # noqa: S310 - local URL
            return str(json.loads(resp.read().decode()).get("version", "unknown"))
    except (OSError, ValueError, urllib.error.URLError):
        return None


def cache_root() -> Path:
    """Where unillm keeps what it makes (converted models, requantized GGUFs, verified digests):
    ``$UNILLM_CACHE``, else ``$XDG_CACHE_HOME/unillm``, else ``~/.cache/unillm``."""
    base = os.environ.get("UNILLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "unillm"
    )
    return Path(base)


def why_not_runnable(spec: ModelSpec) -> str | None:
    """Why this model cannot run on this machine, or None when it can (as far as can be told cheaply)."""
    try:
        info = backend_info(spec.backend)
    except UnillmError as exc:
        return str(exc)
    problem = hardware_problem(spec)
    if problem:
        return problem
    if not info.installed():
        return f"backend {spec.backend!r} not installed: {info.install_hint(bool(gpus()))}"
    if spec.source.package or spec.source.path:
        try:
            resolve_file(spec)
        except UnillmError as exc:
            return str(exc).split(": ", 1)[-1]
    if spec.backend == "ollama" and ollama_version(ollama_host(spec)) is None:
        return f"no Ollama daemon answers at {ollama_host(spec)} (start `ollama serve`, then `ollama pull {spec.source.ollama}`)"
    return None


def give_memory_back() -> None:
    """After an unload: collect the model's objects now, and hand freed heap pages back to the OS (glibc
    keeps them otherwise, and the process looks as large as with the model loaded)."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    libc = ctypes.util.find_library("c")
    if libc and sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(libc).malloc_trim(0)
        except (OSError, AttributeError):
            pass  # not glibc (musl): nothing to trim


@functools.lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX); without it, bf16 is emulated."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
