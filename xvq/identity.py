"""What a file or checkpoint *is*, by content: sha256 of its bytes.

Hashing a 130 GB checkpoint takes minutes, so a file's hash is cached under its
(device, inode, size, mtime_ns, ctime_ns). `cp -p`, `rsync -a` and `tar x` can restore a mtime
but never a ctime (the kernel sets it on every change of the inode), so replaced or edited
weights always miss the cache and are hashed again: a stale artifact cannot pass as fresh.

The cache is a JSON file beside the stamps (`<layout>/.stamps/identity-cache.json`), written when
a step succeeds; within one process every lookup is also kept in memory."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

CACHE_NAME = "identity-cache.json"
MAX_ENTRIES = 20000          # old keys (files since changed) are dropped first
_CHUNK = 8 << 20

_memory: dict[str, str] = {}
_loaded: set[Path] = set()
_pending: dict[Path, dict[str, str]] = {}     # computed, not yet written (see flush)
_default_cache: Path | None = None


def sha256_file(path: Path | str, chunk: int = _CHUNK) -> str:
    h = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def stat_key(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def use_cache(path: Path | str | None) -> None:
    """Make `path` the persistent cache of later lookups that name none (the Stamps folder's)."""
    global _default_cache
    _default_cache = Path(path) if path else None


def _load(cache: Path) -> dict[str, str]:
    try:
        data = json.loads(cache.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}   # absent or damaged: a cache only costs time when lost
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)} if isinstance(data, dict) else {}


def _save(cache: Path, new: dict[str, str]) -> None:
    from xvq.fsio import atomic_write_text
    entries = _load(cache) | new        # merge: another process may have added entries
    if len(entries) > MAX_ENTRIES:
        entries = dict(list(entries.items())[-MAX_ENTRIES:])
    try:
        atomic_write_text(cache, json.dumps(entries, indent=0, sort_keys=False))
    except Exception:
        pass   # an unwritable cache only costs a rehash next time


def file_hash(path: Path | str, cache: Path | str | None = None) -> str:
    """sha256 of a file, from the cache when its (dev, inode, size, mtime, ctime) is known."""
    path = Path(path)
    cache = Path(cache) if cache else _default_cache
    st = path.stat()
    key = stat_key(st)
    if key in _memory:
        return _memory[key]
    if cache is not None and cache not in _loaded:
        _memory.update(_load(cache))     # once per process: one JSON read however many shards
        _loaded.add(cache)
        if key in _memory:
            return _memory[key]
    digest = sha256_file(path)
    if stat_key(path.stat()) != key:      # changed while we read it: do not remember
        return digest
    _memory[key] = digest
    if cache is not None:
        _pending.setdefault(cache, {})[key] = digest
    return digest


def flush() -> None:
    """Write the hashes computed so far into their cache files. Called when a step succeeds
    (Stamps.record), so a failed command leaves no cache behind and a killed one loses at most
    the hashes of the step it was in."""
    while _pending:
        cache, entries = _pending.popitem()
        _save(cache, entries)


def folder_files(folder: Path) -> list[Path]:
    """The files that make up a checkpoint: every visible regular file at its top level."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() != ".gguf")   # a GGUF written beside the weights is output, not input


def source_identity(folder: Path | str, cache: Path | str | None = None) -> str:
    """A checkpoint folder's identity: sha256 over its files' names and contents."""
    folder = Path(folder)
    h = hashlib.sha256()
    for f in folder_files(folder):
        h.update(f"{f.name}\t{file_hash(f, cache)}\n".encode())
    return h.hexdigest()


def files_identity(paths: Iterable[Path], cache: Path | str | None = None) -> list:
    """[[path, size, sha256], ...] for files and every file inside folders (stamp inputs)."""
    out = []
    for p in sorted(Path(x) for x in paths):
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        out += [[str(f), f.stat().st_size, file_hash(f, cache)] for f in files if f.exists()]
    return out
