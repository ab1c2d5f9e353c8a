"""`xvq release --tiers 8G,16G`: one sensitivity-chosen mix per laptop RAM tier, made from the
layout's f16 and the importance matrix the release measured (docs/mix.md)."""
from __future__ import annotations

import functools
from pathlib import Path

from xvq.layout import Layout
from xvq.stamps import Stamps, fingerprint


def build_tiers(model_dir: Path, layout: Layout, tiers, stamps: Stamps, log, calib_tokens: int | None) -> list[Path]:
    """One mixed GGUF per laptop tier (`--tiers 8G,16G`), at `xvq fit`'s default context."""
    from xvq.calib_data import calibration
    from xvq.quantize import DEFAULT_CALIB_TOKENS, Imatrix, build_tier
    f16, imat = layout.gguf("f16"), layout.imatrix()
    if tiers and not imat.is_file():
        log("tiers skipped: they are chosen with the importance matrix, which no requested type measured "
            "(add a type below Q6_K)")
        return []
    @functools.cache
    def inputs():   # once for every tier that has to be made, never when all are up to date
        calib = calibration(budget_tokens=calib_tokens or DEFAULT_CALIB_TOKENS, tokenizer_dir=model_dir)
        return Imatrix.load(imat), calib.text
    outs = []
    for ram in tiers:
        out = layout.gguf(f"xvq-{ram}")

        def make(ram=ram, out=out):
            im, text = inputs()
            build_tier(f16, out, ram, imatrix=im, calib_text=text, log=log)
        stamps.run(f"tier-{ram.lower()}", {"gguf": fingerprint([f16]), "imatrix": fingerprint([imat])}, [], make)
        if out.is_file():
            outs.append(out)
    return outs
