"""Byte-level BPE tokenizer parity (issue 22): llama.cpp's ids against Hugging Face's for
tokenizers trained here in LLaMA-3's and SmolLM's layouts, from xvq's GGUF and from llama.cpp's own
converter (convert_hf_to_gguf.py, its hash check of the pre-tokenizer answered with xvq's choice,
since it refuses tokenizers it has not seen), on the held-out split (41 languages + code), on
chunks of ../shared/assets/corpus (when present), plain and with special tokens parsed.

    python bench/bytelevel_parity.py [--chunks 259]
"""
from __future__ import annotations

import collections
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    from tests.conftest import BYTE_LEVEL_PROBES, SHARED, byte_level_llama
    from tests.test_bytelevel import llama_cpp_convert
    from xvq.calib_data import records
    from xvq.convert.vocab import read_vocab, write_vocab_only_gguf
    from xvq.synth import byte_level_tokenizer, save_byte_level_tokenizer
    from xvq.convert.tokparity import compare_tokenization, corpus_chunks
    n_chunks = int(sys.argv[sys.argv.index("--chunks") + 1]) if "--chunks" in sys.argv else 259
    held = records("heldout")
    corpus = corpus_chunks(sorted((SHARED / "corpus").rglob("*.txt")), n_chunks) if (SHARED / "corpus").is_dir() else []
    train = [r["text"] for r in records("train")] + BYTE_LEVEL_PROBES * 5
    with tempfile.TemporaryDirectory() as tmp:
        for style in ("llama3", "smollm"):
            tok = Path(tmp) / f"tok-{style}"
            save_byte_level_tokenizer(byte_level_tokenizer(train, 3000, style), tok, style)
            pre = read_vocab(tok).pre
            ours = write_vocab_only_gguf(Path(tmp) / f"{style}-xvq.gguf", tok)
            model = byte_level_llama(Path(tmp) / f"m-{style}", tok)
            theirs = llama_cpp_convert(model, Path(tmp) / f"{style}-llama.cpp.gguf", pre)
            for who, path in (("xvq", ours), ("llama.cpp converter", theirs)):
                r = compare_tokenization(path, tok, [x["text"] for x in held])
                bad = collections.Counter(held[d.text_index]["lang"] for d in r.diffs)
                langs = {x["lang"] for x in held}
                line = (f"{style:7s} pre={pre:10s} {who:20s} held-out {r.n_equal}/{r.n_texts} texts, "
                        f"{len(langs) - len(bad)}/{len(langs)} languages exact")
                p = compare_tokenization(path, tok, BYTE_LEVEL_PROBES)
                line += f"; probes {p.n_equal}/{p.n_texts}"
                if corpus:
                    c = compare_tokenization(path, tok, corpus)
                    s = compare_tokenization(path, tok, corpus, special=True)
                    line += (f"; corpus {c.n_equal}/{c.n_texts} plain ({c.per_1000_tokens:.2f}/1000), "
                             f"{s.n_equal}/{s.n_texts} special parsed")
                print(line, flush=True)


if __name__ == "__main__":
    main()
