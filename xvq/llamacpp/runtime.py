"""llama.cpp at run time, through llama-cpp-python's C API: the one place that loads a GGUF and
decides threads, logging and GPU offload. Everything else in xvq asks for a `Gguf` (weights or
vocabulary only) and a `Context` (batched decode), or `chat_model` for generation."""
from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import numpy as np

from xvq import interrupt
from xvq.errors import XvqError

_state = {"log_cb": None, "verbose": False, "backend": False, "stop_cb": None}


def _lib():
    from llama_cpp import llama_cpp as C
    if not _state["backend"]:
        C.llama_backend_init()
        _state["backend"] = True
    quiet()
    interrupt.check()   # a signal recorded in a callback of the previous call
    return C


@interrupt.c_callback
def _stop_requested(*_args) -> bool:
    """ggml's abort callback (true: stop computing) and, negated, llama.cpp's load progress."""
    return interrupt.requested()


@interrupt.c_callback
def _keep_loading(_progress, _user) -> bool:
    return not interrupt.requested()


def _stop_callbacks(C):
    """The ctypes thunks for every context and load, made once and kept for the process."""
    if _state["stop_cb"] is None:
        _state["stop_cb"] = (C.ggml_abort_callback(_stop_requested), C.llama_progress_callback(_keep_loading))
    return _state["stop_cb"]


@functools.cache
def libggml():
    """ggml from the same place as the libllama llama-cpp-python loaded: its own, or the folder
    LLAMA_CPP_LIB_PATH names (llama-cpp-python's switch for a llama.cpp built apart, e.g. for
    another GPU backend), so the tap and the kernels never call into a second copy."""
    override = os.environ.get("LLAMA_CPP_LIB_PATH")
    if override:
        from llama_cpp._ctypes_extensions import load_shared_library
        return load_shared_library("ggml", Path(override))
    from llama_cpp._ggml import libggml as lib
    return lib


# --- logging ---------------------------------------------------------------------------------

def set_verbose(on: bool) -> None:
    """`--verbose`: llama.cpp logs to stderr as its own tools do; otherwise silent."""
    _state["verbose"] = bool(on)
    quiet(force=True)


def quiet(force: bool = False) -> None:
    """(Re)install xvq's log policy, silent unless verbose; `force` after a temporary capture."""
    from llama_cpp import llama_cpp as C
    if _state["log_cb"] is not None and not force:
        return
    # the ctypes thunk must outlive every call llama.cpp makes into it: kept in _state
    old = _state["log_cb"]
    _state["log_cb"] = C.llama_log_callback(_print_log if _state["verbose"] else _drop_log)
    C.llama_log_set(_state["log_cb"], ctypes.c_void_p(0))
    del old   # only now may the previous thunk go


@interrupt.c_callback
def _print_log(level, text, user):
    import sys
    sys.stderr.write(text.decode("utf-8", "replace"))


@interrupt.c_callback
def _drop_log(level, text, user):
    pass


def capture_log(on_line) -> object:
    """Route llama.cpp's log to `on_line(level, text)` until `quiet(force=True)`; returns the
    callback, which the caller keeps alive."""
    C = _lib()

    @interrupt.c_callback
    def forward(level, text, user):
        on_line(level, text.decode("utf-8", "replace"))
    cb = C.llama_log_callback(forward)
    C.llama_log_set(cb, ctypes.c_void_p(0))
    return cb


# --- threads and devices ----------------------------------------------------------------------

