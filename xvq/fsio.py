"""Atomic outputs: everything is written under a temporary name and renamed when complete,
so an interrupted or failed run never leaves a file that looks finished."""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from xvq.errors import XvqError

TMP_MARK = ".xvq-tmp"


def temp_sibling(final: Path) -> Path:
    """A hidden name in the same folder (same filesystem, so the rename is atomic)."""
    return final.with_name(f".{final.name}{TMP_MARK}-{os.getpid()}")


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def ensure_writable_dir(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise XvqError(f"{folder}: cannot create output folder ({e.strerror}); choose a writable location") from e
    if not os.access(folder, os.W_OK):
        raise XvqError(f"{folder}: output folder is not writable; choose a writable location")


@contextlib.contextmanager
def atomic_output(final: Path | str, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path (file, or folder when is_dir); on success it replaces `final`,
    on any exception it is removed and `final` is left untouched."""
    final = Path(final)
    ensure_writable_dir(final.parent)
    tmp = temp_sibling(final)
    _remove(tmp)
    if is_dir:
        tmp.mkdir()
    try:
        yield tmp
    except BaseException as e:
        _remove(tmp)
        if isinstance(e, OSError) and e.errno == 28:
            raise XvqError(f"{final}: disk full while writing; free space or choose another --outdir") from e
        raise
    if final.exists() and final.is_dir():
        shutil.rmtree(final)
    os.replace(tmp, final)


@contextlib.contextmanager
def atomic_files(finals: list[Path]) -> Iterator[list[Path]]:
    """Like atomic_output for several files that only make sense together (GGUF shards)."""
    with contextlib.ExitStack() as stack:
        tmps = [stack.enter_context(atomic_output(f)) for f in finals]
        yield tmps
