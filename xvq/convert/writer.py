"""Streaming GGUF writing on top of gguf-py: tensor infos first, then each tensor's data
written in row blocks straight to the file, so memory holds one block, never the model.
`StreamingWriter` is the one place that reaches into gguf-py's writer internals (its kv and
tensor-info tables, its output files and state): a gguf-py upgrade is checked here alone."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from xvq.llamacpp import tensor_nbytes
from xvq.models.base import OutTensor

QT = gguf.GGMLQuantizationType
OUTTYPES = {"f32": (QT.F32, gguf.LlamaFileType.ALL_F32), "f16": (QT.F16, gguf.LlamaFileType.MOSTLY_F16),
            "bf16": (QT.BF16, gguf.LlamaFileType.MOSTLY_BF16), "q8_0": (QT.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0)}
# float32 bytes converted at once. Small enough that a block and its temporaries stay in the
# CPU cache: 4 MiB blocks converted a bf16 checkpoint ~2x faster than 64 MiB ones (and each
# fresh 64 MiB temporary costs page faults), with a few ms of Python overhead per block at most.
BLOCK_BYTES = 4 << 20


def tensor_type(t: OutTensor, outtype: str) -> QT:
    """llama.cpp's rule: 1-D tensors and the MoE router stay F32; Q8_0 needs rows of 32."""
    want = OUTTYPES[outtype][0]
    if len(t.shape) == 1 or t.name.endswith("ffn_gate_inp.weight"):
        return QT.F32
    if want == QT.Q8_0 and t.shape[-1] % 32:
        return QT.F16
    return want


_STORED = {"BF16": "bf16", "bfloat16": "bf16", "F16": "f16", "float16": "f16", "F32": "f32", "float32": "f32"}
# (stored dtype, output type) pairs written straight from the stored rows: a copy, or for
# bf16 -> f16 one lookup in a 64K-entry table (numpy's own rounding of every bf16 value), the
# same bytes as via float32 at a fraction of the cost (numpy's f32 -> f16 cast is slow).
_DIRECT = {("bf16", QT.F16), ("f16", QT.F16), ("bf16", QT.BF16), ("f32", QT.F32)}


def direct(stored_dtype: str | None, qtype: QT) -> bool:
    return (_STORED.get(stored_dtype or ""), qtype) in _DIRECT


@functools.cache
def _bf16_to_f16_table() -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):  # bf16 values beyond f16 become inf, as in numpy
        return (np.arange(1 << 16, dtype=np.uint32) << 16).view(np.float32).astype(np.float16)


def encode(rows: np.ndarray, qtype: QT, stored_dtype: str | None = None) -> np.ndarray:
    """Rows in the output type's bytes. `rows` are float32, or with `stored_dtype` the rows as
    stored (bf16 as uint16 bits) for a `direct` pair."""
    if stored_dtype is not None:
        kind = _STORED[stored_dtype]
        if kind == "bf16" and qtype == QT.F16:
            return np.take(_bf16_to_f16_table(), rows.view(np.uint16))
        return rows
    if qtype == QT.F32:
        return rows.astype(np.float32, copy=False)
    if qtype == QT.F16:
        return rows.astype(np.float16)
    return gguf.quants.quantize(rows, qtype)


def first_nonfinite(block: np.ndarray, stored_dtype: str | None = None) -> int | None:
    """Index (flat, within the block) of the first NaN/Inf, or None. Raw bf16/f16 rows are
    checked on their bits: exponent all ones."""
    kind = _STORED.get(stored_dtype or "") if stored_dtype else None
    if kind in ("bf16", "f16"):
        inf = 0x7F80 if kind == "bf16" else 0x7C00
        magnitude = block.view(np.uint16) & 0x7FFF     # sign dropped: NaN/Inf are the largest
        if magnitude.max(initial=0) < inf:              # one reduction: ~20 % of the bf16->f16 encode
            return None
        return int(np.flatnonzero(magnitude >= inf)[0])
    finite = np.isfinite(block)
    return None if finite.all() else int(np.flatnonzero(~finite)[0])


@dataclass
class Planned:
    tensor: OutTensor
    qtype: QT


class StreamingWriter(gguf.GGUFWriter):
    """GGUFWriter whose tensors are announced with `plan` and written with `stream`."""

    def has_key(self, key: str) -> bool:
        return key in self.kv_data[0]

    def replace_chat_template(self, template: str) -> None:
        self.kv_data[0].pop(gguf.Keys.Tokenizer.CHAT_TEMPLATE, None)
        self.add_chat_template(template)

    def plan(self, t: OutTensor, qtype: QT) -> Planned:
        self.add_tensor_info(t.name, t.shape, np.dtype(np.float32), tensor_nbytes(t.shape, qtype), raw_dtype=qtype)
        return Planned(t, qtype)

    def begin(self, path: Path) -> None:
        self.write_header_to_file(path)
        self.write_kv_data_to_file()
        self.write_ti_data_to_file()

    # called as on_nonfinite(tensor, row) for the first row holding NaN/Inf; raises to refuse
    on_nonfinite = None

    def stream(self, p: Planned, on_rows=None) -> None:
        file_id = next(i for i, ts in enumerate(self.tensors) if ts)
        fout = self.fout[file_id]
        info = self.tensors[file_id].pop(p.tensor.name)
        self.write_padding(fout, fout.tell())
        start = fout.tell()
        t = p.tensor
        cols = t.shape[-1]
        step = max(1, BLOCK_BYTES // (4 * cols))
        stored = t.raw_dtype if t.raw_rows is not None and direct(t.raw_dtype, p.qtype) else None
        read = t.rows if stored is None else t.raw_rows
        for r in range(0, t.n_rows, step):
            stop = min(r + step, t.n_rows)
            block = read(slice(r, stop)).reshape(stop - r, cols)
            if self.on_nonfinite is not None and (i := first_nonfinite(block, stored)) is not None:
                self.on_nonfinite(t, r + i // cols)
            encode(block, p.qtype, stored).tofile(fout)
            if on_rows:
                on_rows(stop - r)
        written = fout.tell() - start
        if written != info.nbytes:
            raise RuntimeError(f"{t.name}: wrote {written} bytes, expected {info.nbytes}")
        self.write_padding(fout, written)
        self.state = gguf.gguf_writer.WriterState.WEIGHTS


def planned_tensors(fam, outtype: str = "f16") -> dict[str, tuple[tuple[int, ...], str]]:
    """The GGUF tensors `xvq convert` writes for a family's config (names, shapes rows-first,
    types), from the config alone: the family maps its expected shapes as it would real tensors."""
    from xvq.models.base import SourceTensor

    def unreadable(sel):
        raise RuntimeError("shape-only source")
    sources = {n: SourceTensor(n, tuple(shape), "F16", unreadable) for n, shape in fam.expected_shapes().items()}
    return {t.name: (tuple(t.shape), tensor_type(t, outtype).name) for t in fam.gguf_tensors(sources)}
