"""xvq's GGUF quantization against llama.cpp's own tools, same model, same text, one run each:

    imatrix:  xvq (llama.cpp eval + cb_eval tap, from Python)  vs  llama-imatrix
    quantize: xvq (llama_model_quantize from Python)            vs  llama-quantize --imatrix
    quality:  KL divergence to the f32 model per type, without / with xvq's imatrix

    python bench/quantize.py [--model DIR] [--text FILE] [--types Q4_K_M,Q2_K,...] [--threads N]

Default model: the demo model (xvq/demo/model), else ../shared/assets/stories260K-hf; default text:
xvq's calibration sample (imatrix) and its held-out split (KLD).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from xvq import anchors  # noqa: E402
from xvq.quantize.gguf import quantize_file  # noqa: E402
from xvq.llamacpp import Gguf  # noqa: E402
from xvq.quantize.imatrix import Imatrix, chunks_of, compute_imatrix  # noqa: E402


def default_model() -> Path:
    demo = ROOT / "xvq" / "demo" / "model"
    if (demo / "config.json").is_file():
        return demo
    return ROOT.parent / "shared" / "assets" / "stories260K-hf"


def timed(fn, *a, **kw):
    t = time.perf_counter()
    out = fn(*a, **kw)
    return out, time.perf_counter() - t


def run_tool(name: str, *args, cwd=None) -> float:
    t = time.perf_counter()
    subprocess.run([str(anchors.tool(name)), *map(str, args)], check=True, capture_output=True, cwd=cwd)
    return time.perf_counter() - t


def log_softmax(x):
    x = x.astype(np.float64) - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def logits(path, chunks, n_ctx, threads):
    with Gguf(path, gpu_layers=0) as m, m.context(n_ctx, n_ubatch=n_ctx, threads=threads) as ctx:
        return np.concatenate([ctx.decode(c).copy() for c in chunks])


def kld(ref, path, chunks, n_ctx, threads) -> float:
    p, q = log_softmax(ref), log_softmax(logits(path, chunks, n_ctx, threads))
    return float((np.exp(p) * (p - q)).sum(-1).mean())


@click.command()
@click.option("--model", type=click.Path(path_type=Path), default=None)
@click.option("--text", type=click.Path(path_type=Path), default=None, help="Calibration text (default: xvq's).")
@click.option("--types", default="Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q3_K_M,Q2_K,IQ4_XS,IQ2_M")
@click.option("--ctx", "n_ctx", default=512, show_default=True)
@click.option("--threads", default=os.cpu_count() or 1, show_default=True)
@click.option("--eval-chunks", default=16, show_default=True)
def main(model, text, types, n_ctx, threads, eval_chunks):
    from xvq.convert import convert
    model = model or default_model()
    types = [t.strip() for t in types.split(",") if t.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        f32 = tmp / "model-f32.gguf"
        convert(model, f32, "f32", progress=False)
        if text is None:
            from xvq.calib_data import heldout_texts, sample
            calib = sample(tokenizer_dir=model).text
            held = "\n\n".join(heldout_texts().values())
            text = tmp / "calib.txt"
            text.write_text(calib)
        else:   # first half calibrates, second half evaluates
            full = Path(text).read_text()
            calib, held = full[:len(full) // 2], full[len(full) // 2:]
            text = tmp / "calib.txt"
            text.write_text(calib)
        print(f"model {model}  ctx {n_ctx}  threads {threads}  calibration {len(calib)} chars\n")

        # --- imatrix ---
        ours, t_ours = timed(compute_imatrix, f32, calib, dataset=str(text), n_ctx=n_ctx, n_threads=threads,
                             progress=False)
        ours_file = ours.save(tmp / "xvq.imatrix.gguf")
        ref_file = tmp / "llama.imatrix.gguf"
        t_ref = run_tool("llama-imatrix", "-m", f32, "-f", text, "-o", ref_file, "-c", n_ctx, "-b", n_ctx,
                         "--no-ppl", "-t", threads)
        ref = Imatrix.load(ref_file)
        cos = ours.cosine(ref)
        counts_equal = all(np.array_equal(ours.counts[k], ref.counts[k]) for k in ref.counts)
        rows = [("imatrix", f"{ours.chunk_count} chunks", t_ours, t_ref,
                 f"cos min {min(cos.values()):.6f}, {len(cos)}/{len(ref)} tensors, counts equal: {counts_equal}")]

        # --- quantize, same imatrix file for both ---
        for t in types:
            im = Imatrix.load(ours_file)
            out_ours, out_ref = tmp / f"xvq-{t}.gguf", tmp / f"llama-{t}.gguf"
            _, tq = timed(quantize_file, f32, out_ours, t, imatrix=im, n_threads=threads, progress=False)
            # beside the imatrix so llama-quantize records its name, as xvq does (no local paths)
            tr = run_tool("llama-quantize", "--imatrix", Path(ours_file).name, Path(f32).resolve(),
                          Path(out_ref).resolve(), t, threads, cwd=Path(ours_file).parent)
            same = out_ours.read_bytes() == out_ref.read_bytes()
            rows.append((f"quantize {t}", f"{out_ours.stat().st_size / 1e6:.2f} MB", tq, tr,
                         f"byte-identical: {same}"))

        print(f"{'step':18s} {'size':>14s} {'xvq s':>8s} {'llama.cpp s':>12s} {'ratio':>7s}  check")
        for name, size, a, b, note in rows:
            print(f"{name:18s} {size:>14s} {a:8.2f} {b:12.2f} {a / b:7.2f}  {note}")

        # --- quality ---
        with Gguf(f32, vocab_only=True) as m:
            chunks = chunks_of(m.tokenize(held), n_ctx, m.bos if m.add_bos else None, eval_chunks)
        ref_logits = logits(f32, chunks, n_ctx, threads)
        print(f"\nKL divergence to f32 on {len(chunks)} held-out chunks of {n_ctx} "
              f"({'token_embd as the type decides'})")
        print(f"{'type':10s} {'no imatrix':>12s} {'xvq imatrix':>12s} {'ratio':>7s}")
        for t in types:
            plain = quantize_file(f32, tmp / f"plain-{t}.gguf", t, n_threads=threads, progress=False) \
                if t not in ("IQ2_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M", "IQ3_XXS", "Q2_K_S") else None
            k_plain = kld(ref_logits, plain, chunks, n_ctx, threads) if plain else float("nan")
            k_im = kld(ref_logits, tmp / f"xvq-{t}.gguf", chunks, n_ctx, threads)
            print(f"{t:10s} {k_plain:12.6f} {k_im:12.6f} {k_im / k_plain:7.3f}")


if __name__ == "__main__":
    main()
