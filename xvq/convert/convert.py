"""HF checkpoint -> GGUF, streaming one tensor (in row blocks) at a time."""
from __future__ import annotations

import os
import re
from pathlib import Path

import gguf
import numpy as np
from tqdm import tqdm

from xvq.checkpoint import Checkpoint, open_checkpoint
from xvq.convert.vocab import add_vocab
from xvq.convert.writer import OUTTYPES, StreamingWriter, tensor_type
from xvq import interrupt
from xvq.errors import XvqError
from xvq.fsio import disk_full, disk_full_error, partial_output, require_free
from xvq.layout import model_name
from xvq.llamacpp import tensor_nbytes
from xvq.models import Family, family_for
from xvq.units import parse_size


def check_shapes(fam: Family, ckpt: Checkpoint) -> None:
    """Every tensor the config implies is present with the config's shape."""
    for name, shape in fam.expected_shapes().items():
        src = ckpt.tensors.get(name)
        if src is None:
            raise XvqError(f"{ckpt.folder}: tensor {name} is missing from the checkpoint; "
                           f"a shard is missing or the config does not match the weights")
        if tuple(src.shape) != tuple(shape):
            raise XvqError(f"{src.file}: tensor {name} has shape {list(src.shape)} but config.json implies "
                           f"{list(shape)}; use the config that came with these weights")


def resolve_chat_template(fam: Family, model_dir: Path, name: str, option: str | None) -> str | None:
    if option:
        if option in fam.chat_template_names:
            return fam.chat_template_names[option]
        path = Path(option)
        if path.is_file():
            return path.read_text(encoding="utf-8")
        known = ", ".join(fam.chat_template_names) or "none for this family"
        raise XvqError(f"--chat-template {option}: neither a known template name ({known}) nor a file; "
                       f"give a name or the path of a Jinja template")
    return fam.default_chat_template(name)


def write_metadata(w: gguf.GGUFWriter, fam: Family, name: str, outtype: str, params: tuple) -> None:
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_basename(name)
    w.add_size_label(gguf.size_label(*params))
    w.add_file_type(OUTTYPES[outtype][1])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if fam.license:
        w.add_license(fam.license)
    if fam.license_name:
        w.add_license_name(fam.license_name)
    if fam.license_link:
        w.add_license_link(fam.license_link)
    fam.write_hparams(w)


def parameter_counts(fam: Family, tensors) -> tuple[int, int, int, int]:
    total = sum(int(np.prod(t.shape)) for t in tensors)
    expert = sum(int(np.prod(t.shape)) for t in tensors if "_exps." in t.name)
    return total, total - expert, expert, fam.hp.n_expert


def earlier_split(outfile: Path, written: list[Path]) -> list[Path]:
    """Files an earlier run wrote under the same name with another split (NAME.gguf vs
    NAME-0000k-of-0000n.gguf): left behind they would be loaded as a second model."""
    same = re.compile(rf"{re.escape(outfile.stem)}(-\d{{5}}-of-\d{{5}})?{re.escape(outfile.suffix)}")
    return [p for p in outfile.parent.iterdir() if same.fullmatch(p.name) and p not in written and p.is_file()]


def check_outfile(outfile: Path, model_dir: Path) -> None:
    """The output is a .gguf and none of the checkpoint's files: converting never destroys its input."""
    if outfile.is_dir():
        raise XvqError(f"{outfile}: is a folder; give --outfile a file name ending in .gguf")
    if outfile.suffix.lower() != ".gguf":
        raise XvqError(f"{outfile}: not a .gguf name; give --outfile a file name ending in .gguf")
    if outfile.exists() and model_dir.is_dir():
        for f in model_dir.iterdir():
            if f.is_file() and os.path.samefile(outfile, f):
                raise XvqError(f"{outfile}: is the checkpoint's own file {f.name}; "
                               f"give --outfile a path outside {model_dir}")


