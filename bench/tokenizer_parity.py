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
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import gguf  # noqa: E402

from xvq.convert import vocab as V  # noqa: E402
from xvq.convert import tokparity as P  # noqa: E402

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
    anchor = copy.deepcopy(plain)  # what llama.cpp's conversion/xverse.py writes: no scores
    anchor.scores = [0.0] * len(anchor.tokens)
    out["no scores (llama.cpp converter's encoding, 100,534 rows)"] = anchor
    first = copy.deepcopy(plain)
    first.scores = [-float(i) for i in range(len(first.tokens))]
    out["scores = -id (xvq first version)"] = first
    ranked = copy.deepcopy(plain)
    ranked.scores = merge_rank_scores(ranked, tj)
    out["scores = merge rank"] = ranked
    out["merge rank + unreachable renamed (xvq)"] = final
    typed = copy.deepcopy(plain)  # the other ways to say "never form this": type and score
    typed.scores = merge_rank_scores(typed, tj)
    for i in final.renamed:
        typed.types[i], typed.scores[i] = gguf.TokenType.UNUSED, -1e9
    out["merge rank + unreachable typed UNUSED, score -1e9 (not renamed)"] = typed
    out["gpt2 BPE, raw UTF-8 merges (pre gemma4)"] = ("gemma4", tj)
    out["gpt2 BPE, vocab re-encoded to GPT-2 bytes (pre chameleon)"] = ("chameleon", tj)
    return out


def gpt2_bytes() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what llama.cpp's byte-level BPE expects)."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def byte_level(tokens: list[str], pairs: list[tuple[str, str]], types: list[int]):
    """Re-encode a `▁` vocabulary for llama.cpp's byte-level BPE: `▁` -> space -> `Ġ`, every
    character to its UTF-8 bytes; merges that first rebuild each multi-byte character, then the
    tokenizer's own. Byte tokens keep `<0xNN>` text where the byte's character is a token already."""
    table = gpt2_bytes()

    def enc(t: str) -> str:
        return "".join(table[b] for b in t.replace("\u2581", " ").encode("utf-8"))
    out = [t if ty in (gguf.TokenType.CONTROL, gguf.TokenType.BYTE) else enc(t) for t, ty in zip(tokens, types)]
    taken = set(out)
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty == gguf.TokenType.BYTE and table[int(t[3:5], 16)] not in taken:
            out[i] = table[int(t[3:5], 16)]  # llama.cpp's byte-level fallback looks bytes up so
    char_merges, done = [], set()
    for t, ty in zip(tokens, types):
        if ty == gguf.TokenType.NORMAL and len(t) == 1:
            e = enc(t)
            for k in range(2, len(e) + 1):
                if e[:k] not in done:
                    done.add(e[:k])
                    char_merges.append(f"{e[:k - 1]} {e[k - 1]}")
    return out, char_merges + [f"{enc(a)} {enc(b)}" for a, b in pairs]


def write_bpe_gguf(path: Path, tj: dict, pre: str) -> None:
    """llama.cpp's BPE tokenizer over the same ids, with the merge list; the pre-type decides the
    splitting regex (gemma4: `▁`-escaped raw UTF-8, lines only; chameleon: digits and
    punctuation isolated, GPT-2 words, byte-level)."""
    vocab = tj["model"]["vocab"]
    added = {a["id"]: a for a in tj["added_tokens"]}
    n = max(vocab.values()) + 1
    tokens = [""] * n
    for t, i in vocab.items():
        tokens[i] = t
    types = [gguf.TokenType.BYTE if V._is_byte_token(t) else gguf.TokenType.CONTROL if i in added
             else gguf.TokenType.NORMAL for i, t in enumerate(tokens)]
    pairs = V._merge_pairs(tj["model"]["merges"])
    merges = [f"{a} {b}" for a, b in pairs]
    if pre != "gemma4":
        tokens, merges = byte_level(tokens, pairs, types)
        types = [gguf.TokenType.NORMAL if t == gguf.TokenType.BYTE else t for t in types]
    w = V.vocab_only_writer(path, n)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(2)
    w.add_eos_token_id(3)
    w.add_add_bos_token(False)
    V.finish(w)


