"""Delta weights (Ziya-LLaMA's way of publishing a LLaMA fine-tune): merge them onto the base,
make them from a fine-tune, verify a merge.

The published procedure, reproduced bit for bit but streamed: for every tensor of equal shape,
target = base.to(delta.dtype) + delta, computed in the delta's dtype; vocabulary tensors whose
rows differ (an extended vocabulary: embed_tokens, lm_head) are the delta's as they are; buffers
the family skips (rotary inv_freq) are dropped; config and tokenizer are the delta's.

Memory stays near one row block, not two models: both inputs are memory-mapped, the output
safetensors headers are planned up front and each tensor's bytes are written as they are computed.
"""
from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
from tqdm import tqdm

from xvq.checkpoint import Checkpoint, open_checkpoint, weight_files
from xvq.errors import XvqError
from xvq.fsio import atomic_output
from xvq.models import SourceTensor, family_for

if TYPE_CHECKING:
    import torch

# safetensors dtype name -> numpy storage dtype (bfloat16 is kept as its uint16 bits)
STORAGE = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}
_CANONICAL = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64",
              "F32": "F32", "F16": "F16", "BF16": "BF16", "F64": "F64"}
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_SHARD_SIZE = "2GB"
BLOCK_BYTES = 16 << 20  # output bytes computed at once (bench: ~35 MB added at the peak)


def st_dtype(src: SourceTensor) -> str:
    """The tensor's dtype as safetensors names it, whichever format it was read from."""
    try:
        return _CANONICAL[src.dtype]
    except KeyError:
        raise XvqError(f"{src.file}: tensor {src.name} has dtype {src.dtype}; delta merging needs "
                       f"F32, F16 or BF16 weights") from None


# --- arithmetic: torch's own kernels on storage rows, so results are the published script's bit for bit ---

