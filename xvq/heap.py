"""Memory a long run frees goes back to the operating system, and kernel caches stay small.

glibc serves blocks above its mmap threshold with mmap and unmaps them when freed, but raises
the threshold to the size of each such block freed (up to 32 MB). After the first layer, blocks
of layer size therefore come from the heap, where a freed block below a live one cannot be
returned: a run that allocates and frees layer-sized tensors layer after layer (GPTQ; most of all
MoE, with its many expert-sized ones) keeps the holes, and its peak grows with depth.
`return_freed_buffers_to_os` pins the threshold (what MALLOC_MMAP_THRESHOLD_ does) below the
caller's per-layer blocks; smaller ones stay on the heap, which is faster than a fresh mapping.
Other C libraries (macOS, Windows, musl) are left as they are.

torch's CPU matmul goes through oneDNN, which JIT-compiles a kernel for every matrix shape and
caches up to 1,024 of them (and ideep another 1,024 descriptors). MoE calibration hands each
expert a different number of tokens, hence new shapes in every layer: the cache filled by about
25 MB a layer until its cap. `bound_kernel_caches` caps both at 64 entries.

Measured (`xvq quantize gptq`, MoE of width 768, 16 experts, 2 vs 5 layers; tests/test_memory.py):
glibc's default and full caches +250 to +360 MB; threshold pinned +73 to +87 MB; both: +0 MB.
The time and memory of each choice at XVERSE-MoE-A4.2B's width: docs/scale.md.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_MMAP_THRESHOLD = -3          # glibc's mallopt parameter number
INITIAL_THRESHOLD = 128 * 1024
MAX_THRESHOLD = 32 * 1024 * 1024   # mallopt(3)'s ceiling on 64-bit (older glibc refuses more)
KERNEL_CACHE_ENTRIES = "64"
KERNEL_CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")   # oneDNN's, ideep's


def return_freed_buffers_to_os(threshold: int) -> bool:
    """Serve blocks of `threshold` bytes and more (clamped to 128 KiB..32 MiB) with mmap,
    so they are unmapped when freed; False where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, min(max(int(threshold), INITIAL_THRESHOLD), MAX_THRESHOLD)))


def bound_kernel_caches() -> None:
    """Cap oneDNN's kernel caches unless the user set them. Both libraries read the variables
    once, at the first matmul of the process: the xvq command calls this before any command runs."""
    for name in KERNEL_CACHE_VARIABLES:
        os.environ.setdefault(name, KERNEL_CACHE_ENTRIES)
