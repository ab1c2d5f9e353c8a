"""GGUF → quantized GGUF through llama.cpp's own quantizer (`llama_model_quantize` in
llama-cpp-python), with xvq's importance matrix handed over in memory."""
from __future__ import annotations

import ctypes
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from tqdm import tqdm

from xvq.errors import XvqError
from xvq.fsio import atomic_output
from xvq.quantize.imatrix import Imatrix

GGML_LOG_LEVEL_ERROR = 4


@dataclass(frozen=True)
class QuantType:
    name: str          # llama-quantize's name, e.g. Q4_K_M
    ftype: int         # llama_ftype
    main: str          # ggml type of most weights (llama_ftype_get_default_type)
    needs_imatrix: bool = False   # llama.cpp refuses without one

    @property
    def bpw(self) -> float:
        """Nominal bits per weight of the main tensor type."""
        return TYPE_BPW[self.main]


# ggml type -> bits per weight (block bytes * 8 / block elements), from ggml's type traits
TYPE_BPW = {"F32": 32.0, "F16": 16.0, "BF16": 16.0, "Q8_0": 8.5, "Q6_K": 6.5625, "Q5_K": 5.5, "Q5_1": 6.0,
            "Q5_0": 5.5, "Q4_K": 4.5, "Q4_1": 5.0, "Q4_0": 4.5, "IQ4_NL": 4.5, "IQ4_XS": 4.25, "Q3_K": 3.4375,
            "IQ3_S": 3.4375, "IQ3_XXS": 3.0625, "Q2_K": 2.625, "IQ2_S": 2.5625, "IQ2_XS": 2.3125,
            "IQ2_XXS": 2.0625, "IQ1_M": 1.75, "IQ1_S": 1.5625, "TQ2_0": 2.0625, "TQ1_0": 1.6875,
            "MXFP4": 4.25, "NVFP4": 4.5, "Q1_0": 1.125, "Q2_0": 2.25}

# Every type llama-quantize offers (tools/quantize/quantize.cpp QUANT_OPTIONS), with the ggml type
# its weights get (llama-quant.cpp llama_ftype_get_default_type) and llama.cpp's imatrix rule
# (tensor_requires_imatrix: IQ1/IQ2 and IQ3_XXS targets, and Q2_K inside Q2_K_S).
_TABLE = [
    ("Q1_0", "Q1_0", False), ("Q2_0", "Q2_0", False), ("Q4_0", "Q4_0", False), ("Q4_1", "Q4_1", False),
    ("MXFP4_MOE", "MXFP4", False), ("Q5_0", "Q5_0", False), ("Q5_1", "Q5_1", False),
    ("IQ2_XXS", "IQ2_XXS", True), ("IQ2_XS", "IQ2_XS", True), ("IQ2_S", "IQ2_XS", True), ("IQ2_M", "IQ2_S", True),
    ("IQ1_S", "IQ1_S", True), ("IQ1_M", "IQ1_M", True), ("TQ1_0", "TQ1_0", False), ("TQ2_0", "TQ2_0", False),
    ("Q2_K", "Q2_K", False), ("Q2_K_S", "Q2_K", True), ("IQ3_XXS", "IQ3_XXS", True), ("IQ3_S", "IQ3_S", False),
    ("IQ3_M", "IQ3_S", False), ("IQ3_XS", "IQ3_S", False), ("Q3_K_S", "Q3_K", False), ("Q3_K_M", "Q3_K", False),
    ("Q3_K_L", "Q3_K", False), ("IQ4_NL", "IQ4_NL", False), ("IQ4_XS", "IQ4_XS", False), ("Q4_K_S", "Q4_K", False),
    ("Q4_K_M", "Q4_K", False), ("Q5_K_S", "Q5_K", False), ("Q5_K_M", "Q5_K", False), ("Q6_K", "Q6_K", False),
    ("Q8_0", "Q8_0", False), ("F16", "F16", False), ("BF16", "BF16", False), ("F32", "F32", False),
]
ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}


def _ftype(name: str) -> int:
    from llama_cpp import llama_cpp as C
    return C.LLAMA_FTYPE_ALL_F32 if name == "F32" else getattr(C, f"LLAMA_FTYPE_MOSTLY_{name}")