def as_torch(block: np.ndarray, dtype: str) -> "torch.Tensor":
    """Storage rows (bfloat16 as uint16 bits) -> a torch tensor sharing their memory."""
    import torch
    with warnings.catch_warnings():  # read-only memory maps: nothing writes through this view
        warnings.simplefilter("ignore", UserWarning)
        if dtype == "BF16":
            return torch.from_numpy(block.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(block)


def as_storage(t: "torch.Tensor") -> np.ndarray:
    import torch
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()


def combine(first: np.ndarray, first_dtype: str, second: np.ndarray, second_dtype: str, op: str) -> np.ndarray:
    """`first op second.to(first's dtype)` in first's dtype, exactly as torch computes it."""
    a = as_torch(first, first_dtype)
    b = as_torch(second, second_dtype).to(a.dtype)
    return as_storage(a + b if op == "add" else a - b)


# --- planning: which tensor comes from where ---

@dataclass
class Step:
    """One output tensor: `first op second.to(first's dtype)`, or `first` as it is (op None)."""
    name: str
    first: SourceTensor          # the delta (apply) or the target (make): its dtype is the output's
    second: SourceTensor | None  # the base, when combined
    op: str | None               # "add" | "sub" | None

    @property
    def dtype(self) -> str:
        return st_dtype(self.first)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.first.shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(STORAGE[self.dtype]).itemsize

    def blocks(self) -> Iterator[np.ndarray]:
        """The output's rows in storage dtype, a block at a time."""
        n_rows, cols = self.first.n_rows, (self.shape[-1] if self.shape else 1)
        per = max(1, BLOCK_BYTES // max(1, cols * np.dtype(STORAGE[self.dtype]).itemsize))
        for start in range(0, n_rows, per):
            sel = slice(start, min(n_rows, start + per))
            out = raw(self.first, sel)
            if self.op is not None:
                out = combine(out, self.dtype, raw(self.second, sel), st_dtype(self.second), self.op)
            yield np.ascontiguousarray(out)


def raw(src: SourceTensor, sel) -> np.ndarray:
    if src.raw_rows is None:
        raise XvqError(f"{src.file}: tensor {src.name} cannot be read in its stored dtype; "
                       f"convert the checkpoint to safetensors")
    return src.raw_rows(sel)


def is_vocab_tensor(shape_a, shape_b, vocab_a, vocab_b) -> bool:
    """Rows indexed by token id on both sides: differing row counts are an extended vocabulary.
    (Some early LLaMA conversions carry vocab_size -1; then the base's rows are taken as they are.)"""
    base_ok = shape_b[0] == vocab_b if isinstance(vocab_b, int) and vocab_b > 0 else True
    return (len(shape_a) == len(shape_b) > 0 and tuple(shape_a[1:]) == tuple(shape_b[1:])
            and shape_a[0] == vocab_a and base_ok)


def plan(outer: Checkpoint, base: Checkpoint, op: str, outer_role: str) -> list[Step]:
    """Pair `outer` (delta or target) with `base` tensor by tensor, checking names and shapes first,
    so a mismatch stops the run before anything is written."""
    fam = family_for(outer.config, str(outer.folder / "config.json"))
    keep = lambda t: {n: s for n, s in t.items() if not fam.skip_tensor(n)}  # noqa: E731
    mine, theirs = keep(outer.tensors), keep(base.tensors)
    for name in sorted(mine.keys() - theirs.keys()):
        raise XvqError(f"{mine[name].file}: tensor {name} of the {outer_role} is not in the base "
                       f"({base.folder}); use the base model the {outer_role} was made against")
    for name in sorted(theirs.keys() - mine.keys()):
        raise XvqError(f"{theirs[name].file}: tensor {name} of the base is missing from the {outer_role} "
                       f"({outer.folder}); use the base model the {outer_role} was made against")
    vocab_outer, vocab_base = outer.config.get("vocab_size", -1), base.config.get("vocab_size", -1)
    steps = []
    for name, t in mine.items():
        b = theirs[name]
        st_dtype(t), st_dtype(b)  # unsupported dtypes stop here, before anything is written
        if tuple(t.shape) == tuple(b.shape):
            steps.append(Step(name, t, b, op))
        elif is_vocab_tensor(t.shape, b.shape, vocab_outer, vocab_base):
            steps.append(Step(name, t, None, None))
        else:
            raise XvqError(f"{t.file}: tensor {name} has shape {list(t.shape)} in the {outer_role} but "
                           f"{list(b.shape)} in the base ({b.file}); use the base model the {outer_role} "
                           f"was made against")
    return steps


# --- writing: safetensors shards planned up front, data streamed ---

def shard_groups(steps: list[Step], max_bytes: int) -> list[list[Step]]:
    groups: list[list[Step]] = [[]]
    size = 0
    for s in steps:
        if groups[-1] and max_bytes and size + s.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(s)
        size += s.nbytes
    return groups


def safetensors_header(steps: list[Step]) -> bytes:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for s in steps:
        header[s.name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # data starts 8-byte aligned, as safetensors writes it
    return len(text).to_bytes(8, "little") + text


def write_shards(steps: list[Step], folder: Path, max_bytes: int, desc: str) -> None:
    groups = shard_groups(steps, max_bytes)
    names = [f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors" for k in range(len(groups))]
    weight_map = {}
    with tqdm(total=sum(s.nbytes for s in steps), desc=desc, unit="B", unit_scale=True, leave=False) as bar:
        for fname, group in zip(names, groups):
            with (folder / fname).open("wb") as f:
                f.write(safetensors_header(group))
                for s in group:
                    bar.set_postfix_str(s.name, refresh=False)
                    for block in s.blocks():
                        f.write(block.data)  # the block's own buffer, no copy
                        bar.update(block.nbytes)
                    weight_map[s.name] = fname
    index = {"metadata": {"total_size": sum(s.nbytes for s in steps)}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def non_weight_files(folder: Path) -> list[Path]:
    """config, generation config, tokenizer files...: everything but the weights and their index."""
    weights = set(weight_files(folder))
    skip = {INDEX_NAME, "pytorch_model.bin.index.json"}
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p not in weights and p.name not in skip and not p.name.startswith("."))


def _write_model(steps: list[Step], files_from: Path, outdir: Path, shard_size: str | int, desc: str) -> Path:
    from xvq.units import parse_size
    max_bytes = parse_size(shard_size, "--shard-size")
    outdir = Path(outdir)
    if outdir.exists() and (not outdir.is_dir() or any(outdir.iterdir())):
        raise XvqError(f"{outdir}: already exists and is not empty; remove it or choose another --outdir")
    with atomic_output(outdir, is_dir=True) as tmp:
        for p in non_weight_files(files_from):
            shutil.copy2(p, tmp / p.name)
        write_shards(steps, tmp, max_bytes, desc)
    return outdir


def _open_pair(a: Path | str, b: Path | str) -> tuple[Checkpoint, Checkpoint]:
    a, b = open_checkpoint(a), open_checkpoint(b)
    if a.folder.resolve() == b.folder.resolve():
        raise XvqError(f"{a.folder}: given as both models; point --base at the original LLaMA")
    return a, b


# --- the three operations ---

def apply_delta(base: Path | str, delta: Path | str, outdir: Path | str, *,
                shard_size: str | int = DEFAULT_SHARD_SIZE) -> Path:
    """Merge `delta` onto `base` (the published procedure) into `outdir`: sharded safetensors,
    index, and the delta's config and tokenizer."""
    d, b = _open_pair(delta, base)
    steps = plan(d, b, "add", "delta")
    return _write_model(steps, d.folder, Path(outdir), shard_size, "delta apply")


def make_delta(base: Path | str, target: Path | str, outdir: Path | str, *,
               shard_size: str | int = DEFAULT_SHARD_SIZE) -> Path:
    """The inverse: delta = target - base.to(target's dtype) for equal shapes, extended vocab
    tensors whole; the target's config and tokenizer."""
    t, b = _open_pair(target, base)
    steps = plan(t, b, "sub", "target")
    return _write_model(steps, t.folder, Path(outdir), shard_size, "delta make")


@dataclass
class Mismatch:
    name: str      # a tensor name, or a file name when kind == "file"
    reason: str
    kind: str = "tensor"


def check_merge(base: Path | str, delta: Path | str, merged: Path | str) -> list[Mismatch]:
    """Every tensor of `merged` equals base + delta bit for bit (same names, dtypes, shapes), and
    its config and tokenizer files are the delta's. Returns what differs (empty: verified)."""
    d, b = _open_pair(delta, base)
    m = open_checkpoint(merged)
    steps = plan(d, b, "add", "delta")
    fam = family_for(m.config, str(m.folder / "config.json"))
    got = {n: t for n, t in m.tensors.items() if not fam.skip_tensor(n)}
    bad = [Mismatch(n, "not in base + delta") for n in sorted(got.keys() - {s.name for s in steps})]
    for s in tqdm(steps, desc="delta check", leave=False):
        t = got.get(s.name)
        if t is None:
            bad.append(Mismatch(s.name, "missing"))
        elif (st_dtype(t), tuple(t.shape)) != (s.dtype, s.shape):
            bad.append(Mismatch(s.name, f"{st_dtype(t)} {list(t.shape)}, expected {s.dtype} {list(s.shape)}"))
        else:
            differing = count_differing(s, t)
            if differing:
                bad.append(Mismatch(s.name, f"{differing} of {int(np.prod(s.shape))} values differ"))
    for p in non_weight_files(d.folder):
        q = m.folder / p.name
        if not q.is_file():
            bad.append(Mismatch(p.name, "missing (the delta's file)", "file"))
        elif p.name == "config.json":
            if json.loads(q.read_text(encoding="utf-8")) != d.config:
                bad.append(Mismatch(p.name, "differs from the delta's", "file"))
        elif q.read_bytes() != p.read_bytes():
            bad.append(Mismatch(p.name, "differs from the delta's", "file"))
    return bad


def count_differing(step: Step, merged: SourceTensor) -> int:
    """Values whose bits differ (so NaNs compare by their bits too)."""
    n, start = 0, 0
    for block in step.blocks():
        got = np.ascontiguousarray(raw(merged, slice(start, start + block.shape[0]))).reshape(block.shape)
        bits = np.dtype(f"u{block.itemsize}")
        n += int(np.count_nonzero(got.view(bits) != block.view(bits)))
        start += block.shape[0]
    return n


# --- CLI ---
