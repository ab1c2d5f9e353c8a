"""GPTQ benchmark: xvq's GPTQ (xvq.quantize.gptq) against plain GPTQModel on the same LLaMA
checkpoint (an XVERSE model is handed to plain GPTQModel as a LLaMA view of the same weights,
since GPTQModel's own XVERSE definition needs transformers <= 4.38) and against hand-written
round-to-nearest, in the same run.

    .venv/bin/python bench/gptq.py                          # structured LLaMA + XVERSE, hidden 256, CPU
    .venv/bin/python bench/gptq.py --model xvq/demo/model --eval-seqs 40 --calib-tokens 32768
    .venv/bin/python bench/gptq.py --model xvq/demo/model --bits 8
    .venv/bin/python bench/gptq.py --hidden 2048 --layers 8 --calib-tokens 65536 --max-seq-len 2048 --device cuda

Prints, per model: KL divergence to the source model on held-out text (mean per token; the
calibration set's held-out split), perplexity ratio, top-1 agreement, for RTN, xvq and plain
GPTQModel, each both dequantized by hand in fp32 (the quantization alone) and loaded through
transformers + GPTQModel's kernel; then time and peak memory per decoder layer (RSS on CPU,
the CUDA allocator's peak on GPU) for xvq and plain GPTQModel, each run in its own process.

The measurement helpers (structured synthetic checkpoints, RTN reference, GPTQ v1 dequantizer,
KL/perplexity) are also used by tests/test_gptq.py.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Calibration and held-out text when ../shared/assets/corpus is absent: disjoint paragraphs.
CALIB_TEXT = [
    "Once upon a time, there was a little girl named Lily. She liked to play in the park with her dog Max.",
    "西游记是中国古典四大名著之一，讲述了唐僧师徒四人西天取经的故事。孙悟空神通广大，七十二变。",
    "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。何でも薄暗いじめじめした所で泣いていた。",
    "The committee reviewed 42 proposals in 2023; three were funded (a, b, c) and the rest deferred.",
    "def area(r):\n    return 3.14159 * r * r\n\nfor i in range(10):\n    print(i, area(i))",
    "Москва — столица России. Der schnelle braune Fuchs springt. El zorro marrón rápido salta.",
]
HELDOUT_TEXT = [
    "Tom had a red ball. He threw it high into the sky and his sister laughed when it landed in the pond.",
    "三国演义描写了从东汉末年到西晋初年之间近百年的历史风云，诸葛亮足智多谋，关羽义薄云天。",
    "国境の長いトンネルを抜けると雪国であった。夜の底が白くなった。信号所に汽車が止まった。",
    "Rainfall in the region averaged 812 mm per year between 1990 and 2010, with peaks in July.",
    "int main(void) {\n    int total = 0;\n    for (int i = 0; i < 8; i++) total += i;\n    return total;\n}",
    "Le renard brun rapide saute par-dessus le chien paresseux. Il pleut beaucoup à Paris en novembre.",
]


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------

def structured_checkpoint(folder: Path, family: str, tokenizer_dir: Path, *, seed: int = 0, fmt: str = "safetensors",
                          dtype: str = "bfloat16", **config) -> Path:
    """A random checkpoint whose activations look like a trained LLM's to GPTQ: correlated
    (low-rank embeddings) and anisotropic (log-normal per-channel scales in embeddings and
    RMSNorm weights, i.e. outlier channels). With isotropic random activations GPTQ would
    degenerate to round-to-nearest and prove nothing."""
    import shutil

    import torch

    from xvq.synth import make_checkpoint, save_pickle_shards, tiny_config
    folder.mkdir(parents=True, exist_ok=True)
    for f in tokenizer_dir.iterdir():
        if f.is_file():
            shutil.copy(f, folder / f.name)
    n_tok = tokenizer_entries(folder)
    spm = not (folder / "tokenizer.json").exists()
    extra = ({"bos_token_id": 1, "eos_token_id": 2} if spm else {"bos_token_id": 2, "eos_token_id": 3}) \
        if family == "llama" else {}
    cfg = tiny_config(family, vocab_size=n_tok + (37 if family == "xverse" else 0), intermediate_size=768,
                      **extra) | config
    model = make_checkpoint(folder, cfg, seed=seed, dtype="float32", fmt=fmt)
    g = torch.Generator().manual_seed(seed + 1)
    hidden = cfg["hidden_size"]
    rank = max(8, hidden // 8)
    with torch.no_grad():
        emb = torch.randn(cfg["vocab_size"], rank, generator=g) @ torch.randn(rank, hidden, generator=g) / math.sqrt(rank)
        emb += 0.3 * torch.randn(cfg["vocab_size"], hidden, generator=g)
        model.model.embed_tokens.weight.copy_(emb * torch.exp(torch.randn(hidden, generator=g)) * 0.02)
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.copy_(torch.exp(0.8 * torch.randn(hidden, generator=g)))
    model = model.to(getattr(torch, dtype))
    for f in list(folder.glob("*.safetensors")) + list(folder.glob("*.bin")) + list(folder.glob("*.index.json")):
        f.unlink()
    if fmt == "safetensors":
        model.save_pretrained(folder)
    else:
        save_pickle_shards(model.state_dict(), folder, n_shards=2)
    (folder / "config.json").write_text(json.dumps(cfg | {"torch_dtype": dtype}, indent=2))
    return folder


def tokenizer_entries(folder: Path) -> int:
    if (folder / "tokenizer.json").exists():
        return len(json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"])
    import sentencepiece as spm
    return spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")).get_piece_size()


def tokenizer_for_bench(folder: Path) -> Path:
    from xvq.synth import save_xverse_tokenizer, xverse_style_tokenizer
    if not (folder / "tokenizer.json").exists():
        save_xverse_tokenizer(xverse_style_tokenizer((CALIB_TEXT + HELDOUT_TEXT) * 20, 1200), folder)
    return folder


def corpus_texts(heldout: bool) -> list[str]:
    """Calibration (heldout=False) or held-out text, never overlapping: xvq's calibration set's
    train / held-out splits (paragraphs in a fixed shuffled order, so every window mixes
    languages); without it, the halves of ../shared/assets/corpus; else the literal paragraphs."""
    import random
    try:
        from xvq.calib_data import records
        # the hand-written paragraphs: short, so every window mixes languages (the shipped real
        # text comes in 1,500-character records of one language each)
        texts = [r["text"] for r in records("heldout" if heldout else "train") if r.get("source") == "hand-written"]
        random.Random(0).shuffle(texts)
        if texts:
            return texts
    except ImportError:
        pass
    corpus = Path(os.environ.get("XVQ_SHARED", ROOT.parent / "shared")) / "assets" / "corpus"
    files = sorted(corpus.glob("*/*.txt")) if corpus.is_dir() else []
    if not files:
        return HELDOUT_TEXT if heldout else CALIB_TEXT
    out = []
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")[:400_000]
        half = text[len(text) // 2:] if heldout else text[:len(text) // 2]
        paras = [p.strip()[:4000] for p in half.split("\n\n") if len(p.strip()) > 200]
        out += paras[:40]
    return out


# ----------------------------------------------------------------------------------------------
# References: round-to-nearest on GPTQ's own grid, and a GPTQ v1 dequantizer
# ----------------------------------------------------------------------------------------------

def rtn_dequant(w, bits: int, group_size: int, sym: bool = True):
    """Per-group round-to-nearest on the grid GPTQ uses (symmetric: zero at 2^(b-1), scale
    2*max|w|/(2^b-1)); returns the dequantized float32 weight. Written from the GPTQ paper's
    quantizer, independent of GPTQModel."""
    import torch
    out_f, in_f = w.shape
    g = in_f if group_size == -1 else group_size
    W = w.float().reshape(out_f, in_f // g, g)
    maxq = 2 ** bits - 1
    xmin = W.amin(-1, keepdim=True).clamp(max=0)
    xmax = W.amax(-1, keepdim=True).clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    scale = (xmax - xmin) / maxq
    scale[scale == 0] = 1.0
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-xmin / scale)
    q = torch.clamp(torch.round(W / scale) + zero, 0, maxq)
    return (scale * (q - zero)).reshape(out_f, in_f)


def unpack_rows(packed, bits: int, n: int, dim: int):
    """GPTQ packs 32/bits values per int32 along `dim`, lowest bits first."""
    import torch
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int32) * bits
    p = packed.to(torch.int32)
    if dim == 0:
        vals = (p.unsqueeze(1) >> shifts.view(1, per, 1)) & (2 ** bits - 1)
        return vals.reshape(-1, p.shape[1])[:n]
    vals = (p.unsqueeze(2) >> shifts.view(1, 1, per)) & (2 ** bits - 1)
    return vals.reshape(p.shape[0], -1)[:, :n]


def gptq_v1_dequant(tensors: dict, prefix: str, bits: int):
    """W[o, i] = scales[g_idx[i], o] * (q[i, o] - (qzeros[g_idx[i], o] + 1)): the GPTQ v1 layout
    (zero points stored minus one), read straight from the safetensors."""
    qweight, qzeros = tensors[prefix + ".qweight"], tensors[prefix + ".qzeros"]
    scales, g_idx = tensors[prefix + ".scales"].float(), tensors[prefix + ".g_idx"].long()
    in_f, out_f = qweight.shape[0] * 32 // bits, qweight.shape[1]
    q = unpack_rows(qweight, bits, in_f, 0).float()
    zeros = unpack_rows(qzeros, bits, out_f, 1).float() + 1
    return (scales[g_idx] * (q - zeros[g_idx])).T.contiguous()


def load_safetensors_folder(folder: Path) -> dict:
    from safetensors.torch import load_file
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out |= load_file(str(f))
    return out


def quantized_linear_names(model) -> list[str]:
    """Decoder-layer linears GPTQ quantizes (lm_head and embeddings stay in float)."""
    import torch
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]


EVAL_DEVICE = "cpu"   # bench --device cuda evaluates on the GPU too


def source_model(model_dir: Path):
    import torch

    import xvq  # noqa: F401
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(EVAL_DEVICE).eval()


def rtn_model(model_dir: Path, bits: int, group_size: int):
    import torch
    model = source_model(model_dir)
    with torch.no_grad():
        for name in quantized_linear_names(model):
            lin = model.get_submodule(name)
            lin.weight.copy_(rtn_dequant(lin.weight, bits, group_size))
    return model


def dequantized_gptq_model(model_dir: Path, gptq_dir: Path, bits: int):
    """The source model with every quantized linear replaced by its GPTQ dequantization, in fp32:
    the quantization error alone, without fp16 kernel arithmetic."""
    import torch
    model = source_model(model_dir)
    tensors = load_safetensors_folder(gptq_dir)
    with torch.no_grad():
        for name in quantized_linear_names(model):
            model.get_submodule(name).weight.copy_(gptq_v1_dequant(tensors, name, bits))
    return model


def loaded_gptq_model(gptq_dir: Path):
    """The folder as users load it: transformers + GPTQModel's kernels (torch kernel on CPU)."""
    import xvq  # noqa: F401
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(gptq_dir, device_map=EVAL_DEVICE).eval()