def quant_types() -> dict[str, QuantType]:
    return {n: QuantType(n, _ftype(n), main, req) for n, main, req in _TABLE}


def parse_type(name: str) -> QuantType:
    """Case-insensitive; an unknown name lists the valid ones."""
    key = name.strip().upper()
    key = ALIASES.get(key, key)
    types = quant_types()
    if key not in types:
        raise XvqError(f"--type {name}: unknown quantization type; use one of {', '.join(types)}")
    return types[key]


def parse_ggml_type(name: str | None, option: str) -> int:
    """--output-tensor-type / --token-embedding-type: a ggml tensor type name (q8_0, q6_k, f16...)."""
    from llama_cpp import llama_cpp as C
    if name is None:
        return C.GGML_TYPE_COUNT
    key = name.strip().upper()
    value = getattr(C, f"GGML_TYPE_{key}", None)
    if value is None or key in ("COUNT", "I8", "I16", "I32", "I64", "F64"):
        valid = sorted(k[10:] for k in dir(C) if k.startswith("GGML_TYPE_") and k[10:] not in
                       ("COUNT", "I8", "I16", "I32", "I64", "F64"))
        raise XvqError(f"{option} {name}: unknown tensor type; use one of {', '.join(valid)}")
    return value


def default_uses_imatrix(qt: QuantType) -> bool:
    """--imatrix auto: below Q6_K (what llama.cpp's docs recommend imatrix for)."""
    return qt.bpw < TYPE_BPW["Q6_K"]


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
    header = read_header(path)
    gtype = header.kv.get("general.type")
    if gtype and gtype != "model":
        raise XvqError(f"{path}: a GGUF of type '{gtype}', not a model; give the model's f16/f32 GGUF")
    if "general.architecture" not in header.kv:
        raise XvqError(f"{path}: GGUF without general.architecture, not a model; give the model's f16/f32 GGUF")
    infos = dict(header.tensors)
    for shard in other_shards(path, int(header.kv.get("split.count") or 1)):
        infos |= read_header(shard).tensors
    tensors = {n: shape for n, (shape, _) in infos.items()}
    weights = Counter(gguf.GGMLQuantizationType(t).name for shape, t in infos.values() if len(shape) >= 2)
    wtype = weights.most_common(1)[0][0] if weights else "F32"
    return SourceInfo(path, header.kv.get("general.name"), tensors, wtype, TYPE_BPW.get(wtype, 32.0))


@dataclass
class GgufHeader:
    kv: dict[str, object]                               # scalars and strings (arrays skipped)
    tensors: dict[str, tuple[tuple[int, ...], int]]     # name -> (ggml shape, ggml type)


_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


def read_header(path: Path) -> GgufHeader:
    """GGUF metadata and tensor infos without materialising arrays (gguf-py's reader builds every
    vocabulary entry: seconds for a 100k vocabulary, several times per run)."""
    import mmap
    import struct
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise XvqError(f"{path}: not a GGUF file; give a GGUF (xvq convert MODEL_DIR makes one) or a model folder")
        try:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError as e:
            raise XvqError(f"{path}: damaged GGUF; convert the model again") from e
    pos = 4

    def take(fmt: str):
        nonlocal pos
        v = struct.unpack_from("<" + fmt, mm, pos)
        pos += struct.calcsize("<" + fmt)
        return v[0] if len(v) == 1 else v

    def string() -> str:
        nonlocal pos
        n = take("Q")
        pos += n
        if pos > len(mm):
            raise ValueError("truncated string")
        return bytes(mm[pos - n:pos]).decode("utf-8", "replace")

    def value(vtype: int):
        nonlocal pos
        if vtype in _SCALARS:
            return take(_SCALARS[vtype])
        if vtype == _STRING:
            return string()
        if vtype == _ARRAY:
            etype, count = take("IQ")
            if etype in _SCALARS:
                pos += struct.calcsize("<" + _SCALARS[etype]) * count
            else:
                for _ in range(count):
                    value(etype)
            return None
        raise ValueError(f"unknown value type {vtype}")

    try:
        version, n_tensors, n_kv = take("IQQ")
        if version < 2:
            raise ValueError(f"version {version} is too old")
        kv = {}
        for _ in range(n_kv):
            key = string()
            kv[key] = value(take("I"))
        tensors = {}
        for _ in range(n_tensors):
            name = string()
            shape = tuple(take("Q") for _ in range(take("I")))
            tensors[name] = (shape, take("I"))
            take("Q")   # data offset
    except (struct.error, ValueError) as e:
        raise XvqError(f"{path}: damaged GGUF ({e}); convert the model again") from e
    finally:
        mm.close()
    return GgufHeader({k: v for k, v in kv.items() if v is not None}, tensors)


