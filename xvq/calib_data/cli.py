"""`xvq calib show` / `xvq calib export`."""
from __future__ import annotations

import json
from pathlib import Path

import click

from xvq.calib_data.sample import DEFAULT_TOKENS
from xvq.errors import XvqError

LANGUAGE_NAMES = {
    "en": "English", "zh": "Chinese", "ja": "Japanese", "ru": "Russian", "de": "German",
    "es": "Spanish", "fr": "French", "pl": "Polish", "it": "Italian", "pt": "Portuguese",
    "cs": "Czech", "uk": "Ukrainian", "tr": "Turkish", "nl": "Dutch", "hu": "Hungarian",
    "ko": "Korean", "sv": "Swedish", "el": "Greek", "fi": "Finnish", "id": "Indonesian",
    "vi": "Vietnamese", "ar": "Arabic", "ro": "Romanian", "bg": "Bulgarian", "th": "Thai",
    "da": "Danish", "mr": "Marathi", "sk": "Slovak", "fa": "Persian", "hi": "Hindi",
    "no": "Norwegian", "ca": "Catalan", "iw": "Hebrew", "lt": "Lithuanian", "ms": "Malay",
    "sl": "Slovenian", "et": "Estonian", "lv": "Latvian", "sr": "Serbian", "ta": "Tamil",
    "kk": "Kazakh", "code": "code", "user": "user text",
}


def calib_options(f):
    """The options that choose a calibration sample; shared with the commands that use one."""
    f = click.option("--calib-file", "calib_files", multiple=True, type=click.Path(path_type=Path),
                     help="Extra calibration text (.txt, or .jsonl with text/lang); repeatable.")(f)
    f = click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed.")(f)
    f = click.option("--calib-tokens", type=int, default=DEFAULT_TOKENS, show_default=True,
                     help="Token budget of the calibration sample.")(f)
    f = click.option("--tokenizer", "tokenizer_dir", type=click.Path(path_type=Path), default=None,
                     help="Folder with the model's tokenizer (tokenizer.json or tokenizer.model) to count "
                          "tokens; default: an estimate (CJK 1/char, ASCII 1/4 chars, other 1/2 chars).")(f)
    return f


def _sample(tokenizer_dir, calib_tokens, seed, calib_files):
    from xvq.calib_data.sample import sample
    return sample(calib_tokens, seed=seed, tokenizer_dir=tokenizer_dir, extra_files=calib_files)


@click.group("calib")
def calib_group():
    """The multilingual calibration set (XVERSE's 41 languages + code) and its held-out split."""


@calib_group.command("show")
@calib_options
@click.option("--json", "as_json", is_flag=True, help="Print the numbers as JSON (sample and held-out per language).")
def show_cmd(tokenizer_dir, calib_tokens, seed, calib_files, as_json):
    """One line per language: target share, actual share, tokens, shortfall."""
    s = _sample(tokenizer_dir, calib_tokens, seed, calib_files)
    if as_json:
        click.echo(json.dumps(_show_json(s, tokenizer_dir), ensure_ascii=False, indent=1))
        return
    click.echo(f"{s.dataset_name}  budget {s.budget_tokens} tokens ({s.counter}), sampled {s.total_tokens}")
    click.echo(f"{'lang':<6}{'language':<12}{'target':>8}{'actual':>8}{'tokens':>9}{'shortfall':>11}")
    for st in s.per_language:
        target = f"{100 * st.target_share:.2f}%" if st.target_share else "all"
        click.echo(f"{st.lang:<6}{LANGUAGE_NAMES.get(st.lang, st.lang)[:11]:<12}{target:>8}"
                   f"{100 * s.actual_share(st.lang):>7.2f}%{st.tokens:>9}{st.shortfall:>11}")
    short = sum(st.shortfall for st in s.per_language)
    if short:
        click.echo(f"shortfall {short} tokens: not enough unique text for the budget; "
                   "add text with --calib-file or lower --calib-tokens")


def _show_json(s, tokenizer_dir) -> dict:
    from xvq.calib_data.corpus import records
    from xvq.calib_data.tokens import TokenCounter
    counter = TokenCounter(tokenizer_dir)
    held: dict[str, int] = {}
    for r in records("heldout"):
        held[r["lang"]] = held.get(r["lang"], 0) + counter.count(r["text"])
    return {"dataset": s.dataset_name, "budget_tokens": s.budget_tokens, "counter": s.counter,
            "sampled_tokens": s.total_tokens, "seed": s.seed, "extra_files": s.extra_files,
            "languages": [{"lang": st.lang, "language": LANGUAGE_NAMES.get(st.lang, st.lang),
                           "target_share": st.target_share, "actual_share": s.actual_share(st.lang),
                           "target_tokens": st.target_tokens, "tokens": st.tokens, "available": st.available,
                           "records": st.records, "shortfall": st.shortfall, "heldout_tokens": held.get(st.lang, 0)}
                          for st in s.per_language]}


@calib_group.command("export")
@click.argument("file", type=click.Path(path_type=Path))
@calib_options
@click.option("--split", type=click.Choice(["train", "heldout"]), default="train", show_default=True,
              help="train: the calibration sample at --calib-tokens; heldout: the whole held-out split.")
@click.option("--format", "fmt", type=click.Choice(["txt", "jsonl"]), default="txt", show_default=True,
              help='txt: paragraphs separated by blank lines; jsonl: one {"lang": ..., "text": ...} per line.')
def export_cmd(file, tokenizer_dir, calib_tokens, seed, calib_files, split, fmt):
    """Write the calibration sample (input for llama-imatrix) or the held-out split to FILE."""
    from xvq.fsio import atomic_output
    if split == "heldout":
        if calib_files:
            raise XvqError("--calib-file adds calibration text; it is never held out: drop it or use --split train")
        recs, what = _heldout_records(tokenizer_dir), "held-out split"
    else:
        s = _sample(tokenizer_dir, calib_tokens, seed, calib_files)
        recs, what = s.records, s.dataset_name
    with atomic_output(file) as tmp:
        if fmt == "jsonl":
            tmp.write_text("".join(json.dumps({"lang": r["lang"], "text": r["text"]}, ensure_ascii=False) + "\n"
                                   for r in recs), encoding="utf-8")
        else:
            tmp.write_text("\n\n".join(r["text"] for r in recs) + "\n", encoding="utf-8")
    click.echo(f"wrote {file} ({what}: {sum(r['tokens'] for r in recs)} tokens, {len(recs)} paragraphs)")


def _heldout_records(tokenizer_dir) -> list[dict]:
    from xvq.calib_data.corpus import records
    from xvq.calib_data.tokens import TokenCounter
    counter = TokenCounter(tokenizer_dir)
    return [{**r, "tokens": counter.count(r["text"])} for r in records("heldout")]
