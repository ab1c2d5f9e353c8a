"""Importance matrix: per weight matrix, the mean square of each input column over a calibration
text, measured inside llama.cpp's own evaluation of the GGUF (the eval callback `cb_eval`, as
llama-imatrix's collect_imatrix does), saved in llama.cpp's GGUF imatrix format.

    <weight>.in_sum2   F32 [n_mat, n_cols]   sum over tokens of x_j^2 (one row per expert)
    <weight>.counts    F32 [n_mat, 1]        tokens accumulated (per expert: tokens routed to it)
    general.type = imatrix, imatrix.datasets, imatrix.chunk_count, imatrix.chunk_size

Dense MUL_MAT weights have one row; MoE stacked experts (MUL_MAT_ID) one row per expert, each
over the tokens routed to that expert only.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
from tqdm import tqdm

from xvq.errors import XvqError
from xvq.fsio import atomic_output
from xvq.llamacpp import Gguf, MatMul, MatMulTap

KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
SUM_SUFFIX, COUNT_SUFFIX = ".in_sum2", ".counts"


# ----------------------------------------------------------------------------------------------
# The statistics and their file formats
# ----------------------------------------------------------------------------------------------

@dataclass
class Imatrix:
    """Raw sums of squared activations and token counts per weight (llama.cpp's GGUF semantics)."""
    sums: dict[str, np.ndarray] = field(default_factory=dict)     # name -> float64 [n_mat, n_cols]
    counts: dict[str, np.ndarray] = field(default_factory=dict)   # name -> int64 [n_mat]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    path: Path | None = None   # where it was loaded from / saved to

    def __len__(self) -> int:
        return len(self.sums)

    # --- accumulation (called from the eval callback) ---
    def _entry(self, name: str, n_mat: int, n_cols: int) -> tuple[np.ndarray, np.ndarray]:
        if name not in self.sums:
            self.sums[name] = np.zeros((n_mat, n_cols), np.float64)
            self.counts[name] = np.zeros(n_mat, np.int64)
        s = self.sums[name]
        if s.shape != (n_mat, n_cols):
            raise XvqError(f"imatrix: inconsistent activation shape for {name} ({list(s.shape)} vs "
                           f"{[n_mat, n_cols]}); the model graph changed between batches")
        return s, self.counts[name]

    def add_dense(self, name: str, x: np.ndarray, n_mat: int = 1) -> None:
        """x: activations [n_mat or 1 (broadcast), n_rows, n_cols] feeding weight `name`."""
        s, c = self._entry(name, n_mat, x.shape[-1])
        x = x.astype(np.float64, copy=False)
        if x.shape[0] == n_mat:
            s += np.einsum("mrc,mrc->mc", x, x)
        else:  # activations broadcast over a stacked weight: every matrix sees them
            s += np.einsum("mrc,mrc->c", x, x)[None, :]
        c += x.shape[1] * x.shape[0] // n_mat

    def add_routed(self, name: str, x: np.ndarray, ids: np.ndarray, n_expert: int) -> None:
        """MUL_MAT_ID: x [n_tokens, n_slots(or 1), n_cols], ids [n_tokens, n_used] expert per slot.
        Each expert accumulates only the tokens routed to it."""
        s, c = self._entry(name, n_expert, x.shape[-1])
        n_tok, n_used = ids.shape
        slot = np.arange(n_used) % x.shape[1]
        rows = x[:, slot, :].astype(np.float64).reshape(n_tok * n_used, -1)
        experts = ids.reshape(-1)
        if experts.min() < 0 or experts.max() >= n_expert:
            raise XvqError(f"imatrix: expert id out of range for {name}")
        np.add.at(s, experts, rows * rows)
        c += np.bincount(experts, minlength=n_expert)

    # --- what the quantizer consumes ---
    def values(self) -> dict[str, np.ndarray]:
        """Per weight: mean square per input column, flat float32 (experts concatenated); an
        expert that saw no token gets ones, exactly as llama-quantize's loader does."""
        out = {}
        for name, s in self.sums.items():
            # float32 sum / float32 count, as llama-quantize's loader computes it, so a matrix
            # quantizes byte-identically whether it comes from memory or from its file
            s32 = s.astype(np.float32)
            c32 = self.counts[name].astype(np.float32)[:, None]
            with np.errstate(divide="ignore", invalid="ignore"):
                v = np.where(c32 > 0, s32 / c32, np.float32(1.0))
            out[name] = np.ascontiguousarray(v, dtype=np.float32).reshape(-1)
        return out

    def cosine(self, other: "Imatrix") -> dict[str, float]:
        """Per common tensor, cosine similarity of the mean-square vectors."""
        a, b = self.values(), other.values()
        res = {}
        for k in sorted(set(a) & set(b)):
            x, y = a[k].astype(np.float64), b[k].astype(np.float64)
            res[k] = float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y) + 1e-300))
        return res

    def check_model(self, tensors: dict[str, tuple[int, ...]], model_file: Path | str) -> None:
        """`tensors`: GGUF name -> ggml shape (ne0 first). Every entry must name a weight of this
        model with the same input width and matrix count, or the imatrix belongs to another model."""
        where = self.path or "imatrix"
        if not self.sums:
            raise XvqError(f"{where}: the importance matrix has no entries; recompute it with --imatrix auto")
        for name, s in sorted(self.sums.items()):
            shape = tensors.get(name)
            if shape is None:
                raise XvqError(f"{where}: entry {name} is not a tensor of {model_file}; this imatrix was computed "
                               f"for another model — use --imatrix auto to compute one for this model")
            n_mat = int(np.prod(shape[2:])) if len(shape) > 2 else 1
            if s.size != shape[0] * n_mat:
                raise XvqError(f"{where}: entry {name} has {s.size} values but {model_file} needs "
                               f"{shape[0] * n_mat}; this imatrix was computed for another model — "
                               f"use --imatrix auto")

    # --- files ---
    def save(self, path: Path | str) -> Path:
        """llama.cpp's GGUF imatrix format (what llama-imatrix writes, tensors sorted by name)."""
        path = Path(path)
        with atomic_output(path) as tmp:
            w = gguf.GGUFWriter(tmp, arch="")
            w.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)
            w.add_type("imatrix")
            w.add_array(KEY_DATASETS, list(self.datasets))
            w.add_uint32(KEY_CHUNK_COUNT, int(self.chunk_count))
            w.add_uint32(KEY_CHUNK_SIZE, int(self.chunk_size))
            for name in sorted(self.sums):
                sums = self.sums[name].astype(np.float32)
                counts = self.counts[name].astype(np.float32)[:, None]
                if len(counts) == 1:   # ggml drops trailing dimensions of 1: [n_cols] and [1]
                    sums, counts = sums[0], counts[0]
                w.add_tensor(name + SUM_SUFFIX, sums)
                w.add_tensor(name + COUNT_SUFFIX, counts)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
        self.path = path
        return path

    @classmethod
    def load(cls, path: Path | str) -> "Imatrix":
        """A GGUF imatrix, or llama.cpp's legacy .dat format."""
        path = Path(path)
        if not path.is_file():
            raise XvqError(f"{path}: imatrix file not found; give an existing file or --imatrix auto")
        with open(path, "rb") as f:
            magic = f.read(4)
        im = cls._load_gguf(path) if magic == b"GGUF" else cls._load_legacy(path)
        im.path = path
        return im

    @classmethod
    def _load_gguf(cls, path: Path) -> "Imatrix":
        try:
            r = gguf.GGUFReader(path)
        except Exception as e:
            raise XvqError(f"{path}: not a readable GGUF imatrix ({e}); recompute it with --imatrix auto") from e
        im = cls()
        f = r.fields.get(KEY_DATASETS)
        if f is not None:
            im.datasets = [bytes(f.parts[i]).decode("utf-8", "replace") for i in f.data]
        for key, attr in ((KEY_CHUNK_COUNT, "chunk_count"), (KEY_CHUNK_SIZE, "chunk_size")):
            if key in r.fields:
                setattr(im, attr, int(r.fields[key].parts[-1][0]))
        tensors = {t.name: t for t in r.tensors}
        for tname, t in tensors.items():
            if not tname.endswith(SUM_SUFFIX):
                continue
            name = tname[: -len(SUM_SUFFIX)]
            ct = tensors.get(name + COUNT_SUFFIX)
            if ct is None:
                raise XvqError(f"{path}: {tname} has no matching {name}{COUNT_SUFFIX}; the file is damaged")
            counts = np.rint(np.asarray(ct.data, np.float64).reshape(-1)).astype(np.int64)
            im.sums[name] = np.asarray(t.data, np.float64).reshape(len(counts), -1)
            im.counts[name] = counts
        if not im.sums:
            raise XvqError(f"{path}: GGUF without imatrix entries (*.in_sum2); is this a model file? "
                           f"give an imatrix file or --imatrix auto")
        return im

    @classmethod
    def _load_legacy(cls, path: Path) -> "Imatrix":
        """Legacy .dat: per entry (mean square * ncall) and ncall; kept as sums=ncall*mean, counts=ncall
        so values() gives the same means llama-quantize uses."""
        data = path.read_bytes()
        im, pos = cls(), 0

        def take(fmt: str):
            nonlocal pos
            vals = struct.unpack_from(fmt, data, pos)
            pos += struct.calcsize(fmt)
            return vals

        try:
            (n_entries,) = take("<i")
            if n_entries < 1:
                raise ValueError("no entries")
            for _ in range(n_entries):
                (n,) = take("<i")
                name = data[pos:pos + n].decode("utf-8")
                pos += n
                ncall, nval = take("<ii")
                sums = np.frombuffer(data, np.float32, nval, pos).astype(np.float64)
                pos += 4 * nval
                im.sums[name] = sums[None, :]
                im.counts[name] = np.array([ncall], np.int64)
            if pos + 4 <= len(data):
                (im.chunk_count,) = take("<i")
                if pos + 4 <= len(data):
                    (n,) = take("<i")
                    if n > 0:
                        im.datasets = [data[pos:pos + n].decode("utf-8", "replace")]
        except (struct.error, ValueError, UnicodeDecodeError) as e:
            raise XvqError(f"{path}: neither a GGUF imatrix nor a legacy .dat imatrix ({e}); "
                           f"give an imatrix file or --imatrix auto") from e
        return im


