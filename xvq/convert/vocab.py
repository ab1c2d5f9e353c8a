"""Vocabulary → GGUF. (First version; exact llama.cpp/HF parity is refined in issue 3.)"""
from __future__ import annotations

import json
from pathlib import Path

import gguf

from xvq.errors import XvqError


def pad_token(i: int) -> str:
    return f"<|pad{i}|>"


def _bpe_json_vocab(path: Path) -> tuple[list[str], list[float], list[int]]:
    tok = json.loads(path.read_text(encoding="utf-8"))
    vocab: dict[str, int] = tok["model"]["vocab"]
    added = {a["id"]: a for a in tok.get("added_tokens", [])}
    n = max(list(vocab.values()) + list(added)) + 1
    tokens = [""] * n
    for piece, i in vocab.items():
        tokens[i] = piece
    for i, a in added.items():
        tokens[i] = a["content"]
    scores = [-float(i) for i in range(n)]
    types = []
    for i, t in enumerate(tokens):
        if i in added:
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        elif t.startswith("<0x") and len(t) == 6 and t.endswith(">"):
            types.append(gguf.TokenType.BYTE)
        elif t == "<unk>":
            types.append(gguf.TokenType.UNKNOWN)
        else:
            types.append(gguf.TokenType.NORMAL)
    return tokens, scores, types


def _spm_vocab(path: Path) -> tuple[list[str], list[float], list[int]]:
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(path))
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        t = gguf.TokenType.NORMAL
        if sp.is_unknown(i):
            t = gguf.TokenType.UNKNOWN
        elif sp.is_control(i):
            t = gguf.TokenType.CONTROL
        elif sp.is_unused(i):
            t = gguf.TokenType.UNUSED
        elif sp.is_byte(i):
            t = gguf.TokenType.BYTE
        types.append(t)
    return tokens, scores, types


def add_vocab(writer: gguf.GGUFWriter, model_dir: Path, n_vocab: int, kind: str = "auto") -> dict:
    """Write tokenizer.ggml.* keys; rows past the tokenizer up to n_vocab become unused pads."""
    spm_file, json_file = model_dir / "tokenizer.model", model_dir / "tokenizer.json"
    if kind in ("spm", "auto") and spm_file.is_file():
        tokens, scores, types = _spm_vocab(spm_file)
    elif json_file.is_file():
        tokens, scores, types = _bpe_json_vocab(json_file)
    else:
        raise XvqError(f"{model_dir}: no tokenizer.json or tokenizer.model; copy the tokenizer files "
                       f"into the model folder")
    if len(tokens) > n_vocab:
        raise XvqError(f"{model_dir / 'config.json'}: vocab_size {n_vocab} is smaller than the tokenizer's "
                       f"{len(tokens)} entries; fix vocab_size or the tokenizer")
    for i in range(len(tokens), n_vocab):
        tokens.append(pad_token(i))
        scores.append(-1e9)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=False, n_vocab=n_vocab)
    special.add_to_gguf(writer, quiet=True)
    return {"n_tokens": len(tokens)}
