"""Tokenizer parity of every GGUF vocabulary encoding tried for XVERSE (issue 3), on the
100,257-entry XVERSE-style tokenizer in ../shared/assets, against the Hugging Face tokenizer.

    .venv/bin/python bench/tokenizer_parity.py [--chunks 259] [--tokenizer DIR] [--corpus DIR]

Rows: the encoding llama.cpp's own converter writes (the anchor), the intermediate steps, xvq's
encoding, and the BPE ("gpt2") encoding llama.cpp offers for SentencePiece-style BPE. Columns:
texts identical out of N 400-character chunks starting on a non-space character (plain text:
special tokens not parsed), the same with special tokens parsed (as chat front-ends do), the
built-in sample `xvq convert` reports on, and differing tokens per 1,000 (plain text).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import gguf  # noqa: E402

from xvq.convert import vocab as V  # noqa: E402
from xvq.validate import tokparity as P  # noqa: E402

SHARED = ROOT.parent / "shared" / "assets"
N_ROWS = 100_534  # XVERSE's config.json vocab_size


def original_texts(v: V.Vocab) -> V.Vocab:
    """Undo xvq's renaming: every token under its tokenizer.json text, NORMAL."""
    v = copy.deepcopy(v)
    for i, t in v.renamed.items():
        v.tokens[i], v.types[i] = t, gguf.TokenType.NORMAL
    v.renamed, v.start_only = {}, {}
    return v


def merge_rank_scores(v: V.Vocab, tj: dict) -> list[float]:
    rank: dict[str, int] = {}
    for r, (a, b) in enumerate(V._merge_pairs(tj["model"]["merges"])):
        rank.setdefault(a + b, r)
    return [-float(rank[t] + 1) if t in rank else 0.0 for t in v.tokens]


def variants(tok_dir: Path) -> dict[str, V.Vocab | tuple]:
    tj = json.loads((tok_dir / "tokenizer.json").read_text(encoding="utf-8"))
    final = V.read_vocab(tok_dir)
    plain = original_texts(final)
    out: dict[str, V.Vocab | tuple] = {}
    anchor = copy.deepcopy(plain)  # llama.cpp's conversion/xverse.py: no scores, no prefix key
    anchor.scores = [0.0] * len(anchor.tokens)
    out["llama.cpp converter (no scores)"] = anchor
    first = copy.deepcopy(plain)
    first.scores = [-float(i) for i in range(len(first.tokens))]
    out["scores = -id (xvq first version)"] = first
    ranked = copy.deepcopy(plain)
    ranked.scores = merge_rank_scores(ranked, tj)
    out["scores = merge rank"] = ranked
    out["merge rank + unreachable renamed (xvq)"] = final
    out["gpt2 BPE, raw UTF-8 merges (pre gemma4)"] = ("gemma4", tj)
    return out


def write_bpe_gguf(path: Path, tj: dict, pre: str) -> None:
    """llama.cpp's BPE tokenizer over the same tokens, with the merge list; the pre-type decides
    the splitting regex (gemma4: `▁`-escaped raw UTF-8, lines only)."""
    vocab = tj["model"]["vocab"]
    added = {a["id"]: a for a in tj["added_tokens"]}
    n = max(vocab.values()) + 1
    tokens = [""] * n
    for t, i in vocab.items():
        tokens[i] = t
    types = [gguf.TokenType.CONTROL if i in added else gguf.TokenType.BYTE if V._is_byte_token(t)
             else gguf.TokenType.NORMAL for i, t in enumerate(tokens)]
    w = V.vocab_only_writer(path, n)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([f"{a} {b}" for a, b in V._merge_pairs(tj["model"]["merges"])])
    w.add_bos_token_id(2)
    w.add_eos_token_id(3)
    w.add_add_bos_token(False)
    V.finish(w)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", type=Path, default=SHARED / "xverse-style-tokenizer")
    ap.add_argument("--corpus", type=Path, default=SHARED / "corpus")
    ap.add_argument("--chunks", type=int, default=259)
    ap.add_argument("--show", type=int, default=0, help="print the first N differences of xvq's encoding")
    args = ap.parse_args()
    if not (args.tokenizer / "tokenizer.json").is_file() or not args.corpus.is_dir():
        sys.exit(f"needs {args.tokenizer}/tokenizer.json and {args.corpus}")
    texts = P.corpus_chunks(list(args.corpus.glob("*/*.txt")), args.chunks)
    sample = P.parity_sample()
    print(f"{len(texts)} chunks of 400 characters from {args.corpus}; built-in sample {len(sample)} texts")
    print(f"| encoding | plain text | special parsed | built-in sample | differing tokens / 1,000 |")
    print(f"|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, v in variants(args.tokenizer).items():
            path = Path(tmp) / "v.gguf"
            t0 = time.time()
            if isinstance(v, tuple):
                write_bpe_gguf(path, v[1], v[0])
            else:
                V.write_vocab_only_gguf(path, args.tokenizer, N_ROWS, vocab=copy.deepcopy(v))
            plain = P.compare_tokenization(path, args.tokenizer, texts)
            spec = P.compare_tokenization(path, args.tokenizer, texts, special=True)
            samp = P.compare_tokenization(path, args.tokenizer, sample)
            print(f"| {name} | {plain.n_equal}/{plain.n_texts} | {spec.n_equal}/{spec.n_texts} | "
                  f"{samp.n_equal}/{samp.n_texts} | {plain.per_1000_tokens:.2f} |  ({time.time() - t0:.1f}s)")
            if args.show and "(xvq)" in name:
                for d in plain.diffs[:args.show] + spec.diffs[:args.show]:
                    print("   ", d)


if __name__ == "__main__":
    main()
