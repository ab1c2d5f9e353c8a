"""xvq's sensitivity-chosen mixes against llama.cpp's fixed recipes, at the same file sizes:

    for each model: f16 GGUF -> xvq imatrix (timed) -> stock Q4_K_M, Q2_K (+ --frontier types), each
    quantized by llama.cpp with that imatrix (timed) -> one mix per stock file, --target-size = its
    size (timed, bytes this process wrote counted by the kernel) -> mean KLD of every file by
    `xvq validate` (held-out split, ctx 512) and by `llama-perplexity --kl-divergence` on held-out
    English -> ratios, and the mix's predicted against measured KLD.

    python bench/mix.py [--models demo,model2,stories260K,bytelevel] [--frontier Q3_K_M,Q5_K_M] [--threads 1] [--out DIR]

Models: demo = xvq/demo/model; model2 = a second small trained model (bench/mix_model.py trains it
into DIR/mix-model2 when missing); stories260K = ../shared/assets/stories260K-hf, a genuinely
trained LLaMA (Karpathy's llama2.c, float32 training, not re-quantized: a real weight distribution),
calibrated on the first two thirds of the TinyStories excerpt and judged on the last third (its own
language; the multilingual held-out split is mostly bytes to its 512-token vocabulary); bytelevel = a
trained byte-level BPE LLaMA with tied embeddings and llama3 RoPE (bench/bytelevel_model.py, trained
into DIR/bytelevel-model when missing). Writes
DIR/results.json and DIR/frontier.png (default .cache/bench-mix).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("XVQ_SHARED", ROOT.parent / "shared")) / "assets"
MODELS = {"demo": ROOT / "xvq" / "demo" / "model", "stories260K": SHARED / "stories260K-hf"}   # model2: under --out
STORIES_TEXT = SHARED / "corpus" / "tinystories_sample" / "TinyStories-valid-excerpt.txt"
PPL_CTX = 128     # llama-perplexity's window on the held-out English (the stories excerpt is short)


def model_dir(key: str, root: Path) -> Path:
    d = root / {"model2": "mix-model2", "bytelevel": "bytelevel-model"}[key] if key in ("model2", "bytelevel") \
        else MODELS.get(key, Path(key))
    if key == "model2" and not (d / "config.json").is_file():
        from bench.mix_model import train
        train(d)
    if key == "bytelevel" and not (d / "config.json").is_file():   # byte-level BPE, tied, llama3 RoPE
        from bench.bytelevel_model import train as train_bytelevel
        train_bytelevel(d)
    if not (d / "config.json").is_file():
        sys.exit(f"{d}: model not found (stories260K needs ../shared/assets)")
    return d


def texts(key: str, work: Path) -> tuple[Path | None, str]:
    """(calibration file or None for xvq's calibration set, held-out English text)."""
    if key == "stories260K":
        text = STORIES_TEXT.read_text(encoding="utf-8")
        cut = text.rfind("\n", 0, 2 * len(text) // 3)
        (work / "calib.txt").write_text(text[:cut], encoding="utf-8")
        return work / "calib.txt", text[cut:]
    from xvq.calib_data import heldout_texts
    return None, heldout_texts()["en"]


def llama_kld(files: list[Path], base: Path, text: str, work: Path, threads: int) -> dict[str, float]:
    """Mean KLD of each file against `base` by llama.cpp's own llama-perplexity --kl-divergence."""
    from xvq import anchors
    exe = anchors.tool("llama-perplexity")
    if exe is None:
        return {}
    (work / "heldout-en.txt").write_text(text, encoding="utf-8")
    common = ["-c", str(PPL_CTX), "-b", str(PPL_CTX), "-t", str(threads)]
    subprocess.run([str(exe), "-m", str(base), "-f", str(work / "heldout-en.txt"), *common,
                    "--kl-divergence-base", str(work / "base.kld")], check=True, capture_output=True)
    out = {}
    for f in files:
        r = subprocess.run([str(exe), "-m", str(f), *common, "--kl-divergence-base", str(work / "base.kld"),
                            "--kl-divergence"], check=True, capture_output=True, text=True)
        m = re.search(r"Mean\s+KLD:\s+([-\d.e+]+)", r.stdout + r.stderr)
        out[str(f)] = float(m.group(1)) if m else float("nan")
    return out


def run_model(key: str, stock_types: list[str], threads: int, root: Path) -> dict:
    from xvq.calib_data import calibration
    from xvq.layout import Layout
    from xvq.quantize.gguf import quantize_file, source_gguf
    from xvq.quantize.imatrix import compute_imatrix
    from xvq.quantize.mix import Target, choose_and_write, write_report
    from xvq.validate import validate
    d = model_dir(key, root)
    lay = Layout(key, root)
    lay.base.mkdir(parents=True, exist_ok=True)
    src = source_gguf(d, lay, progress=False)
    calib_file, heldout_en = texts(key, lay.base)
    calib = calibration(calib_file, tokenizer_dir=d)
    t = time.perf_counter()
    im = compute_imatrix(src, calib.text, dataset=calib.dataset, n_ctx=512 if calib_file is None else 128,
                         n_threads=threads, progress=False)
    t_imatrix = time.perf_counter() - t
    im.save(lay.imatrix())
    rows = []
    for qt in stock_types:
        t = time.perf_counter()
        f = quantize_file(src, lay.gguf(qt), qt, imatrix=im, n_threads=threads, progress=False)
        t_quant = time.perf_counter() - t
        mix = choose_and_write(src, None, Target("size", f.stat().st_size), imatrix=im, calib_text=calib.text,
                               layout=lay, n_threads=threads, progress=False)
        write_report(mix, lay.mix_dir / (mix.path.stem + ".json"))
        rows.append({"stock": qt, "stock_file": str(f), "stock_bytes": f.stat().st_size, "mix_file": str(mix.path),
                     "mix_bytes": mix.size_bytes, "mix_bpw": mix.bpw, "kld_predicted": mix.kld_predicted,
                     "kld_additive": mix.kld_additive, "kld_measured_calib": mix.kld_measured,
                     "bytes_written": mix.bytes_written, "sensitivity": mix.sensitivity, "timings": mix.timings,
                     "seconds_mix": mix.seconds_choosing + mix.seconds_writing, "seconds_quantize_stock": t_quant})
    files = [r["stock_file"] for r in rows] + [r["mix_file"] for r in rows]
    # stories260K is judged on its own language (the multilingual split is mostly bytes to it)
    own = {"text": {"en": heldout_en}} if key == "stories260K" else {}
    rep = validate(d, files, report_dir=lay.validate_dir, n_threads=threads, progress=False, write=False, **own)
    kld = {e["path"]: e["kld_mean"] for e in rep.artifacts}
    bpw = {e["path"]: e["bpw"] for e in rep.artifacts}
    lkld = llama_kld([Path(f) for f in files], src, heldout_en, lay.base, threads)
    for r in rows:
        r["stock_kld"], r["mix_kld"] = kld[r["stock_file"]], kld[r["mix_file"]]
        r["stock_bpw"] = bpw[r["stock_file"]]
        r["kld_ratio"] = r["mix_kld"] / r["stock_kld"]
        r["stock_kld_llama"], r["mix_kld_llama"] = lkld.get(r["stock_file"]), lkld.get(r["mix_file"])
        r["kld_ratio_llama"] = (r["mix_kld_llama"] / r["stock_kld_llama"]) if lkld else None
    return {"model": key, "seconds_imatrix": t_imatrix, "imatrix_tokens": im.chunk_count * im.chunk_size, "rows": rows}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for ax, res in zip(axes[0], results):
        rows = sorted(res["rows"], key=lambda r: r["stock_bytes"])
        ax.plot([r["stock_bytes"] / 1e6 for r in rows], [r["stock_kld"] for r in rows], "o-", label="llama.cpp recipes")
        for r in rows:
            ax.annotate(r["stock"], (r["stock_bytes"] / 1e6, r["stock_kld"]), fontsize=8)
        ax.plot([r["mix_bytes"] / 1e6 for r in rows], [r["mix_kld"] for r in rows], "s-", label="xvq mixes")
        ax.set_yscale("log")
        ax.set_xlabel("file size (MB)")
        ax.set_ylabel("mean KLD (xvq validate, held-out)")
        ax.set_title(res["model"])
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(res: dict) -> str:
    lines = [f"\n{res['model']}: imatrix {res['seconds_imatrix']:.1f} s on {res['imatrix_tokens']} tokens",
             f"{'stock':7s} {'bytes':>9s} {'KLD val':>8s} {'KLD ppl':>8s} | {'mix bytes':>9s} {'bpw':>5s} "
             f"{'KLD val':>8s} {'KLD ppl':>8s} {'ratio':>6s} {'r ppl':>6s} | {'pred':>8s} {'additive':>8s} "
             f"{'meas':>8s} | {'written':>7s} {'ablated':>7s} | {'mix s':>6s} {'imat+q s':>8s} {'ratio':>5s}"]
    for r in res["rows"]:
        s = r["sensitivity"]
        iq = res["seconds_imatrix"] + r["seconds_quantize_stock"]
        f = lambda v: f"{v:8.5f}" if v is not None else f"{'-':>8s}"  # noqa: E731
        rp = f"{r['kld_ratio_llama']:6.3f}" if r["kld_ratio_llama"] is not None else f"{'-':>6s}"
        lines.append(f"{r['stock']:7s} {r['stock_bytes']:9d} {r['stock_kld']:8.5f} {f(r['stock_kld_llama'])} | "
                     f"{r['mix_bytes']:9d} {r['mix_bpw']:5.2f} {r['mix_kld']:8.5f} {f(r['mix_kld_llama'])} "
                     f"{r['kld_ratio']:6.3f} {rp} | {r['kld_predicted']:8.5f} {r['kld_additive']:8.5f} "
                     f"{r['kld_measured_calib']:8.5f} | {r['bytes_written'] / r['mix_bytes']:6.3f}x "
                     f"{s['measured']:3d}/{s['of']:<3d} | {r['seconds_mix']:6.1f} {iq:8.1f} {r['seconds_mix'] / iq:5.2f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="demo,model2,stories260K")
    ap.add_argument("--frontier", default="", help="more stock types to match, e.g. Q3_K_M,Q5_K_M")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / ".cache" / "bench-mix")
    a = ap.parse_args()
    types = ["Q4_K_M", "Q2_K"] + [t for t in a.frontier.split(",") if t]
    saved = a.out / "results.json"
    results = json.loads(saved.read_text()) if saved.is_file() else []   # other models' earlier runs stay
    for key in a.models.split(","):
        res = run_model(key, types, a.threads, a.out)
        results = [r for r in results if r["model"] != key] + [res]
        print(table(res), flush=True)
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "results.json").write_text(json.dumps(results, indent=1))
        plot(results, a.out / "frontier.png")
    print(f"\nKLD val: xvq validate (held-out split, ctx 512; stories260K: its held-out English); KLD ppl: llama-perplexity --kl-divergence on held-out "
          f"English (ctx {PPL_CTX}); pred: the chosen mix inside the loaded source before writing; additive: sum of "
          f"gain x error; meas: the written file, calibration chunks; written: bytes this process wrote / mix size; "
          f"ratio (last): mix time / (imatrix + stock quantize)")
    print(f"results: {a.out / 'results.json'}, plot: {a.out / 'frontier.png'}")


if __name__ == "__main__":
    main()
