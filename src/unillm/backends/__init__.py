"""Backends are found by name through a table of import paths, imported only when first used.

Third-party backends register under the entry-point group ``unillm.backends``
(``name = "package.module:BackendClass"``).

Example:
    >>> from unillm.backends import BACKENDS
    >>> BACKENDS["llamacpp"].extra
    'llamacpp'
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING

from ..errors import BackendNotInstalledError, ConfigError

if TYPE_CHECKING:
    from .base import Backend


@dataclass(frozen=True, slots=True)
class BackendInfo:
    """Where a backend lives and what it needs installed."""

    name: str
    target: str  # "module:Class"
    module: str  # the library it imports
    distribution: str  # the pip name of that library
    extra: str  # the unillm extra that installs it

    def installed(self) -> bool:
        try:
            return importlib.util.find_spec(self.module) is not None
        except (ImportError, ValueError):
            return False

    def version(self) -> str | None:
        try:
            return metadata.version(self.distribution)
        except metadata.PackageNotFoundError:
            return None


BACKENDS: dict[str, BackendInfo] = {
    "llamacpp": BackendInfo("llamacpp", "unillm.backends.llamacpp:LlamaCppBackend", "llama_cpp", "llama-cpp-python", "llamacpp"),
    "vllm": BackendInfo("vllm", "unillm.backends.vllm:VLLMBackend", "vllm", "vllm", "vllm"),
    "hf": BackendInfo("hf", "unillm.backends.hf:HFBackend", "transformers", "transformers", "hf"),
    "ollama": BackendInfo("ollama", "unillm.backends.ollama:OllamaBackend", "ollama", "ollama", "ollama"),
}


def _installed_entry_points() -> list[metadata.EntryPoint]:
    """The ``unillm.backends`` entry points of installed distributions. ``python -m`` puts the current
    directory on ``sys.path``, so a ``*.dist-info`` folder in a cloned repository would register an import path
    of its own: distributions found in the current directory are not installed ones, and are skipped."""
    here = os.path.realpath(os.getcwd())
    out = []
    for ep in metadata.entry_points(group="unillm.backends"):
        location = getattr(ep.dist, "_path", None)  # the .dist-info folder (PathDistribution)
        if location is not None and os.path.realpath(os.path.dirname(str(location))) == here:
            continue
        out.append(ep)
    return out


#: The backends unillm ships (what an untrusted project file may name).
BUILTIN = frozenset(BACKENDS)


def backend_info(name: str) -> BackendInfo:
    """The table entry of a backend, looking at the ``unillm.backends`` entry points for others."""
    if name in BACKENDS:
        return BACKENDS[name]
    for ep in _installed_entry_points():
        if ep.name == name:
            module = ep.value.split(":")[0]
            return BackendInfo(name, ep.value, module, ep.dist.name if ep.dist else module, name)
    known = sorted(BACKENDS) + sorted(ep.name for ep in _installed_entry_points())
    raise ConfigError(f"unknown backend {name!r}; known: {', '.join(known)}", key="backend")


def backend_class(name: str, model: str | None = None) -> type[Backend]:
    """Import and return a backend class; :class:`BackendNotInstalledError` if its library is missing."""
    info = backend_info(name)
    module_name, _, cls_name = info.target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except BackendNotInstalledError as exc:
        raise BackendNotInstalledError(exc.backend, exc.package, exc.extra, model) from exc.__cause__
    except ImportError as exc:
        if exc.name is not None and exc.name.split(".")[0] == "unillm":
            raise  # a bug in unillm, not a missing library: say what it is
        raise BackendNotInstalledError(info.name, info.distribution, info.extra, model) from exc
    return getattr(module, cls_name)  # type: ignore[no-any-return]
