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

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ModelLoadError
from .cache import sha256_file
from .system import cache_root

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


_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def blob_path(root: Path, digest: Any, name: str = "") -> Path:
    """The blob of a layer digest; only ``sha256:`` and 64 hex digits (a digest is used in a path)."""
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise ModelLoadError(name or "?", f"the manifest names a layer digest {digest!r}, which is not sha256:<64 hex digits>")
    return root / "blobs" / digest.replace(":", "-")


def _verified_cache() -> Path:
    return cache_root() / "ollama-verified.json"


def verify_blob(path: Path, digest: str, name: str) -> None:
    """Check a blob against its digest. A multi-GB GGUF is hashed once: the result is cached, keyed by the
    file's path, size and mtime, so a changed file is hashed again."""
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    cache = _verified_cache()
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if known.get(key) == digest:
        return
    actual = "sha256:" + sha256_file(path)
    if actual != digest:
        raise ModelLoadError(name, f"the blob {path} does not match its manifest: sha256 is {actual}, expected {digest}")
    known[key] = digest
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known))
        os.replace(tmp, cache)
    except OSError:
        pass  # a read-only cache only costs the hash next time


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
    blobs = {}
    for media in (MODEL, PARAMS, SYSTEM):
        if media in by_type:
            digest = by_type[media].get("digest")
            path = blob_path(root, digest, name)
            if not path.is_file():
                raise ModelLoadError(name, f"the blob {path} named by its manifest is missing")
            if verify:
                verify_blob(path, digest, name)
            blobs[media] = path
    stored = StoredModel(name, blobs[MODEL], by_type[MODEL]["digest"])
    try:
        if PARAMS in blobs:
            stored.params = json.loads(blobs[PARAMS].read_text())
        if SYSTEM in blobs:
            stored.system = blobs[SYSTEM].read_text()
    except (OSError, ValueError) as exc:
        raise ModelLoadError(name, f"the stored parameters or system prompt cannot be read: {exc}") from exc
    return stored


def sampling_defaults(params: dict[str, Any]) -> dict[str, Any]:
    """Ollama's stored parameters that unillm has names for (temperature, top_p, stop, seed, num_predict), in
    unillm's conventions: ``num_predict`` -1 ("no limit") and -2 ("fill the context") leave max_tokens unset,
    so the answer may use what the context window leaves; a negative seed (Ollama's "random") is no seed."""
    out: dict[str, Any] = {}
    for src, dst in (("temperature", "temperature"), ("top_p", "top_p"), ("seed", "seed"), ("num_predict", "max_tokens")):
        if src in params:
            out[dst] = params[src]
    if isinstance(out.get("max_tokens"), int) and out["max_tokens"] < 0:
        del out["max_tokens"]
    if isinstance(out.get("seed"), int) and out["seed"] < 0:
        del out["seed"]
    if "stop" in params:
        stop = params["stop"]
        out["stop"] = [stop] if isinstance(stop, str) else list(stop)
    return out
