"""Token windows, the llama-perplexity convention.

The text is tokenized ONCE, by the reference's Hugging Face tokenizer (with its own BOS rule),
and the same ids are fed to every artifact, so a tokenizer difference never reaches perplexity.
The stream is cut into non-overlapping windows of `ctx` tokens; when the tokenizer adds BOS the
first token of every window is replaced by BOS; only the second half of each window is scored:
logits at positions ctx//2 .. ctx-2 predict tokens ctx//2+1 .. ctx-1 (ctx - 1 - ctx//2 per window).
"""
from __future__ import annotations

import json

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xvq.errors import XvqError


def first_scored(ctx: int) -> int:
    return ctx // 2


def scored_per_window(ctx: int) -> int:
    return ctx - 1 - first_scored(ctx)


@dataclass
class Windows:
    """All windows of every text, in order; `spans[lang]` is that text's range of window rows."""
    ctx: int
    tokens: np.ndarray                      # [n_windows, ctx] int32, BOS already in place
    spans: dict[str, tuple[int, int]]       # lang -> (first window, end window)
    n_tokens: dict[str, int]                # lang -> tokens in its stream (before windowing)
    bos_id: int | None = None
    add_bos: bool = False
    meta: dict = field(default_factory=dict)

    @property
    def n_windows(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def per_window(self) -> int:
        return scored_per_window(self.ctx)

    def targets(self) -> np.ndarray:
        """[n_windows, per_window] the token each scored position predicts."""
        f = first_scored(self.ctx)
        return self.tokens[:, f + 1:]

    def position_span(self, lang: str) -> tuple[int, int]:
        a, b = self.spans[lang]
        return a * self.per_window, b * self.per_window


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:  # transformers raises many types for a broken/missing tokenizer
        raise XvqError(f"{model_dir}: cannot load its tokenizer ({type(e).__name__}: {e}); "
                       f"the folder needs tokenizer.json or tokenizer.model") from e
    tok.model_max_length = 1 << 62    # whole texts are tokenized, then windowed; silence the length warning
    return tok


def tokenizer_adds_bos(tok, model_dir: Path | None = None) -> bool:
    """The tokenizer prepends BOS itself, or its tokenizer_config.json says `add_bos_token: true`
    (transformers 5 ignores that flag for a bare tokenizer.json; llama.cpp's converters and
    xvq convert honour it as tokenizer.ggml.add_bos_token, so the GGUF adds BOS)."""
    if tok.bos_token_id is None:
        return False
    ids = tok("a", add_special_tokens=True)["input_ids"]
    if ids and ids[0] == tok.bos_token_id:
        return True
    cfg = Path(model_dir or tok.name_or_path) / "tokenizer_config.json"
    try:
        return bool(json.loads(cfg.read_text(encoding="utf-8")).get("add_bos_token", False))
    except (OSError, ValueError):
        return False


def make_windows(tok, texts: dict[str, str], ctx: int, max_tokens: int | None = None,
                 model_dir: Path | None = None) -> Windows:
    """Tokenize each text with the HF tokenizer (special tokens per its rules, like llama-perplexity's
    `common_tokenize(..., add_special=true)`), keep at most `max_tokens` of each, cut into windows."""
    if ctx < 4:
        raise XvqError(f"--ctx {ctx}: too small; use at least 4 (512 is the llama-perplexity default)")
    add_bos = tokenizer_adds_bos(tok, model_dir)
    rows, spans, counts = [], {}, {}
    for lang, text in texts.items():
        ids = np.asarray(tok(text, add_special_tokens=True)["input_ids"], dtype=np.int32)
        if add_bos and (ids.size == 0 or ids[0] != tok.bos_token_id):
            ids = np.concatenate([[tok.bos_token_id], ids]).astype(np.int32)
        if max_tokens:
            ids = ids[:max_tokens]
        counts[lang] = int(ids.size)
        n = ids.size // ctx
        chunk = ids[: n * ctx].reshape(n, ctx).copy()
        if add_bos and n:
            chunk[:, 0] = tok.bos_token_id
        spans[lang] = (sum(r.shape[0] for r in rows), sum(r.shape[0] for r in rows) + n)
        rows.append(chunk)
    tokens = np.concatenate(rows) if rows else np.zeros((0, ctx), np.int32)
    return Windows(ctx, tokens, spans, counts, tok.bos_token_id, add_bos)
