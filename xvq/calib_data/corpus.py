"""The built-in multilingual text: original paragraphs written for xvq (no downloaded data),
one JSONL file per language in `data/`, one record per paragraph:
`{"lang": "de", "text": "..."}`, code as `{"lang": "code", "code_lang": "rust", "text": "..."}`.

Every record belongs to exactly one split, decided by a hash of its text alone (so the split of
a paragraph never changes when others are added): "heldout" (about 18 %, scored per language by
`xvq validate`, never used for calibration) or "train" (what the calibration sample draws from).
"""
from __future__ import annotations

import functools
import hashlib
import json
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


def text_hash01(text: str) -> float:
    """A stable number in [0, 1) from the text itself (sha1, independent of Python's hash seed)."""
    return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big") / 2**64


@functools.lru_cache(maxsize=1)
def _all_records() -> tuple[dict, ...]:
    """Every built-in record, each tagged with its split, in language order then file order."""
    data = resources.files("xvq.calib_data") / "data"
    out: list[dict] = []
    for lang in ALL_LANGS:
        lines = (data / f"{lang}.jsonl").read_text(encoding="utf-8").splitlines()
        recs = [json.loads(line) for line in lines if line.strip()]
        for rec, split in zip(recs, _split_of(recs)):
            out.append({**rec, "split": split})
    return tuple(out)


def _split_of(recs: list[dict]) -> list[str]:
    """Held-out: records whose text hashes below HELDOUT_FRACTION; a language with at least
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
    for code. None of it is ever in a calibration sample. Small languages may have only one
    short paragraph here; `xvq validate` reports a language n/a when its held-out text is too
    short for two evaluation windows."""
    out: dict[str, list[str]] = {}
    for r in records("heldout"):
        out.setdefault(r["lang"], []).append(r["text"])
    return {lang: "\n\n".join(texts) for lang, texts in out.items()}
