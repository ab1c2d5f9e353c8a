"""The whole step: tensors and their errors, the in-model ablations, the choice, and the one file
llama.cpp's quantizer writes (one type override per tensor, standard types and keys only; the
mix's predicted and measured KLD under xvq.mix.*)."""
from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

import gguf
from tqdm import tqdm

from xvq.errors import XvqError
from xvq.fsio import atomic_output
from xvq.units import MEMORY_MIN, parse_size
from xvq.quantize.mix.candidates import ALIGN, TensorChoice, measure_errors, model_tensors, padded
from xvq.quantize.mix.sensitivity import (Evaluator, Plan, ablate, ablate_at_chosen, ablation_plan,
                                          calibration_chunks, fit_gains, kld_of_mix)
from xvq.quantize.mix.solve import solve
from xvq.quantize.mix.target import Target, check_below_source, check_reachable, tensor_budget
from xvq.stamps import Stamps

KEY_PREDICTED, KEY_MEASURED = "xvq.mix.kld_predicted", "xvq.mix.kld_measured"
KEY_TARGET, KEY_TYPES = "xvq.mix.target", "xvq.mix.types"
TYPES_PLACEHOLDER = "-" * 127  # kv strings are cut at 127 bytes: the header never exceeds this size
# The llama.cpp file type recorded for a mix: the recipe with the most bits per weight at or below
# the mix's (a 5.05 bpw mix reads as Q4_K_M), so tools and the validate gate treat it as that class.
FTYPE_BY_BPW = (("Q2_K", 0.0), ("Q3_K_M", 3.4375), ("Q4_K_M", 4.5), ("Q5_K_M", 5.5), ("Q6_K", 6.5625),
                ("Q8_0", 8.5))
DEFAULT_ABLATION_TOKENS = 131072   # without an imatrix to match: the calibration set's default budget
MIN_ABLATION_TOKENS = 64 * 1024    # a 32-tensor model at 1,024 tokens a tensor, both passes: no fit below
SMALL_MODEL_WEIGHTS = 1e9          # models below this get the floor (it costs them seconds to minutes)


@dataclass
class Mix:
    path: Path
    types: dict[str, str]
    size_bytes: int
    bpw: float
    kld_predicted: float              # the chosen mix measured inside the loaded source, before writing
    kld_measured: float               # the written file, by llama.cpp, on the same chunks
    kld_additive: float               # sum of gain x error over tensors: the knapsack's objective
    seconds_choosing: float
    seconds_writing: float
    tensors: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    sensitivity: dict = field(default_factory=dict)   # what was measured, on how many tokens, the fit's check
    bytes_written: int | None = None                  # by this process while choosing and writing (/proc)

    def as_dict(self) -> dict:
        return {"path": str(self.path), "size_bytes": self.size_bytes, "bpw": self.bpw,
                "kld_predicted": self.kld_predicted, "kld_measured": self.kld_measured,
                "kld_additive": self.kld_additive,
                "seconds_choosing": self.seconds_choosing, "seconds_writing": self.seconds_writing,
                "timings": self.timings, "sensitivity": self.sensitivity, "bytes_written": self.bytes_written,
                "tensors": self.tensors}


def summary(types: dict[str, str]) -> str:
    """'Q4_K:14 Q6_K:10 ...': how many tensors of each quantized type (kv strings hold 127 bytes)."""
    from collections import Counter
    counts = Counter(t for t in types.values() if t != "F32")
    return " ".join(f"{t}:{n}" for t, n in sorted(counts.items(), key=lambda kv: -kv[1]))[:127]