def other_shards(first: Path, count: int) -> list[Path]:
    """The remaining files of a split GGUF (llama.cpp's <prefix>-0000k-of-0000n.gguf); llama.cpp
    itself finds them from the first one."""
    from xvq.layout import gguf_shards
    if count <= 1:
        return []
    paths = gguf_shards(first)[1:]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise XvqError(f"{first}: split GGUF is missing {', '.join(missing)}; put all shards in one folder")
    return paths


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
# llama_model_quantize
# ----------------------------------------------------------------------------------------------

class _QuantizeLog:
    """llama.cpp's log during quantization: counts tensors for the progress bar, keeps errors."""
    TENSOR_LINE = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]")

    def __init__(self, bar: tqdm | None):
        from llama_cpp import llama_cpp as C
        self.bar, self.errors, self.tail = bar, [], []
        self.cb = C.llama_log_callback(self._log)

    def _log(self, level, text, _user):
        try:
            s = text.decode("utf-8", "replace")
            self.tail = (self.tail + [s])[-40:]
            m = self.TENSOR_LINE.match(s)
            if m and self.bar is not None:
                self.bar.total = int(m.group(2))
                self.bar.update(int(m.group(1)) - self.bar.n)
            if level == GGML_LOG_LEVEL_ERROR and s.strip():
                self.errors.append(s.strip())
        except Exception:
            pass


