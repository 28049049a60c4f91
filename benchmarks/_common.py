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
    return str(resolve_file(Registry.load().get("smollm2")))


def direct_llama(n_ctx: int = 2048):
    """A llama_cpp.Llama with the settings unillm's backend uses for the embedded model."""
    import llama_cpp

    threads = default_threads()
    return llama_cpp.Llama(
        model_path=smollm2_path(), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
        n_gpu_layers=-1 if llama_cpp.llama_supports_gpu_offload() else 0, flash_attn=False,
        chat_format="chat_template.default", verbose=False,
    )


def med(xs: list[float]) -> float:
    return statistics.median(xs)
