"""Hugging Face checkpoints as they ship, opened without loading: every tensor is a
`SourceTensor` whose rows are read on demand from a memory map (file-backed pages, not
anonymous memory), so a 65B checkpoint streams through a laptop."""
from __future__ import annotations

import json
import pickle
import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xvq.errors import XvqError, first_words
from xvq.models.base import SourceTensor

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


@dataclass
class Checkpoint:
    folder: Path
    config: dict
    tensors: dict[str, SourceTensor]


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise XvqError(f"{path}: not found; point at a Hugging Face model folder (with config.json)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise XvqError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); restore the original file") from e
    except UnicodeDecodeError:
        raise XvqError(f"{path}: not UTF-8 text (binary?); restore the original config.json") from None
    check_config(config, path)
    return config


# config.json fields every stage reads as sizes (positive integers) or constants (positive numbers)
_SIZE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "max_position_embeddings", "num_experts", "moe_top_k",
                "num_experts_per_tok", "head_dim")
_NUMBER_FIELDS = ("rms_norm_eps", "rope_theta")


def check_config(config, path: Path) -> None:
    """The types the stages rely on, so a hand-edited config fails here in one line rather than
    deep inside a stage."""
    if not isinstance(config, dict):
        raise XvqError(f"{path}: holds a JSON {type(config).__name__}, not an object; "
                       f"restore the config.json that came with the weights")
    for key in _SIZE_FIELDS:
        v = config.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise XvqError(f"{path}: {key} is {v!r}, not a positive integer; "
                           f"restore the config.json that came with the weights")
    for key in _NUMBER_FIELDS:
        v = config.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0):
            raise XvqError(f"{path}: {key} is {v!r}, not a positive number; "
                           f"restore the config.json that came with the weights")
    archs = config.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise XvqError(f"{path}: architectures is {archs!r}, not a list of names; "
                       f"restore the config.json that came with the weights")


def weight_files(folder: Path) -> list[Path]:
    """The checkpoint's shards, from its index when it has one. Repositories that ship both
    formats are read from safetensors (no unpickling, no torch)."""
    for index_name, patterns in (("model.safetensors.index.json", ("model.safetensors", "model-*.safetensors")),
                                 ("pytorch_model.bin.index.json", ("pytorch_model.bin", "pytorch_model-*.bin"))):
        index = folder / index_name
        if index.is_file():
            names = sorted(set(_index_weight_map(index).values()))
            missing = [n for n in names if not (folder / n).is_file()]
            if missing:
                raise XvqError(f"{folder / missing[0]}: named by {index_name} but missing; "
                               f"download every shard ({len(missing)} missing)")
            return [folder / n for n in names]
        for pattern in patterns:
            found = sorted(folder.glob(pattern))
            if found:
                _check_shard_series(folder, found)
                return found
    raise XvqError(f"{folder}: no weights found (model.safetensors, *.safetensors with index, or "
                   f"pytorch_model*.bin); point at the checkpoint folder")


def _index_weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise XvqError(f"{index}: not a valid shard index ({type(e).__name__}); "
                       f"download it again with the shards") from e
    if not isinstance(weight_map, dict):
        raise XvqError(f"{index}: weight_map is not a mapping; download it again with the shards")
    return weight_map


_SHARD_NAME = re.compile(r"^(?P<stem>.+)-(?P<k>\d{5})-of-(?P<n>\d{5})(?P<ext>\..+)$")


def _check_shard_series(folder: Path, found: list[Path]) -> None:
    """Without an index, `NAME-0000k-of-0000n.ext` files still say how many shards there are."""
    m = _SHARD_NAME.match(found[0].name)
    if not m:
        return
    n = int(m["n"])
    expected = [f"{m['stem']}-{k:05d}-of-{n:05d}{m['ext']}" for k in range(1, n + 1)]
    missing = [e for e in expected if not (folder / e).is_file()]
    if missing:
        raise XvqError(f"{folder / missing[0]}: missing ({len(missing)} of {n} shards absent); "
                       f"download every shard")


def _bf16_to_f32(a: np.ndarray) -> np.ndarray:
    return (a.astype(np.uint32) << 16).view(np.float32)


def _row_reader(matrix: np.ndarray, is_bf16: bool):
    def rows(sel):
        block = np.asarray(matrix[sel])
        return _bf16_to_f32(block) if is_bf16 else block.astype(np.float32, copy=False)
    return rows


