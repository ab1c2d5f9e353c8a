"""How much KL divergence a unit of each tensor's error causes (its gain), measured by
single-tensor ablations inside one loaded copy of the source: the model is loaded once and each
ablation adds that tensor's quantization error to its op's output in llama.cpp's eval callback
(xvq.llamacpp.ablation), so it costs one forward pass over the chunks and writes nothing.

Which tensors are measured follows a token budget (the imatrix's, so the measurement takes about
as long as the imatrix did): every tensor when each can get at least MIN_TOKENS; above that size
every kind in as many evenly spread layers as the budget pays for, plus the tensors outside the
blocks, and the rest are fitted as log gain = kind term + layer term. The fit is checked against
measured tensors it did not see (leave one probed layer out)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from tqdm import tqdm

from xvq.errors import XvqError
from xvq.llamacpp import Gguf
from xvq.logits import full_kld, log_sum_exp
from xvq.quantize.mix.candidates import TensorChoice, quantize_dequantize, sample_rows, tensor_bytes

CALIBRATION_TYPE = "Q3_K"      # ablations quantize one tensor to this (or its nearest candidate)
MIN_TOKENS = 1024              # tokens an ablation is scored on, at least (8 chunks of 128)
MAX_TOKENS = 2048              # and at most: on the demo 4096 chose the same mixes as 1024
KLD_CHUNKS = 8                 # calibration chunks for the measured KLD of a written file
BATCH_SEQS = 8                 # chunks decoded together (one graph of 8 x 128 tokens)
KLD_ROWS = 64                  # positions scored at a time (XVERSE's vocabulary: 50 MB of float64 each)
MIN_PROBED_LAYERS = 3          # a layer term needs layers on both sides of the one left out


def kld(ref_logp: np.ndarray, logits: np.ndarray) -> float:
    """Mean KL(ref || q) over positions (full vocabulary), as xvq validate computes it."""
    return float(full_kld(ref_logp, logits).mean())


class Evaluator:
    """The source loaded once with an ablation tap; logits of the second half of each chunk
    (validate scores the second half of each window), the unablated source's as reference.
    `kld_with(name, delta)` is one ablation; `kld(path)` scores another file on the same chunks."""

    def __init__(self, src: Path, chunks: list[np.ndarray], n_ctx: int, n_threads: int | None,
                 gpu_layers: str | int | None = "auto"):
        from xvq.llamacpp.ablation import AblationTap
        self.src, self.chunks, self.n_ctx, self.n_threads = src, chunks, n_ctx, n_threads
        self.gpu_layers = gpu_layers
        self.tap = AblationTap()
        # chunks decode BATCH_SEQS at a time in one graph: fewer callbacks, and a whole mix's
        # deltas (made when their op is reached) are made once per batch
        self.n_seq = min(len(chunks), BATCH_SEQS)
        self._model = Gguf(src, gpu_layers=gpu_layers)
        self._ctx = self._context(self._model, self.tap)
        # the reference as float32 logits and float64 log-sum-exp per batch (not a float64
        # log-probability matrix: 1,024 positions of XVERSE's 100,534-row vocabulary would be 0.8 GB)
        self._ref = [(x, log_sum_exp(x)) for x in self._batches(self._ctx)]

    def _context(self, model: Gguf, tap=None):
        return model.context(self.n_ctx, n_seq=self.n_seq, n_ubatch=self.n_ctx * self.n_seq, threads=self.n_threads,
                             tap=tap)

    def _batches(self, ctx):
        """Logits of the scored positions, one batch of n_seq chunks at a time."""
        k, scored = self.n_seq, self._scored()
        for i in range(0, len(self.chunks), k):
            yield ctx.decode(np.stack(self.chunks[i:i + k]), scored).copy()

    def _kld_of(self, ctx) -> float:
        """Mean KL(source || this computation) over every scored position, batch by batch."""
        total, n = 0.0, 0
        for (ref, lse), x in zip(self._ref, self._batches(ctx)):
            for a in range(0, len(x), KLD_ROWS):   # float64 temporaries of KLD_ROWS rows, not of the batch
                b = a + KLD_ROWS
                total += float(full_kld(ref[a:b].astype(np.float64) - lse[a:b, None], x[a:b]).sum())
            n += len(x)
        return total / n

    @property
    def tokens(self) -> int:
        return len(self.chunks) * self.n_ctx

    def _scored(self) -> np.ndarray:
        return np.arange(self.n_ctx) >= self.n_ctx // 2

    def kld_with(self, name: str, delta: np.ndarray) -> float:
        self.tap.set(name, delta)
        try:
            k = self._kld_of(self._ctx)
        finally:
            self.tap.clear()
        if self.tap.hits == 0:
            raise XvqError(f"{self.src}: tensor {name} is used by no matrix product or lookup the graph computes; "
                           f"report this (the ablation could not measure it)")
        return k

    def kld_with_all(self, deltas: dict) -> float:
        """Every tensor of `deltas` perturbed at once (a mix before it is written); a delta may be
        a function that makes it when its op is reached (xvq.llamacpp.ablation)."""
        self.tap.clear()
        for n, d in deltas.items():
            self.tap.add(n, d)
        try:
            return self._kld_of(self._ctx)
        finally:
            self.tap.clear()

    def kld(self, path: Path) -> float:
        with Gguf(path, gpu_layers=self.gpu_layers) as m, self._context(m) as ctx:
            return self._kld_of(ctx)

    def release_source(self) -> None:
        """Free the loaded source and its context (their compute buffers), keeping the reference:
        before llama.cpp's quantizer writes the file, so the two never hold memory together."""
        self._ctx.close()
        self._model.close()

    def close(self) -> None:
        self.release_source()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def calibration_chunks(src: Path, text: str, n_ctx: int, n_chunks: int) -> list[np.ndarray]:
    """n_chunks windows spread over the text (the calibration sample is ordered by language)."""
    from xvq.quantize.imatrix import chunks_of
    with Gguf(src, vocab_only=True) as m:
        tokens = m.tokenize(text, add_special=True)
        bos = m.bos if m.add_bos else None
    chunks = chunks_of(tokens, n_ctx, bos)
    if not chunks:
        raise XvqError(f"calibration text gives {len(tokens)} tokens, less than one chunk of {n_ctx}; "
                       f"give more text with --calib-file")
    step = max(1, len(chunks) // n_chunks)
    return chunks[::step][:n_chunks]


def make_evaluator(src: Path, text: str, n_ctx: int = 128, n_chunks: int | None = None,
                   n_threads: int | None = None, gpu_layers: str | int | None = "auto") -> Evaluator:
    return Evaluator(src, calibration_chunks(src, text, n_ctx, n_chunks or KLD_CHUNKS), n_ctx, n_threads, gpu_layers)


# ----------------------------------------------------------------------------------------------
# What to measure
# ----------------------------------------------------------------------------------------------

def calibration_type(c: TensorChoice) -> str:
    """CALIBRATION_TYPE, or the candidate nearest to it in size."""
    if CALIBRATION_TYPE in c.options:
        return CALIBRATION_TYPE
    want = tensor_bytes(c.shape, CALIBRATION_TYPE) if c.shape[-1] % 256 == 0 else c.n_elements * 3.44 / 8
    return min(c.options, key=lambda t: abs(c.options[t] - want))


@dataclass
class Plan:
    """The ablations to run and the tokens each is scored on."""
    tensors: list[TensorChoice]
    tokens_each: int
    of: int                           # quantizable tensors in the model

    @property
    def complete(self) -> bool:
        return len(self.tensors) == self.of


def ablation_plan(tensors: list[TensorChoice], budget_tokens: int, n_ctx: int = 128,
                  max_tokens: int = MAX_TOKENS) -> Plan:
    """Every quantizable tensor when the budget gives each at least MIN_TOKENS (up to
    max_tokens each); else the tensors outside the blocks and every kind in evenly spread layers,
    as many as the budget pays for at MIN_TOKENS (at least MIN_PROBED_LAYERS)."""
    q = [c for c in tensors if c.quantizable and len(c.options) > 1]   # one candidate: nothing to choose
    whole = lambda n: max(n_ctx, n // n_ctx * n_ctx)  # noqa: E731
    each = budget_tokens // max(1, len(q))
    if each >= MIN_TOKENS:
        return Plan(q, whole(min(each, max_tokens)), len(q))
    outside = [c for c in q if c.layer is None]
    layers = sorted({c.layer for c in q if c.layer is not None})
    kinds = len({c.kind for c in q if c.layer is not None})
    n_probe = max(MIN_PROBED_LAYERS, (budget_tokens // MIN_TOKENS - len(outside)) // max(1, kinds))
    probes = {layers[i] for i in sample_rows(len(layers), min(n_probe, len(layers)))}
    return Plan(outside + [c for c in q if c.layer in probes], whole(MIN_TOKENS), len(q))


# ----------------------------------------------------------------------------------------------
# Measuring and fitting
# ----------------------------------------------------------------------------------------------

DELTA_BLOCK_ROWS = 1024        # rows quantized at a time: the delta is the one tensor-sized buffer


def quantization_delta(w: np.ndarray, c: TensorChoice, qtype: str, imatrix: np.ndarray | None) -> np.ndarray:
    """Q(W) - W in the tensor's own shape, float32: one tensor's worth of memory, filled a block
    of rows at a time (blocks never straddle two experts, whose imatrix slices differ)."""
    w = np.asarray(w).reshape(-1, c.shape[-1])
    per_matrix = c.shape[-2]
    d = np.empty(w.shape, np.float32)
    a = 0
    while a < w.shape[0]:
        b = min(a + DELTA_BLOCK_ROWS, (a // per_matrix + 1) * per_matrix, w.shape[0])
        rows = np.asarray(w[a:b], np.float32)
        d[a:b] = quantize_dequantize(qtype, rows, imatrix, np.arange(a, b) // per_matrix)
        d[a:b] -= rows
        a = b
    return d.reshape(c.shape)


def ablate(src: Path, plan: Plan | list[TensorChoice], ev: Evaluator, imatrix_values: dict[str, np.ndarray],
           progress: bool = True) -> dict[str, float]:
    """KLD of the source with one tensor at its calibration type, for each tensor of the plan,
    all inside `ev`'s one loaded model."""
    todo = plan.tensors if isinstance(plan, Plan) else plan
    data = {t.name: t for t in gguf.GGUFReader(src).tensors}
    out = {}
    for c in tqdm(todo, desc="sensitivity: ablations", unit="tensor", disable=not progress, leave=False):
        delta = quantization_delta(np.asarray(data[c.name].data), c, calibration_type(c), imatrix_values.get(c.name))
        out[c.name] = ev.kld_with(c.name, delta)
        del delta
    return out


def kld_of_mix(src: Path, types: dict[str, str], tensors: list[TensorChoice], ev: Evaluator,
               imatrix_values: dict[str, np.ndarray]) -> float:
    """KLD of the source with every tensor at its chosen type, all at once inside `ev`'s model: a
    prediction of the written file's KLD that assumes nothing about how errors add (the additive
    sum of single ablations, the knapsack's objective, was 2x low on the demo before the second
    pass at the chosen types). Each tensor's delta is made when its op is reached."""
    data = {t.name: t for t in gguf.GGUFReader(src).tensors}
    by_name = {c.name: c for c in tensors}

    def maker(name: str, qtype: str):
        c = by_name[name]
        return lambda: quantization_delta(np.asarray(data[name].data), c, qtype, imatrix_values.get(name))
    return ev.kld_with_all({n: maker(n, t) for n, t in types.items()
                            if by_name[n].quantizable and t != by_name[n].src_type})


def ablate_at_chosen(src: Path, plan: Plan, types: dict[str, str], ev: Evaluator,
                     imatrix_values: dict[str, np.ndarray], progress: bool = True) -> dict[str, float]:
    """The second pass: each measured tensor ablated again at the type the first choice gave it
    (where that is not its calibration type or the source's), so its gain is known at two types
    and TensorChoice.predicted interpolates between them. The gain per unit of error is not one
    number across types: on the demo model the first choice's KLD was 2x its additive prediction,
    after this pass the re-solved mix's was within 3% of it (docs/mix.md)."""
    data = {t.name: t for t in gguf.GGUFReader(src).tensors}
    todo = [c for c in plan.tensors if types[c.name] not in c.gain_at and types[c.name] != c.src_type]
    out = {}
    for c in tqdm(todo, desc="sensitivity: at the chosen types", unit="tensor", disable=not progress, leave=False):
        t = types[c.name]
        k = ev.kld_with(c.name, quantization_delta(np.asarray(data[c.name].data), c, t, imatrix_values.get(c.name)))
        c.gain_at[t] = max(k, 1e-12) / max(c.error[t], 1e-30)
        out[c.name] = k
    return out


def _ratios(tensors: list[TensorChoice], measured: dict[str, float]) -> dict[str, float]:
    by_name = {c.name: c for c in tensors}
    return {n: max(k, 1e-12) / max(by_name[n].error[calibration_type(by_name[n])], 1e-30) for n, k in measured.items()}


def _layer_model(q: list[TensorChoice], log_ratio: dict[str, float]):
    """log gain = kind term + layer term, fitted on the measured block tensors (alternating
    means, a few rounds); layer terms interpolated between measured layers."""
    seen = [c for c in q if c.layer is not None and c.name in log_ratio]
    kinds = sorted({c.kind for c in seen})
    layers = sorted({c.layer for c in seen})
    kind_t, layer_t = dict.fromkeys(kinds, 0.0), dict.fromkeys(layers, 0.0)
    for _ in range(10):
        for k in kinds:
            kind_t[k] = float(np.mean([log_ratio[c.name] - layer_t[c.layer] for c in seen if c.kind == k]))
        for L in layers:
            layer_t[L] = float(np.mean([log_ratio[c.name] - kind_t[c.kind] for c in seen if c.layer == L]))
    mean_kind = float(np.mean(list(kind_t.values()))) if kinds else 0.0

    def predict(c: TensorChoice) -> float:
        lt = float(np.interp(c.layer, layers, [layer_t[L] for L in layers])) if layers else 0.0
        return kind_t.get(c.kind, mean_kind) + lt
    return predict


def fit_gains(tensors: list[TensorChoice], measured: dict[str, float]) -> dict:
    """gain = measured KLD / error for the ablated tensors; the others from the kind + layer fit.
    Returns the fit's check: for each measured layer left out in turn, the measured gains of its
    tensors against the fit of the other layers (the factor of the median |log| miss)."""
    ratio = _ratios(tensors, measured)
    logr = {n: math.log(r) for n, r in ratio.items()}
    q = [c for c in tensors if c.quantizable and c.options]
    predict = _layer_model(q, logr)
    choosable = sum(1 for c in q if len(c.options) > 1)
    outside = [r for n, r in ratio.items() if next(c for c in q if c.name == n).layer is None]
    for c in q:
        if c.name in ratio:
            c.gain = ratio[c.name]
            c.gain_at = {calibration_type(c): c.gain}
        elif c.layer is not None:
            c.gain = math.exp(predict(c))
        else:
            c.gain = float(np.median(outside or list(ratio.values())))
    return {"measured": len(measured), "of": choosable, **fit_check(q, logr)}


def fit_check(q: list[TensorChoice], logr: dict[str, float]) -> dict:
    """Leave one measured layer out, fit the rest, predict it: how far the fit misses tensors it
    did not see (only meaningful with >= MIN_PROBED_LAYERS measured layers)."""
    layers = sorted({c.layer for c in q if c.layer is not None and c.name in logr})
    if len(layers) < MIN_PROBED_LAYERS:
        return {}
    misses = []
    for L in layers[1:-1]:      # inner layers: the fit interpolates them, as it does unmeasured ones
        predict = _layer_model(q, {n: v for n, v in logr.items() if not n.startswith(f"blk.{L}.")})
        misses += [abs(predict(c) - logr[c.name]) for c in q if c.layer == L and c.name in logr]
    if not misses:
        return {}
    return {"fit_check_factor_median": float(math.exp(np.median(misses))),
            "fit_check_factor_p90": float(math.exp(np.quantile(misses, 0.9))), "fit_check_tensors": len(misses)}
