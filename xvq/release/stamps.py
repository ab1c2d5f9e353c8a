"""Resumable steps: each step records a stamp of its inputs and options; a rerun skips a step
whose stamp matches and whose outputs still exist. Files are fingerprinted by size and mtime
(hashing a 130 GB checkpoint on every rerun would cost minutes); the package's SHA256SUMS
are the real hashes."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable


def fingerprint(paths: Iterable[Path]) -> list:
    out = []
    for p in sorted(Path(x) for x in paths):
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        out += [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.exists()]
    return out


def digest(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


class Stamps:
    def __init__(self, folder: Path, force: bool = False):
        self.folder = folder
        self.force = force
        self.ran: list[str] = []
        self.skipped: list[str] = []

    def _path(self, step: str) -> Path:
        return self.folder / f"{step}.json"

    def fresh(self, step: str, inputs: dict, outputs: Iterable[Path]) -> bool:
        p = self._path(step)
        if self.force or not p.is_file() or not all(Path(o).exists() for o in outputs):
            return False
        return json.loads(p.read_text()).get("digest") == digest(inputs)

    def record(self, step: str, inputs: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._path(step).write_text(json.dumps({"digest": digest(inputs), "inputs": inputs}, indent=1, default=str))

    def run(self, step: str, inputs: dict, outputs: list[Path], action) -> bool:
        """Run `action()` unless the step is fresh; returns True when it ran."""
        if self.fresh(step, inputs, outputs):
            self.skipped.append(step)
            return False
        action()
        self.record(step, inputs)
        self.ran.append(step)
        return True


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