def bytes_written_so_far() -> int | None:
    """Bytes this process has passed to write(2) (Linux /proc/self/io wchar: every file it wrote,
    page cache or not); None where there is no /proc."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("wchar:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def data_offset(path: Path) -> int:
    """Where tensor data starts in a GGUF: the header, kv and tensor infos, aligned."""
    from xvq.llamacpp import read_header
    return read_header(path).data_offset


def _kv_bytes(key: str, value) -> int:
    """One kv entry as GGUF stores it: key length, key, value type, value (strings cut at 127
    bytes by llama.cpp's overrides; numbers 4 bytes, as its quantizer writes them)."""
    size = 8 + len(key.encode()) + 4
    return size + (8 + len(value.encode()[:127]) if isinstance(value, str) else 4)


def header_estimate(src: Path, kv: dict) -> int:
    """The header llama.cpp's quantizer writes from `src` with `kv` added: the source's (the tensor
    infos keep their size whatever the type), plus the added keys and general.quantization_version,
    aligned; an upper bound, checked against the written file."""
    added = sum(_kv_bytes(k, v) for k, v in kv.items()) + _kv_bytes("general.quantization_version", 0)
    return padded(data_offset(src) + added + ALIGN)


def estimated_header(src: Path, extra: int = 2048) -> int:
    """Before the keys are known: the source's header plus room for the keys a quantizer adds."""
    return padded(data_offset(src) + extra)


def _mix_kv(target: Target, imatrix, types_summary: str = TYPES_PLACEHOLDER, predicted: float = 0.0) -> dict:
    from xvq.quantize.gguf import imatrix_keys
    kv = dict(imatrix_keys(imatrix)) if imatrix is not None else {}
    return kv | {KEY_TARGET: target.describe(), KEY_TYPES: types_summary, KEY_PREDICTED: predicted,
                 KEY_MEASURED: 0.0}


def ablation_budget(imatrix, n_weights: int) -> int:
    """Tokens the ablations may spend in all: as many as the imatrix was measured on, so the
    measurement takes about as long as the imatrix did; a model under SMALL_MODEL_WEIGHTS gets at
    least MIN_ABLATION_TOKENS (a small calibration would otherwise leave it a fit)."""
    tokens = DEFAULT_ABLATION_TOKENS
    if imatrix is not None and imatrix.chunk_count > 0 and imatrix.chunk_size:
        tokens = int(imatrix.chunk_count * imatrix.chunk_size)
    return max(MIN_ABLATION_TOKENS, tokens) if n_weights < SMALL_MODEL_WEIGHTS else tokens


def measure_sensitivity(src: Path, tensors: list[TensorChoice], im_values: dict, calib_text: str, *, n_ctx: int,
                        budget_tokens: int, n_threads: int | None, gpu_layers, progress: bool,
                        timings: dict) -> tuple[Evaluator, dict[str, float], dict, Plan]:
    """Errors per type, then the ablations half the budget pays for inside one loaded source (the
    other half is for the second pass at the chosen types), then the gains. Returns the evaluator
    (kept loaded for the second pass and to score the written file), the ablation KLDs, what was
    measured and the plan."""
    t0 = time.perf_counter()
    measure_errors(src, tensors, im_values, progress)
    timings["errors"] = time.perf_counter() - t0
    plan = ablation_plan(tensors, budget_tokens // 2, n_ctx)
    chunks = calibration_chunks(src, calib_text, n_ctx, plan.tokens_each // n_ctx)
    t0 = time.perf_counter()
    ev = Evaluator(src, chunks, n_ctx, n_threads, gpu_layers)
    timings["reference"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    try:
        measured = ablate(src, plan, ev, im_values, progress)
    except BaseException:
        ev.close()
        raise
    timings["ablations"] = time.perf_counter() - t0
    info = fit_gains(tensors, measured)
    info |= {"tokens_per_ablation": ev.tokens, "budget_tokens": budget_tokens, "complete": plan.complete}
    return ev, measured, info, plan


def choose_and_write(src: Path, out: Path | None, target: Target, *, imatrix, calib_text: str, layout=None,
                     outdir: Path | None = None, n_ctx: int = 128, n_threads: int | None = None, progress: bool = True,
                     budget_tokens: int | None = None, gpu_layers: str | int | None = "auto",
                     workdir: Path | None = None, log=print) -> Mix:
    """The mix for `target`, written to `out` (default: the layout's <name>-xvq-<bpw>bpw.gguf).
    `budget_tokens` (default: the imatrix's) bounds the ablations' tokens. `workdir` is kept for
    callers of the file-per-ablation version; nothing is written there now."""
    wrote0 = bytes_written_so_far()
    t0 = time.perf_counter()
    im_values = imatrix.values() if imatrix is not None else {}
    tensors = model_tensors(src, set(im_values))
    header = header_estimate(src, _mix_kv(target, imatrix))
    check_reachable(target, tensors, header, src)
    check_below_source(target, tensors, src)
    if not any(c.quantizable for c in tensors):
        raise XvqError(f"{src}: no tensor can be quantized (already quantized?); give the f16/f32 GGUF")
    timings: dict[str, float] = {}
    budget_tokens = budget_tokens or ablation_budget(imatrix, sum(c.n_elements for c in tensors))
    ev, measured, info, plan = measure_sensitivity(
        src, tensors, im_values, calib_text, n_ctx=n_ctx, budget_tokens=budget_tokens, n_threads=n_threads,
        gpu_layers=gpu_layers, progress=progress, timings=timings)
    with ev:
        t1 = time.perf_counter()
        budget = tensor_budget(target, tensors, header, src)
        types = solve(tensors, budget)
        timings["solve"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        second = ablate_at_chosen(src, plan, types, ev, im_values, progress)
        timings["ablations_at_chosen"] = time.perf_counter() - t1
        info["second_pass"] = len(second)
        t1 = time.perf_counter()
        types = solve(tensors, budget)
        by_name = {c.name: c for c in tensors}
        n_el = sum(c.n_elements for c in tensors)
        bpw = 8 * sum(by_name[n].options[t] for n, t in types.items()) / n_el
        additive = float(sum(by_name[n].predicted(t) for n, t in types.items() if by_name[n].quantizable))
        timings["solve"] += time.perf_counter() - t1
        t1 = time.perf_counter()
        # the in-model prediction quantizes every tensor once more (a quantize pass per 8 chunks):
        # cheap beside the ablations when all tensors were measured, not at 65B, where the
        # additive prediction (within 1.3x after the second pass, docs/mix.md) stands alone
        predicted = kld_of_mix(src, types, tensors, ev, im_values) if plan.complete else additive
        info["prediction"] = "in-model" if plan.complete else "additive"
        timings["predict"] = time.perf_counter() - t1
        t_choose = time.perf_counter() - t0
        if out is None:   # named by the mix, so known only now
            out = layout.gguf(f"xvq-{bpw:.2f}bpw")
            out = Path(outdir) / out.name if outdir is not None else out
        ev.release_source()
        t1 = time.perf_counter()
        measured_kld = write_mix(src, out, target, types, tensors, predicted, imatrix, ev, header, n_threads, progress)
    rows = [{"name": c.name, "type": types[c.name], "bytes": c.options[types[c.name]],
             "kld_predicted": c.predicted(types[c.name]) if c.quantizable else 0.0,
             "gain": c.gain, "gain_at": c.gain_at, "ablation_kld": measured.get(c.name),
             "ablation_kld_at_chosen": second.get(c.name)} for c in tensors]
    wrote1 = bytes_written_so_far()
    return Mix(out, types, out.stat().st_size, bpw, predicted, measured_kld, additive, t_choose,
               time.perf_counter() - t1, rows, timings, info,
               None if wrote0 is None or wrote1 is None else wrote1 - wrote0)


def write_mix(src: Path, out: Path, target: Target, types: dict[str, str], tensors: list[TensorChoice],
              predicted: float, imatrix, ev: Evaluator, header: int, n_threads: int | None, progress: bool) -> float:
    """llama.cpp's quantizer writes the file; its KLD on the evaluator's chunks is patched into the
    header. Returns that KLD."""
    from xvq.quantize.gguf import quantize_with_types
    by_name = {c.name: c for c in tensors}
    quant = {n: t for n, t in types.items() if by_name[n].quantizable}
    bpw = 8 * sum(by_name[n].options[t] for n, t in types.items()) / sum(c.n_elements for c in tensors)
    ftype = [name for name, b in FTYPE_BY_BPW if b <= bpw][-1]
    kv = _mix_kv(target, None, summary(types), predicted)
    with atomic_output(out) as tmp, tqdm(total=2, desc="mix: write, measure", disable=not progress,
                                         leave=False) as bar:
        quantize_with_types(src, tmp, ftype, quant, imatrix=imatrix, extra_kv=list(kv.items()),
                            n_threads=n_threads or 0)
        bar.update()
        measured_kld = ev.kld(tmp)
        patch_float(tmp, KEY_MEASURED, measured_kld)
        bar.update()
        size = tmp.stat().st_size
        if target.kind == "size" and size > target.value:
            raise XvqError(f"{out}: the mix came out at {size} bytes, over the target {int(target.value)}; "
                           f"report this (header estimate {header}, written {data_offset(tmp)})")
    return measured_kld


def patch_float(path: Path, key: str, value: float) -> None:
    """Overwrite a float32 kv value in place (its bytes have a fixed size, so nothing moves)."""
    import mmap
    needle = struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", gguf.GGUFValueType.FLOAT32)
    with open(path, "r+b") as f:
        mm = mmap.mmap(f.fileno(), 0)
        try:
            i = mm.find(needle, 0, data_offset(path))
            if i < 0:
                raise XvqError(f"{path}: key {key} not found in the header; the quantizer did not record it")
            j = i + len(needle)
            mm[j:j + 4] = struct.pack("<f", value)
            mm.flush()
        finally:
            mm.close()


def write_report(mix: Mix, path: Path) -> Path:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(mix.as_dict(), indent=1))
    return path


def quantize_mix(source: Path | str, target: Target, *, imatrix: str | Path | None = "auto",
                 outdir: Path | None = None, outfile: Path | None = None, name: str | None = None,
                 out_root: Path | None = None, calib_file: Path | None = None, calib_tokens: int | None = None,
                 n_threads: int = 0, gpu_layers: str | int | None = "auto", progress: bool = True, log=print) -> Mix:
    """`xvq quantize gguf SOURCE --target-size|--target-bpw|--fit`: one mixed GGUF. With --outdir
    (or --outfile) and no --out-root, the layout it needs (f16, imatrix, report, stamps) goes there too."""
    from xvq.calib_data import calibration
    from xvq.convert import source_gguf
    from xvq.quantize.gguf import DEFAULT_CALIB_TOKENS, ImatrixSettings, layout_for, read_source, resolve_imatrix
    source = Path(source)
    layout = layout_for(source, name, out_root, beside=outdir or (Path(outfile).parent if outfile else None))
    model_dir = source if source.is_dir() else None
    stamps = Stamps(layout.base / ".stamps")
    src = source_gguf(source, layout, stamps, progress=progress)
    info = read_source(src)
    if info.weight_type not in ("F32", "F16", "BF16"):
        raise XvqError(f"{src}: already quantized ({info.weight_type}); a mix is made from the f16/f32 GGUF")
    # the checks before any work: nothing is measured or written when the target cannot be met
    has_im = str(imatrix).lower() != "none"
    names = {n for n in info.tensors if n.startswith("blk.")} if has_im else set()   # what an imatrix covers
    tensors = model_tensors(src, names)
    check_reachable(target, tensors, estimated_header(src), src)
    check_below_source(target, tensors, src)
    calib_tokens = calib_tokens or DEFAULT_CALIB_TOKENS
    calib = calibration(calib_file, budget_tokens=calib_tokens, tokenizer_dir=model_dir)
    settings = ImatrixSettings(spec=imatrix or "auto", calib_file=calib_file, calib_tokens=calib_tokens,
                               n_threads=n_threads, gpu_layers=gpu_layers)
    im = resolve_imatrix(settings, src, layout, stamps, needed=True, tokenizer_dir=model_dir, progress=progress, log=log)
    mix = choose_and_write(src, outfile, target, imatrix=im, calib_text=calib.text, layout=layout, outdir=outdir,
                           n_threads=n_threads or None, gpu_layers=gpu_layers, progress=progress, log=log)
    report = write_report(mix, layout.mix_dir / (mix.path.stem + ".json"))
    s = mix.sensitivity
    log(f"wrote {mix.path} ({mix.size_bytes / 1e6:.1f} MB, {mix.bpw:.2f} bpw; {summary(mix.types)}); "
        f"KLD predicted {mix.kld_predicted:.5f} (additive {mix.kld_additive:.5f}), measured {mix.kld_measured:.5f} "
        f"on the calibration text "
        f"({s['measured']}/{s['of']} tensors ablated, {s['tokens_per_ablation']} tokens each); "
        f"chose in {mix.seconds_choosing:.1f} s; report {report}")
    return mix


def build_tier(src: Path, out: Path, ram: str, *, imatrix, calib_text: str, ctx: int = 8192,
               n_threads: int | None = None, log=print) -> Path | None:
    """One release tier: the best mix `xvq fit` says fits `ram` at `ctx`, or None with a line
    saying why it is skipped (larger than the Q8_0 file, or nothing fits)."""
    target = Target("fit", parse_size(ram, "--tiers", minimum=MEMORY_MIN) / 1e9, ctx)
    tensors = model_tensors(src, set(imatrix.values()) if imatrix is not None else set())
    q8 = sum(c.options.get("Q8_0", min(c.options.values())) if c.quantizable else c.options[c.src_type]
             for c in tensors)
    budget = tensor_budget(target, tensors, 0, src)
    if budget >= q8:
        log(f"tier {ram}: skipped, the Q8_0 file ({q8 / 1e9:.2f} GB of weights) already fits {ram} at {ctx} context")
        return None
    try:
        check_reachable(target, tensors, estimated_header(src), src)
    except XvqError as e:
        log(f"tier {ram}: skipped, {e.message}")
        return None
    mix = choose_and_write(src, out, target, imatrix=imatrix, calib_text=calib_text, n_threads=n_threads,
                           progress=False)
    log(f"tier {ram}: {out.name} ({mix.bpw:.2f} bpw, {mix.size_bytes / 1e6:.1f} MB; {summary(mix.types)})")
    return out
