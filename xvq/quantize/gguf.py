"""GGUF → quantized GGUF through llama.cpp's own quantizer (`xvq.llamacpp.quantize_model`), with
xvq's importance matrix handed over in memory; and the one convert → imatrix → quantize pipeline
that `xvq quantize gguf` and `xvq release` both run."""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from tqdm import tqdm

from xvq.calib_data import DEFAULT_TOKENS as DEFAULT_CALIB_TOKENS
from xvq.errors import XvqError
from xvq.fsio import atomic_output, require_free
from xvq.identity import source_identity
from xvq.llamacpp import QuantType, parse_ggml_type, parse_type, quantize_model, read_model_header, type_bpw
from xvq.quantize.imatrix import Imatrix, compute_imatrix
from xvq.stamps import Stamps, fingerprint

# ----------------------------------------------------------------------------------------------
# The source GGUF
# ----------------------------------------------------------------------------------------------

@dataclass
class SourceInfo:
    path: Path
    name: str | None                      # general.name
    tensors: dict[str, tuple[int, ...]]   # name -> ggml shape (ne0 first)
    weight_type: str                      # most common type of the 2-D weights
    weight_bpw: float


def read_source(path: Path | str) -> SourceInfo:
    """Metadata of a model GGUF; XvqError if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise XvqError(f"{path}: file not found; give a GGUF file or a model folder")
    header = read_model_header(path)
    gtype = header.kv.get("general.type")
    if gtype and gtype != "model":
        raise XvqError(f"{path}: a GGUF of type '{gtype}', not a model; give the model's f16/f32 GGUF")
    if "general.architecture" not in header.kv:
        raise XvqError(f"{path}: GGUF without general.architecture, not a model; give the model's f16/f32 GGUF")
    tensors = {n: shape for n, (shape, _) in header.tensors.items()}
    weights = Counter(gguf.GGMLQuantizationType(t).name for shape, t in header.tensors.values() if len(shape) >= 2)
    wtype = weights.most_common(1)[0][0] if weights else "F32"
    return SourceInfo(path, header.kv.get("general.name"), tensors, wtype, type_bpw(wtype))


def check_requantize(src: SourceInfo, qt: QuantType) -> bool:
    """True when the source is already quantized (llama.cpp must be allowed to requantize);
    XvqError when it is quantized at or below the asked type, which can only lose quality."""
    if src.weight_type in ("F32", "F16", "BF16"):
        return False
    if src.weight_bpw <= qt.bpw:
        raise XvqError(f"{src.path}: already quantized to {src.weight_type} ({src.weight_bpw:g} bpw), at or below "
                       f"{qt.name} ({qt.bpw:g} bpw); quantize from the f16/f32 GGUF instead")
    return True


# ----------------------------------------------------------------------------------------------
# One file
# ----------------------------------------------------------------------------------------------

def imatrix_keys(im: Imatrix) -> dict[str, str | int]:
    """The quantize.imatrix.* keys llama-quantize records (as kv overrides; the library does not).
    Only the imatrix's file name: a published file must not carry the builder's folders."""
    kv: dict[str, str | int] = {}
    if im.path is not None:
        kv["quantize.imatrix.file"] = im.path.name
    if im.datasets:
        kv["quantize.imatrix.dataset"] = im.datasets[0]
    kv["quantize.imatrix.entries_count"] = len(im)
    if im.chunk_count > 0:
        kv["quantize.imatrix.chunks_count"] = im.chunk_count
    return kv


def quantize_file(src: Path | str, out: Path | str, qtype: str | QuantType, *, imatrix: Imatrix | None = None,
                  output_tensor_type: str | None = None, token_embedding_type: str | None = None,
                  n_threads: int = 0, progress: bool = True) -> Path:
    """Quantize one GGUF with llama.cpp; written under a temporary name, renamed when complete."""
    qt = parse_type(qtype) if isinstance(qtype, str) else qtype
    src, out = Path(src), Path(out)
    info = read_source(src)
    if out.resolve() == src.resolve():
        raise XvqError(f"{out}: output would overwrite the input; choose another --outfile")
    requant = check_requantize(info, qt)
    if imatrix is not None:
        imatrix.check_model(info.tensors, src)
    elif qt.needs_imatrix:
        raise XvqError(f"--type {qt.name} requires an importance matrix (llama.cpp refuses without one); "
                       f"use --imatrix auto or --imatrix FILE")
    # llama.cpp reports a full disk only after writing most of the file: check first (an upper
    # bound: every tensor at the main type's bits, plus the bits llama.cpp's mixes add to a few)
    weights = sum(int(np.prod(shape)) for shape in info.tensors.values())
    require_free(out.parent, int(weights * (qt.bpw + 2) / 8) + (1 << 20), out.name)
    out_type = parse_ggml_type(output_tensor_type, "--output-tensor-type")
    embd_type = parse_ggml_type(token_embedding_type, "--token-embedding-type")
    with atomic_output(out) as tmp, tqdm(desc=f"quantize {qt.name}", unit="tensor", disable=not progress,
                                         leave=False) as bar:
        def advance(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)
        quantize_model(src, tmp, ftype=qt.ftype, n_threads=n_threads, allow_requantize=requant,
                       output_tensor_type=out_type, token_embedding_type=embd_type,
                       imatrix=imatrix.values() if imatrix is not None else None,
                       kv=imatrix_keys(imatrix) if imatrix is not None else None, on_progress=advance)
    return out


def quantize_with_types(src: Path, dst: Path, ftype: str, types: dict[str, str], *, imatrix: Imatrix | None = None,
                        extra_kv: list[tuple[str, object]] = (), n_threads: int = 0) -> None:
    """llama.cpp's quantizer writes `dst` with exactly `types` (tensor name -> ggml type) for the
    tensors named; `ftype` names the recorded file type and decides the rest."""
    quantize_model(src, dst, ftype=parse_type(ftype).ftype, n_threads=n_threads,
                   imatrix=imatrix.values() if imatrix is not None else None,
                   kv={**(imatrix_keys(imatrix) if imatrix is not None else {}), **dict(extra_kv)},
                   tensor_types={n: int(gguf.GGMLQuantizationType[t]) for n, t in types.items()})


# ----------------------------------------------------------------------------------------------
# convert → imatrix → quantize: `xvq quantize gguf` and `xvq release`
# ----------------------------------------------------------------------------------------------




def source_gguf(source: Path, layout, stamps: Stamps | None = None, *, progress: bool = True) -> Path:
    """A GGUF as given, or a model folder converted to the layout's f16 GGUF (reused while the
    stamp says it was made from this checkpoint's content: `make gguf`, `xvq release` and
    `xvq convert` into the layout share the "convert" stamp)."""
    from xvq.convert import convert
    if not source.is_dir():
        return source
    if not (source / "config.json").is_file():
        raise XvqError(f"{source}: a folder without config.json; give a Hugging Face model folder or a GGUF")
    f16 = layout.gguf("f16")
    stamps = stamps or Stamps(layout.base / ".stamps")
    stamps.run("convert", {"model": source_identity(source, stamps.cache)}, [f16],
               lambda: convert(source, f16, "f16", name=layout.name, progress=progress))
    return f16


def measure_imatrix(src: Path, target: Path, *, calib_file: Path | None = None,
                    calib_tokens: int = DEFAULT_CALIB_TOKENS, tokenizer_dir: Path | None = None, n_ctx: int = 512,
                    n_threads: int = 0, gpu_layers: str | int | None = "auto", progress: bool = True,
                    log=print) -> Imatrix:
    from xvq.calib_data import calibration
    calib = calibration(calib_file, budget_tokens=calib_tokens, tokenizer_dir=tokenizer_dir)
    im = compute_imatrix(src, calib.text, dataset=calib.dataset, n_ctx=n_ctx, n_threads=n_threads or None,
                         progress=progress, gpu_layers=gpu_layers)
    im.save(target)
    log(f"wrote {target} ({len(im)} entries, {im.chunk_count} chunks of {n_ctx})")
    return im


def resolve_imatrix(spec: str | Path | None, src: Path, layout, stamps: Stamps, *, needed: bool,
                    calib_file: Path | None = None, calib_tokens: int = DEFAULT_CALIB_TOKENS,
                    tokenizer_dir: Path | None = None, n_ctx: int = 512, n_threads: int = 0,
                    gpu_layers: str | int | None = "auto", progress: bool = True, log=print) -> Imatrix | None:
    """--imatrix none|auto|FILE. auto, when `needed`: the layout's imatrix, measured unless its
    stamp says it was made from this GGUF's content and this calibration."""
    spec = "auto" if spec is None else str(spec)
    if spec.lower() == "none" or (spec.lower() == "auto" and not needed):
        return None
    info = read_source(src)
    if spec.lower() != "auto":
        im = Imatrix.load(spec)
        im.check_model(info.tensors, src)
        return im
    target = layout.imatrix()

    def measure():
        measure_imatrix(src, target, calib_file=calib_file, calib_tokens=calib_tokens, tokenizer_dir=tokenizer_dir,
                        n_ctx=n_ctx, n_threads=n_threads, gpu_layers=gpu_layers, progress=progress, log=log)
    inputs = {"gguf": fingerprint([src]), "calib_file": fingerprint([calib_file]) if calib_file else None,
              "calib_tokens": calib_tokens}
    if not stamps.run("imatrix", inputs, [target], measure):
        log(f"reusing importance matrix {target}")
    im = Imatrix.load(target)
    im.check_model(info.tensors, src)
    return im