def default_threads() -> int:
    """Usable cores (affinity-aware), as llama.cpp's tools count them."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, n)


def supports_gpu_offload() -> bool:
    return bool(_lib().llama_supports_gpu_offload())


GPU_LAYERS_HELP = ("Layers llama.cpp offloads to the GPU: auto (all, when this llama.cpp build has a GPU "
                   "backend: CUDA, or Metal on macOS), 0 (CPU), or a number.")


def resolve_gpu_layers(spec: str | int | None = "auto") -> int:
    """--gpu-layers auto|N|0: auto = every layer when this llama.cpp build can offload, else 0."""
    s = "auto" if spec is None else str(spec).strip().lower()
    if s == "auto":
        return 999 if supports_gpu_offload() else 0
    try:
        n = int(s)
    except ValueError:
        raise XvqError(f"--gpu-layers {spec}: use auto, 0, or a number of layers") from None
    if n < 0:
        raise XvqError(f"--gpu-layers {spec}: use auto, 0, or a positive number of layers")
    if n > 0 and not supports_gpu_offload():
        raise XvqError(f"--gpu-layers {spec}: this llama.cpp build has no GPU backend; rebuild with "
                       f"`make setup GPU=cuda` (Metal is the default on macOS) or use --gpu-layers 0")
    return n


def device_label(n_gpu_layers: int) -> str:
    """Which device computes, for reports and progress lines."""
    if n_gpu_layers <= 0:
        return "cpu"
    C = _lib()
    try:
        for i in range(C.ggml_backend_dev_count()):
            dev = C.ggml_backend_dev_get(i)
            if C.ggml_backend_dev_type(dev) in (1, 2):   # GGML_BACKEND_DEVICE_TYPE_GPU / IGPU
                return f"gpu ({C.ggml_backend_dev_description(dev).decode()})"
    except AttributeError:   # older bindings without the device API
        pass
    return "gpu"


def ftype_value(name: str) -> int:
    """llama_ftype of a llama-quantize type name, from the installed library's constants."""
    from llama_cpp import llama_cpp as C
    return C.LLAMA_FTYPE_ALL_F32 if name == "F32" else getattr(C, f"LLAMA_FTYPE_MOSTLY_{name}")


# --- a loaded GGUF ----------------------------------------------------------------------------

