"""The model's tensors, the llama.cpp types each can take, and each type's error (ggml's own
kernels on a sample of rows, weighted by the importance matrix)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
from tqdm import tqdm

from xvq.llamacpp import tensor_nbytes, type_bpw

# Candidates, cheapest first. IQ1_* are left out: llama.cpp's own docs call them unusable alone.
CANDIDATES = ("IQ2_XXS", "Q2_K", "IQ3_XXS", "IQ3_S", "Q3_K", "IQ4_XS", "Q4_K", "Q5_K",
              "Q6_K", "Q8_0", "F16")
# Rows that no 256-block type divides (XVERSE-MoE's experts, 1728 wide) take the 32-block types
# llama.cpp itself falls back to (tensor_type_fallback).
ROW32_CANDIDATES = ("Q4_0", "IQ4_NL", "Q5_0", "Q5_1")
SAMPLE_ROWS = 64               # rows per tensor whose error is measured (an unbiased sample)
ALIGN = 32                     # GGUF tensor data alignment


@dataclass
class TensorChoice:
    name: str
    shape: tuple[int, ...]              # numpy order: (experts,) rows, cols
    src_type: str
    quantizable: bool
    options: dict[str, int] = field(default_factory=dict)       # type -> bytes
    error: dict[str, float] = field(default_factory=dict)       # type -> weighted squared error
    gain: float = 0.0                   # KLD per unit of error (calibrated)
    gain_at: dict[str, float] = field(default_factory=dict)     # type -> gain measured at that type

    @property
    def kind(self) -> str:
        return re.sub(r"^blk\.\d+\.", "", self.name)

    @property
    def layer(self) -> int | None:
        m = re.match(r"blk\.(\d+)\.", self.name)
        return int(m.group(1)) if m else None

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape))

    def predicted(self, qtype: str) -> float:
        """gain x error; with gains measured at two or more types, the gain at this type is
        interpolated in log error between them (KLD is not linear in the weighted squared error
        across types: it grows faster once the coarse types' errors dominate)."""
        e = self.error[qtype]
        pts = sorted((self.error[t], g) for t, g in self.gain_at.items() if self.error.get(t, 0) > 0)
        if len(pts) < 2 or e <= 0:
            return self.gain * e
        x = np.log([p[0] for p in pts])
        return float(np.exp(np.interp(np.log(e), x, np.log([p[1] for p in pts])))) * e


def padded(n: int) -> int:
    return n + (-n % ALIGN)


def tensor_bytes(shape: tuple[int, ...], qtype: str) -> int:
    """Bytes of a tensor in `qtype` (rows are whole blocks for every candidate kept)."""
    return tensor_nbytes(shape, gguf.GGMLQuantizationType[qtype])


def candidate_types(name: str, shape: tuple[int, ...], src_type: str, has_imatrix: bool) -> list[str]:
    """The types llama.cpp can store this tensor in: whole blocks per row, an imatrix where ggml
    demands one, no more bits than the source has."""
    from xvq.llamacpp.kernels import requires_imatrix
    from xvq.llamacpp.quant_types import block_size
    out = []
    extra = ROW32_CANDIDATES if shape[-1] % 256 else ()
    for t in CANDIDATES + extra:
        if shape[-1] % block_size(t):
            continue
        if requires_imatrix(t) and not has_imatrix:
            continue
        if type_bpw(t) > type_bpw(src_type) and t != src_type:
            continue
        out.append(t)
    return out


def model_tensors(src: Path, imatrix_names: set[str]) -> list[TensorChoice]:
    """Every tensor of the GGUF; the quantizable ones with their candidates and sizes. Stacked
    expert tensors are one unit each (llama.cpp gives a tensor one type); the router and norms
    stay at their source type, as llama.cpp's quantizer keeps them."""
    from xvq.llamacpp import read_header
    from xvq.llamacpp.quant_types import allows_quantization
    out = []
    for name, (ggml_shape, type_id) in read_header(src).tensors.items():
        shape = tuple(reversed(ggml_shape))
        src_type = gguf.GGMLQuantizationType(type_id).name
        q = allows_quantization(name, ggml_shape) and src_type in ("F32", "F16", "BF16")
        c = TensorChoice(name, shape, src_type, q)
        if q:
            for qt in candidate_types(name, shape, src_type, name in imatrix_names):
                c.options[qt] = tensor_bytes(shape, qt)
        else:
            c.options[src_type] = tensor_nbytes(shape, type_id)
        out.append(c)
    return out


def sample_rows(n_rows: int, k: int | None = None) -> np.ndarray:
    k = k or SAMPLE_ROWS
    if n_rows <= k:
        return np.arange(n_rows)
    return np.unique(np.linspace(0, n_rows - 1, k).round().astype(np.int64))


def quantize_dequantize(qtype: str, rows: np.ndarray, imatrix: np.ndarray | None, expert: np.ndarray) -> np.ndarray:
    """Q(W) for rows [n, k] through ggml's kernels, as llama.cpp's quantizer computes it: one call
    per expert, each with its own imatrix slice (`expert[i]` is row i's expert)."""
    from xvq.llamacpp.kernels import dequantize_rows, quantize_rows
    n, k = rows.shape
    out = np.empty((n, k), np.float32)
    im = None if imatrix is None else np.asarray(imatrix, np.float32).reshape(-1, k)
    for e in np.unique(expert):
        g = expert == e
        out[g] = dequantize_rows(qtype, quantize_rows(qtype, rows[g], None if im is None else im[e]), int(g.sum()), k)
    return out


def weighted_errors(weights: np.ndarray, types: list[str], imatrix: np.ndarray | None,
                    rows_per_matrix: int) -> dict[str, float]:
    """weights [rows, cols] (experts stacked); imatrix [n_mat * cols] or None -> per type
    sum_ij w_j (W - Q(W))^2 over all rows, estimated from a sample of rows."""
    n_rows, k = weights.shape
    idx = sample_rows(n_rows)
    x = np.asarray(weights[idx], np.float32)
    scale = n_rows / len(idx)
    expert = idx // rows_per_matrix
    w_rows = (np.asarray(imatrix, np.float32).reshape(-1, k)[expert] if imatrix is not None else np.ones_like(x))
    out = {}
    for t in types:
        if t == "F32":
            out[t] = 0.0
            continue
        y = quantize_dequantize(t, x, imatrix, expert)
        out[t] = float((w_rows * (x - y).astype(np.float64) ** 2).sum() * scale)
    return out


def measure_errors(src: Path, tensors: list[TensorChoice], imatrix_values: dict[str, np.ndarray],
                   progress: bool = True) -> None:
    r = gguf.GGUFReader(src)
    data = {t.name: t for t in r.tensors}
    todo = [c for c in tensors if c.quantizable]
    for c in tqdm(todo, desc="sensitivity: error per type", unit="tensor", disable=not progress, leave=False):
        w = np.asarray(data[c.name].data).reshape(-1, c.shape[-1])
        c.error = weighted_errors(w, list(c.options), imatrix_values.get(c.name), c.shape[-2])
