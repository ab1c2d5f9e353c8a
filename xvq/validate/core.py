"""`validate()`: score every artifact against the reference, gate, write the report.

One tokenization (the reference's HF tokenizer) and one reference pass (cached) serve every
artifact; an artifact that cannot be scored gets a reason in the report, and the others go on.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from xvq.errors import XvqError
from xvq.validate import artifacts as arts
from xvq.validate import competence as comp_rule
from xvq.validate import gate
from xvq.llamacpp import default_threads
from xvq.validate.backends import GgufScorer, HfScorer, plan_reference
from xvq.validate.metrics import DEFAULT_TOP_K, artifact_rows, full_kld, in_row_blocks, perplexity
from xvq.validate.reference import Reference, reference_for
from xvq.validate.windows import Windows, load_tokenizer, make_windows

MIN_LANGUAGE_WINDOWS = 2        # fewer: that language's numbers are n/a
VOCAB_MISMATCH_LIMIT = 0.10     # more GGUF pieces than this differ from the HF vocab: another model
TOKENIZER_SAMPLES = 2000        # lines of the evaluation text checked for tokenizer parity


@dataclass
class Report:
    data: dict
    report_dir: Path

    @property
    def passed(self) -> bool:
        return bool(self.data["passed"])

    @property
    def artifacts(self) -> list[dict]:
        return self.data["artifacts"]

    def failures(self) -> list[tuple[str, list[str]]]:
        return [(a["path"], a["reasons"]) for a in self.artifacts if not a["passed"]]

    def entry(self, path: Path | str) -> dict:
        want = str(Path(path))
        return next(a for a in self.artifacts if a["path"] == want)


# ---------------------------------------------------------------- inputs

def evaluation_texts(text, heldout: bool) -> tuple[dict[str, str], str]:
    """(lang -> text, description). `text` may be a file path or a ready dict."""
    if isinstance(text, dict):
        return dict(text), "texts given by the caller"
    if text is not None:
        p = Path(text)
        try:
            return {p.stem: p.read_text(encoding="utf-8")}, str(p)
        except (OSError, UnicodeDecodeError) as e:
            raise XvqError(f"{p}: cannot read the evaluation text ({e}); give a UTF-8 text file") from e
    if not heldout:
        raise XvqError("no evaluation text: give --text FILE or --heldout")
    try:
        from xvq.calib_data import heldout_texts
    except ImportError as e:
        raise XvqError(f"--heldout needs xvq.calib_data, which is not available ({e}); "
                       f"give --text FILE instead") from e
    return dict(heldout_texts()), "xvq.calib_data held-out split"


def tokenizer_samples(texts: dict[str, str]) -> list[str]:
    """400-character chunks of every evaluation text, each starting on a non-space character
    (prompt-sized pieces, as issue 3 measures parity), plus the converter's hard strings."""
    from xvq.convert import parity_chunks as chunks
    from xvq.convert import parity_sample
    samples = [c for t in texts.values() if t.strip() for c in chunks(t, max(1, len(t) // 400))]
    step = max(1, len(samples) // TOKENIZER_SAMPLES)
    return samples[::step][:TOKENIZER_SAMPLES] + parity_sample()


# ---------------------------------------------------------------- tokenizer parity

def token_mismatch(info: arts.ArtifactInfo, reference_dir: Path, ref_tok,
                   samples: list[str]) -> tuple[float | None, dict]:
    """Share of tokens inside differing spans: the artifact's tokenizer (llama.cpp's for a GGUF,
    the folder's own for GPTQ/HF) against the reference's HF tokenizer on the same texts."""
    from xvq.convert import compare_tokenization, compare_tokenizers, hf_tokenizer
    try:
        if info.kind == "gguf":
            res, method = compare_tokenization(info.path, reference_dir, samples), "llama.cpp tokenizer vs HF"
        elif any((info.path / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
            (ref, ref_piece), (art, art_piece) = hf_tokenizer(reference_dir), hf_tokenizer(info.path)
            res, method = compare_tokenizers(ref, art, samples, ref_piece, art_piece), "HF tokenizer vs HF"
        else:
            return None, {"status": "not measured: the folder has no tokenizer files"}
    except Exception as e:   # parity is a measurement; its failure must not stop scoring
        return None, {"status": f"not measured: {type(e).__name__}: {e}"}
    return res.n_tokens_differing / max(1, res.n_tokens), {
        "status": "measured", "method": method, "n_texts": res.n_texts, "texts_differing": res.n_texts - res.n_equal,
        "n_tokens": res.n_tokens, "tokens_differing": res.n_tokens_differing, "first_diff": _jsonable(res.first_diff)}


def _jsonable(x):
    if x is None or isinstance(x, (str, int, float, bool)):
        return x
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "__dict__"):
        return _jsonable(vars(x))
    return str(x)


# ---------------------------------------------------------------- scoring

def make_scorer(info: arts.ArtifactInfo, ctx: int, n_threads: int | None, gpu_layers="auto"):
    if info.kind == "gguf":
        return GgufScorer(info.path, ctx, n_threads=n_threads, gpu_layers=gpu_layers)
    return HfScorer(info.path, ctx)


def score(scorer, windows: Windows, ref: Reference, label: str, progress: bool, workers: int | None = None) -> tuple:
    """Per-position nll/kld/top1 over every window, plus the full-vocabulary KLD on the sample.
    Each window's statistics run in row blocks on `workers` threads (numpy releases the GIL)."""
    S = windows.per_window
    targets = windows.targets()
    n = windows.n_windows * S
    nll, kld, top1 = np.empty(n), np.empty(n), np.empty(n, bool)
    n_full = ref.full_logp.shape[0]
    full = []
    workers = workers or default_threads()
    t0 = time.perf_counter()
    with tqdm(total=windows.n_windows, desc=f"score {label}", unit="win", disable=not progress, leave=False) as bar, \
            ThreadPoolExecutor(workers) as pool:
        for i, logits in enumerate(scorer.logits(windows.tokens)):
            a, b = i * S, (i + 1) * S
            ref_w, tg = ref.slice(a, b), targets[i]
            parts = in_row_blocks(lambda x, y: artifact_rows(logits[x:y], tg[x:y], ref_w.slice(x, y), ref.n_vocab),
                                  S, pool, workers, logits.shape[1])
            nll[a:b] = np.concatenate([p.nll for p in parts])
            kld[a:b] = np.concatenate([p.kld for p in parts])
            top1[a:b] = np.concatenate([p.top1 for p in parts])
            if a < n_full:
                m = min(b, n_full) - a
                full.append(full_kld(ref.full_logp[a:a + m], logits[:m]))
            bar.update()
    seconds = time.perf_counter() - t0
    kld_full = np.concatenate(full) if full else np.zeros(0)
    return nll, kld, top1, kld_full, seconds


def summarize(nll, kld, top1, ref_nll) -> dict:
    ppl, ref_ppl = perplexity(nll), perplexity(ref_nll)
    return {
        "perplexity": ppl,
        "reference_perplexity": ref_ppl,
        "ppl_ratio": ppl / ref_ppl if ppl and ref_ppl else None,
        "kld_mean": float(kld.mean()) if kld.size else None,
        "kld_p99": float(np.percentile(kld, 99)) if kld.size else None,
        "top1_agreement": float(top1.mean()) if top1.size else None,
        "n_tokens_scored": int(nll.size),
    }


def per_language(windows: Windows, ref: Reference, nll, kld, top1, t: gate.Thresholds,
                 competent: dict[str, bool] | None = None) -> dict:
    """Numbers per language; a language the reference is not competent on keeps its numbers
    and reasons but `passed` stays true (it is not gated)."""
    out = {}
    for lang, (wa, wb) in windows.spans.items():
        if wb - wa < MIN_LANGUAGE_WINDOWS:
            out[lang] = None          # n/a: fewer than two windows of text
            continue
        a, b = windows.position_span(lang)
        m = summarize(nll[a:b], kld[a:b], top1[a:b], ref.rows.nll[a:b])
        m["n_windows"] = wb - wa
        m["competent"] = (competent or {}).get(lang, True)
        m["reasons"] = gate.judge(m, t)
        m["passed"] = not m["reasons"] or not m["competent"]
        out[lang] = m
    return out


def language_competence(windows: Windows, ref: Reference) -> dict[str, dict | None]:
    """lang -> the competence rule's numbers for the reference (None: too few windows)."""
    out = {}
    targets = windows.targets()
    for lang, (wa, wb) in windows.spans.items():
        if wb - wa < MIN_LANGUAGE_WINDOWS:
            out[lang] = None
            continue
        a, b = windows.position_span(lang)
        out[lang] = comp_rule.measure(windows.tokens[wa:wb], targets[wa:wb], ref.rows.nll[a:b])
    return out


def headline_positions(windows: Windows, competent: dict[str, bool]) -> np.ndarray | None:
    """Scored positions of the languages the headline means cover: those the reference is
    competent on. None (all positions) for a single text, or when it is competent on none."""
    langs = [lang for lang, ok in competent.items() if ok]
    if len(windows.spans) <= 1 or not langs or len(langs) == len(windows.spans):
        return None
    return np.concatenate([np.arange(*windows.position_span(lang)) for lang in langs])


def blank_entry(info: arts.ArtifactInfo) -> dict:
    return {"path": str(info.path), "kind": info.kind, "quant_type": info.quant_type,
            "size_bytes": info.size_bytes, "bpw": info.bpw, "perplexity": None, "ppl_ratio": None,
            "kld_mean": None, "kld_p99": None, "top1_agreement": None, "per_language": {},
            "token_mismatch_rate": None, "tokenizer": None, "kld_check": None, "thresholds": None,
            "n_tokens_scored": 0, "seconds": None, "tokens_per_second": None, "passed": False, "reasons": []}


@dataclass
class Scoring:
    """What every artifact of one `validate` call is scored against, and how."""
    windows: Windows
    ref: Reference | None
    ref_tok: object
    reference_dir: Path
    samples: list[str]
    overrides: dict
    n_threads: int | None
    progress: bool
    input_problem: str | None
    competent: dict[str, bool]
    gpu_layers: str | int | None = "auto"
    ref_shape: arts.ModelShape | None = None


def evaluate_artifact(info: arts.ArtifactInfo, run: Scoring) -> dict:
    windows, ref, ref_tok, reference_dir = run.windows, run.ref, run.ref_tok, run.reference_dir
    samples, overrides, n_threads, progress = run.samples, run.overrides, run.n_threads, run.progress
    input_problem, competent, gpu_layers, ref_shape = run.input_problem, run.competent, run.gpu_layers, run.ref_shape
    e = blank_entry(info)
    t = gate.thresholds_for(info.quant_type, overrides)
    e["thresholds"] = t.as_dict()
    if info.error:
        e["reasons"] = [info.error]
        return e
    not_from_reference = info.shape.differences(ref_shape) if info.shape and ref_shape else []
    if not_from_reference:   # before scoring: a KLD against another model's logits means nothing
        e["reasons"] = [f"{info.path}: an artifact of another model, not made from {reference_dir.name} "
                        f"({'; '.join(not_from_reference)}); validate it against its own reference"]
        return e
    if info.n_vocab is not None and ref is not None and info.n_vocab != ref.n_vocab:
        e["reasons"] = [f"{info.path}: vocabulary of {info.n_vocab} entries, the reference has {ref.n_vocab}: "
                        f"an artifact of another model; validate it against its own reference"]
        return e
    if info.tokens is not None:
        diff = arts.vocab_difference(info.tokens, ref_tok)
        if diff > VOCAB_MISMATCH_LIMIT:
            e["reasons"] = [f"{info.path}: {diff:.0%} of its vocabulary differs from the reference tokenizer: "
                            f"an artifact of another model; validate it against its own reference"]
            return e
    e["token_mismatch_rate"], e["tokenizer"] = token_mismatch(info, reference_dir, ref_tok, samples)
    if input_problem:
        e["reasons"] = [input_problem]
        return e
    try:
        scorer = make_scorer(info, windows.ctx, n_threads, gpu_layers)
    except XvqError as err:
        e["reasons"] = [err.message]
        return e
    e["device"] = scorer.device
    try:
        if scorer.n_vocab != ref.n_vocab:
            e["reasons"] = [f"{info.path}: model outputs {scorer.n_vocab} logits, the reference {ref.n_vocab}: "
                            f"an artifact of another model"]
            return e
        nll, kld, top1, kld_full, seconds = score(scorer, windows, ref, info.path.name, progress, n_threads)
    finally:
        scorer.close()
    keep = headline_positions(windows, competent or {})
    e |= summarize(nll, kld, top1, ref.rows.nll) if keep is None else \
        summarize(nll[keep], kld[keep], top1[keep], ref.rows.nll[keep])
    e.pop("reference_perplexity")
    e["seconds"] = seconds
    e["tokens_per_second"] = windows.n_windows * windows.ctx / seconds if seconds else None
    e["kld_check"] = {"n_positions": int(kld_full.size), "top_k": ref.k,
                      "kld_topk": float(kld[:kld_full.size].mean()) if kld_full.size else None,
                      "kld_full": float(kld_full.mean()) if kld_full.size else None}
    e["per_language"] = per_language(windows, ref, nll, kld, top1, t, competent)
    reasons = gate.judge(e, t)
    if len(e["per_language"]) > 1:      # one text alone: its numbers are the overall ones
        for lang, m in e["per_language"].items():
            if m and not m["passed"]:   # only languages the reference is competent on fail
                reasons += [f"{lang}: {r}" for r in m["reasons"]]
    e["reasons"], e["passed"] = reasons, not reasons
    return e


# ---------------------------------------------------------------- the API

@dataclass(frozen=True)
class ValidateSettings:
    """What is measured and how (the options of `xvq validate`).

    text: a file path, or {lang: text}; default the held-out split of xvq.calib_data.
    thresholds: overrides {max_kld, max_ppl_ratio, max_token_mismatch} for every artifact.
    reference_gguf: a bf16/f32 GGUF of the reference, scored in llama.cpp instead of transformers.
    gpu_layers: llama.cpp offload (auto: every layer when the build has a GPU backend)."""
    text: object = None
    heldout: bool = True
    ctx: int = 512
    max_tokens: int | None = None
    thresholds: dict | None = None
    reference_gguf: Path | str | None = None
    top_k: int = DEFAULT_TOP_K
    n_threads: int | None = None
    gpu_layers: str | int | None = "auto"


def validate(reference_dir: Path | str, artifacts: list[Path | str], settings: ValidateSettings | None = None, *,
             report_dir: Path | str, progress: bool = True, write: bool = True, model_name: str | None = None,
             layout=None, **options) -> Report:
    """Score `artifacts` (GGUF files, GPTQ/HF folders) against the reference and gate them.
    `settings`, or its fields as keywords (`ctx=64, text=...`); model_name: what the report calls
    the model (default: the reference folder's name); layout: where the reference's f16 GGUF lives
    when the checkpoint does not fit in memory. Writes report.json, report.md and report.png into
    report_dir (when write) and returns the Report."""
    s = settings or ValidateSettings(**options)
    text, heldout, ctx, max_tokens, thresholds = s.text, s.heldout, s.ctx, s.max_tokens, s.thresholds
    reference_gguf, top_k, n_threads, gpu_layers = s.reference_gguf, s.top_k, s.n_threads, s.gpu_layers
    from xvq.validate.report import build_report, write_report
    reference_dir, report_dir = Path(reference_dir), Path(report_dir)
    if not (reference_dir / "config.json").is_file():
        raise XvqError(f"{reference_dir}: not a Hugging Face model folder (no config.json); "
                       f"--reference takes the bf16 checkpoint the artifacts were made from")
    texts, text_source = evaluation_texts(text, heldout)
    tok = load_tokenizer(reference_dir)
    windows = make_windows(tok, texts, ctx, max_tokens, reference_dir)
    problem = None
    if windows.n_windows == 0:
        n = max(windows.n_tokens.values(), default=0)
        problem = (f"{text_source}: text tokenizes to {n} tokens, shorter than one window of --ctx {ctx}; "
                   f"give a longer text or a smaller --ctx")
    ref, backend = None, None
    ref_params = arts.reference_params(reference_dir)
    if not problem:
        ref, backend = reference_pass(reference_dir, reference_gguf, windows, top_k, report_dir / "cache",
                                      n_threads, ref_params, progress, gpu_layers, layout)
    samples = tokenizer_samples(texts)
    competence = language_competence(windows, ref) if ref is not None else {}
    competent = {lang: bool(c and c["competent"]) for lang, c in competence.items()}
    if len(windows.spans) <= 1 or not any(competent.values()):
        competent = {}   # one text (the user chose it), or a reference competent on none: gate all
    run = Scoring(windows, ref, tok, reference_dir, samples, thresholds or {}, n_threads, progress, problem, competent,
                  gpu_layers, arts.reference_shape(reference_dir))
    entries = [evaluate_artifact(arts.inspect(Path(p), ref_params), run) for p in artifacts]
    data = build_report(reference_dir=reference_dir, reference_gguf=reference_gguf, ref=ref, windows=windows,
                        text_source=text_source, entries=entries, overrides=thresholds or {}, top_k=top_k,
                        max_tokens=max_tokens, input_problem=problem, model_name=model_name,
                        competence=competence, backend=backend)
    report = Report(data, report_dir)
    if write:
        write_report(report)
    return report


def reference_pass(reference_dir: Path, reference_gguf, windows: Windows, top_k: int, cache_dir: Path,
                   n_threads: int | None, ref_params: int | None, progress: bool, gpu_layers="auto",
                   layout=None) -> tuple[Reference, dict]:
    """The reference's statistics, from the backend the memory at hand allows (plan_reference);
    returns them with what computed them and why, for the report."""
    plan = plan_reference(ref_params or 0, Path(reference_gguf) if reference_gguf else None)
    if plan.backend == "transformers":
        ref = reference_for(lambda: HfScorer(reference_dir, windows.ctx, dtype=plan.dtype, device=plan.device),
                            reference_dir, windows, top_k, cache_dir, progress)
        return ref, {"backend": plan.backend, "reason": plan.reason, "device": plan.device, "gguf": None}
    src = Path(reference_gguf) if reference_gguf else reference_gguf_of(reference_dir, layout, cache_dir, progress)
    device = {}

    def scorer():
        s = GgufScorer(src, windows.ctx, n_threads=n_threads, gpu_layers=gpu_layers)
        device["name"] = s.device
        return s
    ref = reference_for(scorer, src, windows, top_k, cache_dir, progress)
    return ref, {"backend": plan.backend, "reason": plan.reason, "device": device.get("name", "cached"),
                 "gguf": src.name}


def reference_gguf_of(reference_dir: Path, layout, cache_dir: Path, progress: bool) -> Path:
    """The layout's f16 GGUF of the reference (what the quantized files were made from), made
    now if the layout holds none from this checkpoint's content."""
    from xvq.layout import Layout
    from xvq.convert import source_gguf
    layout = layout or Layout("reference", cache_dir)
    return source_gguf(reference_dir, layout, progress=progress)