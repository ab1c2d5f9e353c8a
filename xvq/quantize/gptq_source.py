"""The folder GPTQModel reads the source weights from, without a copy of XVERSE's pickle shards.

GPTQModel keeps the model on the meta device and reads each layer's tensors when it gets to them,
through safetensors' `safe_open` on the files the folder's `model.safetensors.index.json` names
(its LazyTurtle); for pickle shards it would first re-write the whole checkpoint as safetensors
(130 GB more for XVERSE-65B). PyTorch's zip pickles can be memory-mapped just as well
(`torch.load(mmap=True)`), so xvq gives GPTQModel an index that names the pickle shards themselves
(linked, not copied, into a work folder) and answers `safe_open` for them: no staged copy, nothing
held but the pages being read. A legacy (pre-zip) pickle cannot be mapped, and a file system that
links neither way leaves nothing to point at: those are staged as safetensors, shard by shard.
"""
from __future__ import annotations

import importlib
import json
import os
import shutil
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from xvq.checkpoint import load_pickle_state, weight_files
from xvq.fsio import require_free

# The GPTQModel modules that open source shards (each imported safe_open by name).
SAFE_OPEN_USERS = ("gptqmodel.utils.structure", "gptqmodel.models.writer", "gptqmodel.utils.model")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


def has_safetensors(model_dir: Path) -> bool:
    return all(f.suffix == ".safetensors" for f in weight_files(model_dir))


def mappable(model_dir: Path) -> bool:
    """Every shard is safetensors or a zip pickle (what torch.save has written since PyTorch 1.6)."""
    return all(f.suffix == ".safetensors" or zipfile.is_zipfile(f) for f in weight_files(model_dir))


def staged_bytes(model_dir: Path) -> int:
    """Extra disk the source needs while GPTQModel reads it: none unless a legacy pickle is staged."""
    return 0 if mappable(model_dir) else sum(f.stat().st_size for f in weight_files(model_dir))


class PickleShard:
    """What GPTQModel uses of a safetensors handle, for one memory-mapped pickle shard."""

    def __init__(self, path: Path):
        import torch
        self.tensors = {k: v for k, v in load_pickle_state(path).items() if isinstance(v, torch.Tensor)}

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        return False

    def keys(self) -> list[str]:
        return list(self.tensors)

    def get_tensor(self, name: str):
        return self.tensors[name]

    def metadata(self) -> dict:
        return {"format": "pt"}


@contextmanager
def gptq_readable(model_dir: Path, work: Path) -> Iterator[Path]:
    """The folder to hand GPTQModel while this context is open (the source itself for safetensors)."""
    if has_safetensors(model_dir):
        yield model_dir
        return
    opened: dict[Path, PickleShard] = {}   # by the shard's real path; kept open for the run
    folder = linked_pickle_shards(model_dir, work / "source", opened) if mappable(model_dir) else None
    if folder is None:
        require_free(work, sum(f.stat().st_size for f in weight_files(model_dir)), f"staging {model_dir} as safetensors")
        yield stage_as_safetensors(model_dir, work / "stage")
        return
    with pickle_shards_open_as_safetensors(opened):
        yield folder


def linked_pickle_shards(model_dir: Path, folder: Path, opened: dict[Path, PickleShard]) -> Path | None:
    """A folder with links to the pickle shards and an index naming them (GPTQModel also sizes
    the source by the weight files it finds there); None where the file system links neither way
    (Windows without symlink rights, the work folder on another drive): then the shards are staged.
    The shards opened to list their tensors go into `opened`, for GPTQModel's reads."""
    carry_side_files(model_dir, folder)
    index = {}
    for shard in weight_files(model_dir):
        real = shard.resolve()
        if not link(real, folder / shard.name):
            shutil.rmtree(folder)
            return None
        opened[real] = PickleShard(shard)   # errors name the path the user gave
        index |= dict.fromkeys(opened[real].keys(), shard.name)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    return folder


def link(target: Path, name: Path) -> bool:
    for make in (os.symlink, os.link):
        try:
            make(target, name)
            return True
        except (OSError, NotImplementedError):
            continue
    return False


@contextmanager
def pickle_shards_open_as_safetensors(opened: dict[Path, PickleShard]) -> Iterator[None]:
    originals = {name: importlib.import_module(name).safe_open for name in SAFE_OPEN_USERS}

    def safe_open(path, framework="pt", device="cpu", **kw):
        if str(path).endswith(PICKLE_SUFFIXES):
            real = Path(path).resolve()   # GPTQModel opens the links
            if real not in opened:
                opened[real] = PickleShard(real)
            return opened[real]
        return originals[SAFE_OPEN_USERS[0]](path, framework=framework, device=device, **kw)

    for name in SAFE_OPEN_USERS:
        importlib.import_module(name).safe_open = safe_open
    try:
        yield
    finally:
        for name, original in originals.items():
            importlib.import_module(name).safe_open = original
        opened.clear()


def carry_side_files(model_dir: Path, folder: Path) -> Path:
    """config, tokenizer and remote code: what GPTQModel reads besides the weights."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = set(weight_files(model_dir))
    for f in model_dir.iterdir():
        if f.is_file() and f not in weights and not f.name.endswith(".index.json"):
            shutil.copy2(f, folder / f.name)
    return folder


def stage_as_safetensors(model_dir: Path, stage: Path) -> Path:
    """A copy with every pickle shard re-written as one safetensors shard, shard by shard."""
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm
    carry_side_files(model_dir, stage)
    weight_map, total = {}, 0
    for src in tqdm(weight_files(model_dir), desc="staging safetensors", unit="shard"):
        state = load_pickle_state(src, mmap=zipfile.is_zipfile(src))   # a legacy pickle cannot be mapped
        name = src.with_suffix(".safetensors").name.replace("pytorch_model", "model")
        tensors = {k: v.contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}
        save_file(tensors, stage / name, metadata={"format": "pt"})
        weight_map |= {k: name for k in tensors}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del state, tensors
    (stage / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return stage
