"""The built-in multilingual text, in XVERSE's 41 languages plus code, in two kinds:

- hand-written paragraphs (`data/<lang>.jsonl`, original text written for xvq), whose split is
  decided by a hash of their text alone (so it never changes when others are added);
- real licensed text (`data/train.jsonl.xz`, `data/heldout.jsonl.xz`, built by
  scripts/build_corpus.py from pinned package versions; `data/sources.json` lists every source,
  version, licence, sha256 and the tokens it gives), whose split is the file it is in: held-out
  is the Universal Declaration of Human Rights (the same articles in every language, so
  per-language numbers compare) and two stdlib modules for code, never sampled for calibration.

Records: `{"lang": "de", "text": "...", "source": "..."}`, code also has "code_lang".
"""
from __future__ import annotations

import functools
import hashlib
import json
import lzma
from importlib import resources
from typing import Iterator

# The languages of XVERSE-65B's published pre-training mix, in the order of their share, then code.
LANGUAGES = tuple((
    "en zh ja ru de es fr pl it pt cs uk tr nl hu ko sv el fi id vi ar ro bg th da mr sk fa hi "
    "no ca iw lt ms sl et lv sr ta kk"
).split())
CODE = "code"
ALL_LANGS = (*LANGUAGES, CODE)

HELDOUT_FRACTION = 0.18
SPLITS = ("train", "heldout", "all")
HAND_WRITTEN = "hand-written"


def text_hash01(text: str) -> float:
    """A stable number in [0, 1) from the text itself (sha1, independent of Python's hash seed)."""
    return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big") / 2**64


@functools.lru_cache(maxsize=1)
def _all_records() -> tuple[dict, ...]:
    """Every built-in record, each tagged with its split: hand-written ones in language order,
    then the shipped train and held-out files in their order."""
    data = resources.files("xvq.calib_data") / "data"
    out: list[dict] = []
    for lang in ALL_LANGS:
        lines = (data / f"{lang}.jsonl").read_text(encoding="utf-8").splitlines()
        recs = [json.loads(line) for line in lines if line.strip()]
        for rec, split in zip(recs, _split_of(recs)):
            out.append({**rec, "source": HAND_WRITTEN, "split": split})
    for split in ("train", "heldout"):
        with lzma.open(data / f"{split}.jsonl.xz", "rt", encoding="utf-8") as f:
            out += [{**json.loads(line), "split": split} for line in f if line.strip()]
    return tuple(out)


def sources() -> dict:
    """The shipped corpus's provenance (data/sources.json): source id -> registry, name,
    version, licence, sha256 of the archive, and tokens per split and language."""
    return json.loads((resources.files("xvq.calib_data") / "data" / "sources.json").read_text(encoding="utf-8"))


def _split_of(recs: list[dict]) -> list[str]:
    """Hand-written records: held-out when their text hashes below HELDOUT_FRACTION; a language with at least
    three records where none does gives up its lowest-hash record, so every language can be
    scored."""
    h = [text_hash01(r["text"]) for r in recs]
    held = {i for i, x in enumerate(h) if x < HELDOUT_FRACTION}
    if not held and len(recs) >= 3:
        held = {min(range(len(recs)), key=h.__getitem__)}
    return ["heldout" if i in held else "train" for i in range(len(recs))]


def records(split: str = "train", langs: tuple[str, ...] | None = None) -> list[dict]:
    """Built-in records of one split ("train", "heldout" or "all"), optionally only some
    languages. Each record: lang, text, split, and code_lang for code."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    return [dict(r) for r in _all_records()
            if (split == "all" or r["split"] == split) and (langs is None or r["lang"] in langs)]


def corpus_texts(split: str = "train") -> Iterator[str]:
    """The text of every record of a split, one paragraph (or code snippet) at a time."""
    for r in records(split):
        yield r["text"]


def heldout_texts() -> dict[str, str]:
    """lang -> the held-out text of that language (paragraphs joined by blank lines), "code"
    for code: the UDHR articles first, then hand-written paragraphs. None of it is ever in a
    calibration sample; every language has at least 1,100 tokens of an XVERSE-style tokenizer
    (two windows of 512)."""
    out: dict[str, list[str]] = {}
    held = records("heldout")
    for r in [r for r in held if r["source"] != HAND_WRITTEN] + [r for r in held if r["source"] == HAND_WRITTEN]:
        out.setdefault(r["lang"], []).append(r["text"])
    return {lang: "\n\n".join(texts) for lang, texts in out.items()}
