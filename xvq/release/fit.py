"""Laptop fit: the memory llama.cpp needs for a GGUF (weights + KV cache + compute buffer) at
common context sizes, and which common machines it fits.

The compute-buffer term follows llama.cpp's CPU graph at its default n_ubatch 512 without flash
attention: the attention scores (ctx × n_ubatch × n_head, f32) and mask, the logits
(n_ubatch × n_vocab, f32) and a few hidden-state buffers; checked against llama.cpp's own
reported sizes in tests/test_release.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click

CONTEXTS = (4096, 8192, 16384)
MACHINES_GB = (8, 16, 32, 64, 96, 128)
# What an OS, a browser and the runtime leave free: macOS lets the GPU wire about 2/3 to 3/4 of
# unified memory by default; on a PC the OS and apps take a similar share.
USABLE_FRACTION = 0.70
N_UBATCH = 512
MiB = 1 << 20


@dataclass
class GgufShapes:
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int
    weights_bytes: int
    file_type: str


def gguf_shapes(path: Path | str) -> GgufShapes:
    """Shapes from the GGUF header(s); weight bytes summed over every shard. Reads headers only
    (xvq.quantize.gguf.read_header), not the vocabulary, so a 100k-token file costs milliseconds."""
    import gguf
    from xvq.convert.writer import nbytes
    from xvq.quantize.gguf import other_shards, read_header
    path = Path(path)
    first = read_header(path)
    kv = first.kv
    tensors = dict(first.tensors)
    for shard in other_shards(path, int(kv.get("split.count") or 1)):
        tensors |= read_header(shard).tensors
    arch = kv["general.architecture"]
    n_head = int(kv[f"{arch}.attention.head_count"])
    n_embd = int(kv[f"{arch}.embedding_length"])
    weights = sum(nbytes(shape, gguf.GGMLQuantizationType(t)) for shape, t in tensors.values())
    ftype = kv.get("general.file_type")
    return GgufShapes(
        n_layer=int(kv[f"{arch}.block_count"]), n_embd=n_embd, n_head=n_head,
        n_head_kv=int(kv.get(f"{arch}.attention.head_count_kv", n_head)),
        head_dim=int(kv.get(f"{arch}.attention.key_length", n_embd // n_head)),
        n_vocab=int(tensors["token_embd.weight"][0][1]),   # ggml shape (n_embd, n_vocab): every row, padding too
        weights_bytes=weights, file_type=gguf.LlamaFileType(ftype).name if ftype is not None else "?")


def kv_cache_bytes(s: GgufShapes, ctx: int, bytes_per_value: int = 2) -> int:
    """K and V caches in f16, every layer, every position."""
    return 2 * s.n_layer * ctx * s.n_head_kv * s.head_dim * bytes_per_value


def compute_buffer_bytes(s: GgufShapes, ctx: int, n_ubatch: int = N_UBATCH) -> int:
    attention = ctx * n_ubatch * (4 * s.n_head + 4)   # KQ scores f32 + mask
    logits = n_ubatch * s.n_vocab * 4
    hidden = n_ubatch * s.n_embd * 8
    return attention + logits + hidden


def memory_needed(s: GgufShapes, ctx: int) -> int:
    return s.weights_bytes + kv_cache_bytes(s, ctx) + compute_buffer_bytes(s, ctx)


def fits(s: GgufShapes, ctx: int, ram_gb: float) -> bool:
    return memory_needed(s, ctx) <= ram_gb * 1e9 * USABLE_FRACTION


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


def parse_ram(text: str) -> float:
    t = text.strip().upper().removesuffix("B")
    return float(t[:-1]) if t[-1:] == "G" else float(t)


@click.command("fit")
@click.argument("target", type=click.Path(exists=True, path_type=Path))
@click.option("--ram", default="16G", show_default=True, help="Machine memory, e.g. 32G.")
@click.option("--ctx", default=8192, show_default=True, type=click.IntRange(min=1), help="Context length to plan for.")
@click.option("--name", default=None)
@click.option("--out-root", type=click.Path(path_type=Path), default=None)
def fit_cmd(target: Path, ram: str, ctx: int, name, out_root):
    """Recommend the best-quality GGUF that fits a machine (TARGET: a .gguf, a folder of them, or a model
    folder whose out/<name>/gguf/ holds them)."""
    from xvq.errors import XvqError
    from xvq.layout import Layout, is_first_gguf
    if target.is_file():
        candidates = [target]
    else:
        folder = target if any(target.glob("*.gguf")) else Layout.for_model(target, name, out_root).gguf_dir
        candidates = [p for p in sorted(folder.glob("*.gguf")) if is_first_gguf(p)]
    if not candidates:
        raise XvqError(f"{target}: no GGUF files found; run `xvq quantize gguf` first or pass a .gguf")
    gb = parse_ram(ram)
    rows = sorted(((gguf_shapes(p), p) for p in candidates), key=lambda sp: -sp[0].weights_bytes)
    for s, p in rows:
        need = memory_needed(s, ctx)
        click.echo(f"{p.name:48s} {need / 1e9:7.2f} GB at {ctx} ctx  {'fits' if fits(s, ctx, gb) else 'too big'}")
    best = next((p for s, p in rows if fits(s, ctx, gb)), None)
    if best is None:
        raise XvqError(f"{target}: nothing fits {gb:g} GB at {ctx} context; try a smaller --ctx or a lower-bit type")
    click.echo(f"recommended for {gb:g} GB: {best.name}")
