"""A tap on llama.cpp's compute graph (the eval callback llama-imatrix uses): every matrix
multiplication a selector accepts is handed over with its weight's name and its activations.

ggml has no accessor for a tensor's shape, strides, sources or op, so the struct layout of
`ggml_tensor` is declared here; it is checked at the first callback against what the library
itself reports (name, element count, byte size, dimensions, op) and a mismatch stops with one
line instead of reading garbage. Tensor data is read with `ggml_backend_tensor_get`, which also
works when the tensor lives on a GPU."""
from __future__ import annotations

import ctypes
from typing import Callable

import numpy as np

from xvq import interrupt
from xvq.errors import XvqError


class GgmlTensor(ctypes.Structure):
    pass


GGML_MAX_DIMS, GGML_MAX_SRC = 4, 10
GgmlTensor._fields_ = [
    ("type", ctypes.c_int), ("buffer", ctypes.c_void_p),
    ("ne", ctypes.c_int64 * GGML_MAX_DIMS), ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
    ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16), ("flags", ctypes.c_int32),
    ("src", ctypes.POINTER(GgmlTensor) * GGML_MAX_SRC),
    ("view_src", ctypes.POINTER(GgmlTensor)), ("view_offs", ctypes.c_size_t),
    ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64), ("extra", ctypes.c_void_p),
    ("padding", ctypes.c_char * 8),
]
GGML_TYPE_F32 = 0
_STRUCT_HINT = ("the installed llama-cpp-python's ggml_tensor layout differs from the one xvq reads; "
                "reinstall the locked llama-cpp-python version (make setup)")


def _ggml():
    """libggml beside llama-cpp-python's libllama, with the functions the tap needs typed."""
    from xvq.llamacpp.runtime import libggml
    lib = libggml()
    sigs = {"ggml_op_name": (ctypes.c_char_p, [ctypes.c_int]),
            "ggml_op_desc": (ctypes.c_char_p, [ctypes.c_void_p]),
            "ggml_get_name": (ctypes.c_char_p, [ctypes.c_void_p]),
            "ggml_nelements": (ctypes.c_int64, [ctypes.c_void_p]),
            "ggml_nbytes": (ctypes.c_size_t, [ctypes.c_void_p]),
            "ggml_n_dims": (ctypes.c_int, [ctypes.c_void_p]),
            "ggml_backend_buffer_is_host": (ctypes.c_bool, [ctypes.c_void_p]),
            "ggml_backend_tensor_get": (None, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t])}
    for name, (res, args) in sigs.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib


def _op_codes(lib, wanted=("MUL_MAT", "MUL_MAT_ID")) -> dict[str, int]:
    """ggml op numbers by name, asked of the loaded ggml (the enum shifts between versions)."""
    found = {}
    for i in range(256):
        name = (lib.ggml_op_name(i) or b"").decode()
        if name in wanted:
            found[name] = i
        if len(found) == len(wanted):
            return found
    raise XvqError("the installed llama-cpp-python's ggml has no MUL_MAT/MUL_MAT_ID op; reinstall the locked version")


def weight_name(raw: bytes) -> str:
    """'CUDA0#blk.0.attn_k.weight#0' -> 'blk.0.attn_k.weight' (llama-imatrix's filter_tensor_name)."""
    s = raw.decode("utf-8", "replace")
    return s.split("#")[1] if "#" in s else s


def check_layout(lib, ptr, t: GgmlTensor) -> None:
    """The declared struct against the library's own accessors, on a real graph tensor."""
    n_dims = max([1] + [i + 1 for i in range(GGML_MAX_DIMS) if t.ne[i] != 1])
    f32_extent = 4 + sum((t.ne[i] - 1) * t.nb[i] for i in range(GGML_MAX_DIMS))
    agree = (t.name == (lib.ggml_get_name(ptr) or b"")
             and int(np.prod(list(t.ne))) == lib.ggml_nelements(ptr)
             and n_dims == lib.ggml_n_dims(ptr)
             and (t.type != GGML_TYPE_F32 or min(t.ne) <= 0 or f32_extent == lib.ggml_nbytes(ptr))
             # ggml_op_desc names the unary/glu function instead of the op for those two
             and (lib.ggml_op_name(t.op) in (b"UNARY", b"GLU", lib.ggml_op_desc(ptr))))
    if not agree:
        raise XvqError(_STRUCT_HINT)


