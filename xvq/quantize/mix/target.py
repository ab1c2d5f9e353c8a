"""What the user asked for (--target-size, --target-bpw, --fit) and the bytes it leaves for
tensor data; the targets that cannot be met (below the smallest file, at or above the source)
are refused here, before anything is measured."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from xvq.errors import XvqError
from xvq.quantize.mix.candidates import TensorChoice, padded
from xvq.units import parse_size


@dataclass(frozen=True)
class Target:
    kind: str          # size | bpw | fit
    value: float       # bytes | bits per weight | RAM in GB
    ctx: int = 8192    # fit only

    def describe(self) -> str:
        if self.kind == "size":
            return f"size<={int(self.value)}"
        if self.kind == "bpw":
            return f"bpw<={self.value:g}"
        return f"fit {self.value:g}GB ctx {self.ctx}"


def parse_target(size: str | None, bpw: float | None, fit: str | None, ctx: int | None) -> Target | None:
    given = [x is not None for x in (size, bpw, fit)]
    if sum(given) > 1:
        raise XvqError("give one of --target-size, --target-bpw, --fit")
    if size is not None:
        return Target("size", float(parse_size(size, "--target-size", minimum=1, example="17.5G")))
    if bpw is not None:
        if not 0 < bpw <= 32:
            raise XvqError(f"--target-bpw {bpw}: give bits per weight between 1 and 16, e.g. 4.5")
        return Target("bpw", float(bpw))
    if fit is not None:
        return Target("fit", parse_size(fit, "--fit", minimum=1) / 1e9, ctx or 8192)
    return None


def smallest(tensors: list[TensorChoice]) -> int:
    return sum(padded(min(c.options.values())) for c in tensors)


def largest(tensors: list[TensorChoice]) -> int:
    """Every tensor at its most expensive candidate: the source's own types (F16 at most)."""
    return sum(padded(max(c.options.values())) for c in tensors)


def tensor_budget(target: Target, tensors: list[TensorChoice], header: int, src: Path) -> int:
    """Bytes available for tensor data."""
    if target.kind == "size":
        return int(target.value) - header
    n_el = sum(c.n_elements for c in tensors)
    if target.kind == "bpw":
        return int(target.value * n_el / 8)
    from xvq.llamacpp.memory import USABLE_FRACTION, compute_buffer_bytes, gguf_shapes, kv_cache_bytes
    s = gguf_shapes(src)
    return int(target.value * 1e9 * USABLE_FRACTION - kv_cache_bytes(s, target.ctx)
               - compute_buffer_bytes(s, target.ctx))


def check_reachable(target: Target, tensors: list[TensorChoice], header: int, src: Path) -> None:
    """One line with the smallest achievable size when nothing fits."""
    low = smallest(tensors)
    budget = tensor_budget(target, tensors, header, src)
    if budget >= low:
        return
    n_el = sum(c.n_elements for c in tensors)
    if target.kind == "size":
        raise XvqError(f"--target-size {int(target.value)} bytes is below the smallest file this model can make "
                       f"({header + low} bytes, {8 * low / n_el:.2f} bpw); give at least {header + low}")
    if target.kind == "bpw":
        raise XvqError(f"--target-bpw {target.value:g} is below the smallest mix of this model "
                       f"({8 * low / n_el:.3f} bpw, {header + low} bytes); give at least {8 * low / n_el:.3f}")
    from xvq.llamacpp.memory import USABLE_FRACTION
    need = (low - budget) / 1e9 / USABLE_FRACTION + target.value
    raise XvqError(f"--fit {target.value:g}G at --ctx {target.ctx}: no file fits; the smallest achievable file "
                   f"({header + low} bytes) needs a {need:.4g} GB machine at this context; use a smaller --ctx "
                   f"or more RAM")


def check_below_source(target: Target, tensors: list[TensorChoice], src: Path) -> None:
    """A target the source itself meets leaves nothing to choose: every tensor would stay at its
    source type and the "mix" would be a copy of the f16 file. Refused in one line, before the
    imatrix is measured."""
    high = largest(tensors)
    n_el = sum(c.n_elements for c in tensors)
    size = src.stat().st_size
    if target.kind == "size" and target.value >= size:
        raise XvqError(f"--target-size {int(target.value)} bytes is at or above the source's own size ({src}, "
                       f"{size} bytes): nothing to mix; use the source as it is, or give a smaller size "
                       f"(the Q8_0 file is about {size * 8.5 / 16:.0f} bytes)")
    if target.kind == "bpw" and target.value >= 8 * high / n_el:
        raise XvqError(f"--target-bpw {target.value:g} is at or above the source's own {8 * high / n_el:.2f} bpw "
                       f"({src}): nothing to mix; use the source as it is, or give fewer bits (e.g. 4.5)")
