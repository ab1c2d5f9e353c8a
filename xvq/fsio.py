"""Atomic outputs: everything is written under a partial name and renamed when complete, so an
interrupted or failed run never leaves a file that looks finished.

A partial is `.<name>.xvq-partial` with a lock file `.<name>.xvq-partial.lock` holding the PID
of its writer. A run killed with SIGKILL cannot clean up, so every later run sweeps the folders
it writes: a partial whose writer is gone (`psutil.pid_exists`, which also works on Windows where
`os.kill(pid, 0)` would terminate the process) is removed. The fixed name also means two runs
writing the same output collide on the lock instead of racing."""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import time
from pathlib import Path
from typing import Iterator

import psutil

from xvq import interrupt
from xvq.errors import XvqError

PARTIAL = ".xvq-partial"
LOCK = ".lock"
_LEGACY = re.compile(r"\.xvq-tmp-(\d+)$")      # earlier versions: .<name>.xvq-tmp-<pid>
# Below this much free space a failed write is reported as a full disk: writers such as numpy's
# tofile or llama.cpp's iostreams lose errno, but the folder's free space tells the story.
NEARLY_FULL = 64 << 20
_live: set[Path] = set()   # partials this process is writing


def partial_path(final: Path) -> Path:
    """The partial name of `final`: hidden, same folder (same filesystem: the rename is atomic)."""
    return final.with_name(f".{final.name}{PARTIAL}")


def lock_path(partial: Path) -> Path:
    return partial.with_name(partial.name + LOCK)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _lock_owner(lock: Path) -> int | None:
    """The PID written in a lock file; None when unreadable (a writer killed mid-write)."""
    try:
        return int(lock.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int | None, since: float | None = None) -> bool:
    """The process exists (and, given the lock's mtime `since`, is not a later process that
    reused a dead writer's PID)."""
    if pid is None or pid <= 0 or not psutil.pid_exists(pid):
        return False
    if since is None:
        return True
    try:
        return psutil.Process(pid).create_time() <= since + 1.0
    except psutil.Error:
        return False


def _lock_alive(lock: Path) -> tuple[int | None, bool]:
    owner = _lock_owner(lock)
    try:
        since = lock.stat().st_mtime
    except OSError:
        return owner, False
    if owner is None:   # created but its PID not written yet (or its writer died right then)
        return None, time.time() - since < 10
    return owner, _alive(owner, since)


def sweep(folder: Path) -> list[Path]:
    """Remove partials (and their locks) in `folder` whose writer process is gone; return them."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    removed = []
    for name in names:
        p = folder / name
        if name.endswith(PARTIAL + LOCK):
            partial = p.with_name(name[:-len(LOCK)])
            if not _lock_alive(p)[1]:
                for q in (partial, p):
                    if q.exists() or q.is_symlink():
                        _remove(q)
                        removed.append(q)
        elif name.endswith(PARTIAL) and not lock_path(p).exists():
            _remove(p)         # a partial without its lock: the lock is created first, removed last
            removed.append(p)
        elif (m := _LEGACY.search(name)) and not _alive(int(m.group(1))):
            _remove(p)
            removed.append(p)
    return removed


def sweep_tree(root: Path) -> list[Path]:
    """`sweep` every folder under root (outputs xvq wrote: a layout's base folder)."""
    if not root.is_dir():
        return []
    removed = sweep(root)
    for dirpath, dirnames, _ in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.endswith(PARTIAL)]
        for d in dirnames:
            removed += sweep(Path(dirpath) / d)
    return removed


def _take_lock(partial: Path) -> Path:
    """Create the lock of `partial` (exclusively); a live owner means another run is writing it."""
    lock = lock_path(partial)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner, alive = _lock_alive(lock)
            if alive and owner != os.getpid():
                final = partial.with_name(partial.name[1:-len(PARTIAL)])
                raise XvqError(f"{final}: another xvq process (PID {owner}) is writing it; "
                               f"wait for it to finish or stop it") from None
            _remove(partial)
            _remove(lock)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        return lock
    raise XvqError(f"{lock}: cannot take the lock; remove the file and retry")


