"""GGUF files as llama.cpp lays them out: the header without materialising arrays, the shards of a
split file (names from `xvq.layout`), tensor byte sizes."""
from __future__ import annotations

import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from xvq.errors import XvqError
from xvq.layout import gguf_shards

def tensor_nbytes(shape: tuple[int, ...], qtype: int | gguf.GGMLQuantizationType) -> int:
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
    return int(np.prod(shape)) // block * size


def type_bpw(qtype: str | int | gguf.GGMLQuantizationType) -> float:
    """Bits per weight of a ggml type (block bytes * 8 / block elements)."""
    t = gguf.GGMLQuantizationType[qtype] if isinstance(qtype, str) else gguf.GGMLQuantizationType(qtype)
    block, size = gguf.GGML_QUANT_SIZES[t]
    return size * 8 / block


# ---------------------------------------------------------------------------------------------
# The header
# ---------------------------------------------------------------------------------------------

@dataclass
class GgufHeader:
    kv: dict[str, object]                               # scalars and strings (arrays skipped)
    tensors: dict[str, tuple[tuple[int, ...], int]]     # name -> (ggml shape, ggml type)
    data_offset: int = 0                                # where tensor data starts (aligned)


_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


def read_header(path: Path) -> GgufHeader:
    """GGUF metadata and tensor infos without materialising arrays (gguf-py's reader builds every
    vocabulary entry: seconds for a 100k vocabulary, several times per run)."""
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise XvqError(f"{path}: not a GGUF file; give a GGUF (xvq convert MODEL_DIR makes one) or a model folder")
        try:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError as e:
            raise XvqError(f"{path}: damaged GGUF; convert the model again") from e
    pos = 4

    def take(fmt: str):
        nonlocal pos
        v = struct.unpack_from("<" + fmt, mm, pos)
        pos += struct.calcsize("<" + fmt)
        return v[0] if len(v) == 1 else v

    def string() -> str:
        nonlocal pos
        n = take("Q")
        pos += n
        if pos > len(mm):
            raise ValueError("truncated string")
        return bytes(mm[pos - n:pos]).decode("utf-8", "replace")

    def value(vtype: int):
        nonlocal pos
        if vtype in _SCALARS:
            return take(_SCALARS[vtype])
        if vtype == _STRING:
            return string()
        if vtype == _ARRAY:
            etype, count = take("IQ")
            if etype in _SCALARS:
                pos += struct.calcsize("<" + _SCALARS[etype]) * count
            else:
                for _ in range(count):
                    value(etype)
            return None
        raise ValueError(f"unknown value type {vtype}")

    try:
        version, n_tensors, n_kv = take("IQQ")
        if version < 2:
            raise ValueError(f"version {version} is too old")
        kv = {}
        for _ in range(n_kv):
            key = string()
            kv[key] = value(take("I"))
        tensors, data_end = {}, 0
        for _ in range(n_tensors):
            name = string()
            shape = tuple(take("Q") for _ in range(take("I")))
            tensors[name] = (shape, take("I"))
            data_end = max(data_end, take("Q") + _nbytes_or_zero(shape, tensors[name][1]))
        align = int(kv.get("general.alignment") or 32)
        data_offset = pos + (-pos % align)
        size = len(mm)
    except (struct.error, ValueError) as e:
        raise XvqError(f"{path}: damaged GGUF ({e}); convert the model again") from e
    finally:
        mm.close()
    if data_offset + data_end > size:   # llama.cpp would only say "tensor data is not within the file bounds"
        raise XvqError(f"{path}: truncated GGUF ({data_offset + data_end - size:,} bytes of tensor data missing); "
                       f"copy or download it again, or convert the model again")
    return GgufHeader({k: v for k, v in kv.items() if v is not None}, tensors, data_offset)


def _nbytes_or_zero(shape: tuple[int, ...], qtype: int) -> int:
    try:
        return tensor_nbytes(shape, qtype)
    except (KeyError, ValueError):   # a type this gguf-py does not know: llama.cpp will judge the file
        return 0


def other_shards(first: Path, count: int) -> list[Path]:
    """The remaining files of a split GGUF; llama.cpp itself finds them from the first one."""
    if count <= 1:
        return []
    paths = gguf_shards(Path(first))[1:]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise XvqError(f"{first}: split GGUF is missing {', '.join(missing)}; put all shards in one folder")
    return paths


def read_model_header(path: Path | str) -> GgufHeader:
    """The first file's metadata with the tensor infos of every shard."""
    path = Path(path)
    first = read_header(path)
    tensors = dict(first.tensors)
    for shard in other_shards(path, int(first.kv.get("split.count") or 1)):
        tensors |= read_header(shard).tensors
    return GgufHeader(first.kv, tensors, first.data_offset)
