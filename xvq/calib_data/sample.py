"""Drawing the calibration sample: XVERSE-65B's language shares applied to a token budget, from
the training split only, never repeating text."""
from __future__ import annotations

import hashlib
import json
import random
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from xvq.calib_data.corpus import ALL_LANGS, records
from xvq.calib_data.shares import target_shares
from xvq.calib_data.tokens import TokenCounter
from xvq.errors import XvqError

DATASET_VERSION = "xvq-calib-v2"
DEFAULT_TOKENS = 131072   # imatrix and GPTQ default; the train split fills 524,288 at the shares
USER = "user"
MIN_PARTIAL_TOKENS = 8   # below this a cut paragraph is noise, not text


@dataclass
class LangStat:
    lang: str
    target_share: float   # of the part of the budget the language shares apply to
    target_tokens: int
    tokens: int           # what the sample holds
    available: int        # unique text there was to draw from
    records: int

    @property
    def shortfall(self) -> int:
        """Tokens the target asked for beyond the unique text there was (not the few tokens a
        paragraph boundary leaves unused)."""
        return max(0, self.target_tokens - self.available)


@dataclass
class CalibSample:
    text: str                         # the records joined by blank lines (llama-imatrix input)
    records: list[dict]               # lang, text, tokens, source, partial (+ code_lang)
    per_language: list[LangStat]      # built-in languages and code in share order, then user groups
    dataset_name: str                 # short id for GGUF metadata
    budget_tokens: int
    seed: int
    counter: str                      # "estimate" or the tokenizer folder's name
    extra_files: list[str] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(s.tokens for s in self.per_language)

    def actual_share(self, lang: str) -> float:
        total = self.total_tokens
        return sum(s.tokens for s in self.per_language if s.lang == lang) / total if total else 0.0


def sample(budget_tokens: int = DEFAULT_TOKENS, seed: int = 0, tokenizer_dir: Path | str | None = None,
           extra_files: Iterable[Path | str] = ()) -> CalibSample:
    """The calibration sample. User text whose language is not one of the built-in ones (plain
    .txt files, jsonl without a known `lang`) is taken first and in full (up to the budget); the
    rest of the budget is split by `target_shares()`; user jsonl records of a built-in language
    join that language's pool. A language with too little unique text gives what it has and its
    shortfall is reported (nothing is repeated, nothing is moved to other languages, so the
    shares of the languages that had enough stay right). Deterministic for a given seed."""
    if budget_tokens <= 0:
        raise XvqError(f"--calib-tokens {budget_tokens}: the token budget must be positive")
    counter = TokenCounter(tokenizer_dir)
    extra_files = [Path(p) for p in extra_files]
    pools: dict[str, list[dict]] = {lang: [] for lang in ALL_LANGS}
    for rec in records("train"):
        pools[rec["lang"]].append(rec)
    for rec in load_extra_files(extra_files):
        pools.setdefault(rec["lang"], []).append(rec)
    every = [rec for pool in pools.values() for rec in pool]
    for rec, n in zip(every, counter.count_many([rec["text"] for rec in every])):
        rec["tokens"] = n

    chosen: list[dict] = []
    stats: list[LangStat] = []
    remaining = budget_tokens
    for lang in [k for k in pools if k not in ALL_LANGS]:   # user groups, in full
        picked = _fill(pools[lang], remaining, random.Random(f"{seed}/{lang}"), counter)
        got = sum(r["tokens"] for r in picked)
        stats.append(LangStat(lang, 0.0, min(_total(pools[lang]), remaining), got, _total(pools[lang]), len(picked)))
        chosen += picked
        remaining -= got
    shares = target_shares()
    for lang in ALL_LANGS:
        target = int(shares[lang] * remaining)
        picked = _fill(pools[lang], target, random.Random(f"{seed}/{lang}"), counter)
        stats.append(LangStat(lang, shares[lang], target, sum(r["tokens"] for r in picked),
                              _total(pools[lang]), len(picked)))
        chosen += picked
    stats = [s for s in stats if s.lang in ALL_LANGS] + [s for s in stats if s.lang not in ALL_LANGS]

    random.Random(seed).shuffle(chosen)   # interleave languages so every imatrix chunk is mixed
    return CalibSample(
        text="\n\n".join(r["text"] for r in chosen), records=chosen, per_language=stats,
        dataset_name=dataset_name(budget_tokens, seed, extra_files), budget_tokens=budget_tokens,
        seed=seed, counter=counter.name, extra_files=[str(p) for p in extra_files])


