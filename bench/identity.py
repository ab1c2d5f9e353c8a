"""What content identity (xvq.identity) costs: hashing once, and every later lookup.

    .venv/bin/python bench/identity.py                # a 1 GiB checkpoint of 4 shards
    .venv/bin/python bench/identity.py --mib 256      # a quick look

A random checkpoint folder (shards of incompressible bytes, plus config.json) is written to a
temporary folder and read once, so every hash starts from a warm page cache (the throughput of
the hash itself, not of the disk). Measured, each in a fresh process as a command would be:

- coreutils `sha256sum` over the shards: the reference (and the same digests are required);
- the first `source_identity` (every byte hashed, cache written beside the stamps);
- a second `source_identity` in a new process: the cache lookup a rerun pays
  (stat + JSON read, no bytes hashed);
- the lookup after `touch -r` restores the old mtime of one shard (as `cp -p`/`rsync -a` do):
  its ctime changed, so that shard, and only it, is hashed again.

A 130 GB checkpoint costs 130 GB / (first-hash throughput) once; every later command pays the
cached lookup.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CHILD = """
import sys, time
sys.path.insert(0, {root!r})
from xvq.identity import flush, source_identity
t = time.perf_counter()
ident = source_identity({folder!r}, {cache!r})
flush()   # as Stamps.record does when the step that needed the identity succeeds
print(time.perf_counter() - t, ident)
"""


def make_folder(folder: Path, mib: int, shards: int) -> list[Path]:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    files = []
    per = mib // shards
    for k in range(1, shards + 1):
        f = folder / f"model-{k:05d}-of-{shards:05d}.safetensors"
        with open(f, "wb") as out:
            for _ in range(per):
                out.write(os.urandom(1 << 20))
        files.append(f)
    return files


def warm(files: list[Path]) -> None:
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass


def timed_identity(folder: Path, cache: Path) -> tuple[float, float, str]:
    """(wall seconds of the child process, seconds inside source_identity (imports excluded), identity)."""
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT), folder=str(folder), cache=str(cache))],
                         check=True, capture_output=True, text=True).stdout.split()
    return time.perf_counter() - t, float(out[0]), out[1]


def sha256sum(files: list[Path]) -> tuple[float, dict[str, str]]:
    t = time.perf_counter()
    out = subprocess.run(["sha256sum", *map(str, files)], check=True, capture_output=True, text=True).stdout
    return time.perf_counter() - t, {Path(p).name: d for d, p in (ln.split(None, 1) for ln in out.splitlines())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--shards", type=int, default=4)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="xvq-bench-identity-"))
    try:
        folder, cache = tmp / "model", tmp / "stamps" / "identity-cache.json"
        files = make_folder(folder, args.mib, args.shards)
        size = sum(f.stat().st_size for f in files)
        warm(files)
        ref_s, ref = sha256sum(files)
        first_wall, first_s, ident = timed_identity(folder, cache)
        from xvq.identity import _load
        cached = set(_load(cache).values())
        assert set(ref.values()) <= cached, "xvq's sha256 differs from sha256sum's"
        second_wall, second_s, ident2 = timed_identity(folder, cache)
        assert ident2 == ident
        st = files[0].stat()
        with open(files[0], "r+b") as f:    # same size, same mtime, other content: `cp -p` of other weights
            f.write(os.urandom(16))
        os.utime(files[0], ns=(st.st_atime_ns, st.st_mtime_ns))
        warm(files[:1])
        third_wall, third_s, ident3 = timed_identity(folder, cache)
        assert ident3 != ident, "a replaced shard with its mtime restored went unnoticed"
        mb = size / 1e6
        print(f"\n{mb:.0f} MB in {len(files)} shards (warm page cache), {os.cpu_count()} CPUs\n")
        print("| what | seconds | MB/s | vs sha256sum |")
        print("|---|---:|---:|---:|")
        print(f"| coreutils sha256sum (reference) | {ref_s:.3f} | {mb / ref_s:.0f} | 1.00 |")
        print(f"| first source_identity (hash all, write cache) | {first_s:.3f} | {mb / first_s:.0f} | "
              f"{ref_s / first_s:.2f} |")
        print(f"| second lookup, new process (cache hit) | {second_s * 1e3:.2f} ms | - | - |")
        print(f"|   same, whole process incl. Python start | {second_wall:.3f} | - | - |")
        print(f"| one shard replaced, mtime restored (rehash 1/{len(files)}) | {third_s:.3f} | "
              f"{mb / len(files) / third_s:.0f} | - |")
        print(f"\nprojected first hash of a 130 GB checkpoint: {130e3 / (mb / first_s) / 60:.1f} min; "
              f"later lookups: {second_s * 1e3:.1f} ms per {len(files)} shards")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
