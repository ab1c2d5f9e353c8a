"""What llama.cpp needs in memory to run a GGUF: weights + KV cache + compute buffer, and whether
that fits a machine.

The compute-buffer term follows llama.cpp's CPU graph at its default n_ubatch 512 without flash
attention: the attention scores (ctx × n_ubatch × n_head, f32) and mask, the logits
(n_ubatch × n_vocab, f32) and a few hidden-state buffers; checked against llama.cpp's own
reported sizes in tests/test_release_fit.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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
    """Shapes from the GGUF header(s); weight bytes summed over every shard. Reads headers only,
    not the vocabulary, so a 100k-token file costs milliseconds."""
    import gguf
    from xvq.llamacpp import read_model_header, tensor_nbytes
    header = read_model_header(path)
    kv, tensors = header.kv, header.tensors
    arch = kv["general.architecture"]
    n_head = int(kv[f"{arch}.attention.head_count"])
    n_embd = int(kv[f"{arch}.embedding_length"])
    weights = sum(tensor_nbytes(shape, t) for shape, t in tensors.values())
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
