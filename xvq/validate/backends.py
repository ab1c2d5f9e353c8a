"""Where logits come from: llama.cpp for GGUF files, transformers for HF folders (the bf16
reference, GPTQ checkpoints). Every backend takes the same [n_windows, ctx] token windows and
yields, per window, the float32 logits of its scored positions ([ctx - 1 - ctx//2, n_vocab])."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np

from xvq.errors import XvqError
from xvq.validate.windows import first_scored, scored_per_window

LOGITS_BUDGET_BYTES = 512 << 20     # cap on one decode's output rows (n_seq windows at once)


def default_threads() -> int:
    """Physical-core count like llama.cpp's tools (cpu_get_num_math); affinity-aware."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, n)


class GgufScorer:
    """llama.cpp through llama-cpp-python's low-level API, run the way llama-perplexity runs:
    n_seq windows packed into one batch (one sequence each, n_batch = n_seq * ctx), logits
    requested only for the second half of each window, KV memory cleared between batches."""

    kind = "gguf"

    def __init__(self, path: Path, ctx: int, *, n_threads: int | None = None, n_seq: int | None = None,
                 n_gpu_layers: int = 0):
        import llama_cpp
        from llama_cpp import _internals
        from llama_cpp._logger import set_verbose
        set_verbose(False)
        llama_cpp.llama_backend_init()
        self.ctx_len = ctx
        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = n_gpu_layers
        try:
            self._model = _internals.LlamaModel(path_model=str(path), params=mp, verbose=False)
        except (ValueError, OSError) as e:
            raise XvqError(f"{path}: llama.cpp cannot load it ({e}); the file is damaged or not a model GGUF") from e
        vocab = llama_cpp.llama_model_get_vocab(self._model.model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(vocab))
        per_seq_out = ctx - first_scored(ctx)
        if n_seq is None:   # llama-perplexity's default n_batch 2048 -> 2048 // ctx windows per batch
            n_seq = max(1, min(2048 // ctx, LOGITS_BUDGET_BYTES // (4 * self.n_vocab * per_seq_out)))
        self.n_seq = n_seq
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = cp.n_batch = ctx * n_seq
        cp.n_ubatch = min(512, ctx * n_seq)
        cp.n_seq_max = n_seq
        cp.n_threads = cp.n_threads_batch = n_threads or default_threads()
        try:
            self._ctx = _internals.LlamaContext(model=self._model, params=cp, verbose=False)
        except ValueError as e:
            raise XvqError(f"{path}: llama.cpp cannot create a context of {ctx * n_seq} tokens ({e}); "
                           f"lower --ctx") from e
        self._llama = llama_cpp
        self._batch = llama_cpp.llama_batch_init(ctx * n_seq, 0, n_seq)
        self._layout_batch()

    def _layout_batch(self) -> None:
        """Positions, sequence ids and output flags never change between batches: set them once."""
        ctx, b = self.ctx_len, self._batch
        n = ctx * self.n_seq
        pos = np.arange(n) % ctx
        np.ctypeslib.as_array(b.pos, shape=(n,))[:] = pos
        np.ctypeslib.as_array(b.n_seq_id, shape=(n,))[:] = 1
        np.ctypeslib.as_array(b.logits, shape=(n,))[:] = pos >= first_scored(ctx)
        for j in range(n):
            b.seq_id[j][0] = j // ctx
        self._tokens = np.ctypeslib.as_array(b.token, shape=(n,))

    def logits(self, windows: np.ndarray) -> Iterator[np.ndarray]:
        ctx, S = self.ctx_len, scored_per_window(self.ctx_len)
        out_per_seq = ctx - first_scored(ctx)
        lc = self._llama
        for g in range(0, len(windows), self.n_seq):
            group = windows[g:g + self.n_seq]
            lc.llama_memory_clear(lc.llama_get_memory(self._ctx.ctx), True)
            self._tokens[:group.size] = group.reshape(-1)
            self._batch.n_tokens = group.size
            rc = lc.llama_decode(self._ctx.ctx, self._batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
            out = np.ctypeslib.as_array(lc.llama_get_logits(self._ctx.ctx),
                                        shape=(len(group) * out_per_seq, self.n_vocab))
            for s in range(len(group)):
                yield out[s * out_per_seq: s * out_per_seq + S]

    def close(self) -> None:
        if getattr(self, "_batch", None) is not None:
            self._llama.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "_ctx", None) is not None:
            self._ctx.close()
            self._ctx = None
        if getattr(self, "_model", None) is not None:
            self._model.close()
            self._model = None


def torch_device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


class HfScorer:
    """transformers (the reference, GPTQ folders, any HF checkpoint). Only the scored half of
    each window goes through the LM head (logits_to_keep)."""

    kind = "hf"

    def __init__(self, folder: Path, ctx: int, *, dtype: str = "auto", batch_size: int = 1,
                 device: str | None = None):
        import torch
        import xvq  # noqa: F401  (registers XVERSE with the Auto classes)
        from transformers import AutoModelForCausalLM
        self.ctx_len = ctx
        self.device = device or torch_device()
        self.batch_size = batch_size
        torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
        try:
            self.model = AutoModelForCausalLM.from_pretrained(
                str(folder), dtype=torch_dtype, device_map=self.device if self.device != "cpu" else None)
        except Exception as e:  # transformers raises many types for unreadable folders
            raise XvqError(f"{folder}: transformers cannot load it ({type(e).__name__}: {e}); "
                           f"check the folder is a complete checkpoint") from e
        if self.device == "cpu":
            self.model.to("cpu")
        self.model.eval()
        self.n_vocab = int(self.model.get_output_embeddings().weight.shape[0]) \
            if self.model.get_output_embeddings() is not None else int(self.model.config.vocab_size)

    def logits(self, windows: np.ndarray) -> Iterator[np.ndarray]:
        import torch
        ctx = self.ctx_len
        keep = ctx - first_scored(ctx)       # positions first .. ctx-1; the last one predicts nothing
        with torch.inference_mode():
            for g in range(0, len(windows), self.batch_size):
                ids = torch.from_numpy(windows[g:g + self.batch_size].astype(np.int64)).to(self.device)
                out = self.model(input_ids=ids, logits_to_keep=keep, use_cache=False).logits
                out = out[:, :-1].float().cpu().numpy()
                for row in out:
                    yield row

    def close(self) -> None:
        self.model = None


def reference_dtype(n_params: int, device: str) -> str:
    """The reference runs in float32 when that fits comfortably, else in the checkpoint's dtype."""
    if device == "cpu" and n_params * 4 > 32 << 30:
        return "auto"
    return "float32" if device == "cpu" else "auto"
