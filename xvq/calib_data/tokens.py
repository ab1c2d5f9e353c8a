"""Token counting for the calibration budget: the model's own tokenizer when given, otherwise a
cheap estimate that needs nothing."""
from __future__ import annotations

import math
from pathlib import Path

from xvq.errors import XvqError


def _is_cjk(cp: int) -> bool:
    """Han ideographs, kana, Hangul and CJK punctuation: roughly one token per character in the
    tokenizers of CJK-capable models (and more in English-centred ones)."""
    return (0x3000 <= cp <= 0x30FF or 0x3400 <= cp <= 0x4DBF or 0x4E00 <= cp <= 0x9FFF
            or 0xAC00 <= cp <= 0xD7AF or 0x1100 <= cp <= 0x11FF or 0xF900 <= cp <= 0xFAFF
            or 0xFF00 <= cp <= 0xFFEF or 0x20000 <= cp <= 0x2FFFF)


def estimate_tokens(text: str) -> int:
    """The default count when no tokenizer is given: 1 per CJK character, 1 per 4 other ASCII
    characters (English-like text and code), 1 per 2 other non-ASCII characters (Cyrillic, Greek,
    accented Latin, Arabic, Hebrew, Indic, Thai: scripts that BPE vocabularies split finer);
    whitespace is free. An estimate for budgeting only, within about a factor of 2 of real
    tokenizers."""
    cjk = ascii_chars = other = 0
    for ch in text:
        cp = ord(ch)
        if ch.isspace():
            continue
        if cp < 128:
            ascii_chars += 1
        elif _is_cjk(cp):
            cjk += 1
        else:
            other += 1
    return cjk + math.ceil(ascii_chars / 4 + other / 2)


# (tokenizer file identity) -> {text: count}: the built-in corpus is counted once per process,
# not once per sample (a 100k-vocabulary BPE takes seconds over the whole train split).
_COUNTS: dict[str, dict[str, int]] = {}


class TokenCounter:
    """count(text) -> tokens. `name` says which counter it is (for reports and dataset names)."""

    def __init__(self, tokenizer_dir: Path | str | None = None):
        self.tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else None
        self._encode = estimate_tokens if self.tokenizer_dir is None else _load_encoder(self.tokenizer_dir)
        self.name = "estimate" if self.tokenizer_dir is None else self.tokenizer_dir.name
        self._memo = _COUNTS.setdefault(_identity(self.tokenizer_dir), {})

    def count(self, text: str) -> int:
        if not text:
            return 0
        n = self._memo.get(text)
        if n is None:
            n = self._memo[text] = self._encode(text)
        return n

    def count_many(self, texts: list[str]) -> list[int]:
        """Counts of many texts, the new ones encoded as one batch (parallel in `tokenizers`)."""
        new = list({t for t in texts if t and t not in self._memo})
        batch = getattr(self._encode, "batch", None)
        if new and batch is not None:
            self._memo.update(zip(new, batch(new)))
        return [self.count(t) for t in texts]


def _identity(folder: Path | None) -> str:
    """The tokenizer files' path, size and mtime: a changed tokenizer is counted afresh."""
    if folder is None:
        return "estimate"
    files = [folder] if folder.is_file() else sorted(p for p in folder.glob("tokenizer*") if p.is_file())
    return "|".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)


def _load_encoder(folder: Path):
    """tokenizer.json (the folder's, or the file itself) through `tokenizers` (fast, no model
    code); a SentencePiece-only folder through transformers. Special tokens (BOS/EOS) are not counted: llama-imatrix adds its own."""
    tokenizer_json = folder if folder.is_file() and folder.suffix == ".json" else folder / "tokenizer.json"
    if tokenizer_json.is_file():
        from tokenizers import Tokenizer
        try:
            tok = Tokenizer.from_file(str(tokenizer_json))
        except Exception as e:
            raise XvqError(f"{tokenizer_json}: cannot be read as a tokenizer ({e}); pass a valid tokenizer folder") from e
        def encode(text: str) -> int:
            return len(tok.encode(text, add_special_tokens=False).ids)
        def batch(texts: list[str], per_call: int = 64) -> list[int]:
            # slices: one Rust call over the whole corpus takes seconds, and a signal waits for it
            return [len(e.ids) for i in range(0, len(texts), per_call)
                    for e in tok.encode_batch(texts[i:i + per_call], add_special_tokens=False)]
        encode.batch = batch
        return encode
    if not folder.is_dir():
        raise XvqError(f"{folder}: tokenizer folder not found; pass --tokenizer a folder with tokenizer.json or tokenizer.model")
    if (folder / "tokenizer.model").is_file():
        from transformers import AutoTokenizer
        try:
            tok = AutoTokenizer.from_pretrained(str(folder))
        except Exception as e:
            raise XvqError(f"{folder}: cannot load the tokenizer ({e}); pass a valid tokenizer folder") from e
        return lambda text: len(tok(text, add_special_tokens=False)["input_ids"])
    raise XvqError(f"{folder}: no tokenizer.json or tokenizer.model; pass --tokenizer the model folder")
