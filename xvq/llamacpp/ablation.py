"""One tensor's quantization error injected into a loaded model, no file written: a compute-graph
tap (the eval callback, as xvq.llamacpp.tap) that adds (Q(W) - W)·x to the output of every
matrix multiplication whose weight is W (and D[ids] to the rows an embedding lookup gathers).

The model is loaded once, memory-mapped and offloaded as llama.cpp decides, and every ablation is
one forward pass: the output of W's op is the last node of the graph segment the scheduler
computes before calling back (it asked to see it), so what the tap adds there is what every later
op reads. The cost is one extra product of W's shape per token and D (one tensor, float32) in
memory. Host tensors are changed in place; a tensor on a GPU is read with
ggml_backend_tensor_get and written back with ggml_backend_tensor_set."""
from __future__ import annotations

import ctypes

import numpy as np

from xvq import interrupt
from xvq.errors import XvqError
from xvq.llamacpp.tap import GGML_TYPE_F32, GgmlTensor, _ggml, _op_codes, check_layout, tensor_array, weight_name


def _lib_with_set():
    lib = _ggml()
    lib.ggml_backend_tensor_set.restype = None
    lib.ggml_backend_tensor_set.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    return lib


class AblationTap:
    """cb_eval for a Context. `set(name, delta)` makes every later decode compute as if weight
    `name` were W + delta (delta in numpy order: [rows, cols], or [experts, rows, cols] for
    stacked experts); `add` perturbs one more weight at the same time (a whole mix, measured
    before it is written); `clear()` restores the model. `hits` counts the ops changed since
    `set`, so a name the graph never uses is caught. A delta may be given as a function that
    makes it: it is then made when its op is reached and dropped after, so a whole model's
    perturbation needs one tensor's memory at a time (decode the chunks in one batch to make each
    once). Exceptions never unwind through C: kept in `error` and raised by Context.decode; a
    signal (xvq.interrupt) stops the graph at the next op."""

    def __init__(self):
        self.lib = _lib_with_set()
        ops = _op_codes(self.lib, ("MUL_MAT", "MUL_MAT_ID", "GET_ROWS"))
        self.MUL_MAT, self.MUL_MAT_ID, self.GET_ROWS = ops["MUL_MAT"], ops["MUL_MAT_ID"], ops["GET_ROWS"]
        self.deltas: dict[str, np.ndarray] = {}
        self.hits = 0
        self.error: BaseException | None = None
        self._checked = False
        from llama_cpp import llama_cpp as C
        self.callback = C.ggml_backend_sched_eval_callback(self._cb)

    def set(self, name: str, delta: np.ndarray) -> None:
        self.deltas, self.hits = {name: np.asarray(delta, np.float32)}, 0

    def add(self, name: str, delta) -> None:
        self.deltas[name] = delta if callable(delta) else np.asarray(delta, np.float32)

    def clear(self) -> None:
        self.deltas = {}

    def _target(self, t: GgmlTensor) -> np.ndarray | None:
        if not self.deltas or t.op not in (self.MUL_MAT, self.MUL_MAT_ID, self.GET_ROWS) or not t.src[0]:
            return None
        return self.deltas.get(weight_name(t.src[0].contents.name))

    @interrupt.c_callback
    def _cb(self, ptr, ask, _user):
        if interrupt.requested():
            return bool(ask)   # "needed", then "stop": ggml breaks off the graph there (as the tap)
        try:
            t = ctypes.cast(ptr, ctypes.POINTER(GgmlTensor)).contents
            if not self._checked:
                check_layout(self.lib, ptr, t)
                self._checked = True
            delta = self._target(t)
            if delta is None:
                return bool(not ask)
            if ask:
                return True
            if self.error is None:
                self._perturb(t, ptr, delta() if callable(delta) else delta)
                self.hits += 1
            return True
        except BaseException as e:
            self.error = self.error or e
            return bool(not ask)

    def _perturb(self, t: GgmlTensor, ptr, delta: np.ndarray) -> None:
        if t.type != GGML_TYPE_F32:
            raise XvqError(f"ablation of {weight_name(t.src[0].contents.name)}: the op's output is not float32; "
                           f"use a CPU or CUDA build of the locked llama-cpp-python")
        host = not t.buffer or self.lib.ggml_backend_buffer_is_host(t.buffer)
        nbytes = self.lib.ggml_nbytes(ptr)
        if host:
            raw = (ctypes.c_uint8 * nbytes).from_address(t.data)
        else:
            raw = ctypes.create_string_buffer(nbytes)
            self.lib.ggml_backend_tensor_get(ptr, raw, 0, nbytes)
        ne, nb = list(t.ne), list(t.nb)
        out = np.lib.stride_tricks.as_strided(np.frombuffer(raw, np.float32), shape=ne[::-1], strides=nb[::-1])
        if t.op == self.GET_ROWS:
            ids = tensor_array(self.lib, t.src[1].contents, t.src[1], np.int32)
            out += delta[ids.reshape(out.shape[:-1])]          # each gathered row's own error
        elif t.op == self.MUL_MAT:
            x = tensor_array(self.lib, t.src[1].contents, t.src[1], np.float32)
            out += x @ delta.T                                  # (..., tokens, cols) -> (..., tokens, rows)
        else:
            self._perturb_routed(t, out, delta)
        if not host:
            self.lib.ggml_backend_tensor_set(ptr, raw, 0, nbytes)

    def _perturb_routed(self, t: GgmlTensor, out: np.ndarray, delta: np.ndarray) -> None:
        """MUL_MAT_ID: out (1, tokens, slots, rows) += D[expert of the slot] @ x of the slot (x has
        one slot for all, gate/up, or one per slot, down)."""
        x = tensor_array(self.lib, t.src[1].contents, t.src[1], np.float32)[0]        # (tokens, xs, cols)
        ids = tensor_array(self.lib, t.src[2].contents, t.src[2], np.int32)[0, 0]     # (tokens, slots)
        for e in np.unique(ids):
            tok, slot = np.nonzero(ids == e)
            xs = x[tok, slot if x.shape[1] > 1 else 0]
            out[0, tok, slot] += xs @ delta[e].T
