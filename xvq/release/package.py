"""The package that goes public: files under the layout's names, big GGUFs split in llama.cpp's
shard format, SHA256SUMS, manifest.json, and a verify that re-checks all of it."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import gguf
import numpy as np

from xvq.errors import XvqError
from xvq.layout import is_first_gguf
from xvq.stamps import sha256_file

SUMS = "SHA256SUMS"
MANIFEST = "manifest.json"


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard links cost no space and no time; copy where the filesystem refuses."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def copy_tree(src: Path, dst: Path) -> None:
    for f in sorted(src.rglob("*")):
        if f.is_file():
            link_or_copy(f, dst / f.relative_to(src))


def _copy_kv(reader: gguf.GGUFReader, writer: gguf.GGUFWriter) -> None:
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key.startswith("split.") or key == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)


def split_gguf(src: Path, dst: Path, max_bytes: int) -> list[Path]:
    """Rewrite `src` as dst-0000k-of-0000n.gguf shards of at most max_bytes of tensor data
    (llama.cpp loads the first shard and finds the rest). Tensor bytes are copied as they are."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(None, arch, split_max_size=max_bytes)
    _copy_kv(reader, writer)
    for t in reader.tensors:   # element shape + raw type: the bytes are copied, never converted
        writer.add_tensor_info(t.name, tuple(reversed([int(x) for x in t.shape])), np.dtype(np.float32),
                               int(t.n_bytes), raw_dtype=t.tensor_type)
    writer.write_header_to_file(dst)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        writer.write_tensor_data(t.data)
    writer.close()
    return writer.format_shard_names(dst)


def place_gguf(src: Path, folder: Path, max_bytes: int) -> list[Path]:
    if max_bytes and src.stat().st_size > max_bytes:
        return split_gguf(src, folder / src.name, max_bytes)
    link_or_copy(src, folder / src.name)
    return [folder / src.name]


def write_sums(root: Path) -> Path:
    files = sorted(f for f in root.rglob("*") if f.is_file() and f.name != SUMS)
    lines = [f"{sha256_file(f)}  {f.relative_to(root).as_posix()}" for f in files]
    (root / SUMS).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root / SUMS


def write_manifest(root: Path, meta: dict) -> Path:
    sums = dict(reversed(line.split("  ", 1)) for line in (root / SUMS).read_text().splitlines() if line)
    files = [{"path": rel, "size": (root / rel).stat().st_size, "sha256": digest} for rel, digest in sorted(sums.items())]
    (root / MANIFEST).write_text(json.dumps(meta | {"files": files}, indent=2, ensure_ascii=False), encoding="utf-8")
    return root / MANIFEST


def first_shards(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.gguf") if is_first_gguf(p))


def verify(root: Path, load: bool = True) -> list[str]:
    """Problems found (empty when the package is sound): sums, then every GGUF loads in llama.cpp."""
    root = Path(root)
    sums = root / SUMS
    if not sums.is_file():
        raise XvqError(f"{sums}: missing; is {root} a package made by `xvq release`?")
    problems = []
    for line in sums.read_text().splitlines():
        digest, rel = line.split("  ", 1)
        f = root / rel
        if not f.is_file():
            problems.append(f"{rel}: missing")
        elif sha256_file(f) != digest:
            problems.append(f"{rel}: sha256 differs from {SUMS}")
    if load:
        for p in first_shards(root):
            if any(p.relative_to(root).as_posix() in pr for pr in problems):
                continue
            from xvq.llamacpp import loads
            complaint = loads(p)
            if complaint:
                problems.append(f"{p.relative_to(root)}: llama.cpp cannot load it ({complaint})")
    return problems
