"""Resumable steps: each step records a stamp of its inputs, options and outputs; a rerun skips a
step whose stamp matches and whose outputs are still the files it wrote. Files are identified by
content (sha256, cached under device/inode/size/mtime/ctime by xvq.identity, so a 130 GB
checkpoint is hashed once, not per command): weights replaced with their mtime kept are seen.
Stamps are replaced atomically; a damaged one only means the step runs again."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

from xvq import identity, interrupt
from xvq.fsio import atomic_write_text
from xvq.identity import sha256_file  # noqa: F401  (re-exported: package.py hashes with it)


def fingerprint(paths: Iterable[Path]) -> list:
    """[[path, size, sha256], ...] of files and the files inside folders."""
    return identity.files_identity(paths)


def digest(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


class Stamps:
    def __init__(self, folder: Path, force: bool = False):
        self.folder = Path(folder)
        self.force = force
        self.ran: list[str] = []
        self.skipped: list[str] = []
        identity.use_cache(self.cache)

    @property
    def cache(self) -> Path:
        return self.folder / identity.CACHE_NAME

    def _path(self, step: str) -> Path:
        return self.folder / f"{step}.json"

    def _saved(self, step: str) -> dict | None:
        try:
            saved = json.loads(self._path(step).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None     # absent, empty or damaged (an older xvq wrote stamps in place)
        return saved if isinstance(saved, dict) else None

    def fresh(self, step: str, inputs: dict, outputs: Iterable[Path]) -> bool:
        outputs = list(outputs)
        saved = None if self.force else self._saved(step)
        if saved is None or not all(Path(o).exists() for o in outputs):
            return False
        return (saved.get("digest") == digest(inputs)
                and saved.get("outputs") == fingerprint(outputs))

    def record(self, step: str, inputs: dict, outputs: Iterable[Path] = ()) -> None:
        interrupt.check()   # only a step that ran to its end without a signal is stamped
        stamp = {"digest": digest(inputs), "inputs": inputs, "outputs": fingerprint(outputs)}
        atomic_write_text(self._path(step), json.dumps(stamp, indent=1, default=str))
        identity.flush()

    def run(self, step: str, inputs: dict, outputs: list[Path], action) -> bool:
        """Run `action()` unless the step is fresh; returns True when it ran."""
        if self.fresh(step, inputs, outputs):
            self.skipped.append(step)
            return False
        self._path(step).unlink(missing_ok=True)   # outputs about to change: the old stamp is void
        action()
        self.record(step, inputs, outputs)
        self.ran.append(step)
        return True
