"""GGUF files sized for a target, with per-tensor types chosen by measured sensitivity.

1. Error: every quantizable tensor is quantized by ggml's own kernels to every candidate type
   (llama.cpp's k-quants, IQ types with an imatrix, Q8_0, F16) on a sample of its rows; the
   error is the imatrix-weighted squared error sum_ij w_j (W_ij - Q(W)_ij)^2, i.e. the expected
   squared change of the tensor's output per token (w_j = E[x_j^2]).
2. Calibration: the KL divergence a tensor causes is its error times a gain (how much the output
   distribution moves per unit of output change there). Gains are measured by single-tensor
   ablations on the calibration text (one tensor quantized, the rest kept, KLD to the source):
   every kind in one layer and one kind in every probed layer, fitted as
   log gain = kind term + layer term; the embedding and output tensors are measured directly.
3. Choice: predicted KLD = sum of gain * error over tensors (small perturbations add), minimised
   under the byte budget: a dynamic programme over the budget (sizes rounded up, so its answer
   fits), then the best single upgrades that still fit in exact bytes.
4. File: llama.cpp's quantizer writes it with one type override per tensor (standard types and
   keys only); the mix's predicted and measured KLD are recorded under xvq.mix.*.
"""
from __future__ import annotations

import json
import math
import re
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
from tqdm import tqdm

from xvq.errors import XvqError
from xvq.fsio import atomic_output
from xvq.llamacpp import Gguf
from xvq.units import MEMORY_MIN, parse_size
from xvq.stamps import Stamps
from xvq.logits import full_kld, log_sum_exp

# Candidates, cheapest first. IQ1_* are left out: llama.cpp's own docs call them unusable alone.
CANDIDATES = ("IQ2_XXS", "Q2_K", "IQ3_XXS", "IQ3_S", "Q3_K", "IQ4_XS", "Q4_K", "Q5_K",
              "Q6_K", "Q8_0", "F16")
# Rows that no 256-block type divides (XVERSE-MoE's experts, 1728 wide) take the 32-block types
# llama.cpp itself falls back to (tensor_type_fallback).
ROW32_CANDIDATES = ("Q4_0", "IQ4_NL", "Q5_0", "Q5_1")
CALIBRATION_TYPE = "Q3_K"      # ablations quantize one tensor to this (or its nearest candidate)
SAMPLE_ROWS = 64               # rows per tensor whose error is measured (an unbiased sample)
ALIGN = 32                     # GGUF tensor data alignment
KLD_CHUNKS = 8                 # calibration chunks for ablations and the measured KLD
MAX_LAYER_PROBES = 8           # layers whose gain is measured; the others are interpolated
KEY_PREDICTED, KEY_MEASURED = "xvq.mix.kld_predicted", "xvq.mix.kld_measured"
KEY_TARGET, KEY_TYPES = "xvq.mix.target", "xvq.mix.types"
TYPES_PLACEHOLDER = "-" * 127  # kv strings are cut at 127 bytes: the header never exceeds this size
# The llama.cpp file type recorded for a mix: the recipe with the most bits per weight at or below
# the mix's (a 5.05 bpw mix reads as Q4_K_M), so tools and the validate gate treat it as that class.
FTYPE_BY_BPW = (("Q2_K", 0.0), ("Q3_K_M", 3.4375), ("Q4_K_M", 4.5), ("Q5_K_M", 5.5), ("Q6_K", 6.5625),
                ("Q8_0", 8.5))


# ----------------------------------------------------------------------------------------------
# Targets
# ----------------------------------------------------------------------------------------------

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
        return Target("fit", parse_size(fit, "--fit", minimum=MEMORY_MIN) / 1e9, ctx or 8192)
    return None


# ----------------------------------------------------------------------------------------------
# The model's tensors and their candidates
# ----------------------------------------------------------------------------------------------