# ----------------------------------------------------------------------------------------------
# Quality
# ----------------------------------------------------------------------------------------------

def eval_batches(tokenizer_dir: Path, texts: list[str], seq_len: int = 128, n_seqs: int = 16):
    import torch
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids: list[int] = []
    for t in texts:
        ids += tok(t, add_special_tokens=False)["input_ids"]
        if len(ids) >= seq_len * n_seqs:
            break
    n = min(n_seqs, len(ids) // seq_len)
    if n == 0:
        raise ValueError("not enough held-out text")
    return torch.tensor(ids[:n * seq_len]).view(n, seq_len)


def log_probs(model, batches):
    import torch
    with torch.no_grad():
        return torch.cat([torch.log_softmax(model(b[None].to(model.device)).logits.float().cpu(), -1)
                          for b in batches])


def kl_and_ppl(ref_lp, q_lp, batches) -> dict:
    """Mean per-token KL(ref || q) and perplexities on the next-token targets."""
    import torch
    kl = (ref_lp.exp() * (ref_lp - q_lp)).sum(-1).mean().item()
    targets = batches[:, 1:].reshape(-1)

    def ppl(lp):
        return math.exp(-lp[:, :-1].reshape(-1, lp.shape[-1]).gather(1, targets[:, None]).mean().item())
    ref_ppl, q_ppl = ppl(ref_lp), ppl(q_lp)
    top1 = (ref_lp.argmax(-1) == q_lp.argmax(-1)).float().mean().item()
    return {"kl": kl, "ppl": q_ppl, "ref_ppl": ref_ppl, "ppl_ratio": q_ppl / ref_ppl, "top1": top1,
            "max_abs_logprob": float(torch.max(torch.abs(ref_lp - q_lp)))}


# ----------------------------------------------------------------------------------------------
# Timing and memory per decoder layer
# ----------------------------------------------------------------------------------------------

class LayerMeter:
    """Marks which decoder layer GPTQ is working on (forward pre-hooks) and samples memory in a
    thread: per layer, the seconds from its first forward to the next layer's, and the peak."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.current = "load"
        self.start = {"load": time.perf_counter()}
        self.peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _memory(self) -> int:
        if self.cuda:
            import torch
            return torch.cuda.memory_allocated()
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self):
        while not self._stop.is_set():
            m = self._memory()
            self.peak[self.current] = max(self.peak.get(self.current, 0), m)
            time.sleep(0.005)

    def enter(self, phase: str):
        if phase not in self.start:
            self._close_cuda_phase()
            self.start[phase] = time.perf_counter()
            self.current = phase

    def _close_cuda_phase(self):
        """On CUDA the allocator's own peak counter is exact (sampling misses short spikes)."""
        if self.cuda:
            import torch
            self.peak[self.current] = max(self.peak.get(self.current, 0), torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()

    def attach(self, qmodel):
        import torch
        for name, mod in qmodel.model.named_modules():
            if isinstance(mod, torch.nn.ModuleList) and name.endswith("layers"):
                for i, layer in enumerate(mod):
                    layer.register_forward_pre_hook(lambda m, a, i=i: self.enter(f"layer {i}"))
                return

    def finish(self) -> list[dict]:
        """Phases: load (model shell, calibration capture), then one per layer; the last layer's
        time includes packing and saving."""
        end = time.perf_counter()
        self._close_cuda_phase()
        self._stop.set()
        self._thread.join()
        phases = list(self.start)
        rows = []
        for k, p in enumerate(phases):
            stop = self.start[phases[k + 1]] if k + 1 < len(phases) else end
            rows.append({"phase": p, "seconds": stop - self.start[p], "peak_mb": self.peak.get(p, 0) / 2**20})
        return rows


def worker(args) -> None:
    """One quantization in this process: `xvq` (xvq.quantize.gptq) or `plain` GPTQModel."""
    import torch
    from xvq.quantize.gptq import GptqSettings, calibration_sequences, quantize_gptq
    cuda = args.device == "cuda"
    settings = GptqSettings(bits=args.bits, group_size=args.group_size, calib_tokens=args.calib_tokens,
                            max_seq_len=args.max_seq_len, device=args.device)
    texts = corpus_texts(heldout=False)
    meter = LayerMeter(cuda)
    t0 = time.perf_counter()
    if args.worker == "xvq":
        result = quantize_gptq(args.model, args.out, settings, texts=texts, on_model=meter.attach)
        n_tokens = result.n_tokens
    else:
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(os.cpu_count() or 1))
        from gptqmodel import GPTQModel, QuantizeConfig
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(args.model)
        seqs = calibration_sequences(tok, texts, settings.calib_tokens, settings.max_seq_len, settings.seed)
        n_tokens = sum(len(s["input_ids"]) for s in seqs)
        qc = QuantizeConfig(bits=args.bits, group_size=args.group_size, desc_act=True, static_groups=True, sym=True,
                            true_sequential=True, damp_percent=0.01,
                            device=None if args.device == "auto" else args.device)
        model = GPTQModel.load(str(args.model), qc)
        meter.attach(model)
        model.quantize(seqs, batch_size=1, tokenizer=tok)
        model.save(str(args.out))
    rows = meter.finish()
    peak_cuda = max(r["peak_mb"] for r in rows) if cuda else None
    Path(args.json).write_text(json.dumps({"seconds": time.perf_counter() - t0, "tokens": n_tokens,
                                           "phases": rows, "peak_cuda_mb": peak_cuda}))


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------

def run_worker(which: str, model: Path, out: Path, args) -> dict:
    js = out.with_suffix(".json")
    cmd = [sys.executable, __file__, "--worker", which, "--model", str(model), "--out", str(out), "--json", str(js),
           "--bits", str(args.bits), "--group-size", str(args.group_size), "--calib-tokens", str(args.calib_tokens),
           "--max-seq-len", str(args.max_seq_len), "--device", args.device]
    log = out.with_suffix(".log")
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"{which} quantization failed (rc {rc}):\n{tail}")
    return json.loads(js.read_text())