class Gguf:
    """A GGUF in llama.cpp: memory-mapped weights (offloaded per `gpu_layers`), or with
    `vocab_only` the vocabulary alone (a 65B file's tokenizer in a second). Free with close()
    or a `with` block."""

    def __init__(self, path: Path | str, *, vocab_only: bool = False, gpu_layers: str | int | None = "auto"):
        self.path = Path(path)
        if not self.path.is_file():
            raise XvqError(f"{self.path}: GGUF not found; convert the model first (xvq convert)")
        C = self.C = _lib()
        mp = C.llama_model_default_params()
        mp.vocab_only = vocab_only
        self.n_gpu_layers = 0 if vocab_only else resolve_gpu_layers(gpu_layers)
        mp.n_gpu_layers = self.n_gpu_layers
        mp.progress_callback = _stop_callbacks(C)[1]   # a signal stops a long load
        self.model = C.llama_model_load_from_file(str(self.path).encode(), mp)
        if not self.model:
            interrupt.check()
            what = "its vocabulary" if vocab_only else "it"
            raise XvqError(f"{self.path}: llama.cpp cannot load {what}; the file is damaged or not a model GGUF "
                           f"(convert the model again with xvq convert)")
        self.vocab = C.llama_model_get_vocab(self.model)
        self.n_vocab = int(C.llama_vocab_n_tokens(self.vocab))

    @property
    def device(self) -> str:
        return device_label(self.n_gpu_layers)

    @property
    def add_bos(self) -> bool:
        return bool(self.C.llama_vocab_get_add_bos(self.vocab))

    @property
    def bos(self) -> int:
        return int(self.C.llama_vocab_bos(self.vocab))

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> np.ndarray:
        C = self.C
        raw = text.encode("utf-8")
        cap = len(raw) + 16
        while True:
            buf = (C.llama_token * cap)()
            n = C.llama_tokenize(self.vocab, raw, len(raw), buf, cap, add_special, parse_special)
            if n >= 0:
                return np.frombuffer(buf, np.int32, n).copy()
            cap = -n

    def piece(self, token: int) -> str:
        return self.C.llama_vocab_get_text(self.vocab, int(token)).decode("utf-8", "replace")

    def context(self, n_ctx: int, *, n_seq: int = 1, n_ubatch: int | None = None, threads: int | None = None,
                tap=None) -> "Context":
        return Context(self, n_ctx, n_seq=n_seq, n_ubatch=n_ubatch, threads=threads, tap=tap)

    def close(self) -> None:
        if getattr(self, "model", None):
            self.C.llama_model_free(self.model)
            self.model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Context:
    """A llama.cpp context holding `n_seq` independent sequences of up to `n_ctx` tokens each,
    decoded together in one batch (as llama-perplexity packs windows). `tap` is a MatMulTap whose
    callback sees the graph (llama-imatrix's cb_eval)."""

    def __init__(self, model: Gguf, n_ctx: int, *, n_seq: int = 1, n_ubatch: int | None = None,
                 threads: int | None = None, tap=None):
        C = self.C = model.C
        self.model, self.n_ctx, self.n_seq, self.tap = model, n_ctx, n_seq, tap
        total = n_ctx * n_seq
        cp = C.llama_context_default_params()
        cp.n_ctx = cp.n_batch = total
        cp.n_ubatch = n_ubatch or min(512, total)
        cp.n_seq_max = n_seq
        cp.n_threads = cp.n_threads_batch = threads or default_threads()
        if tap is not None:
            cp.cb_eval = tap.callback
            cp.cb_eval_user_data = None
        cp.abort_callback = _stop_callbacks(C)[0]   # a signal stops a decode between graph nodes
        self.ctx = C.llama_init_from_model(model.model, cp)
        interrupt.check()
        if not self.ctx:
            raise XvqError(f"{model.path}: llama.cpp cannot create a context of {total} tokens; use a smaller --ctx")
        self.batch = C.llama_batch_init(total, 0, n_seq)
        self._shape = None

    def _lay_out(self, n: int, outputs: np.ndarray) -> None:
        """Positions, sequence ids and output flags: set once per window shape."""
        key = (n, outputs.tobytes())
        if self._shape == key:
            return
        b, total = self.batch, n * self.n_seq
        pos = np.tile(np.arange(n, dtype=np.int32), self.n_seq)
        np.ctypeslib.as_array(b.pos, shape=(total,))[:] = pos
        np.ctypeslib.as_array(b.n_seq_id, shape=(total,))[:] = 1
        np.ctypeslib.as_array(b.logits, shape=(total,))[:] = np.tile(outputs, self.n_seq)
        for j in range(total):
            b.seq_id[j][0] = j // n
        self._shape = key

    def decode(self, windows: np.ndarray, outputs: np.ndarray | None = None) -> np.ndarray:
        """Evaluate up to n_seq windows [k, n] of token ids from an empty cache; `outputs` [n] says
        which positions produce logits (default all). Returns the logits of those positions,
        [k * outputs.sum(), n_vocab], a view valid until the next decode."""
        C = self.C
        windows = np.atleast_2d(np.asarray(windows, np.int32))
        k, n = windows.shape
        if k > self.n_seq or n > self.n_ctx:
            raise ValueError(f"{k} windows of {n} tokens > context of {self.n_seq} x {self.n_ctx}")
        outputs = np.ones(n, bool) if outputs is None else np.asarray(outputs, bool)
        self._lay_out(n, outputs)
        C.llama_memory_clear(C.llama_get_memory(self.ctx), True)
        np.ctypeslib.as_array(self.batch.token, shape=(n * self.n_seq,))[:k * n] = windows.reshape(-1)
        self.batch.n_tokens = k * n
        rc = C.llama_decode(self.ctx, self.batch)
        interrupt.check()   # before the tap's or llama.cpp's error: a stopped decode is not a failure
        if self.tap is not None and self.tap.error is not None:
            err, self.tap.error = self.tap.error, None
            raise err
        if rc != 0:
            raise XvqError(f"{self.model.path}: llama.cpp failed to evaluate a batch (code {rc})")
        n_out = k * int(outputs.sum())
        if n_out == 0:
            return np.empty((0, self.model.n_vocab), np.float32)
        return np.ctypeslib.as_array(C.llama_get_logits(self.ctx), shape=(n_out, self.model.n_vocab))

    def close(self) -> None:
        if getattr(self, "batch", None) is not None:
            self.C.llama_batch_free(self.batch)
            self.batch = None
        if getattr(self, "ctx", None):
            self.C.llama_free(self.ctx)
            self.ctx = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --- generation (llama-cpp-python's high-level API: chat templates, sampling) ----------------

def chat_model(path: Path | str, n_ctx: int = 0, *, n_batch: int = 512, gpu_layers: str | int | None = "auto",
               hint: str = "convert or download it again"):
    """A `llama_cpp.Llama` for generation, loaded with xvq's offload and logging policy."""
    from llama_cpp import Llama
    n_gpu = resolve_gpu_layers(gpu_layers)
    _lib()
    try:
        llm = Llama(str(path), n_ctx=n_ctx, n_batch=n_batch, n_gpu_layers=n_gpu, verbose=_state["verbose"])
        interrupt.check()
    except Exception as e:   # llama-cpp-python raises ValueError/RuntimeError for unloadable files
        raise XvqError(f"{path}: llama.cpp could not load it ({e}); {hint}") from e
    finally:
        quiet(force=True)
    return llm


def loads(path: Path | str) -> str | None:
    """None when llama.cpp loads the file and makes a small context, else its complaint."""
    try:
        chat_model(path, 64, n_batch=32, gpu_layers=0).close()
        return None
    except XvqError as e:
        return str(e)

