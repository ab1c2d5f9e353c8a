"""ggml's own quantization kernels, one tensor (or a sample of its rows) at a time: what the
mixed-precision search measures each candidate type with."""
from __future__ import annotations

import ctypes

import gguf
import numpy as np

from xvq.errors import XvqError

_LIB = None


class _TypeTraits(ctypes.Structure):
    """struct ggml_type_traits (ggml.h of the locked llama-cpp-python)."""
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                ("from_float_ref", ctypes.c_void_p)]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)


def _ggml():
    global _LIB
    if _LIB is None:
        from xvq.llamacpp.runtime import libggml
        lib = libggml()
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                            ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
        lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
        lib.ggml_row_size.restype = ctypes.c_size_t
        lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
        lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
        _LIB = lib
    return _LIB


def type_id(name: str) -> int:
    return int(gguf.GGMLQuantizationType[name.upper()])


def row_size(qtype: str, n_per_row: int) -> int:
    """Bytes of one row of `n_per_row` values in `qtype` (ggml_row_size)."""
    return int(_ggml().ggml_row_size(type_id(qtype), n_per_row))


def requires_imatrix(qtype: str) -> bool:
    return bool(_ggml().ggml_quantize_requires_imatrix(type_id(qtype)))


# values quantized per C call: a 65B model's largest matrix (235M values, seconds at low bits)
# would otherwise hold a signal until it is done
QUANTIZE_VALUES_PER_CALL = 1 << 22


def quantize_rows(qtype: str, rows: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    """rows [n, k] float32 -> the bytes ggml_quantize_chunk writes (what llama.cpp stores)."""
    rows = np.ascontiguousarray(rows, np.float32)
    n, k = rows.shape
    per_row = row_size(qtype, k)
    out = np.empty(n * per_row, np.uint8)
    im = None if imatrix is None else np.ascontiguousarray(imatrix, np.float32)
    wrote = 0
    step = max(1, QUANTIZE_VALUES_PER_CALL // k)   # rows are independent: the bytes are the same in slices
    for r in range(0, n, step):
        m = min(step, n - r)
        wrote += _ggml().ggml_quantize_chunk(type_id(qtype), rows[r:r + m].ctypes.data, out[r * per_row:].ctypes.data,
                                             0, m, k, None if im is None else im.ctypes.data)
    if wrote != out.size:
        raise XvqError(f"ggml wrote {wrote} bytes for {n}x{k} {qtype}, expected {out.size}; reinstall the locked "
                       f"llama-cpp-python")
    return out


def dequantize_rows(qtype: str, data: np.ndarray, n: int, k: int) -> np.ndarray:
    """The inverse through ggml's own to_float (the values llama.cpp computes with)."""
    traits = _ggml().ggml_get_type_traits(type_id(qtype)).contents
    out = np.empty((n, k), np.float32)
    data = np.ascontiguousarray(data, np.uint8)
    _TO_FLOAT(traits.to_float)(data.ctypes.data, out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), n * k)
    return out


# ----------------------------------------------------------------------------------------------
# llama_model_quantize with one type per tensor
# ----------------------------------------------------------------------------------------------