def print_phases(label: str, run: dict) -> None:
    print(f"\n{label}: {run['seconds']:.1f} s total, {run['tokens']} calibration tokens"
          + (f", peak CUDA {run['peak_cuda_mb']:.0f} MiB" if run.get("peak_cuda_mb") else ""))
    print(f"  {'phase':<12} {'seconds':>8} {'peak MiB':>9}")
    for r in run["phases"]:
        print(f"  {r['phase']:<12} {r['seconds']:8.2f} {r['peak_mb']:9.0f}")


def llama_view(model_dir: Path, dest: Path) -> Path:
    """The same weights declared as LLaMA (what plain GPTQModel can quantize: its own XVERSE
    definition needs transformers <= 4.38)."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        if f.name != "config.json" and not (dest / f.name).exists():
            (dest / f.name).symlink_to(f.resolve())
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg = {k: v for k, v in cfg.items() if k != "auto_map"} | {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    (dest / "config.json").write_text(json.dumps(cfg, indent=2))
    return dest


def bench_model(model_dir: Path, work: Path, args) -> None:
    arch = json.loads((model_dir / "config.json").read_text()).get("architectures")
    print(f"\n=== {model_dir} ({arch}) {args.bits}-bit g{args.group_size}, device {args.device} ===")
    runs = {"xvq": run_worker("xvq", model_dir, work / f"{model_dir.name}-xvq", args)}
    plain_src = model_dir if arch == ["LlamaForCausalLM"] else llama_view(model_dir, work / f"{model_dir.name}-as-llama")
    runs["plain GPTQModel"] = run_worker("plain", plain_src, work / f"{model_dir.name}-plain", args)
    batches = eval_batches(model_dir, corpus_texts(heldout=True), args.eval_seq_len, args.eval_seqs)
    ref = log_probs(source_model(model_dir), batches)
    rows = {"RTN (reference)": kl_and_ppl(ref, log_probs(rtn_model(model_dir, args.bits, args.group_size), batches), batches)}
    for label, suffix in (("xvq GPTQ", "xvq"), ("plain GPTQModel", "plain")):
        out = work / f"{model_dir.name}-{suffix}"
        if out.is_dir():
            rows[label] = kl_and_ppl(ref, log_probs(dequantized_gptq_model(model_dir, out, args.bits), batches), batches)
            rows[label + " (kernel)"] = kl_and_ppl(ref, log_probs(loaded_gptq_model(out), batches), batches)
    rtn_kl = rows["RTN (reference)"]["kl"]
    print(f"\nheld-out: {batches.numel()} tokens; source ppl {next(iter(rows.values()))['ref_ppl']:.3f}")
    print(f"  {'model':<26} {'KL':>10} {'KL/RTN':>7} {'ppl ratio':>9} {'top-1':>6}")
    for label, r in rows.items():
        print(f"  {label:<26} {r['kl']:10.6f} {r['kl'] / rtn_kl:7.3f} {r['ppl_ratio']:9.4f} {r['top1']:6.3f}")
    for label, run in runs.items():
        print_phases(label, run)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, action="append", help="model folder(s); default: structured tiny LLaMA + XVERSE")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=256, help="synthetic models' hidden size")
    ap.add_argument("--layers", type=int, default=4, help="synthetic models' decoder layers")
    ap.add_argument("--eval-seqs", type=int, default=16)
    ap.add_argument("--eval-seq-len", type=int, default=256)
    ap.add_argument("--keep", type=Path, default=None, help="keep outputs here instead of a temporary folder")
    ap.add_argument("--worker", choices=("xvq", "plain"), help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.model = args.model[0]
        return worker(args)
    global EVAL_DEVICE
    EVAL_DEVICE = "cuda" if args.device == "cuda" else "cpu"
    with tempfile.TemporaryDirectory(prefix="xvq-bench-gptq-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        models = args.model
        if not models:
            tok = tokenizer_for_bench(work / "tokenizer")
            size = dict(hidden_size=args.hidden, intermediate_size=3 * args.hidden, num_hidden_layers=args.layers,
                        num_attention_heads=max(4, args.hidden // 64))
            models = [structured_checkpoint(work / "llama-structured", "llama", tok,
                                            num_key_value_heads=max(2, args.hidden // 128), **size),
                      structured_checkpoint(work / "xverse-structured", "xverse", tok, fmt="bin", **size)]
        for m in models:
            bench_model(m, work, args)


if __name__ == "__main__":
    main()
