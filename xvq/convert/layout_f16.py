"""The layout's f16 GGUF of a model folder: the one file every later stage starts from, made here
and stamped by the checkpoint's content ("convert"), so `xvq convert`, `xvq quantize gguf`,
`xvq validate` and `xvq release` share it and remake it only when the checkpoint changed."""
from __future__ import annotations

from pathlib import Path

from xvq.convert.convert import convert
from xvq.errors import XvqError
from xvq.identity import source_identity
from xvq.stamps import Stamps


def layout_f16(model_dir: Path, layout, stamps: Stamps | None = None, *, progress: bool = True,
               force: bool = False) -> Path:
    """Convert `model_dir` to `layout.gguf("f16")` unless its stamp says it was made from this content."""
    f16 = layout.gguf("f16")
    stamps = stamps or Stamps(layout.base / ".stamps", force=force)
    stamps.run("convert", {"model": source_identity(model_dir, stamps.cache)}, [f16],
               lambda: convert(model_dir, f16, "f16", name=layout.name, progress=progress))
    return f16


def source_gguf(source: Path, layout, stamps: Stamps | None = None, *, progress: bool = True) -> Path:
    """A GGUF as given, or a model folder's layout f16 (layout_f16)."""
    source = Path(source)
    if not source.is_dir():
        return source
    if not (source / "config.json").is_file():
        raise XvqError(f"{source}: a folder without config.json; give a Hugging Face model folder or a GGUF")
    return layout_f16(source, layout, stamps, progress=progress)
