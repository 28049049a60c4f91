"""Read models that ``ollama pull`` stored, without the Ollama daemon.

``OLLAMA_MODELS`` (default ``~/.ollama/models``) holds ``manifests/registry.ollama.ai/library/NAME/TAG``: a
JSON manifest whose layers point to ``blobs/sha256-HEX``. The layer of media type
``application/vnd.ollama.image.model`` is the GGUF; ``...params`` (JSON) and ``...system`` (text) hold the
defaults that Ollama applies.

Example:
    >>> from unillm.ollama_store import split_name
    >>> split_name("llama3.1:8b")
    ('registry.ollama.ai', 'library', 'llama3.1', '8b')
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ModelLoadError

MODEL = "application/vnd.ollama.image.model"
PARAMS = "application/vnd.ollama.image.params"
SYSTEM = "application/vnd.ollama.image.system"


def store_root() -> Path:
    return Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models")


def split_name(name: str) -> tuple[str, str, str, str]:
    """``[host/][namespace/]model[:tag]`` as Ollama resolves it."""
    base, _, tag = name.partition(":")
    parts = base.split("/")
    host, namespace = "registry.ollama.ai", "library"
    if len(parts) == 3:
        host, namespace, model = parts
    elif len(parts) == 2:
        namespace, model = parts
    else:
        model = parts[0]
    return host, namespace, model, tag or "latest"


@dataclass
class StoredModel:
    """A model of the local Ollama store: its GGUF, and the defaults Ollama would apply."""

    name: str
    gguf: Path
    digest: str
    params: dict[str, Any] = field(default_factory=dict)
    system: str | None = None


def blob_path(root: Path, digest: str) -> Path:
    return root / "blobs" / digest.replace(":", "-")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def find(name: str, root: Path | None = None, *, verify: bool = True) -> StoredModel:
    """Resolve an Ollama name in the store; raises ModelLoadError naming what is missing or wrong."""
    root = root or store_root()
    host, namespace, model, tag = split_name(name)
    manifest_path = root / "manifests" / host / namespace / model / tag
    if not manifest_path.is_file():
        raise ModelLoadError(name, f"not in the Ollama store {root} (no {manifest_path}); `ollama pull {name}` puts it there")
    try:
        manifest = json.loads(manifest_path.read_text())
        layers = manifest["layers"]
    except (ValueError, KeyError) as exc:
        raise ModelLoadError(name, f"the manifest {manifest_path} is not valid: {exc}") from exc
    by_type = {layer.get("mediaType"): layer for layer in layers}
    if MODEL not in by_type:
        raise ModelLoadError(name, f"the manifest {manifest_path} has no {MODEL} layer")
    digest = by_type[MODEL]["digest"]
    gguf = blob_path(root, digest)
    if not gguf.is_file():
        raise ModelLoadError(name, f"the blob {gguf} named by its manifest is missing")
    if verify:
        actual = "sha256:" + sha256_file(gguf)
        if actual != digest:
            raise ModelLoadError(name, f"the blob {gguf} does not match its manifest: sha256 is {actual}, expected {digest}")
    stored = StoredModel(name, gguf, digest)
    if PARAMS in by_type:
        stored.params = json.loads(blob_path(root, by_type[PARAMS]["digest"]).read_text())
    if SYSTEM in by_type:
        stored.system = blob_path(root, by_type[SYSTEM]["digest"]).read_text()
    return stored


def sampling_defaults(params: dict[str, Any]) -> dict[str, Any]:
    """Ollama's stored parameters that unillm has names for (temperature, top_p, stop, seed, num_predict)."""
    out: dict[str, Any] = {}
    for src, dst in (("temperature", "temperature"), ("top_p", "top_p"), ("seed", "seed"), ("num_predict", "max_tokens")):
        if src in params:
            out[dst] = params[src]
    if "stop" in params:
        stop = params["stop"]
        out["stop"] = [stop] if isinstance(stop, str) else list(stop)
    return out
