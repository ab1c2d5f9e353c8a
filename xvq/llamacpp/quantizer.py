"""llama.cpp's quantizer (`llama_model_quantize`), with an importance matrix handed over in memory
and the `quantize.imatrix.*` keys llama-quantize records."""
from __future__ import annotations

import ctypes
import re
from pathlib import Path
from typing import Callable

import numpy as np

from xvq import interrupt
from xvq.errors import XvqError
from xvq.llamacpp import runtime

GGML_LOG_LEVEL_ERROR = 4
_ABANDONED: list = []
_TENSOR_LINE = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]")


def _imatrix_array(C, values: dict[str, np.ndarray]):
    """Null-terminated llama_model_imatrix_data[]; returns (array, keep-alive buffers)."""
    arr = (C.llama_model_imatrix_data * (len(values) + 1))()
    keep = []
    for i, (name, v) in enumerate(sorted(values.items())):
        v = np.ascontiguousarray(v, np.float32)
        keep += [v, name.encode()]
        arr[i].name = keep[-1]
        arr[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        arr[i].size = v.size
    arr[len(values)].name = None
    return arr, keep


def _kv_overrides(C, kv: dict[str, str | int | float]):
    """llama_model_kv_override[] (strings cut to llama.cpp's 127 bytes), empty key terminated."""
    arr = (C.llama_model_kv_override * (len(kv) + 1))()
    for i, (key, val) in enumerate(kv.items()):
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
    arr[len(kv)].key = b""
    return arr


def _tensor_overrides(C, types: dict[str, int]):
    """One anchored pattern per tensor (what `llama-quantize --tensor-type NAME=TYPE` sets)."""
    arr = (C.llama_model_tensor_override * (len(types) + 1))()
    keep = []
    for i, (name, qtype) in enumerate(sorted(types.items())):
        keep.append(f"^{re.escape(name)}$".encode())
        arr[i].pattern = keep[-1]
        arr[i].type = qtype
    arr[len(types)].pattern = None
    return arr, keep


def quantize_model(src: Path, dst: Path, *, ftype: int, n_threads: int = 0, allow_requantize: bool = False,
                   output_tensor_type: int | None = None, token_embedding_type: int | None = None,
                   imatrix: dict[str, np.ndarray] | None = None, kv: dict[str, str | int | float] | None = None,
                   tensor_types: dict[str, int] | None = None,
                   on_progress: Callable[[int, int], None] | None = None) -> None:
    """Write `dst` from `src`; `tensor_types` pins single tensors to ggml types (the others get
    `ftype`'s recipe). XvqError with llama.cpp's own complaint when it refuses."""
    C = runtime._lib()
    p = C.llama_model_quantize_default_params()
    p.ftype, p.nthread, p.allow_requantize = ftype, n_threads, allow_requantize
    p.output_tensor_type = C.GGML_TYPE_COUNT if output_tensor_type is None else output_tensor_type
    p.token_embedding_type = C.GGML_TYPE_COUNT if token_embedding_type is None else token_embedding_type
    keep = []
    if imatrix is not None:
        arr, bufs = _imatrix_array(C, imatrix)
        p.imatrix = ctypes.cast(arr, ctypes.POINTER(C.llama_model_imatrix_data))
        keep += [arr, bufs]
    if tensor_types:
        tt, patterns = _tensor_overrides(C, tensor_types)
        p.tt_overrides = ctypes.cast(tt, ctypes.POINTER(C.llama_model_tensor_override))
        keep += [tt, patterns]
    if kv:
        kva = _kv_overrides(C, kv)
        p.kv_overrides = ctypes.cast(kva, ctypes.POINTER(C.llama_model_kv_override))
        keep.append(kva)
    errors, tail = [], []

    def on_line(level: int, text: str) -> None:
        tail[:] = (tail + [text])[-40:]
        m = _TENSOR_LINE.match(text)
        if m and on_progress is not None:
            on_progress(int(m.group(1)), int(m.group(2)))
        if level == GGML_LOG_LEVEL_ERROR and text.strip():
            errors.append(text.strip())

    cb = runtime.capture_log(lambda level, text: _guard(on_line, level, text))
    try:   # in a worker thread: llama.cpp's quantizer has no way to be told to stop
        rc = interrupt.blocking(C.llama_model_quantize, str(src).encode(), str(dst).encode(), ctypes.byref(p))
    except interrupt.Interrupted:
        _ABANDONED.append((p, keep, cb))   # that thread still reads them until the process ends
        raise
    finally:
        runtime.quiet(force=True)
    del keep, cb
    if rc != 0 or not Path(dst).is_file():
        detail = errors[-1] if errors else (tail[-1].strip() if tail else f"code {rc}")
        if _write_failed(detail, Path(dst)):
            raise XvqError(f"{Path(dst).parent}: could not write the quantized file (disk full?); "
                           f"free space there or choose another --outdir")
        raise XvqError(f"{src}: llama.cpp could not quantize it: {detail}")


def _write_failed(detail: str, dst: Path) -> bool:
    """llama.cpp reports a failed write as a stream error without naming the file."""
    import shutil
    try:
        low_space = shutil.disk_usage(dst.parent).free < (64 << 20)
    except OSError:
        low_space = False
    return low_space or "basic_ios" in detail or "iostream" in detail


def _guard(fn, *args) -> None:
    try:   # nothing may unwind through C
        fn(*args)
    except Exception:
        pass
