"""llama.cpp's byte-level BPE pre-tokenizers, transcribed once from the locked llama.cpp
(src/llama-vocab.cpp: `llm_tokenizer_bpe`'s regex_exprs per pre type, and the
`tokenizer.ggml.pre` names that select each type and the options they imply).

Each entry is written in the form a Hugging Face tokenizer.json declares the same splitting
(llama.cpp keeps that "original regex from tokenizer.json" in its comments): a sequence of regexes,
each splitting every piece of the one before and keeping the matches isolated. `llama_cpp_form`
applies llama.cpp's own documented adaptations, so tests/test_pretok.py can check every entry
against llama-vocab.cpp itself.

The choice of a name is by declaration, not by hashing sample tokenizations (llama.cpp's
converter's way, which knows only tokenizers it has seen): a tokenizer whose declared splitting
equals an entry's reproduces llama.cpp's splitting wherever llama.cpp's regex engine agrees with
Hugging Face's, and `xvq convert` measures that on text in every language.
"""
from __future__ import annotations

from dataclasses import dataclass

# GPT-2's regex, as tokenizers' ByteLevel(use_regex=True) applies it. llama.cpp writes it without
# the final `|\s+`, but runs it through a hand-written matcher (unicode.cpp,
# unicode_regex_split_custom_gpt2, "GPT2 system regex") that implements the full form.
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
LLAMA3 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN35 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")
SEED_CODER = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+"
MINICPM5 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
DEEPSEEK_CODER = (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", r"[一-龥ࠀ-一가-퟿]+", r"\p{N}")


@dataclass(frozen=True)
class PreTokenizer:
    name: str                    # tokenizer.ggml.pre
    splits: tuple[str, ...]      # regexes in Hugging Face's form, applied in turn (Split, Isolated)
    ignore_merges: bool = False  # the name makes llama.cpp take whole-piece vocabulary hits first


# Order matters only where two names split alike: the first is chosen (the canonical one).
PRE_TOKENIZERS: tuple[PreTokenizer, ...] = (
    PreTokenizer("gpt-2", (GPT2,)),
    PreTokenizer("llama-bpe", (LLAMA3,), ignore_merges=True),
    PreTokenizer("smaug-bpe", (LLAMA3,)),
    PreTokenizer("smollm", (r"\p{N}", GPT2)),          # starcoder, refact, command-r split alike
    PreTokenizer("qwen2", (QWEN2,)),
    PreTokenizer("qwen35", (QWEN35,)),
    PreTokenizer("seed-coder", (SEED_CODER,)),
    PreTokenizer("minicpm5", (r"\p{N}{1,3}", MINICPM5), ignore_merges=True),
    PreTokenizer("deepseek-coder", DEEPSEEK_CODER),
)

# llama.cpp's rewrites of Hugging Face regexes (its comments in llama-vocab.cpp say why): std::regex
# has no inline (?i:...) group, so the contractions are spelled with character classes.
ADAPTATIONS = ((_CONTRACTIONS, r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"),)


def llama_cpp_form(regex: str) -> str:
    """`regex` as llama-vocab.cpp spells it."""
    if regex == GPT2:
        return GPT2[:-len(r"|\s+")]
    for hf, ours in ADAPTATIONS:
        regex = regex.replace(hf, ours)
    return regex


def normalise_regex(regex: str) -> str:
    """One spelling for the same regex: literal CR/LF/tab as escapes (llama.cpp writes some as C
    escapes, tokenizer.json as regex escapes), llama.cpp's adaptations undone."""
    regex = regex.replace("\r", r"\r").replace("\n", r"\n").replace("\t", r"\t")
    for hf, ours in ADAPTATIONS:
        regex = regex.replace(ours, hf)
    return regex


def matching(splits: tuple[str, ...], ignore_merges: bool) -> tuple[PreTokenizer | None, PreTokenizer | None]:
    """(the entry that splits as `splits` with the same ignore_merges, else None; an entry that
    splits alike with the other ignore_merges, else None)."""
    want = tuple(normalise_regex(r) for r in splits)
    alike = [p for p in PRE_TOKENIZERS if tuple(normalise_regex(r) for r in p.splits) == want]
    exact = next((p for p in alike if p.ignore_merges == ignore_merges), None)
    return exact, (None if exact else next(iter(alike), None))
