"""What unillm keeps in its cache (:func:`unillm.system.cache_root`), and keeping it from growing.

- ``gguf/``: requantized copies of GGUF files (``options.cpu_weights``), named after their source's
  *content* (a SHA-256 prefix), so one file installed in several environments has one copy.
  ``gguf/sources.json`` records each copy's sources and the digests of the files already read (by path, size
  and modification time: a file is hashed once). A copy none of whose sources exists any more (the
  environment that installed it is gone) is pruned when another copy is made, and by ``unillm cache prune``.
- ``converted/NAME``: GGUF models converted to safetensors folders for vLLM and transformers (``unillm
  convert``); listed, never pruned (``unillm convert`` makes them on purpose).
- ``ollama-verified.json``: the Ollama blobs whose digests were checked.

Example:
    >>> sorted(CacheEntry("gguf/a.gguf", 2**20, [], False).to_dict())
    ['kept', 'path', 'size', 'sources']
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .system import cache_root

#: A copy younger than this is never pruned: another process may be making it, or about to record it.
GRACE_S = 600


def gguf_dir() -> Path:
    return cache_root() / "gguf"


def _index_path() -> Path:
    return gguf_dir() / "sources.json"


def _read_index() -> dict[str, Any]:
    try:
        data = json.loads(_index_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"digests": {}, "copies": {}}
    if not isinstance(data, dict):
        return {"digests": {}, "copies": {}}
    data.setdefault("digests", {})
    data.setdefault("copies", {})
    return data


def _write_index(data: dict[str, Any]) -> None:
    path = _index_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _stamp(path: str) -> str:
    st = os.stat(path)
    return f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}"


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a file's content, read 4 MiB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def content_digest(path: str) -> str:
    """The SHA-256 of a file's content, computed once per (path, size, modification time)."""
    stamp = _stamp(path)
    index = _read_index()
    known = index["digests"].get(stamp)
    if isinstance(known, str):
        return known
    digest = sha256_file(path)
    index = _read_index()  # again: another process may have written it meanwhile
    index["digests"] = {k: v for k, v in index["digests"].items() if not k.startswith(os.path.abspath(path) + "|")}
    index["digests"][stamp] = digest
    with contextlib.suppress(OSError):
        _write_index(index)
    return digest


def copy_path(source: str, target: str) -> Path:
    """Where the ``target`` (``q8_0``...) copy of ``source`` is kept: named by the source's content."""
    stem = os.path.basename(source).removesuffix(".gguf")
    return gguf_dir() / f"{stem}.{content_digest(source)[:16]}.{target}.gguf"


def record_source(copy: Path, source: str) -> None:
    """Note that ``source`` is a source of ``copy`` (what keeps the copy from being pruned)."""
    index = _read_index()
    sources = index["copies"].setdefault(copy.name, [])
    if os.path.abspath(source) not in sources:
        sources.append(os.path.abspath(source))
        with contextlib.suppress(OSError):
            _write_index(index)


@dataclass
class CacheEntry:
    """One thing in the cache: its path (relative to the cache root), size in bytes, its sources (for a
    GGUF copy) and whether pruning keeps it."""

    path: str
    size: int
    sources: list[str]
    kept: bool

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def entries() -> list[CacheEntry]:
    """Everything in the cache, with what :func:`prune` would do to each."""
    root = cache_root()
    out: list[CacheEntry] = []
    index = _read_index()
    if gguf_dir().is_dir():
        now = time.time()
        for p in sorted(gguf_dir().glob("*.gguf")):
            sources = list(index["copies"].get(p.name, []))
            young = now - p.stat().st_mtime < GRACE_S
            out.append(CacheEntry(str(p.relative_to(root)), p.stat().st_size, sources,
                                  young or any(os.path.exists(s) for s in sources)))
    converted = root / "converted"
    if converted.is_dir():
        for p in sorted(converted.iterdir()):
            out.append(CacheEntry(str(p.relative_to(root)), _size(p), [], True))
    return out


def prune() -> list[CacheEntry]:
    """Remove the GGUF copies that no source of which exists (and that are not being made): the removed."""
    removed = [e for e in entries() if not e.kept]
    index = _read_index()
    for e in removed:
        with contextlib.suppress(OSError):
            (cache_root() / e.path).unlink()
        index["copies"].pop(Path(e.path).name, None)
    index["digests"] = {k: v for k, v in index["digests"].items() if os.path.exists(k.rsplit("|", 2)[0])}
    if removed or index != _read_index():
        with contextlib.suppress(OSError):
            _write_index(index)
    return removed
