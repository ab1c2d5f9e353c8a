"""Where logits come from: llama.cpp for GGUF files, transformers for HF folders (the bf16
reference, GPTQ checkpoints). Every backend takes the same [n_windows, ctx] token windows and
yields, per window, the float32 logits of its scored positions ([ctx - 1 - ctx//2, n_vocab])."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from xvq.errors import XvqError
from xvq.llamacpp import Gguf
from xvq.validate.windows import first_scored, scored_per_window

LOGITS_BUDGET_BYTES = 512 << 20     # cap on one decode's output rows (n_seq windows at once)


class GgufScorer:
    """A GGUF in llama.cpp, run the way llama-perplexity runs: n_seq windows packed into one batch
    (one sequence each), logits only for the second half of each window, memory cleared between
    batches."""

    kind = "gguf"

    def __init__(self, path: Path, ctx: int, *, n_threads: int | None = None, n_seq: int | None = None,
                 gpu_layers: str | int | None = "auto"):
        self.ctx_len = ctx
        self._model = Gguf(path, gpu_layers=gpu_layers)
        self.n_vocab = self._model.n_vocab
        self.device = self._model.device
        per_seq_out = ctx - first_scored(ctx)
        if n_seq is None:   # llama-perplexity's default n_batch 2048 -> 2048 // ctx windows per batch
            n_seq = max(1, min(2048 // ctx, LOGITS_BUDGET_BYTES // (4 * self.n_vocab * per_seq_out)))
        self.n_seq = n_seq
        try:
            self._ctx = self._model.context(ctx, n_seq=n_seq, threads=n_threads)
        except XvqError:
            self._model.close()
            raise
        self._outputs = np.arange(ctx) >= first_scored(ctx)

    def logits(self, windows: np.ndarray) -> Iterator[np.ndarray]:
        S = scored_per_window(self.ctx_len)
        out_per_seq = int(self._outputs.sum())
        for g in range(0, len(windows), self.n_seq):
            group = windows[g:g + self.n_seq]
            out = self._ctx.decode(group, self._outputs)
            for s in range(len(group)):
                yield out[s * out_per_seq: s * out_per_seq + S]

    def close(self) -> None:
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
