"""Turn a registry GGUF into a safetensors folder for the vLLM and transformers backends, once.

transformers dequantizes the GGUF (needs ``gguf`` and ``accelerate``); the result is saved in bf16 under
``$UNILLM_CACHE`` (default ``~/.cache/unillm``)``/converted/NAME`` and reused from then on. A registry entry
points at it with ``source: {gguf_of: NAME}``; ``unillm convert NAME`` makes it ahead of time.

Example:
    >>> from unillm.convert import converted_dir
    >>> converted_dir("smollm2").name
    'smollm2'
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .errors import BackendNotInstalledError, ModelLoadError
from .registry import ModelSpec, Registry, resolve_file
from .system import cache_root


def converted_dir(name: str) -> Path:
    return cache_root() / "converted" / name


def is_converted(name: str) -> bool:
    return (converted_dir(name) / "config.json").is_file()


def convert_gguf(name: str, registry: Registry | None = None, dtype: str = "bfloat16") -> Path:
    """The safetensors folder of registry model ``name`` (a GGUF), converting it the first time."""
    out = converted_dir(name)
    if is_converted(name):
        return out
    spec = (registry or Registry.load()).get(name)
    gguf = resolve_file(spec)
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise BackendNotInstalledError("hf", "transformers", "hf", name) from exc
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=getattr(torch, dtype))
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds here
        raise ModelLoadError(name, f"transformers could not read {gguf}: {exc}") from exc
    # The loaded model remembers the GGUF quantizer; saved with it, the folder would claim to be quantized.
    model.hf_quantizer = None  # type: ignore[assignment]
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{name}-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if out.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            tmp.rename(out)  # atomic: a half-written folder is never taken for a finished one
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def model_folder(spec: ModelSpec) -> Path:
    """The safetensors folder of an hf/vllm entry (converting a GGUF the first time for ``gguf_of``)."""
    src = spec.source
    if src.gguf_of:
        return convert_gguf(src.gguf_of)
    if src.path:
        p = Path(os.path.expandvars(src.path)).expanduser()
        if not (p / "config.json").is_file():
            raise ModelLoadError(spec.name, f"{p} is not a model folder (no config.json)")
        return p
    raise ModelLoadError(spec.name, f"the {spec.backend} backend cannot load {src.describe()} from a local folder")