def anchor_gguf(tok_dir: Path, tmp: Path) -> Path:
    """Run llama.cpp's own convert_hf_to_gguf.py (its conversion/xverse.py) on a tiny XVERSE
    checkpoint carrying the tokenizer. Its converter needs one row per tokenizer entry."""
    from xvq import anchors
    from xvq.synth import make_checkpoint, tiny_config
    model = tmp / "tiny-xverse"
    n = len(json.loads((tok_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"])
    make_checkpoint(model, tiny_config("xverse", vocab_size=n, hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=1, num_attention_heads=2))
    for f in tok_dir.iterdir():
        shutil.copy(f, model / f.name)
    out = tmp / "anchor.gguf"
    proc = subprocess.run([sys.executable, str(anchors.convert_script()), str(model), "--outtype", "f32",
                           "--outfile", str(out)], env=os.environ | {"PYTHONPATH": str(anchors.gguf_py())},
                          capture_output=True, text=True, timeout=600)
    if proc.returncode:
        sys.exit(f"llama.cpp's converter failed: {proc.stderr[-2000:]}")
    return out


def row(name: str, path: Path, tok_dir: Path, texts: list[str], sample: list[str], t0: float, show: int = 0):
    plain = P.compare_tokenization(path, tok_dir, texts)
    spec = P.compare_tokenization(path, tok_dir, texts, special=True)
    samp = P.compare_tokenization(path, tok_dir, sample)
    print(f"| {name} | {plain.n_equal}/{plain.n_texts} | {spec.n_equal}/{spec.n_texts} | "
          f"{samp.n_equal}/{samp.n_texts} | {plain.per_1000_tokens:.2f} | {spec.per_1000_tokens:.2f} |"
          f"  ({time.time() - t0:.1f}s)")
    for d in plain.diffs[:show] + spec.diffs[:show]:
        print("   ", d)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", type=Path, default=SHARED / "xverse-style-tokenizer")
    ap.add_argument("--corpus", type=Path, default=SHARED / "corpus")
    ap.add_argument("--chunks", type=int, default=259)
    ap.add_argument("--show", type=int, default=0, help="print the first N differences of xvq's encoding")
    ap.add_argument("--no-anchor", action="store_true", help="skip running llama.cpp's converter (~1 min)")
    args = ap.parse_args()
    if not (args.tokenizer / "tokenizer.json").is_file() or not args.corpus.is_dir():
        sys.exit(f"needs {args.tokenizer}/tokenizer.json and {args.corpus}")
    texts = P.corpus_chunks(list(args.corpus.glob("*/*.txt")), args.chunks)
    sample = P.parity_sample()
    print(f"{len(texts)} chunks of 400 characters from {args.corpus}; built-in sample {len(sample)} texts")
    print("| encoding | plain text | special parsed | built-in sample | differing tokens / 1,000 (plain) | (special) |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not args.no_anchor:
            t0 = time.time()
            row("llama.cpp convert_hf_to_gguf.py (anchor, real run)", anchor_gguf(args.tokenizer, tmp),
                args.tokenizer, texts, sample, t0)
        for name, v in variants(args.tokenizer).items():
            path = tmp / "v.gguf"
            t0 = time.time()
            if isinstance(v, tuple):
                write_bpe_gguf(path, v[1], v[0])
            else:
                V.write_vocab_only_gguf(path, args.tokenizer, N_ROWS, vocab=copy.deepcopy(v))
            row(name, path, args.tokenizer, texts, sample, t0, args.show if "(xvq)" in name else 0)


if __name__ == "__main__":
    main()