@dataclass
class TensorChoice:
    name: str
    shape: tuple[int, ...]              # numpy order: (experts,) rows, cols
    src_type: str
    quantizable: bool
    options: dict[str, int] = field(default_factory=dict)       # type -> bytes
    error: dict[str, float] = field(default_factory=dict)       # type -> weighted squared error
    gain: float = 0.0                   # KLD per unit of error (calibrated)

    @property
    def kind(self) -> str:
        return re.sub(r"^blk\.\d+\.", "", self.name)

    @property
    def layer(self) -> int | None:
        m = re.match(r"blk\.(\d+)\.", self.name)
        return int(m.group(1)) if m else None

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape))

    def predicted(self, qtype: str) -> float:
        return self.gain * self.error[qtype]


def padded(n: int) -> int:
    return n + (-n % ALIGN)


def tensor_bytes(shape: tuple[int, ...], qtype: str) -> int:
    from xvq.llamacpp.kernels import row_size
    rows = int(np.prod(shape[:-1]))
    return rows * row_size(qtype, shape[-1])


def candidate_types(name: str, shape: tuple[int, ...], src_type: str, has_imatrix: bool) -> list[str]:
    """The types llama.cpp can store this tensor in: whole blocks per row, an imatrix where ggml
    demands one, no more bits than the source has."""
    from xvq.llamacpp.kernels import requires_imatrix
    from xvq.llamacpp.quant_types import block_size
    src_bpw = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[src_type]]
    src_bits = src_bpw[1] * 8 / src_bpw[0]
    out = []
    extra = ROW32_CANDIDATES if shape[-1] % 256 else ()
    for t in CANDIDATES + extra:
        if shape[-1] % block_size(t):
            continue
        if requires_imatrix(t) and not has_imatrix:
            continue
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t]]
        if size * 8 / block > src_bits and t != src_type:
            continue
        out.append(t)
    return out


def model_tensors(src: Path, imatrix_names: set[str]) -> list[TensorChoice]:
    from xvq.llamacpp import read_header
    from xvq.llamacpp.quant_types import allows_quantization
    out = []
    for name, (ggml_shape, type_id) in read_header(src).tensors.items():
        shape = tuple(reversed(ggml_shape))
        src_type = gguf.GGMLQuantizationType(type_id).name
        q = allows_quantization(name, ggml_shape) and src_type in ("F32", "F16", "BF16")
        c = TensorChoice(name, shape, src_type, q)
        if q:
            for qt in candidate_types(name, shape, src_type, name in imatrix_names):
                c.options[qt] = tensor_bytes(shape, qt)
        else:
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(type_id)]
            c.options[src_type] = int(np.prod(shape)) // block * size
        out.append(c)
    return out


# ----------------------------------------------------------------------------------------------
# 1. Quantization error per candidate (ggml's kernels on a sample of rows)
# ----------------------------------------------------------------------------------------------

def sample_rows(n_rows: int, k: int | None = None) -> np.ndarray:
    k = k or SAMPLE_ROWS
    if n_rows <= k:
        return np.arange(n_rows)
    return np.unique(np.linspace(0, n_rows - 1, k).round().astype(np.int64))