def _total(pool: list[dict]) -> int:
    return sum(r["tokens"] for r in pool)


def _fill(pool: list[dict], target: int, rng: random.Random, counter: TokenCounter) -> list[dict]:
    """Whole records in seeded order while they fit (first fit), then the start of one more,
    cut at a word or sentence boundary, to come close to the target."""
    order = list(pool)
    rng.shuffle(order)
    picked, left, rest = [], target, []
    for rec in order:
        if rec["tokens"] <= left:
            picked.append({**rec, "partial": False})
            left -= rec["tokens"]
        else:
            rest.append(rec)
    if rest and left >= MIN_PARTIAL_TOKENS:
        part = _prefix_within(rest[0], left, counter)
        if part is not None:
            picked.append(part)
    return picked


_CUT_AFTER = re.compile(r"[\s。！？；，、.!?;,]")


def _prefix_within(rec: dict, max_tokens: int, counter: TokenCounter) -> dict | None:
    """The longest prefix of the record ending at a boundary with at most max_tokens tokens
    (binary search: token counts grow with the prefix)."""
    text = rec["text"]
    best = _longest_prefix(text, [m.end() for m in _CUT_AFTER.finditer(text)], max_tokens, counter)
    if best is None or best[1] < MIN_PARTIAL_TOKENS:   # scripts without spaces (Thai): any character not starting a combining mark
        cuts = [i for i in range(1, len(text)) if not unicodedata.category(text[i]).startswith("M")]
        best = _longest_prefix(text, cuts, max_tokens, counter)
    if best is None or best[1] < MIN_PARTIAL_TOKENS:
        return None
    return {**rec, "text": best[0], "tokens": best[1], "partial": True}


def _longest_prefix(text: str, cuts: list[int], max_tokens: int, counter: TokenCounter):
    lo, hi, best = 0, len(cuts) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        piece = text[:cuts[mid]].rstrip()
        n = counter.count(piece)
        if n <= max_tokens:
            best, lo = (piece, n), mid + 1
        else:
            hi = mid - 1
    return best


def load_extra_files(paths: Iterable[Path]) -> list[dict]:
    """User calibration text. `.jsonl`: one JSON object a line with "text" (and optionally
    "lang": a built-in code joins that language, anything else is its own group; no lang means
    "user"). Any other file: UTF-8 plain text, paragraphs split at blank lines, lang "user"."""
    out = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise XvqError(f"{path}: --calib-file not found; pass an existing .txt or .jsonl file")
        try:
            content = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise XvqError(f"{path}: not UTF-8 text (byte {e.start}); convert it to UTF-8") from e
        recs = _jsonl_records(path, content) if path.suffix.lower() == ".jsonl" else [
            {"lang": USER, "text": p.strip()} for p in re.split(r"\n\s*\n", content) if p.strip()]
        if not recs:
            raise XvqError(f"{path}: --calib-file holds no text; pass a file with text in it")
        out += [{**r, "source": str(path)} for r in recs]
    return out


def _jsonl_records(path: Path, content: str) -> list[dict]:
    recs = []
    for n, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise XvqError(f"{path}:{n}: not valid JSON ({e.msg}); write one JSON object per line") from e
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise XvqError(f'{path}:{n}: each line needs a "text" string; write {{"text": "...", "lang": "en"}}')
        if obj["text"].strip():
            rec = {"lang": str(obj.get("lang") or USER), "text": obj["text"]}
            if "code_lang" in obj:
                rec["code_lang"] = str(obj["code_lang"])
            recs.append(rec)
    return recs


def dataset_name(budget_tokens: int, seed: int, extra_files: list[Path]) -> str:
    """e.g. "xvq-calib-v1+seed0+64k"; with user files, "+user-<8 hex of their contents>"."""
    size = f"{budget_tokens // 1024}k" if budget_tokens % 1024 == 0 else str(budget_tokens)
    name = f"{DATASET_VERSION}+seed{seed}+{size}"
    if extra_files:
        h = hashlib.sha1()
        for p in extra_files:
            h.update(Path(p).read_bytes())
        name += f"+user-{h.hexdigest()[:8]}"
    return name