def safetensors_tensors(path: Path) -> dict[str, SourceTensor]:
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise XvqError(f"{path}: truncated safetensors file (no header); download it again")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise XvqError(f"{path}: truncated safetensors file (header past end); download it again")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise XvqError(f"{path}: corrupt safetensors header ({type(e).__name__}); download it again") from e
    if not isinstance(header, dict):
        raise XvqError(f"{path}: corrupt safetensors header (not a mapping); download it again")
    header.pop("__metadata__", None)
    data_start = 8 + n
    out = {}
    for name, info in header.items():
        dtype = _ST_DTYPES.get(info["dtype"])
        if dtype is None:
            raise XvqError(f"{path}: tensor {name} has dtype {info['dtype']}, which xvq cannot convert; "
                           f"supply an F32, F16 or BF16 checkpoint")
        begin, end = info["data_offsets"]
        if data_start + end > size:
            raise XvqError(f"{path}: truncated (tensor {name} runs past the end of the file); download it again")
        shape = tuple(info["shape"])
        cols = shape[-1] if shape else 1
        count = (end - begin) // np.dtype(dtype).itemsize
        if count != int(np.prod(shape)):
            raise XvqError(f"{path}: corrupt (tensor {name} holds {count} values, its shape {list(shape)} needs "
                           f"{int(np.prod(shape))}); download it again")
        flat = np.memmap(path, dtype=dtype, mode="r", offset=data_start + begin, shape=(count,)) if count else np.zeros(0, dtype)
        matrix = flat.reshape(-1, cols)
        out[name] = SourceTensor(name, shape, info["dtype"], _row_reader(matrix, info["dtype"] == "BF16"),
                                 str(path), raw_rows=lambda sel, m=matrix: np.asarray(m[sel]))
    return out


def load_pickle_state(path: Path, *, mmap: bool = True) -> dict:
    """A PyTorch pickle's state dict, weights only, memory-mapped unless `mmap` is False or the
    file is a legacy pre-zip pickle (PyTorch < 1.6), which torch can only read whole; one-line
    errors for corrupt files and pickles that carry code."""
    import torch
    try:
        return torch.load(path, map_location="cpu", mmap=mmap and zipfile.is_zipfile(path), weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():
            raise XvqError(f"{path}: cannot be read as a PyTorch checkpoint (corrupt pickle); "
                           f"download it again or convert to safetensors") from e
        # a pickle that names code to call: never run, and not a download error
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f" ({found.group(1)})" if found else ""
        raise XvqError(f"{path}: contains code{what} that xvq refused to run (weights-only loading); "
                       f"do not use this file: get the checkpoint from a trusted source, "
                       f"preferably as safetensors") from None
    except Exception as e:  # torch raises several types for truncated / non-zip files
        raise XvqError(f"{path}: cannot be read as a PyTorch checkpoint ({type(e).__name__}: "
                       f"{first_words(str(e))}); download it again or convert to safetensors") from e


def pickle_tensors(path: Path) -> dict[str, SourceTensor]:
    import torch
    state = load_pickle_state(path)
    out = {}
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            continue
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise XvqError(f"{path}: tensor {name} has dtype {t.dtype}, which xvq cannot convert; "
                           f"supply an F32, F16 or BF16 checkpoint")
        matrix = t.reshape(-1, t.shape[-1]) if t.dim() else t.reshape(1, 1)

        def rows(sel, m=matrix):
            if isinstance(sel, np.ndarray):
                sel = torch.from_numpy(sel)
            return m[sel].to(torch.float32).numpy()

        def raw_rows(sel, m=matrix):
            if isinstance(sel, np.ndarray):
                sel = torch.from_numpy(sel)
            block = m[sel]
            return block.view(torch.int16).numpy().view(np.uint16) if block.dtype == torch.bfloat16 else block.numpy()
        out[name] = SourceTensor(name, tuple(t.shape), str(t.dtype).removeprefix("torch."), rows, str(path),
                                 raw_rows=raw_rows)
    return out


def open_checkpoint(folder: Path | str) -> Checkpoint:
    folder = Path(folder)
    if not folder.is_dir():
        raise XvqError(f"{folder}: not a folder; point at a Hugging Face model folder")
    config = read_config(folder)
    tensors: dict[str, SourceTensor] = {}
    for f in weight_files(folder):
        tensors |= safetensors_tensors(f) if f.suffix == ".safetensors" else pickle_tensors(f)
    return Checkpoint(folder, config, tensors)
