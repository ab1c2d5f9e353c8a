"""ggml's own quantization kernels, one tensor (or a sample of its rows) at a time, and llama.cpp's
quantizer with per-tensor type overrides (llama_model_quantize_params.tt_overrides, what
`llama-quantize --tensor-type` sets): the only place the mixed-precision code touches ctypes."""
from __future__ import annotations

import ctypes
import re
from pathlib import Path

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
        from llama_cpp._ggml import libggml as lib
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


def quantize_rows(qtype: str, rows: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    """rows [n, k] float32 -> the bytes ggml_quantize_chunk writes (what llama.cpp stores)."""
    rows = np.ascontiguousarray(rows, np.float32)
    n, k = rows.shape
    out = np.empty(n * row_size(qtype, k), np.uint8)
    im = None if imatrix is None else np.ascontiguousarray(imatrix, np.float32)
    wrote = _ggml().ggml_quantize_chunk(type_id(qtype), rows.ctypes.data, out.ctypes.data, 0, n, k,
                                        None if im is None else im.ctypes.data)
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

def _kv_array(items: list[tuple[str, object]]):
    """Null-terminated llama_model_kv_override[] of str/int/float values."""
    from llama_cpp import llama_cpp as C
    arr = (C.llama_model_kv_override * (len(items) + 1))()
    for i, (key, val) in enumerate(items):
        arr[i].key = key.encode()
        if isinstance(val, str):
            arr[i].tag = C.LLAMA_KV_OVERRIDE_TYPE_STR
            arr[i].value.val_str = val.encode("utf-8")[:127]
        elif isinstance(val, float):
            arr[i].tag = C.LLAMA_KV_OVERRIDE_TYPE_FLOAT
            arr[i].value.val_f64 = val
        else:
            arr[i].tag = C.LLAMA_KV_OVERRIDE_TYPE_INT
            arr[i].value.val_i64 = int(val)
    arr[len(items)].key = b""
    return arr


def quantize_with_types(src: Path, dst: Path, ftype: str, types: dict[str, str], *, imatrix=None,
                        extra_kv: list[tuple[str, object]] = (), n_threads: int = 0) -> None:
    """llama.cpp's quantizer writes `dst` from `src` with exactly `types` (tensor name -> ggml type),
    one anchored --tensor-type pattern per tensor; `ftype` only names the file type recorded.
    Tensors not named keep llama.cpp's choice for `ftype`."""
    from llama_cpp import llama_cpp as C
    from xvq.quantize.gguf import _QuantizeLog, imatrix_array, imatrix_kv_overrides, parse_type
    from xvq.quantize.imatrix import quiet_llama
    params = C.llama_model_quantize_default_params()
    params.ftype = parse_type(ftype).ftype
    params.nthread = n_threads
    keep = []
    tt = (C.llama_model_tensor_override * (len(types) + 1))()
    for i, (name, qtype) in enumerate(sorted(types.items())):
        keep.append(f"^{re.escape(name)}$".encode())
        tt[i].pattern = keep[-1]
        tt[i].type = type_id(qtype)
    tt[len(types)].pattern = None
    params.tt_overrides = ctypes.cast(tt, ctypes.POINTER(C.llama_model_tensor_override))
    kv_items = list(extra_kv)
    if imatrix is not None:
        arr, bufs = imatrix_array(imatrix.values())
        params.imatrix = ctypes.cast(arr, ctypes.POINTER(C.llama_model_imatrix_data))
        base = imatrix_kv_overrides(imatrix, imatrix.path.name if imatrix.path else None)
        kv_items = [(base[i].key.decode(), base[i].value.val_str.decode() if base[i].tag == C.LLAMA_KV_OVERRIDE_TYPE_STR
                     else int(base[i].value.val_i64)) for i in range(len(base) - 1)] + kv_items
        keep += [arr, bufs, base]
    kv = _kv_array(kv_items)
    params.kv_overrides = ctypes.cast(kv, ctypes.POINTER(C.llama_model_kv_override))
    keep += [tt, kv]
    log = _QuantizeLog(None)
    C.llama_log_set(log.cb, ctypes.c_void_p(0))
    try:
        rc = C.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    finally:
        quiet_llama(force=True)
    if rc != 0 or not Path(dst).is_file():
        detail = log.errors[-1] if log.errors else (log.tail[-1].strip() if log.tail else f"code {rc}")
        raise XvqError(f"{src}: llama.cpp could not write the mix: {detail}")
    del keep