# ----------------------------------------------------------------------------------------------
# Measuring it inside llama.cpp's evaluation of the GGUF
# ----------------------------------------------------------------------------------------------

class ImatrixCollector:
    """What llama-imatrix's collect_imatrix selects: MUL_MAT on blk.* weights with >= 16 f32
    activation rows, and every MUL_MAT_ID; adds the squared activations to the weight's sums."""

    def __init__(self, im: Imatrix, process_output: bool = False):
        self.im, self.process_output = im, process_output
        self.tap = MatMulTap(self.wanted, self.collect)

    def wanted(self, mm: MatMul) -> bool:
        if mm.routed:
            return True
        if mm.rows < 16 or not mm.f32:
            return False
        return mm.weight.startswith("blk.") or (self.process_output and mm.weight == "output.weight")

    def collect(self, mm: MatMul) -> None:
        x = mm.activations()                                  # (ne3, ne2, ne1, ne0)
        if mm.routed:
            self.im.add_routed(mm.weight, x[0], mm.expert_ids(), mm.weight_ne[2])
        else:
            n_mat = mm.weight_ne[2] * mm.weight_ne[3]
            if n_mat == 1:
                self.im.add_dense(mm.weight, x.reshape(1, -1, x.shape[-1]))
            else:
                self.im.add_dense(mm.weight, x.reshape(-1, x.shape[-2], x.shape[-1]), n_mat)
        if not np.isfinite(self.im.sums[mm.weight]).all():
            raise XvqError(f"imatrix: non-finite activations in {mm.weight}; the model produces inf/nan on the "
                           f"calibration text")


