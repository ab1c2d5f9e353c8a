"""The parity checker on a hand-made XVERSE-structured tokenizer whose ids are worked out by hand:
it must find exactly the difference it is shown, where it is."""
from __future__ import annotations

import gguf
import pytest

from xvq.convert.vocab import read_vocab, write_vocab_only_gguf
from xvq.convert.tokparity import compare_tokenization, corpus_chunks, parity_sample

PIECES = ["▁", "a", "b", "("]
MERGES = [("▁", "a"), ("▁", "(")]  # "▁(" only ever forms at the start of a text


@pytest.fixture(scope="module")
def hand_tokenizer(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from xvq.synth import XVERSE_SPECIALS, save_xverse_tokenizer
    vocab = {t: i for i, t in enumerate(XVERSE_SPECIALS + [f"<0x{b:02X}>" for b in range(256)] + PIECES
                                        + [a + b for a, b in MERGES])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=MERGES, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Punctuation(behavior="isolated"), pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)])
    tok.add_special_tokens(XVERSE_SPECIALS)
    d = tmp_path_factory.mktemp("hand-tok")
    save_xverse_tokenizer(tok, d)
    return d, vocab


def test_hand_ids(hand_tokenizer, tmp_path):
    d, vocab = hand_tokenizer
    v = read_vocab(d)
    assert v.start_only == {vocab["▁("]: "▁("} and v.renamed == v.start_only
    good = write_vocab_only_gguf(tmp_path / "good.gguf", d)
    texts = ["ab a", "a (b"]  # HF: [▁a b ▁a], [▁a ▁ ( b]
    r = compare_tokenization(good, d, texts)
    assert (r.n_texts, r.n_equal, r.mismatch_rate, r.first_diff) == (2, 2, 0.0, None)
    assert r.n_tokens == 3 + 4


def test_reports_first_difference_with_context(hand_tokenizer, tmp_path):
    """Keep `▁(` under its own text, as llama.cpp's converter does: llama.cpp then merges the
    mid-text ` (` that HF keeps as `▁`,`(`."""
    d, vocab = hand_tokenizer
    v = read_vocab(d)
    i = vocab["▁("]
    v.tokens[i], v.types[i] = "▁(", gguf.TokenType.NORMAL
    bad = write_vocab_only_gguf(tmp_path / "bad.gguf", d, vocab=v)
    r = compare_tokenization(bad, d, ["ab a", "a (b", "b (a (b"])
    assert (r.n_texts, r.n_equal) == (3, 1)
    assert r.mismatch_rate == pytest.approx(2 / 3)
    f = r.first_diff
    assert (f.text_index, f.position) == (1, 1)
    assert f.hf_ids == [vocab["▁"], vocab["("], vocab["b"]] and f.llama_ids == [vocab["▁("], vocab["b"]]
    assert f.hf_pieces[:2] == ["▁", "("] and f.llama_pieces[0] == "▁("
    assert "a (b" in f.context
    # HF: [▁a b ▁a] [▁a ▁ ( b] [▁ b ▁ ( a ▁ ( b] (no "▁b" token); text 1 differs in the span
    # [▁ (] vs [▁(], text 2 in two such spans: 2 + 4 of 3 + 4 + 8 tokens
    assert r.n_tokens == 15 and r.n_tokens_differing == 6
    assert r.per_1000_tokens == pytest.approx(1000 * 6 / 15)
    assert "1/3 texts identical" in r.summary()


def test_special_flag_parses_special_tokens(hand_tokenizer, tmp_path):
    d, vocab = hand_tokenizer
    path = write_vocab_only_gguf(tmp_path / "v.gguf", d)
    # plain text: "<pad>" is characters (all byte fallback here) on both sides
    assert compare_tokenization(path, d, ["a<pad>b"]).n_equal == 1
    # parsed: both give the <pad> id; llama.cpp then prefixes the rest with ▁ (documented residual)
    r = compare_tokenization(path, d, ["a<pad>b"], special=True)
    f = r.first_diff  # HF [▁a <pad> b], llama.cpp [▁a <pad> ▁ b]
    assert (f.position, f.hf_ids, f.llama_ids) == (2, [vocab["b"]], [vocab["▁"], vocab["b"]])


def test_corpus_chunks(tmp_path):
    (tmp_path / "a.txt").write_text("  x" * 500 + "\n 你好" * 300, encoding="utf-8")
    (tmp_path / "b.txt").write_text("word " * 400, encoding="utf-8")
    ch = corpus_chunks([tmp_path / "b.txt", tmp_path / "a.txt"], 7, size=50)
    assert len(ch) == 7 and all(len(c) == 50 and not c[0].isspace() for c in ch)
    sample = parity_sample()
    assert len(sample) >= 10 and sum(map(len, sample)) > 3000
    assert any("，" in t for t in sample) and any("。" in t and "は" in t for t in sample)