def weighted_errors(weights: np.ndarray, types: list[str], imatrix: np.ndarray | None,
                    rows_per_matrix: int) -> dict[str, float]:
    """weights [rows, cols] (experts stacked); imatrix [n_mat * cols] or None -> per type
    sum_ij w_j (W - Q(W))^2 over all rows, estimated from a sample of rows."""
    from xvq.llamacpp.kernels import dequantize_rows, quantize_rows
    n_rows, k = weights.shape
    idx = sample_rows(n_rows)
    x = np.asarray(weights[idx], np.float32)
    scale = n_rows / len(idx)
    if imatrix is not None:
        im = np.asarray(imatrix, np.float32).reshape(-1, k)
        w_rows = im[idx // rows_per_matrix]                  # each row's own expert slice
    else:
        w_rows = np.ones_like(x)
    out = {}
    for t in types:
        if t in ("F32",):
            out[t] = 0.0
            continue
        groups = [idx // rows_per_matrix == e for e in np.unique(idx // rows_per_matrix)]
        y = np.empty_like(x)
        for g in groups:   # ggml takes one imatrix slice per call: one call per expert
            imx = None if imatrix is None else w_rows[g][0]
            y[g] = dequantize_rows(t, quantize_rows(t, x[g], imx), int(g.sum()), k)
        out[t] = float((w_rows * (x - y).astype(np.float64) ** 2).sum() * scale)
    return out


def measure_errors(src: Path, tensors: list[TensorChoice], imatrix_values: dict[str, np.ndarray],
                   progress: bool = True) -> None:
    r = gguf.GGUFReader(src)
    data = {t.name: t for t in r.tensors}
    todo = [c for c in tensors if c.quantizable]
    for c in tqdm(todo, desc="sensitivity: error per type", unit="tensor", disable=not progress, leave=False):
        raw = np.asarray(data[c.name].data)
        rows_per_matrix = c.shape[-2]
        w = raw.reshape(-1, c.shape[-1])
        c.error = weighted_errors(w, list(c.options), imatrix_values.get(c.name), rows_per_matrix)


# ----------------------------------------------------------------------------------------------
# 2. Calibration: single-tensor KLD ablations on the calibration text
# ----------------------------------------------------------------------------------------------

def log_softmax(logits: np.ndarray) -> np.ndarray:
    return logits.astype(np.float64) - log_sum_exp(logits)[:, None]


def kld(ref_logp: np.ndarray, logits: np.ndarray) -> float:
    """Mean KL(ref || q) over positions (full vocabulary), as xvq validate computes it."""
    return float(full_kld(ref_logp, logits).mean())


@dataclass
class Evaluator:
    """Logits of the second half of each calibration chunk (validate scores the second half of
    each window), the source's as reference."""
    chunks: list[np.ndarray]
    n_ctx: int
    n_threads: int | None
    ref_logp: np.ndarray | None = None

    def logits(self, path: Path) -> np.ndarray:
        scored = np.arange(self.n_ctx) >= self.n_ctx // 2
        with Gguf(path, gpu_layers=0) as m, m.context(self.n_ctx, n_ubatch=self.n_ctx, threads=self.n_threads) as ctx:
            return np.concatenate([ctx.decode(c, scored).copy() for c in self.chunks])

    def kld(self, path: Path) -> float:
        return kld(self.ref_logp, self.logits(path))


def make_evaluator(src: Path, text: str, n_ctx: int = 128, n_chunks: int | None = None,
                   n_threads: int | None = None) -> Evaluator:
    n_chunks = n_chunks or KLD_CHUNKS
    from xvq.quantize.imatrix import chunks_of
    with Gguf(src, vocab_only=True) as m:
        tokens = m.tokenize(text, add_special=True)
        bos = m.bos if m.add_bos else None
    chunks = chunks_of(tokens, n_ctx, bos)
    if not chunks:
        raise XvqError(f"calibration text gives {len(tokens)} tokens, less than one chunk of {n_ctx}; "
                       f"give more text with --calib-file")
    step = max(1, len(chunks) // n_chunks)   # spread over the sample (it is ordered by language)
    ev = Evaluator(chunks[::step][:n_chunks], n_ctx, n_threads)
    ev.ref_logp = log_softmax(ev.logits(src))
    return ev


def calibration_type(c: TensorChoice) -> str:
    """CALIBRATION_TYPE, or the candidate nearest to it in size."""
    if CALIBRATION_TYPE in c.options:
        return CALIBRATION_TYPE
    want = tensor_bytes(c.shape, CALIBRATION_TYPE) if c.shape[-1] % 256 == 0 else c.n_elements * 3.44 / 8
    return min(c.options, key=lambda t: abs(c.options[t] - want))


def ablation_plan(tensors: list[TensorChoice], max_layer_probes: int = MAX_LAYER_PROBES) -> list[TensorChoice]:
    """Every kind in a middle layer, the largest kind in up to `max_layer_probes` layers, and
    every tensor outside the blocks (embedding, output)."""
    q = [c for c in tensors if c.quantizable and c.options]
    layers = sorted({c.layer for c in q if c.layer is not None})
    plan = [c for c in q if c.layer is None]
    if layers:
        mid = layers[len(layers) // 2]
        plan += [c for c in q if c.layer == mid]
        probe_kind = max((c for c in q if c.layer == mid), key=lambda c: c.n_elements).kind
        probes = [layers[i] for i in sample_rows(len(layers), max_layer_probes)]
        plan += [c for c in q if c.kind == probe_kind and c.layer in probes and c.layer != mid]
    return plan


def fit_gains(tensors: list[TensorChoice], measured: dict[str, float]) -> None:
    """gain = measured KLD / error for the ablated tensors; the others get
    exp(kind term + layer term) from the ablated ones (layer terms interpolated between probes)."""
    by_name = {c.name: c for c in tensors}
    ratio = {}
    for name, k in measured.items():
        c = by_name[name]
        e = c.error[calibration_type(c)]
        ratio[name] = max(k, 1e-12) / max(e, 1e-30)
    q = [c for c in tensors if c.quantizable and c.options]
    layers = sorted({c.layer for c in q if c.layer is not None})
    if layers:
        mid = layers[len(layers) // 2]
        kind_term = {c.kind: math.log(ratio[c.name]) for c in q if c.layer == mid and c.name in ratio}
        probe_kind = next((c.kind for c in q if c.layer not in (None, mid) and c.name in ratio), None)
        probe = {mid: 0.0}
        if probe_kind is not None:
            for c in q:
                if c.kind == probe_kind and c.name in ratio and c.layer != mid:
                    probe[c.layer] = math.log(ratio[c.name]) - kind_term[probe_kind]
        xs = sorted(probe)
        layer_term = dict(zip(layers, np.interp(layers, xs, [probe[x] for x in xs])))
        mean_kind = float(np.mean(list(kind_term.values())))
    for c in q:
        if c.name in ratio:
            c.gain = ratio[c.name]
        elif c.layer is not None:
            c.gain = math.exp(kind_term.get(c.kind, mean_kind) + layer_term[c.layer])
        else:
            c.gain = float(np.median(list(ratio.values())))


def ablate(src: Path, tensors: list[TensorChoice], plan: list[TensorChoice], ev: Evaluator, imatrix,
           workdir: Path, extra_kv: list, progress: bool = True) -> tuple[dict[str, float], int]:
    """KLD of the source with one tensor quantized, for each tensor of the plan; also returns the
    header size llama.cpp writes with the mix's keys (the same for every type assignment)."""
    from xvq.quantize.gguf import quantize_with_types
    keep = {c.name: c.src_type for c in tensors if c.quantizable}
    out, header = {}, 0
    for c in tqdm(plan, desc="sensitivity: ablations", unit="tensor", disable=not progress, leave=False):
        path = workdir / "ablation.gguf"
        quantize_with_types(src, path, "Q8_0", keep | {c.name: calibration_type(c)}, imatrix=imatrix,
                            extra_kv=extra_kv, n_threads=ev.n_threads or 0)
        header = data_offset(path)
        out[c.name] = ev.kld(path)
        path.unlink()
    return out, header


def data_offset(path: Path) -> int:
    """Where tensor data starts in a GGUF: the header, kv and tensor infos, aligned."""
    from xvq.llamacpp import read_header
    return read_header(path).data_offset


# ----------------------------------------------------------------------------------------------
# 3. The knapsack
# ----------------------------------------------------------------------------------------------

def smallest(tensors: list[TensorChoice]) -> int:
    return sum(padded(min(c.options.values())) for c in tensors)


def solve(tensors: list[TensorChoice], budget: int, units: int = 20000) -> dict[str, str]:
    """Minimum predicted KLD with sum of padded tensor bytes <= budget (tensor data only): a
    dynamic programme over the budget in `units` steps, each tensor's sizes rounded up to whole
    steps (so every solution it finds fits), then filled with single upgrades in exact bytes."""
    choice = {c.name: min(c.options, key=c.options.get) for c in tensors}
    fixed = [c for c in tensors if not c.quantizable]
    q = [c for c in tensors if c.quantizable]
    left = budget - sum(padded(c.options[choice[c.name]]) for c in fixed)
    if not q or left < sum(padded(min(c.options.values())) for c in q):
        return choice
    step = max(1, -(-left // units))
    n = left // step
    inf = np.inf
    dp = np.zeros(n + 1)                       # best predicted KLD using at most b steps
    picks = []
    for c in q:
        opts = list(c.options)
        w = [-(-padded(c.options[t]) // step) for t in opts]
        v = [c.predicted(t) for t in opts]
        new = np.full(n + 1, inf)
        arg = np.zeros(n + 1, np.int8)
        for i, (wi, vi) in enumerate(zip(w, v)):
            if wi > n:
                continue
            cand = np.full(n + 1, inf)
            cand[wi:] = dp[:n + 1 - wi] + vi
            better = cand < new
            new[better], arg[better] = cand[better], i
        dp = new
        picks.append((c, opts, w, arg))
    if not np.isfinite(dp[n]):                # the rounding up left no room: the cheapest types
        return choice
    b = n
    for c, opts, w, arg in reversed(picks):   # walk back the choices
        i = int(arg[b])
        choice[c.name] = opts[i]
        b -= w[i]
    by_name = {c.name: c for c in tensors}
    used = sum(padded(by_name[nm].options[t]) for nm, t in choice.items())
    # fill what the rounding left with the single best upgrades
    while True:
        best = None
        for c in q:
            n, cur = c.name, choice[c.name]
            for t in c.options:
                db = padded(c.options[t]) - padded(c.options[cur])
                dk = c.predicted(cur) - c.predicted(t)
                if dk > 0 and db > 0 and used + db <= budget and (best is None or dk > best[0]):
                    best = (dk, n, t, db)
        if best is None:
            break
        _, n, t, db = best
        choice[n], used = t, used + db
    return choice


# ----------------------------------------------------------------------------------------------
# 4. The whole step
# ----------------------------------------------------------------------------------------------

@dataclass
class Mix:
    path: Path
    types: dict[str, str]
    size_bytes: int
    bpw: float
    kld_predicted: float
    kld_measured: float
    seconds_choosing: float
    seconds_writing: float
    tensors: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"path": str(self.path), "size_bytes": self.size_bytes, "bpw": self.bpw,
                "kld_predicted": self.kld_predicted, "kld_measured": self.kld_measured,
                "seconds_choosing": self.seconds_choosing, "seconds_writing": self.seconds_writing,
                "timings": self.timings, "tensors": self.tensors}


def summary(types: dict[str, str]) -> str:
    """'Q4_K:14 Q6_K:10 ...': how many tensors of each quantized type (kv strings hold 127 bytes)."""
    from collections import Counter
    counts = Counter(t for t in types.values() if t != "F32")
    return " ".join(f"{t}:{n}" for t, n in sorted(counts.items(), key=lambda kv: -kv[1]))[:127]


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


def estimated_header(src: Path, extra: int = 2048) -> int:
    """Before any file is written: the source's header plus room for the keys a quantizer adds."""
    return padded(data_offset(src) + extra)


def choose_and_write(src: Path, out: Path | None, target: Target, *, imatrix, calib_text: str, layout=None,
                     outdir: Path | None = None, n_ctx: int = 128, n_threads: int | None = None, progress: bool = True,
                     workdir: Path | None = None, log=print) -> Mix:
    """The mix for `target`, written to `out` (default: the layout's <name>-xvq-<bpw>bpw.gguf)."""
    import tempfile
    from xvq.quantize.gguf import quantize_with_types
    t0 = time.perf_counter()
    im_values = imatrix.values() if imatrix is not None else {}
    tensors = model_tensors(src, set(im_values))
    check_reachable(target, tensors, estimated_header(src), src)
    if not any(c.quantizable for c in tensors):
        raise XvqError(f"{src}: no tensor can be quantized (already quantized?); give the f16/f32 GGUF")
    timings = {}
    measure_errors(src, tensors, im_values, progress)
    timings["errors"] = time.perf_counter() - t0
    ev = make_evaluator(src, calib_text, n_ctx, n_threads=n_threads)
    timings["reference"] = time.perf_counter() - t0 - sum(timings.values())
    extra_kv = [(KEY_TARGET, target.describe()), (KEY_TYPES, TYPES_PLACEHOLDER),
                (KEY_PREDICTED, 0.0), (KEY_MEASURED, 0.0)]
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        measured, header = ablate(src, tensors, ablation_plan(tensors), ev, imatrix, Path(tmp), extra_kv, progress)
    timings["ablations"] = time.perf_counter() - t0 - sum(timings.values())
    fit_gains(tensors, measured)
    check_reachable(target, tensors, header, src)
    budget = tensor_budget(target, tensors, header, src)
    types = solve(tensors, budget)
    by_name = {c.name: c for c in tensors}
    data_bytes = sum(by_name[n].options[t] for n, t in types.items())
    n_el = sum(c.n_elements for c in tensors)
    bpw = 8 * data_bytes / n_el
    predicted = float(sum(by_name[n].predicted(t) for n, t in types.items() if by_name[n].quantizable))
    t_choose = time.perf_counter() - t0
    timings["solve"] = t_choose - sum(timings.values())
    if out is None:   # named by the mix, so known only now
        out = layout.gguf(f"xvq-{bpw:.2f}bpw")
        out = Path(outdir) / out.name if outdir is not None else out
    quant = {n: t for n, t in types.items() if by_name[n].quantizable}
    ftype = [name for name, b in FTYPE_BY_BPW if b <= bpw][-1]
    kv = [(KEY_TARGET, target.describe()), (KEY_TYPES, summary(types)), (KEY_PREDICTED, predicted),
          (KEY_MEASURED, 0.0)]
    t1 = time.perf_counter()
    with atomic_output(out) as tmp, tqdm(total=2, desc="mix: write, measure", disable=not progress,
                                         leave=False) as bar:
        quantize_with_types(src, tmp, ftype, quant, imatrix=imatrix, extra_kv=kv, n_threads=n_threads or 0)
        bar.update()
        measured_kld = ev.kld(tmp)
        patch_float(tmp, KEY_MEASURED, measured_kld)
        bar.update()
        size = tmp.stat().st_size
        if target.kind == "size" and size > target.value:
            raise XvqError(f"{out}: the mix came out at {size} bytes, over the target {int(target.value)}; "
                           f"report this (header estimate {header})")
    rows = [{"name": c.name, "type": types[c.name], "bytes": c.options[types[c.name]],
             "kld_predicted": c.predicted(types[c.name]) if c.quantizable else 0.0,
             "gain": c.gain, "ablation_kld": measured.get(c.name)} for c in tensors]
    return Mix(out, types, out.stat().st_size, bpw, predicted, measured_kld, t_choose,
               time.perf_counter() - t1, rows, timings)


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
                 n_threads: int = 0, progress: bool = True, log=print) -> Mix:
    """`xvq quantize gguf SOURCE --target-size|--target-bpw|--fit`: one mixed GGUF."""
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
    # the reachability check before any work: nothing is written when the target cannot be met
    has_im = str(imatrix).lower() != "none"
    names = {n for n in info.tensors if n.startswith("blk.")} if has_im else set()   # what an imatrix covers
    check_reachable(target, model_tensors(src, names), estimated_header(src), src)
    calib_tokens = calib_tokens or DEFAULT_CALIB_TOKENS
    calib = calibration(calib_file, budget_tokens=calib_tokens, tokenizer_dir=model_dir)
    im = resolve_imatrix(ImatrixSettings(spec=imatrix or "auto", calib_file=calib_file, calib_tokens=calib_tokens,
                                         n_threads=n_threads), src, layout, stamps, needed=True,
                         tokenizer_dir=model_dir, progress=progress, log=log)
    mix = choose_and_write(src, outfile, target, imatrix=im, calib_text=calib.text, layout=layout, outdir=outdir,
                           n_threads=n_threads or None, progress=progress, log=log)
    report = write_report(mix, layout.base / "mix" / (mix.path.stem + ".json"))
    log(f"wrote {mix.path} ({mix.size_bytes / 1e6:.1f} MB, {mix.bpw:.2f} bpw; {summary(mix.types)}); "
        f"KLD predicted {mix.kld_predicted:.5f}, measured {mix.kld_measured:.5f} on the calibration text; "
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
