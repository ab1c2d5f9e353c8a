"""`xvq calib show` / `xvq calib export`."""
from __future__ import annotations

from pathlib import Path

import click

from xvq.calib_data.sample import DEFAULT_TOKENS

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
def show_cmd(tokenizer_dir, calib_tokens, seed, calib_files):
    """One line per language: target share, actual share, tokens, shortfall."""
    s = _sample(tokenizer_dir, calib_tokens, seed, calib_files)
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


@calib_group.command("export")
@click.argument("file", type=click.Path(path_type=Path))
@calib_options
def export_cmd(file, tokenizer_dir, calib_tokens, seed, calib_files):
    """Write the sampled calibration text to FILE (input for llama-imatrix)."""
    from xvq.fsio import atomic_output
    s = _sample(tokenizer_dir, calib_tokens, seed, calib_files)
    with atomic_output(file) as tmp:
        tmp.write_text(s.text + "\n", encoding="utf-8")
    click.echo(f"wrote {file} ({s.dataset_name}: {s.total_tokens} tokens, {len(s.records)} paragraphs)")