def nonfinite_guard(ckpt: Checkpoint, allow: bool):
    """The writer's on_nonfinite: refuse (naming tensor and file) unless allowed, then warn once per tensor."""
    warned = set()

    def on_nonfinite(t, row: int) -> None:
        src = ckpt.tensors.get(t.sources[0]) if t.sources else None
        where, name = (src.file, src.name) if src else (ckpt.folder, t.name)
        if not allow:
            raise XvqError(f"{where}: tensor {name} holds NaN/Inf (row {row}); the weights are damaged: "
                           f"download them again (or pass --allow-nonfinite to convert anyway)")
        if name not in warned:
            warned.add(name)
            tqdm.write(f"warning: {where}: tensor {name} holds NaN/Inf (row {row}); converted as is "
                       f"(--allow-nonfinite)")
    return on_nonfinite


def convert(model_dir: Path | str, outfile: Path | str, outtype: str = "f16", *, split_max_size: str | int = 0,
            name: str | None = None, chat_template: str | None = None, rope_theta: float | None = None,
            progress: bool = True, allow_nonfinite: bool = False) -> list[Path]:
    """Convert and return the written file(s): one GGUF, or its shards in llama.cpp's format."""
    model_dir, outfile = Path(model_dir), Path(outfile)
    outtype = outtype.lower()
    if outtype not in OUTTYPES:
        raise XvqError(f"--outtype {outtype}: unknown; use one of {', '.join(OUTTYPES)}")
    check_outfile(outfile, model_dir)
    max_shard = parse_size(split_max_size, "--split-max-size")
    ckpt = open_checkpoint(model_dir)
    fam = family_for(ckpt.config, str(model_dir / "config.json"))
    if rope_theta:
        fam.hp.rope_theta = float(rope_theta)
    check_shapes(fam, ckpt)
    name = model_name(model_dir, name)
    tensors = list(fam.gguf_tensors(ckpt.tensors))

    w = StreamingWriter(path=None, arch=fam.gguf_arch, split_max_size=max_shard)
    w.on_nonfinite = nonfinite_guard(ckpt, allow_nonfinite)
    write_metadata(w, fam, name, outtype, parameter_counts(fam, tensors))
    vocab = add_vocab(w, model_dir, fam.hp.n_vocab, fam.vocab_kind)
    for note in vocab.get("notes", []):
        tqdm.write(f"vocab: {note}")
    template = resolve_chat_template(fam, model_dir, name, chat_template)
    # an explicit --chat-template wins over the tokenizer's own; the family default does not
    if template and (chat_template or not w.has_key(gguf.Keys.Tokenizer.CHAT_TEMPLATE)):
        w.replace_chat_template(template)
    plans = [w.plan(t, tensor_type(t, outtype)) for t in tensors]
    # before minutes of writing, not at the end of them (plus 1 MiB for the header and vocabulary)
    require_free(outfile.parent, sum(tensor_nbytes(p.tensor.shape, p.qtype) for p in plans) + (1 << 20),
                 f"{outfile.name}")

    try:
        with partial_output(outfile, is_dir=True) as staging:
            return write_staged(w, plans, staging, outfile, name, outtype, progress)
    except OSError as e:
        raise XvqError(f"{outfile}: cannot write ({e.strerror or e}); choose a writable location") from e
    finally:
        w.close()


def write_staged(w: StreamingWriter, plans, staging: Path, outfile: Path, name: str, outtype: str,
                 progress: bool) -> list[Path]:
    """Write every file into the staging folder, then move them to their final names."""
    try:
        w.begin(staging / outfile.name)
        total_rows = sum(p.tensor.n_rows for p in plans)
        with tqdm(total=total_rows, desc=f"convert {name} → {outtype}", unit="row", disable=not progress,
                  leave=False) as bar:
            for i, p in enumerate(plans, 1):
                bar.set_postfix_str(f"tensor {i}/{len(plans)} {p.tensor.name}")  # redrawn per tensor
                w.stream(p, on_rows=bar.update)
        w.close()
    except OSError as e:
        # numpy's tofile reports a full disk without errno ("cannot write (None)" before): ask the disk
        if disk_full(e, outfile.parent):
            raise disk_full_error(outfile) from e
        raise
    interrupt.check()   # a file finished under a signal is not moved to its final name
    written = []
    for f in sorted(staging.iterdir()):
        os.replace(f, outfile.parent / f.name)
        written.append(outfile.parent / f.name)
    for stale in earlier_split(outfile, written):
        stale.unlink()
    return written
