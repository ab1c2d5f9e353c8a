"""xvq's sensitivity-chosen mixes against llama.cpp's fixed recipes, at the same file sizes:

    for each model: f16 GGUF -> xvq imatrix (timed) -> stock Q2_K, Q4_K_M (+ --frontier types), each
    quantized by llama.cpp with that imatrix (timed) -> one mix per stock file, --target-size = its
    size (time to choose) -> `xvq validate` on all (held-out split, ctx 512) -> mean KLD, ratios.

    python bench/mix.py [--models demo,model2] [--frontier Q3_K_M,Q5_K_M] [--threads 1]

Models: demo = xvq/demo/model; model2 = a second small trained model (bench/mix_model.py trains it
into .cache/mix-model2 when missing); bytelevel = a trained byte-level BPE LLaMA with tied embeddings
and llama3 RoPE (bench/bytelevel_model.py, .cache/bytelevel-model). Writes
.cache/bench-mix/results.json and frontier.png (XVQ_BENCH_CACHE=DIR for another folder than .cache).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CACHE = Path(os.environ.get("XVQ_BENCH_CACHE", ROOT / ".cache"))
OUT = CACHE / "bench-mix"
MODELS = {"demo": ROOT / "xvq" / "demo" / "model", "model2": CACHE / "mix-model2", "bytelevel": CACHE / "bytelevel-model"}


def model_dir(key: str) -> Path:
    d = MODELS.get(key, Path(key))
    if key == "model2" and not (d / "config.json").is_file():
        from bench.mix_model import train
        train(d)
    if key == "bytelevel" and not (d / "config.json").is_file():
        from bench.bytelevel_model import train as train_bytelevel
        train_bytelevel(d)
    return d


def run_model(key: str, stock_types: list[str], threads: int) -> dict:
    from xvq.layout import Layout
    from xvq.calib_data import calibration
    from xvq.convert import source_gguf
    from xvq.quantize.gguf import quantize_file
    from xvq.quantize.imatrix import compute_imatrix
    from xvq.quantize.mix import Target, choose_and_write, write_report
    from xvq.validate import validate
    d = model_dir(key)
    lay = Layout(key, OUT)
    src = source_gguf(d, lay, progress=False)
    calib = calibration(None, tokenizer_dir=d)
    t = time.perf_counter()
    im = compute_imatrix(src, calib.text, dataset=calib.dataset, n_threads=threads, progress=False)
    t_imatrix = time.perf_counter() - t
    im.save(lay.imatrix())
    rows, t_quant = [], {}
    for qt in stock_types:
        t = time.perf_counter()
        f = quantize_file(src, lay.gguf(qt), qt, imatrix=im, n_threads=threads, progress=False)
        t_quant[qt] = time.perf_counter() - t
        mix = choose_and_write(src, None, Target("size", f.stat().st_size), imatrix=im, calib_text=calib.text,
                               layout=lay, n_threads=threads, progress=False)
        write_report(mix, lay.base / "mix" / (mix.path.stem + ".json"))
        rows.append({"stock": qt, "stock_file": str(f), "stock_bytes": f.stat().st_size, "mix_file": str(mix.path),
                     "mix_bytes": mix.size_bytes, "mix_bpw": mix.bpw, "kld_predicted": mix.kld_predicted,
                     "kld_measured_calib": mix.kld_measured, "seconds_choosing": mix.seconds_choosing,
                     "seconds_quantize_stock": t_quant[qt]})
    files = [r["stock_file"] for r in rows] + [r["mix_file"] for r in rows]
    rep = validate(d, files, report_dir=lay.validate_dir, n_threads=threads, progress=False)
    kld = {e["path"]: e["kld_mean"] for e in rep.artifacts}
    bpw = {e["path"]: e["bpw"] for e in rep.artifacts}
    for r in rows:
        r["stock_kld"], r["mix_kld"] = kld[r["stock_file"]], kld[r["mix_file"]]
        r["stock_bpw"] = bpw[r["stock_file"]]
        r["kld_ratio"] = r["mix_kld"] / r["stock_kld"]
    return {"model": key, "seconds_imatrix": t_imatrix, "rows": rows}


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
        ax.set_ylabel("mean KLD (held-out, ctx 512)")
        ax.set_title(res["model"])
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="demo,model2")
    ap.add_argument("--frontier", default="", help="more stock types to match, e.g. Q3_K_M,Q5_K_M")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    types = ["Q4_K_M", "Q2_K"] + [t for t in a.frontier.split(",") if t]
    results = []
    for key in a.models.split(","):
        res = run_model(key, types, a.threads)
        results.append(res)
        print(f"\n{key}: imatrix {res['seconds_imatrix']:.1f} s")
        print(f"{'stock':8s} {'bytes':>9s} {'KLD':>8s} | {'mix bytes':>9s} {'bpw':>5s} {'KLD':>8s} {'ratio':>6s} "
              f"{'choose s':>8s} {'imat+quant s':>12s}")
        for r in res["rows"]:
            print(f"{r['stock']:8s} {r['stock_bytes']:9d} {r['stock_kld']:8.5f} | {r['mix_bytes']:9d} "
                  f"{r['mix_bpw']:5.2f} {r['mix_kld']:8.5f} {r['kld_ratio']:6.3f} {r['seconds_choosing']:8.1f} "
                  f"{res['seconds_imatrix'] + r['seconds_quantize_stock']:12.1f}")
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "results.json").write_text(json.dumps(results, indent=1))
        plot(results, OUT / "frontier.png")
    print(f"\nresults: {OUT / 'results.json'}, plot: {OUT / 'frontier.png'}")


if __name__ == "__main__":
    main()