def chunks_of(tokens: np.ndarray, n_ctx: int, bos: int | None, n_chunks: int | None = None) -> list[np.ndarray]:
    """llama-imatrix/llama-perplexity chunking: consecutive n_ctx windows of the tokenized text,
    the first token of each replaced by BOS when the vocabulary adds one."""
    n = len(tokens) // n_ctx
    if n_chunks is not None and n_chunks >= 0:
        n = min(n, n_chunks)
    out = []
    for i in range(n):
        c = tokens[i * n_ctx:(i + 1) * n_ctx].copy()
        if bos is not None:
            c[0] = bos
        out.append(c)
    return out


def compute_imatrix(model_gguf: Path | str, text: str, *, dataset: str = "", n_ctx: int = 512,
                    n_chunks: int | None = None, n_threads: int | None = None, progress: bool = True,
                    process_output: bool = False, gpu_layers: str | int | None = "auto") -> Imatrix:
    """llama-imatrix's statistics, measured by xvq through llama.cpp's evaluation of the GGUF.
    Every position outputs logits, as llama-imatrix does, so the last layer runs on every token."""
    im = Imatrix(datasets=[dataset] if dataset else [], chunk_size=n_ctx)
    collector = ImatrixCollector(im, process_output=process_output)
    with Gguf(model_gguf, gpu_layers=gpu_layers) as m, \
            m.context(n_ctx, n_ubatch=n_ctx, threads=n_threads, tap=collector.tap) as ctx:
        tokens = m.tokenize(text, add_special=True)
        if len(tokens) < 2 * n_ctx:
            raise XvqError(f"calibration text gives {len(tokens)} tokens, fewer than 2 chunks of {n_ctx}; "
                           f"give more text or a smaller --ctx")
        chunks = chunks_of(tokens, n_ctx, m.bos if m.add_bos else None, n_chunks)
        for c in tqdm(chunks, desc=f"imatrix {Path(model_gguf).name} ({m.device})", unit="chunk",
                      disable=not progress, leave=False):
            ctx.decode(c)
            im.chunk_count += 1
    if not im.sums:
        raise XvqError(f"{model_gguf}: no weight matrix was seen during evaluation; "
                       f"the chunk size {n_ctx} may be below 16 tokens")
    return im