def make_ggufs(source: Path | str, qts: list[QuantType], layout, outs: list[Path], *,
               imatrix: str | Path | None = "auto", calib_file: Path | None = None,
               calib_tokens: int = DEFAULT_CALIB_TOKENS, n_ctx: int = 512, n_threads: int = 0,
               output_tensor_type: str | None = None, token_embedding_type: str | None = None,
               gpu_layers: str | int | None = "auto", stamps: Stamps | None = None, reuse_outputs: bool = False,
               progress: bool = True, log=print) -> list[Path]:
    """A model folder is converted to the layout's f16 GGUF; an importance matrix is measured when
    some type gets one (QuantType.gets_imatrix) or read from --imatrix FILE; then one file per type,
    all from the same source and imatrix. Each step is stamped by the content of its inputs
    (`stamps`, default the layout's): convert and imatrix are reused while their inputs are
    unchanged, the quantized files too with `reuse_outputs` (xvq release)."""
    source = Path(source)
    stamps = stamps or Stamps(layout.base / ".stamps")
    src = source_gguf(source, layout, stamps, progress=progress)
    info = read_source(src)
    for qt in qts:   # fail before any work, not after the first type
        check_requantize(info, qt)
    auto = str(imatrix or "auto").lower() == "auto"
    im = resolve_imatrix(imatrix, src, layout, stamps, needed=any(q.gets_imatrix(auto) for q in qts),
                         calib_file=calib_file, calib_tokens=calib_tokens,
                         tokenizer_dir=source if source.is_dir() else None, n_ctx=n_ctx, n_threads=n_threads,
                         gpu_layers=gpu_layers, progress=progress, log=log)
    written = []
    for qt, out in tqdm(list(zip(qts, outs)), desc="quantize", unit="type", disable=not progress or len(qts) < 2):
        use = im if im is not None and qt.gets_imatrix(auto) else None
        inputs = {"gguf": fingerprint([src]), "imatrix": fingerprint([im.path]) if use is not None else None,
                  "type": qt.name, "output_tensor_type": output_tensor_type,
                  "token_embedding_type": token_embedding_type}

        def quantize_one(qt=qt, out=out, use=use):
            quantize_file(src, out, qt, imatrix=use, output_tensor_type=output_tensor_type,
                          token_embedding_type=token_embedding_type, n_threads=n_threads, progress=progress)
            log(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB){' with imatrix' if use is not None else ''}")
        (stamps if reuse_outputs else Stamps(stamps.folder, force=True)).run(f"gguf-{qt.name.lower()}", inputs, [out],
                                                                          quantize_one)
        written.append(out)
    return written


