"""Freed layer-sized buffers go back to the operating system.

glibc serves blocks above its mmap threshold with mmap and unmaps them when freed, but raises
the threshold to the size of each such block freed (up to 32 MB). After the first layer, blocks
of layer size therefore come from the heap, where a freed block below a live one cannot be
returned: a run that allocates and frees layer-sized tensors layer after layer (GPTQ; most of all
MoE, with its many expert-sized ones) keeps the holes, and its peak grows with depth. Measured on
a 16-expert MoE of width 1024 (`xvq quantize gptq`, 2 vs 6 layers): +800 MB with glibc's
default, +190 MB with the threshold pinned at its initial 128 KiB (what MALLOC_MMAP_THRESHOLD_
does). Other C libraries (macOS, Windows, musl) are left as they are.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3          # glibc's mallopt parameter number
INITIAL_THRESHOLD = 128 * 1024


def return_freed_buffers_to_os() -> bool:
    """Pin glibc's mmap threshold; False where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, INITIAL_THRESHOLD))
