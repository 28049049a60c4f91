"""``unillm doctor``: what this machine has, and what can run on it.

Example:
    >>> from unillm.doctor import doctor
    >>> report = doctor()
    >>> report.cpus >= 1 and any(m["name"] == "smollm2" for m in report.models)
    True
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any

from .backends import BACKENDS
from .registry import Registry
from .options import LlamaCppOptions, parse_options
from .system import (
    GPU,
    cpu_count,
    default_threads,
    gpus,
    llamacpp_threads,
    memory_gb,
    ollama_host,
    ollama_version,
    why_not_runnable,
)


@dataclass
class Report:
    """Facts about this machine and the registry's models on it."""

    cpus: int
    memory_gb: float | None
    gpus: list[GPU]
    backends: dict[str, dict[str, Any]]
    llama_cpp_gpu_offload: bool | None
    llama_cpp_threads: int
    ollama_host: str
    ollama_version: str | None
    models: list[dict[str, Any]] = field(default_factory=list)
    #: Registry entries or files that were refused (name or <file> -> why).
    problems: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def max_gpu_memory_gb(self) -> float:
        return max((g.memory_gb for g in self.gpus), default=0.0)


def _llama_cpp_offload() -> bool | None:
    if importlib.util.find_spec("llama_cpp") is None:
        return None
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


def doctor(registry: Registry | None = None, problems: dict[str, str] | None = None) -> Report:
    """Collect the report (imports llama_cpp, if installed, to ask whether it can offload). ``problems``: what
    was refused before the registry could be built (a registry file given explicitly that cannot be read)."""
    registry = registry if registry is not None else Registry.load()
    host = ollama_host()
    found = list(gpus())
    backends = {
        name: {"installed": info.installed(), "package": info.distribution, "version": info.version(),
               "install": info.install_hint(bool(found))}
        for name, info in BACKENDS.items()
    }
    models = []
    for spec in registry:
        reason = why_not_runnable(spec)
        entry = {"name": spec.name, "backend": spec.backend, "runs_here": reason is None, "why_not": reason}
        if spec.backend == "llamacpp":
            o = parse_options(LlamaCppOptions, spec)
            n, why, _ = llamacpp_threads(o.n_threads, o.parallel)
            entry["threads"] = f"{n} thread{'s' if n > 1 else ''}, {why}"
        models.append(entry)
    return Report(
        cpus=cpu_count(), memory_gb=memory_gb(), gpus=found, backends=backends,
        llama_cpp_gpu_offload=_llama_cpp_offload(), llama_cpp_threads=default_threads(),
        ollama_host=host, ollama_version=ollama_version(host), models=models,
        problems={**(problems or {}), **{name: str(exc) for name, exc in registry.problems.items()}},
    )


def format_report(r: Report) -> str:
    mem = f"{r.memory_gb:.1f} GB" if r.memory_gb else "unknown"
    env = os.environ.get("UNILLM_N_THREADS")
    threads = (f"llama.cpp threads {r.llama_cpp_threads} (UNILLM_N_THREADS={env})" if env else
               f"llama.cpp threads {r.llama_cpp_threads} for one sequence, {r.cpus} for a batching model "
               "(UNILLM_N_THREADS is not set)")
    lines = [f"CPU       {r.cpus} cores, {mem} memory; {threads}"]
    if r.gpus:
        lines += [f"GPU {g.index}     {g.name}, {g.memory_gb:.0f} GB" for g in r.gpus]
    else:
        lines.append("GPU       none found (NVML / nvidia-smi)")
    offload = {None: "llama-cpp-python not installed", True: "yes (CUDA/Metal/Vulkan build)", False: "no (CPU-only build)"}
    lines.append(f"llama.cpp GPU offload: {offload[r.llama_cpp_gpu_offload]}")
    lines.append(f"Ollama    {r.ollama_host}: " + (f"daemon answers, version {r.ollama_version}" if r.ollama_version else "no daemon answers"))
    lines.append("")
    lines.append("Backends")
    for name, b in r.backends.items():
        state = f"{b['package']} {b['version']}" if b["installed"] else f"not installed: {b['install']}"
        lines.append(f"  {name:9} {state}")
    lines.append("")
    lines.append("Models")
    width = max(len(m["name"]) for m in r.models)
    for m in r.models:
        threads = f", {m['threads']}" if m.get("threads") else ""
        lines.append(f"  {m['name']:{width}}  " + (f"runs here{threads}" if m["runs_here"] else f"no: {m['why_not']}"))
    if r.problems:
        lines += ["", "Refused registry entries and files"]
        lines += [f"  {name}: {why}" for name, why in r.problems.items()]
    return "\n".join(lines)