def layout_for(source: Path | str, name: str | None, out_root: Path | str | None, outdir: Path | str | None = None):
    """The layout of a model folder (its name) or of a GGUF (--name, else general.name, else the
    file stem without its f16/f32/bf16/q8_0 suffix); with `outdir` (--outdir) the imatrix and
    mix reports go there too (xvq.layout.OutdirLayout)."""
    from xvq.layout import DEFAULT_ROOT, Layout, OutdirLayout
    source = Path(source)
    if source.is_dir():
        lay = Layout.for_model(source, name, out_root)
    else:
        info = read_source(source)
        stem = re.sub(r"(-\d{5}-of-\d{5})?$", "", source.stem)
        stem = re.sub(r"-(f32|f16|bf16|q8_0)$", "", stem, flags=re.I)
        lay = Layout(name or info.name or stem, Path(out_root) if out_root else DEFAULT_ROOT)
    return OutdirLayout(lay.name, lay.root, Path(outdir)) if outdir is not None else lay


def quantize(source: Path | str, types: list[str], *, imatrix: str | Path | None = "auto",
             outdir: Path | None = None, outfile: Path | None = None, name: str | None = None,
             out_root: Path | None = None, output_tensor_type: str | None = None,
             token_embedding_type: str | None = None, calib_file: Path | None = None,
             calib_tokens: int = DEFAULT_CALIB_TOKENS, n_ctx: int = 512, n_threads: int = 0,
             gpu_layers: str | int | None = "auto", progress: bool = True, log=print) -> list[Path]:
    """`xvq quantize gguf`: every type from one source, one imatrix shared by all of them."""
    names = [t for spec in types for t in str(spec).replace(",", " ").split()]   # "--type Q4_K_M,Q8_0" too
    qts = [parse_type(t) for t in names] or [parse_type("Q4_K_M")]
    if outfile is not None and len(qts) > 1:
        raise XvqError("--outfile names one file but several --type were given; use --outdir instead")
    parse_ggml_type(output_tensor_type, "--output-tensor-type")
    parse_ggml_type(token_embedding_type, "--token-embedding-type")
    if str(imatrix).lower() == "none" and any(t.needs_imatrix for t in qts):
        bad = next(t.name for t in qts if t.needs_imatrix)
        raise XvqError(f"--type {bad} requires an importance matrix (llama.cpp refuses without one); "
                       f"use --imatrix auto or --imatrix FILE")
    source = Path(source)
    layout = layout_for(source, name, out_root, outdir)
    outs = [Path(outfile) if outfile is not None else
            (Path(outdir) / layout.gguf(qt.name).name if outdir else layout.gguf(qt.name)) for qt in qts]
    return make_ggufs(source, qts, layout, outs, imatrix=imatrix, calib_file=calib_file, calib_tokens=calib_tokens,
                      n_ctx=n_ctx, n_threads=n_threads, output_tensor_type=output_tensor_type,
                      token_embedding_type=token_embedding_type, gpu_layers=gpu_layers, progress=progress, log=log)


def effective_tensor_types(fam, ftype: str, *, has_imatrix: bool = False,
                           source_outtype: str = "f16") -> dict[str, str]:
    """For a model family: GGUF tensor name -> ggml type after `llama-quantize <ftype>`, from the
    config alone (sizes and laptop fit of a 65B model without converting it)."""
    from xvq.convert import planned_tensors
    from xvq.llamacpp import tensor_types
    hp = fam.hp
    is_70b = fam.gguf_arch == "llama" and hp.n_layer == 80 and hp.n_head != hp.n_head_kv
    return tensor_types(planned_tensors(fam, source_outtype), ftype, n_layer=hp.n_layer, n_expert=hp.n_expert,
                        n_gqa=hp.n_head // hp.n_head_kv, has_imatrix=has_imatrix, is_70b=is_70b)