def imatrix_array(values: dict[str, np.ndarray]):
    """Null-terminated llama_model_imatrix_data[]; returns (array, keep-alive buffers)."""
    from llama_cpp import llama_cpp as C
    arr = (C.llama_model_imatrix_data * (len(values) + 1))()
    keep = []
    for i, (name, v) in enumerate(sorted(values.items())):
        v = np.ascontiguousarray(v, np.float32)
        keep.append(v)
        keep.append(name.encode())
        arr[i].name = keep[-1]
        arr[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        arr[i].size = v.size
    arr[len(values)].name = None
    return arr, keep


def imatrix_kv_overrides(im: Imatrix, file_label: str | None):
    """The quantize.imatrix.* keys llama-quantize records (it adds them as kv overrides; the
    library does not): file, dataset, entries_count, chunks_count."""
    from llama_cpp import llama_cpp as C
    items: list[tuple[str, int, object]] = []
    if file_label:
        items.append(("quantize.imatrix.file", C.LLAMA_KV_OVERRIDE_TYPE_STR, file_label))
    if im.datasets:
        items.append(("quantize.imatrix.dataset", C.LLAMA_KV_OVERRIDE_TYPE_STR, im.datasets[0]))
    items.append(("quantize.imatrix.entries_count", C.LLAMA_KV_OVERRIDE_TYPE_INT, len(im)))
    if im.chunk_count > 0:
        items.append(("quantize.imatrix.chunks_count", C.LLAMA_KV_OVERRIDE_TYPE_INT, im.chunk_count))
    arr = (C.llama_model_kv_override * (len(items) + 1))()
    for i, (key, tag, val) in enumerate(items):
        arr[i].key = key.encode()
        arr[i].tag = tag
        if tag == C.LLAMA_KV_OVERRIDE_TYPE_STR:
            arr[i].value.val_str = str(val).encode("utf-8")[:127]
        else:
            arr[i].value.val_i64 = int(val)
    arr[len(items)].key = b""
    return arr


def _imatrix_label(path: Path | None) -> str | None:
    """llama-quantize stores the --imatrix path as given, cut to 127 bytes; xvq stores the path,
    or just the file name when the path would not fit."""
    if path is None:
        return None
    s = str(path)
    return s if len(s.encode()) <= 127 else path.name


def quantize_file(src: Path | str, out: Path | str, qtype: str | QuantType, *, imatrix: Imatrix | None = None,
                  output_tensor_type: str | None = None, token_embedding_type: str | None = None,
                  n_threads: int = 0, progress: bool = True) -> Path:
    """Quantize one GGUF with llama.cpp; written under a temporary name, renamed when complete."""
    from llama_cpp import llama_cpp as C
    from xvq.quantize.imatrix import quiet_llama
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

    params = C.llama_model_quantize_default_params()
    params.ftype = qt.ftype
    params.nthread = n_threads
    params.allow_requantize = requant
    params.output_tensor_type = parse_ggml_type(output_tensor_type, "--output-tensor-type")
    params.token_embedding_type = parse_ggml_type(token_embedding_type, "--token-embedding-type")
    keep = []
    if imatrix is not None:
        arr, bufs = imatrix_array(imatrix.values())
        kv = imatrix_kv_overrides(imatrix, _imatrix_label(imatrix.path))
        params.imatrix = ctypes.cast(arr, ctypes.POINTER(C.llama_model_imatrix_data))
        params.kv_overrides = ctypes.cast(kv, ctypes.POINTER(C.llama_model_kv_override))
        keep += [arr, bufs, kv]

    with atomic_output(out) as tmp, tqdm(desc=f"quantize {qt.name}", unit="tensor", disable=not progress,
                                         leave=False) as bar:
        log = _QuantizeLog(bar)
        C.llama_log_set(log.cb, ctypes.c_void_p(0))
        try:
            rc = C.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        finally:
            quiet_llama(force=True)
        if rc != 0 or not tmp.is_file():
            detail = log.errors[-1] if log.errors else (log.tail[-1].strip() if log.tail else f"code {rc}")
            raise XvqError(f"{src}: llama.cpp could not quantize to {qt.name}: {detail}")
    del keep
    return out


# ----------------------------------------------------------------------------------------------
# The `xvq quantize gguf` pipeline: source → (imatrix) → one file per type
# ----------------------------------------------------------------------------------------------

DEFAULT_CALIB_TOKENS = 131072   # = xvq.calib_data.DEFAULT_TOKENS: 256 chunks of 512


@dataclass
class Calibration:
    text: str
    dataset: str


def calibration(calib_file: Path | str | None = None, *, budget_tokens: int = DEFAULT_CALIB_TOKENS,
                tokenizer_dir: Path | None = None, seed: int = 0) -> Calibration:
    """The text the importance matrix is measured on: a given file, else xvq's calibration set."""
    if calib_file is not None:
        p = Path(calib_file)
        if not p.is_file():
            raise XvqError(f"--calib-file {p}: not found; give a UTF-8 text file")
        return Calibration(p.read_text(encoding="utf-8", errors="replace"), str(p))
    try:
        from xvq.calib_data import sample
    except ImportError as e:
        raise XvqError(f"the calibration set (xvq.calib_data) is not available ({e}); "
                       f"give --calib-file TEXT or --imatrix FILE") from e
    s = sample(budget_tokens=budget_tokens, seed=seed, tokenizer_dir=tokenizer_dir)
    return Calibration(s.text, s.dataset_name)


def resolve_source(source: Path | str, layout, *, progress: bool = True) -> tuple[Path, Path | None]:
    """(GGUF to quantize, model folder or None). A model folder is converted first into the
    layout's f16 GGUF (reused when it is newer than the checkpoint, e.g. after `make gguf`'s
    convert step)."""
    source = Path(source)
    if not source.is_dir():
        return source, None
    if not (source / "config.json").is_file():
        raise XvqError(f"{source}: a folder without config.json; give a Hugging Face model folder or a GGUF")
    f16 = layout.gguf("f16")
    newest = max(p.stat().st_mtime for p in source.iterdir() if p.is_file())
    if not (f16.is_file() and f16.stat().st_mtime >= newest):
        from xvq.convert import convert
        convert(source, f16, "f16", name=layout.name, progress=progress)
    return f16, source


def resolve_imatrix(spec: str | Path | None, src_gguf: Path, types: list[QuantType], layout, *,
                    calib: Calibration | None = None, calib_file: Path | None = None,
                    model_dir: Path | None = None, calib_tokens: int = DEFAULT_CALIB_TOKENS, n_ctx: int = 512,
                    n_threads: int | None = None, progress: bool = True, log=print) -> Imatrix | None:
    """--imatrix none|auto|FILE. auto: only when some type is below Q6_K (or needs one); reuses
    the layout's imatrix when it fits this model, else measures and saves it there."""
    from xvq.quantize.imatrix import compute_imatrix
    spec = "auto" if spec is None else spec
    if str(spec).lower() == "none":
        return None
    info = read_source(src_gguf)
    if str(spec).lower() != "auto":
        im = Imatrix.load(spec)
        im.check_model(info.tensors, src_gguf)
        return im
    if not any(default_uses_imatrix(t) or t.needs_imatrix for t in types):
        return None
    target = layout.imatrix()
    if target.is_file():
        try:
            im = Imatrix.load(target)
            im.check_model(info.tensors, src_gguf)
            log(f"reusing importance matrix {target}")
            return im
        except XvqError:
            log(f"{target} does not fit this model; measuring a new one")
    calib = calib or calibration(calib_file, budget_tokens=calib_tokens, tokenizer_dir=model_dir)
    im = compute_imatrix(src_gguf, calib.text, dataset=calib.dataset, n_ctx=n_ctx, n_threads=n_threads,
                         progress=progress)
    im.save(target)
    log(f"wrote {target} ({len(im)} entries, {im.chunk_count} chunks of {n_ctx})")
    return im


def layout_for(source: Path | str, name: str | None, out_root: Path | str | None):
    """The layout of a model folder (its name) or of a GGUF (--name, else general.name, else the
    file stem without its f16/f32/bf16/q8_0 suffix)."""
    from xvq.layout import DEFAULT_ROOT, Layout
    source = Path(source)
    if source.is_dir():
        return Layout.for_model(source, name, out_root)
    info = read_source(source)
    stem = re.sub(r"(-\d{5}-of-\d{5})?$", "", source.stem)
    stem = re.sub(r"-(f32|f16|bf16|q8_0)$", "", stem, flags=re.I)
    return Layout(name or info.name or stem, Path(out_root) if out_root else DEFAULT_ROOT)


def quantize(source: Path | str, types: list[str], *, imatrix: str | Path | None = "auto",
             outdir: Path | None = None, outfile: Path | None = None, name: str | None = None,
             out_root: Path | None = None, output_tensor_type: str | None = None,
             token_embedding_type: str | None = None, calib_file: Path | None = None,
             calib_tokens: int = DEFAULT_CALIB_TOKENS, n_ctx: int = 512, n_threads: int = 0,
             progress: bool = True, log=print) -> list[Path]:
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
    src_path = Path(source)
    layout = layout_for(src_path, name, out_root)
    src_gguf, model_dir = resolve_source(src_path, layout, progress=progress)
    info = read_source(src_gguf)
    for qt in qts:   # fail before any work, not after the first type
        check_requantize(info, qt)
    im = resolve_imatrix(imatrix, src_gguf, qts, layout, calib_file=calib_file, model_dir=model_dir,
                         calib_tokens=calib_tokens, n_ctx=n_ctx, n_threads=n_threads or None,
                         progress=progress, log=log)
    written = []
    for qt in tqdm(qts, desc="quantize", unit="type", disable=not progress or len(qts) < 2):
        out = outfile if outfile is not None else (Path(outdir) / layout.gguf(qt.name).name if outdir
                                                   else layout.gguf(qt.name))
        # auto applies the imatrix below Q6_K; an explicit file applies to every type
        auto = str(imatrix).lower() == "auto"
        use = im if im is not None and (not auto or default_uses_imatrix(qt) or qt.needs_imatrix) else None
        quantize_file(src_gguf, out, qt, imatrix=use, output_tensor_type=output_tensor_type,
                      token_embedding_type=token_embedding_type, n_threads=n_threads, progress=progress)
        log(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB){' with imatrix' if use is not None else ''}")
        written.append(out)
    return written
