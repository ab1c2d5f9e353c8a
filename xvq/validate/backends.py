"""Where logits come from: llama.cpp for GGUF files, transformers for HF folders (the bf16
reference, GPTQ checkpoints). Every backend takes the same [n_windows, ctx] token windows and
yields, per window, the float32 logits of its scored positions ([ctx - 1 - ctx//2, n_vocab])."""
from __future__ import annotations

from dataclasses import dataclass
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


# --- which backend computes the reference ------------------------------------------------------

HEADROOM = 1.25       # activations, logits and the allocator's slack on top of the weights
MEMORY_ENV = "XVQ_MEMORY"


def memory_available(device: str) -> tuple[int, str]:
    """(bytes the reference may use, where that figure comes from): XVQ_MEMORY (a size, e.g. 48G)
    when set, else the free memory of the GPU torch computes on, else available RAM."""
    import os
    if os.environ.get(MEMORY_ENV):
        from xvq.units import parse_size
        return parse_size(os.environ[MEMORY_ENV], MEMORY_ENV), f"{MEMORY_ENV}={os.environ[MEMORY_ENV]}"
    if device == "cuda":
        import torch
        return int(torch.cuda.mem_get_info()[0]), "free GPU memory"
    import psutil
    return int(psutil.virtual_memory().available), "available RAM"


@dataclass
class ReferencePlan:
    backend: str             # "transformers" or "llama.cpp"
    reason: str
    device: str
    dtype: str = "auto"      # transformers only


def plan_reference(n_params: int, reference_gguf: Path | None) -> ReferencePlan:
    """transformers when the checkpoint fits the memory at hand with room to spare (float32 on a
    CPU when even that fits), else llama.cpp on the bf16/f16 GGUF (memory-mapped, offloaded to a
    GPU when the build has one)."""
    if reference_gguf is not None:
        return ReferencePlan("llama.cpp", "--reference-gguf given", "")
    device = torch_device()
    avail, source = memory_available(device)
    for dtype, width in ((("float32", 4),) if device == "cpu" else ()) + (("auto", 2),):
        need = int(n_params * width * HEADROOM)
        if need <= avail:
            return ReferencePlan("transformers", f"{dtype} weights need {need / 1e9:.1f} GB, {source} is "
                                                 f"{avail / 1e9:.1f} GB", device, dtype)
    need = int(n_params * 2 * HEADROOM)
    return ReferencePlan("llama.cpp", f"bf16 weights need {need / 1e9:.1f} GB, more than {source} "
                                      f"({avail / 1e9:.1f} GB): the f16 GGUF, memory-mapped", "")
