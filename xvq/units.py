"""The one syntax of every option that takes a size (`--split-max-size`, `--max-shard-size`,
`--ram`, `--fit`, `--tiers`, `--target-size`, `--shard-size`, XVQ_MEMORY): K/M/G/T are decimal
(llama.cpp's split sizes, disk vendors), KiB/MiB/GiB/TiB binary, and a bare number is refused,
since '48' could mean bytes or gigabytes and guessing wrong splits a model into 10^9 files."""
from __future__ import annotations

import re

from xvq.errors import XvqError

_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
          "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(K|M|G|T|KI|MI|GI|TI)B?\s*", re.I)
SIZE_HELP = "K/M/G/T are decimal (4G = 4,000,000,000 bytes), KiB/MiB/GiB/TiB binary"
MEMORY_MIN = 100 * 10**6   # no machine that runs a model has less: "--ram 1K" is a wrong unit


def parse_size(text: str | int | None, option: str = "size", *, minimum: int = 0, example: str = "16G") -> int:
    """'4G' -> 4_000_000_000, '2GiB' -> 2_147_483_648; None/'' -> 0 (no limit). With `minimum`,
    a smaller size (0 included) is refused in one line."""
    if text is None or text == "":
        if minimum:
            raise XvqError(f"{option}: give a size, e.g. {example} ({SIZE_HELP})")
        return 0
    if isinstance(text, int):
        n, unit = text, ""
    else:
        m = _SIZE.fullmatch(str(text))
        if not m:
            number = str(text).strip()
            hint = f"; did you mean {number}G?" if _is_positive_number(number) else ""
            raise XvqError(f"{option} {text!r}: give a number with a unit, e.g. 4G or 2GiB ({SIZE_HELP}){hint}")
        n, unit = int(float(m.group(1)) * _UNITS[m.group(2).upper()]), m.group(2).upper()
    if minimum and n <= 0:
        raise XvqError(f"{option} {text}: must be more than 0, e.g. {example}")
    if n < minimum:
        hint = f"; did you mean {m.group(1)}G?" if unit in ("K", "M", "KI", "MI") else ""
        raise XvqError(f"{option} {text}: {human_size(n)} is below {human_size(minimum)}, e.g. {example}{hint}")
    return n


def _is_positive_number(s: str) -> bool:
    try:
        return float(s) > 0
    except ValueError:
        return False


def human_size(n: float) -> str:
    """Bytes for a message: 17.5 GB, 310 MB, 1 kB (decimal, as the options read them)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} bytes"