def ensure_writable_dir(folder: Path) -> list[Path]:
    """Create `folder` (and parents) if needed; return the folders created, deepest first."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        remove_empty(missing)
        raise XvqError(f"{folder}: cannot create output folder ({e.strerror}); choose a writable location") from e
    if not os.access(folder, os.W_OK):
        raise XvqError(f"{folder}: output folder is not writable; choose a writable location")
    return missing


def remove_empty(folders: list[Path]) -> None:
    """Remove the folders (deepest first) that are still empty: a failed run leaves no empty tree."""
    for d in folders:
        try:
            d.rmdir()
        except OSError:
            break


def disk_full(e: BaseException | None, folder: Path) -> bool:
    """True when a failure was (most likely) a full disk: ENOSPC/EDQUOT, or the folder's disk has
    almost no space left (errors from C++ streams or numpy carry no errno)."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return True
    try:
        return shutil.disk_usage(folder).free < NEARLY_FULL
    except OSError:
        return False


def require_free(folder: Path, need: int, what: str) -> None:
    """Refuse up front when `folder`'s disk has less than `need` bytes free: for writers that
    end the whole process on a write error (GPTQModel's workers call os._exit) and so cannot
    report a full disk in one line."""
    existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    free = shutil.disk_usage(existing).free
    if free < need:
        raise XvqError(f"{folder}: not enough free disk for {what} (about {_human(need)} needed, {_human(free)} free); "
                       f"free space there (or write somewhere else) and run again")


def _human(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def disk_full_error(final: Path) -> XvqError:
    return XvqError(f"{final}: disk full while writing it; free space in {final.parent} "
                    f"(or write somewhere else) and run again")


@contextlib.contextmanager
def partial_output(final: Path, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield the locked partial path of `final` (a folder when is_dir); on any exception it is
    removed. The caller renames it; the lock is released in every case."""
    created = ensure_writable_dir(final.parent)
    sweep(final.parent)
    tmp = partial_path(final)
    failed = True
    try:
        lock = _take_lock(tmp)
    except BaseException:
        remove_empty(created)
        raise
    _live.add(tmp)
    try:
        _remove(tmp)
        if is_dir:
            tmp.mkdir()
        yield tmp
        failed = False
    except BaseException as e:
        full = not isinstance(e, (KeyboardInterrupt, SystemExit)) and disk_full(e, final.parent)
        with interrupt.shielded():
            _remove(tmp)
        if full:
            raise disk_full_error(final) from e
        raise
    finally:
        with interrupt.shielded():
            _remove(tmp)   # renamed away on success: a no-op then
            _remove(lock)
            _live.discard(tmp)
            if failed:
                remove_empty(created)


def remove_live_partials() -> None:
    """Remove every partial this process has open: an interrupted run's last act, since a worker
    thread still inside llama.cpp may have created its file again after the cleanup."""
    for tmp in list(_live):
        _remove(tmp)
        _remove(lock_path(tmp))


@contextlib.contextmanager
def atomic_output(final: Path | str, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a partial path (file, or folder when is_dir); on success it replaces `final`,
    on any exception it is removed and `final` is left untouched."""
    final = Path(final)
    with partial_output(final, is_dir=is_dir) as tmp:
        yield tmp
        interrupt.check()   # a result finished under a signal is never renamed as complete
        if final.is_dir() and not final.is_symlink():
            # a folder cannot be replaced in one step: move the old one aside (also a partial
            # name, so a kill between the two renames leaves nothing a sweep would not remove)
            old = partial_path(final.with_name(final.name + ".old"))
            _remove(old)
            os.replace(final, old)
            os.replace(tmp, final)
            _remove(old)
        else:
            os.replace(tmp, final)


def atomic_write_text(final: Path | str, text: str) -> Path:
    """A small file (stamp, manifest, cache) replaced in one step, flushed to disk first."""
    final = Path(final)
    with atomic_output(final) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    return final


@contextlib.contextmanager
def scratch_dir(parent: Path, label: str) -> Iterator[Path]:
    """A working folder removed afterwards (and by a later sweep if this process is killed)."""
    with partial_output(parent / label, is_dir=True) as tmp:
        yield tmp
