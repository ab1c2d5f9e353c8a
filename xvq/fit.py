"""Laptop fit: the memory a GGUF needs (xvq.llamacpp.memory) at common context sizes, and which
common machines it fits; `xvq fit`."""
from __future__ import annotations

from pathlib import Path

import click

from xvq.units import SIZE_HELP
from xvq.llamacpp.memory import N_UBATCH, USABLE_FRACTION, fits, gguf_shapes, memory_needed

CONTEXTS = (4096, 8192, 16384)
MACHINES_GB = (8, 16, 32, 64, 96, 128)


def fit_table(path: Path | str) -> dict:
    s = gguf_shapes(path)
    return {
        "file": Path(path).name, "file_type": s.file_type, "weights_bytes": s.weights_bytes,
        "contexts": {str(c): {"bytes": memory_needed(s, c),
                              "fits_gb": [g for g in MACHINES_GB if fits(s, c, g)]} for c in CONTEXTS},
    }


def fit_markdown(paths: list[Path]) -> str:
    head = "| file | weights | " + " | ".join(f"{c // 1024}k ctx" for c in CONTEXTS) + " | smallest machine (8k ctx) |"
    rows = [head, "|" + "---|" * (len(CONTEXTS) + 3)]
    for p in paths:
        t = fit_table(p)
        ctx8 = t["contexts"]["8192"]["fits_gb"]
        cells = [f"{t['contexts'][str(c)]['bytes'] / 1e9:.2f} GB" for c in CONTEXTS]
        rows.append(f"| {t['file']} | {t['weights_bytes'] / 1e9:.2f} GB | " + " | ".join(cells) +
                    f" | {str(ctx8[0]) + ' GB' if ctx8 else 'over 128 GB'} |")
    return "\n".join(rows) + f"\n\nMemory = weights + f16 KV cache + llama.cpp compute buffer (n_ubatch {N_UBATCH}); " \
        f"a machine fits when that is at most {USABLE_FRACTION:.0%} of its RAM.\n"


@click.command("fit")
@click.argument("target", type=click.Path(exists=True, path_type=Path))
@click.option("--ram", default="16G", show_default=True, help=f"Machine memory, e.g. 32G ({SIZE_HELP}).")
@click.option("--ctx", type=click.IntRange(min=1), default=8192, show_default=True, help="Context length to plan for.")
@click.option("--name", default=None)
@click.option("--out-root", type=click.Path(path_type=Path), default=None)
def fit_cmd(target: Path, ram: str, ctx: int, name, out_root):
    """Recommend the best-quality GGUF that fits a machine (TARGET: a .gguf, a folder of them, or a model
    folder whose out/<name>/gguf/ holds them)."""
    from xvq.errors import XvqError
    from xvq.layout import Layout, is_first_gguf
    from xvq.units import MEMORY_MIN, parse_size
    # before any work: a wrong unit is the likelier mistake (--ram 1K, --ram 0G refused here)
    gb = parse_size(ram, "--ram", minimum=MEMORY_MIN) / 1e9
    if target.is_file():
        candidates = [target]
    else:
        folder = target if any(target.glob("*.gguf")) else Layout.for_model(target, name, out_root).gguf_dir
        candidates = [p for p in sorted(folder.glob("*.gguf")) if is_first_gguf(p)]
    if not candidates:
        raise XvqError(f"{target}: no GGUF files found; run `xvq quantize gguf` first or pass a .gguf")
    rows = sorted(((gguf_shapes(p), p) for p in candidates), key=lambda sp: -sp[0].weights_bytes)
    for s, p in rows:
        need = memory_needed(s, ctx)
        click.echo(f"{p.name:48s} {need / 1e9:7.2f} GB at {ctx} ctx  {'fits' if fits(s, ctx, gb) else 'too big'}")
    best = next((p for s, p in rows if fits(s, ctx, gb)), None)
    if best is None:
        raise XvqError(f"{target}: nothing fits {gb:g} GB at {ctx} context; try a smaller --ctx or a lower-bit type")
    click.echo(f"recommended for {gb:g} GB: {best.name}")
