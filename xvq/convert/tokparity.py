"""Tokenizer parity: Hugging Face ids (the reference) against llama.cpp ids for the same texts.

`compare_tokenization(gguf, hf_dir, texts)` loads the GGUF with `vocab_only=True` (no weights are
read, so a full-size model file is checked in a second) and reports how many texts tokenize to
exactly the same ids, how many tokens differ per 1,000, and the first difference with context.

`special=False` compares plain text: llama.cpp does not parse special-token strings and the
Hugging Face tokenizer is told not to either (`encode_special_tokens`). `special=True` compares
prompts as chat front-ends send them: both parse `<|endoftext|>` and friends.
"""
from __future__ import annotations

import difflib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from xvq.errors import XvqError

SAMPLE_FILE = Path(__file__).with_name("parity_sample.txt")
SAMPLE_SEPARATOR = "\n%%\n"

Tokenize = Callable[[str], list[int]]


@dataclass
class Diff:
    text_index: int
    position: int          # index of the first differing token
    context: str           # the text around it, decoded from the Hugging Face tokens
    hf_ids: list[int]      # a few ids from `position` on
    llama_ids: list[int]
    hf_pieces: list[str]
    llama_pieces: list[str]

    def __str__(self) -> str:
        return (f"text {self.text_index}, token {self.position}: …{self.context}… "
                f"HF {self.hf_pieces} {self.hf_ids} vs llama.cpp {self.llama_pieces} {self.llama_ids}")


@dataclass
class ParityResult:
    n_texts: int
    n_equal: int
    mismatch_rate: float              # share of texts whose ids differ anywhere
    n_tokens: int                     # Hugging Face tokens in all texts
    n_tokens_differing: int           # tokens inside differing spans (the longer side)
    first_diff: Diff | None
    diffs: list[Diff]                 # the first difference of every differing text

    @property
    def per_1000_tokens(self) -> float:
        return 1000.0 * self.n_tokens_differing / max(self.n_tokens, 1)

    def summary(self) -> str:
        s = (f"{self.n_equal}/{self.n_texts} texts identical (mismatch rate {self.mismatch_rate:.1%}, "
             f"{self.per_1000_tokens:.2f} differing tokens per 1,000)")
        return s + (f"; first difference: {self.first_diff}" if self.first_diff else "")


# --- the two tokenizers ------------------------------------------------------------------------

def hf_tokenizer(folder: Path | str, special: bool = False) -> tuple[Tokenize, Callable[[int], str]]:
    """Reference ids: tokenizers for tokenizer.json, else sentencepiece for tokenizer.model."""
    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        tok.encode_special_tokens = not special
        return (lambda s: tok.encode(s, add_special_tokens=False).ids), (lambda i: tok.id_to_token(i) or "?")
    if (folder / "tokenizer.model").is_file():
        import sentencepiece as spm
        sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
        return (lambda s: sp.encode(s)), sp.id_to_piece
    raise XvqError(f"{folder}: no tokenizer.json or tokenizer.model to compare against; "
                   f"point at the Hugging Face model folder")


@contextmanager
def llama_tokenizer(gguf_path: Path | str, special: bool = False) -> Iterator[tuple[Tokenize, Callable[[int], str]]]:
    """llama.cpp's tokenizer of a GGUF, vocabulary only (a 65B file costs nothing); no BOS, since
    the Hugging Face reference is taken without special tokens too."""
    from xvq.llamacpp import Gguf
    with Gguf(gguf_path, vocab_only=True) as v:
        yield (lambda s: v.tokenize(s, add_special=False, parse_special=special).tolist()), v.piece


# --- comparison --------------------------------------------------------------------------------

def _differing_tokens(a: Sequence[int], b: Sequence[int]) -> int:
    sm = difflib.SequenceMatcher(a=a, b=b, autojunk=False)
    # an inserted llama.cpp token counts too, so a span counts as its longer side
    return sum(max(i2 - i1, j2 - j1) for op, i1, i2, j1, j2 in sm.get_opcodes() if op != "equal")


def _first_diff(index: int, a: list[int], b: list[int], hf_piece, ll_piece, width: int = 6) -> Diff:
    p = next((k for k in range(min(len(a), len(b))) if a[k] != b[k]), min(len(a), len(b)))
    context = "".join(hf_piece(i) for i in a[max(0, p - width):p + width]).replace("\u2581", " ")
    ha, lb = a[p:p + 4], b[p:p + 4]
    return Diff(index, p, context, ha, lb, [hf_piece(i) for i in ha], [ll_piece(i) for i in lb])


def compare_tokenization(gguf_path: Path | str, hf_tokenizer_dir: Path | str, texts: Iterable[str], *,
                         special: bool = False) -> ParityResult:
    """Tokenize every text with both and compare the id sequences."""
    hf, hf_piece = hf_tokenizer(hf_tokenizer_dir, special)
    with llama_tokenizer(gguf_path, special) as (ll, ll_piece):
        return compare_tokenizers(hf, ll, texts, hf_piece, ll_piece)


def compare_tokenizers(hf: Tokenize, ll: Tokenize, texts: Iterable[str], hf_piece=str, ll_piece=str) -> ParityResult:
    n = n_equal = n_tok = n_diff = 0
    diffs: list[Diff] = []
    for i, text in enumerate(texts):
        a, b = list(hf(text)), list(ll(text))
        n += 1
        n_tok += len(a)
        if a == b:
            n_equal += 1
            continue
        n_diff += _differing_tokens(a, b)
        diffs.append(_first_diff(i, a, b, hf_piece, ll_piece))
    return ParityResult(n, n_equal, (n - n_equal) / max(n, 1), n_tok, n_diff, diffs[0] if diffs else None, diffs)


# --- texts -------------------------------------------------------------------------------------

def chunks(text: str, n: int, size: int = 400) -> list[str]:
    """`n` evenly spaced `size`-character chunks of `text`, each moved forward to start on a
    non-space character (the acceptance sample of issue 3)."""
    out = []
    span = max(len(text) - size, 1)
    for j in range(n):
        o = span * j // n
        while o < len(text) and text[o].isspace():
            o += 1
        if text[o:o + size]:
            out.append(text[o:o + size])
    return out


def corpus_chunks(files: Sequence[Path], n_total: int = 259, size: int = 400) -> list[str]:
    """`n_total` chunks spread evenly over the files (sorted, so the sample is reproducible)."""
    files = sorted(files)
    if not files:
        return []
    per = [n_total // len(files) + (1 if i < n_total % len(files) else 0) for i in range(len(files))]
    return [c for f, k in zip(files, per) for c in chunks(f.read_text(encoding="utf-8"), k, size)]


def parity_sample() -> list[str]:
    """The built-in multilingual sample that `xvq convert` measures every file on: paragraphs of
    Chinese (classical and modern), Japanese, English prose, wikitext, code, numbers, mixed scripts."""
    return [t for t in SAMPLE_FILE.read_text(encoding="utf-8").split(SAMPLE_SEPARATOR) if t.strip()]