def tensor_array(lib, t: GgmlTensor, ptr, dtype) -> np.ndarray:
    """A ggml tensor's data as an array of shape (ne3, ne2, ne1, ne0), honouring strides."""
    ne, nb = list(t.ne), list(t.nb)
    nbytes = lib.ggml_nbytes(ptr)
    itemsize = np.dtype(dtype).itemsize
    if t.buffer and not lib.ggml_backend_buffer_is_host(t.buffer):
        raw = ctypes.create_string_buffer(nbytes + itemsize)
        lib.ggml_backend_tensor_get(ptr, raw, 0, nbytes)
    else:   # host memory: read in place, llama-imatrix does the same
        raw = (ctypes.c_uint8 * (nbytes + itemsize)).from_address(t.data)
    base = np.frombuffer(raw, np.uint8, nbytes - nbytes % itemsize).view(dtype)
    return np.lib.stride_tricks.as_strided(base, shape=ne[::-1], strides=nb[::-1], writeable=False)


class MatMul:
    """One matrix multiplication in the graph: weight (src0) times activations (src1)."""

    def __init__(self, tap: "MatMulTap", t: GgmlTensor):
        self._tap, self._t = tap, t
        self.routed = t.op == tap.MUL_MAT_ID          # MoE: experts chosen per token (src2 = ids)
        w, x = t.src[0].contents, t.src[1].contents
        self.weight = weight_name(w.name)
        self.weight_ne = tuple(int(v) for v in w.ne)
        self.rows = int(x.ne[1])
        self.f32 = x.type == GGML_TYPE_F32

    def activations(self) -> np.ndarray:
        """(ne3, ne2, ne1, ne0) float32: for MUL_MAT_ID x[0] is (n_tokens, n_slots, n_cols)."""
        return tensor_array(self._tap.lib, self._t.src[1].contents, self._t.src[1], np.float32)

    def expert_ids(self) -> np.ndarray:
        """(n_tokens, n_used) int32: the expert of every slot of every token."""
        return tensor_array(self._tap.lib, self._t.src[2].contents, self._t.src[2], np.int32)[0, 0]


class MatMulTap:
    """cb_eval for a Context: `select(mm)` on the ask pass, `collect(mm)` once computed. An
    exception never unwinds through C: it is kept in `error` and raised after the decode; a
    signal (xvq.interrupt) stops the graph at the next matmul."""

    def __init__(self, select: Callable[[MatMul], bool], collect: Callable[[MatMul], None]):
        self.select, self.collect = select, collect
        self.lib = _ggml()
        ops = _op_codes(self.lib)
        self.MUL_MAT, self.MUL_MAT_ID = ops["MUL_MAT"], ops["MUL_MAT_ID"]
        self.error: BaseException | None = None
        self._checked = False
        from llama_cpp import llama_cpp as C
        self.callback = C.ggml_backend_sched_eval_callback(self._cb)

    @interrupt.c_callback
    def _cb(self, ptr, ask, _user):
        if interrupt.requested():
            return bool(ask)   # "needed", then "stop": ggml breaks off the graph there
        try:
            t = ctypes.cast(ptr, ctypes.POINTER(GgmlTensor)).contents
            if not self._checked:
                check_layout(self.lib, ptr, t)
                self._checked = True
            if t.op not in (self.MUL_MAT, self.MUL_MAT_ID):
                return bool(not ask)
            if ask:
                return bool(self.select(MatMul(self, t)))
            if self.error is None:
                self.collect(MatMul(self, t))
            return True
        except BaseException as e:
            self.error = self.error or e
            return bool(not ask)
