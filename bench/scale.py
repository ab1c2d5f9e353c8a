"""What a full-size run costs, projected from full-width slices measured on this machine.

For each model xvq targets, random checkpoints at the real width are built with 1 and 2 layers
(MoE: 8 of the 64 routed experts plus the shared ones, and a third slice with 16 experts to price
one expert), every stage runs as the command a user runs, in its own process, and its wall time,
peak anonymous memory (RssAnon, as tests/test_memory.py measures it) and the bytes it wrote are
recorded. Per-layer cost = 2-layer minus 1-layer; fixed cost = the rest; the table projects each
stage to the full depth (and, for MoE, to 64 experts) on this machine, and prints the per-layer
figures to scale by other hardware.

    .venv/bin/python bench/scale.py --quick        # XVERSE-7B and Ziya-LLaMA-13B (the two smallest)
    .venv/bin/python bench/scale.py                # every model (needs ../shared/assets)
    .venv/bin/python bench/scale.py --models XVERSE-65B --stages convert

Shapes come from ../shared/assets/xverse-configs (MoE-A36B derived from its README's table);
Ziya-LLaMA-13B is LLaMA-13B's shape (40 layers of 5120, vocabulary 39,410). At most one model's
files exist at a time (under .cache/bench/scale, deleted before the next).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.test_memory import peak_anon_mb  # noqa: E402

SHARED = ROOT.parent / "shared" / "assets"
WORK = Path(os.environ.get("XVQ_BENCH_WORK", ROOT / ".cache" / "bench" / "scale"))
ZIYA = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=5120, intermediate_size=13824,
            num_attention_heads=40, num_key_value_heads=40, num_hidden_layers=40, vocab_size=39410,
            rms_norm_eps=1e-6, max_position_embeddings=2048, hidden_act="silu", tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2, rope_theta=10000.0)
MODELS = ["XVERSE-7B-Chat", "Ziya-LLaMA-13B", "XVERSE-13B", "XVERSE-MoE-A4.2B", "XVERSE-65B", "XVERSE-MoE-A36B"]
QUICK = MODELS[:2]
STAGES = ["convert", "imatrix", "quantize", "mix", "gptq", "validate", "delta"]
CALIB_TOKENS, EXPERTS = 4096, 8


def full_config(name: str) -> dict:
    if name == "Ziya-LLaMA-13B":
        return dict(ZIYA)
    return json.loads((SHARED / "xverse-configs" / name / "config.json").read_text())


def slice_config(cfg: dict, n_layer: int, n_experts: int = EXPERTS) -> dict:
    out = cfg | {"num_hidden_layers": n_layer}
    if "num_experts" in cfg:
        out["num_experts"] = n_experts
    return out


def tokenizer_for(cfg: dict, into: Path) -> None:
    """XVERSE: the XVERSE-style 100k tokenizer (rows past it are padding, as in the real
    models); LLaMA/Ziya: a BPE of the calibration text near the config's vocabulary size."""
    if cfg["model_type"] == "xverse":
        for f in (SHARED / "xverse-style-tokenizer").iterdir():
            shutil.copy(f, into / f.name)
        return
    cached = WORK.parent / f"tok-{cfg['vocab_size']}"
    if not cached.is_dir():
        from xvq.calib_data import corpus_texts
        from xvq.synth import save_xverse_tokenizer, xverse_style_tokenizer
        save_xverse_tokenizer(xverse_style_tokenizer(corpus_texts(), cfg["vocab_size"] - 8), cached)
    for f in cached.iterdir():
        shutil.copy(f, into / f.name)


def build(folder: Path, cfg: dict) -> Path:
    """bf16 safetensors, re-saved as pickle .bin for XVERSE (its shipping format)."""
    from xvq.synth import write_random_safetensors
    files = write_random_safetensors(folder, cfg, dtype="bfloat16", shard_bytes=4 << 30)
    if cfg["model_type"] == "xverse":
        from safetensors.torch import load_file
        from xvq.synth import save_pickle_shards
        state = {k: v for f in files for k, v in load_file(str(f)).items()}
        save_pickle_shards(state, folder, n_shards=max(2, len(files)))
        del state
        for f in folder.glob("*.safetensors*"):
            f.unlink()
    tokenizer_for(cfg, folder)
    return folder


def size_of(paths) -> int:
    total = 0
    for p in map(Path, paths):
        total += sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else \
            (p.stat().st_size if p.exists() else 0)
    return total


def xvq(*args) -> list[str]:
    return [sys.executable, "-m", "xvq.cli", *map(str, args)]


def stage_commands(model: Path, w: Path, texts: tuple[Path, Path]) -> dict:
    """stage -> (command, outputs); in the order they depend on each other."""
    calib, evaluation = texts
    f16, im, q4 = w / "f16.gguf", w / "im.gguf", w / "q4_k_m.gguf"
    return {
        "convert": (xvq("convert", model, "--outfile", f16, "--outtype", "f16"), [f16]),
        "imatrix": (xvq("quantize", "imatrix", f16, "-o", im, "--calib-file", calib, "--ctx", 512), [im]),
        "quantize": (xvq("quantize", "gguf", f16, "--type", "Q4_K_M", "--imatrix", im, "--outfile", q4), [q4]),
        "gptq": (xvq("quantize", "gptq", model, "--outdir", w / "gptq", "--bits", 4, "--calib-tokens", CALIB_TOKENS,
                     "--max-seq-len", 512), [w / "gptq"]),
        "validate": (xvq("validate", "--reference", model, q4, "--reference-gguf", f16, "--text", evaluation,
                         "--ctx", 512, "--max-tokens", 1024, "--report", w / "report"), [w / "report"]),
    }


def run_stage(cmd: list[str], outputs: list[Path], timeout: float) -> dict:
    # the multi-GB files the slice build or the previous stage wrote are flushed first, so their
    # write-back does not land in this stage's time (it did: 65B's 1-layer convert took 2x the 2-layer's)
    os.sync()
    t0 = time.perf_counter()
    peak, proc = peak_anon_mb(cmd, timeout=timeout, interval=0.02)   # minutes-long stages: 20 ms is fine-grained enough
    ok = proc.returncode == 0 or (cmd[3] == "validate" and (outputs[0] / "report.json").is_file())
    return {"s": time.perf_counter() - t0, "mb": peak, "bytes": size_of(outputs), "ok": ok,
            "err": "" if ok else (proc.stderr.strip().splitlines() or ["?"])[-1][:160]}


def measure_slice(name: str, cfg: dict, stages: list[str], texts, timeout: float) -> dict:
    folder = WORK / name / f"{cfg['num_hidden_layers']}L-{cfg.get('num_experts', 0)}E"
    shutil.rmtree(folder, ignore_errors=True)
    model = build(folder / "model", cfg)
    work = folder / "out"
    work.mkdir()
    cmds = stage_commands(model, work, texts)
    out = {}
    for stage in stages:
        if stage == "delta":
            out[stage] = delta_stage(model, work, timeout)
        elif stage == "mix":
            out[stage] = mix_stage(work, timeout)
        elif stage in cmds:
            out[stage] = run_stage(*cmds[stage], timeout)
        print(f"  {name} {cfg['num_hidden_layers']}L/{cfg.get('num_experts', '-')}E {stage}: "
              f"{out[stage]['s']:.1f} s, {out[stage]['mb']:.0f} MB{'' if out[stage]['ok'] else ' FAILED ' + out[stage]['err']}",
              flush=True)
    shutil.rmtree(folder, ignore_errors=True)
    return out


def mix_stage(work: Path, timeout: float) -> dict:
    """`--target-size` at the Q4_K_M file's size (the quantize stage's), with the imatrix stage's
    file: the mix alone, as `quantize` is the stock file alone. Its report (in --outdir) gives
    the bytes the process wrote by the kernel's count (/proc/self/io) and what was ablated."""
    q4 = work / "q4_k_m.gguf"
    if not q4.is_file():
        return {"s": 0.0, "mb": 0.0, "bytes": 0, "ok": False, "err": "run the quantize stage first (its size is the target)"}
    out = work / "mix"
    r = run_stage(xvq("quantize", "gguf", work / "f16.gguf", "--target-size", f"{q4.stat().st_size / 1e6:.6f}M",
                      "--imatrix", work / "im.gguf", "--outdir", out), [out], timeout)
    reports = sorted(out.glob("*.json")) if out.is_dir() else []
    if reports:
        rep = json.loads(reports[0].read_text())
        r |= {"written_by_process": rep.get("bytes_written"), "mix_bytes": rep["size_bytes"],
              "ablated": f"{rep['sensitivity']['measured']}/{rep['sensitivity']['of']}",
              "kld_predicted": rep["kld_predicted"], "kld_measured": rep["kld_measured"], "timings": rep["timings"]}
    return r


def delta_stage(model: Path, work: Path, timeout: float) -> dict:
    """Ziya's delta merge: the delta of a fine-tune (here: the base itself) applied onto the base."""
    from xvq.delta import make_delta
    target = shutil.copytree(model, work / "target")
    delta = make_delta(model, target, work / "delta")
    shutil.rmtree(target)
    return run_stage(xvq("delta", "apply", "--base", model, "--delta", delta, "--outdir", work / "merged"),
                     [work / "merged"], timeout)


def project(one: dict, two: dict | None, n_layer: int, more: dict | None = None, n_expert: int = 0,
            layers: tuple[int, int] = (1, 2)) -> dict:
    """Fixed + per-layer cost at the model's depth, from slices of layers[0] and layers[1] layers
    (layers[1] = 0, two = None: one slice, whose whole cost counts per layer: an upper bound). MoE: each
    layer also carries the (n_expert - 8) experts the slices lack, priced from the slice with twice
    the experts. Time and bytes add up; memory is a peak: the first slice's, plus its growth with
    depth, plus the experts one layer adds. A difference below zero is noise and counts as zero."""
    a, b = layers
    keys = ("s", "mb", "bytes")
    per_layer = {k: max(0.0, (two[k] - one[k]) / (b - a) if two else one[k] / a) for k in keys}
    per_expert = {k: max(0.0, (more[k] - one[k]) / (EXPERTS * a)) if more else 0.0 for k in keys}
    extra = max(0, n_expert - EXPERTS) if more else 0
    full_layer = {k: per_layer[k] + extra * per_expert[k] for k in keys}
    fixed = {k: max(0.0, one[k] - a * per_layer[k]) for k in keys}
    return {"per_layer": full_layer, "per_expert": per_expert, "depth_mb": per_layer["mb"] if two else 0.0,
            "s": fixed["s"] + n_layer * full_layer["s"], "bytes": fixed["bytes"] + n_layer * full_layer["bytes"],
            "mb": one["mb"] + (n_layer - a) * (per_layer["mb"] if two else 0.0) + extra * per_expert["mb"]}


def texts() -> tuple[Path, Path]:
    from xvq.calib_data import calibration, heldout_texts
    WORK.mkdir(parents=True, exist_ok=True)
    calib, evaluation = WORK.parent / "scale-calib.txt", WORK.parent / "scale-eval.txt"
    calib.write_text(calibration(budget_tokens=CALIB_TOKENS).text, encoding="utf-8")
    evaluation.write_text("\n\n".join(heldout_texts()), encoding="utf-8")
    return calib, evaluation


def convert_must_hold(timeout: float) -> None:
    """Issue 16's bound: one full-width layer of XVERSE-65B (and its 100,534-row vocabulary) and one
    of MoE-A36B with all 64 stacked experts of 6144 x 4096 convert in under 1 GB of anonymous memory
    (written as safetensors: a 12 GB pickle would first have to be built in this machine's RAM)."""
    from xvq.synth import write_random_safetensors
    for name, experts in (("XVERSE-65B", 0), ("XVERSE-MoE-A36B", 64)):
        cfg = slice_config(full_config(name), 1, experts)
        folder = WORK / name / "must-hold"
        shutil.rmtree(folder, ignore_errors=True)
        write_random_safetensors(folder / "model", cfg, dtype="bfloat16", shard_bytes=4 << 30)
        tokenizer_for(cfg, folder / "model")
        r = run_stage(xvq("convert", folder / "model", "--outfile", folder / "f16.gguf"), [folder / "f16.gguf"], timeout)
        ckpt = size_of([folder / "model"]) / 1e9
        print(f"| {name} 1 layer{f', {experts} experts' if experts else ''} | {ckpt:.1f} GB bf16 | {r['s']:.0f} s | "
              f"{r['mb']:.0f} MB | {'PASS' if r['ok'] and r['mb'] < 1000 else 'FAIL ' + r['err']} |", flush=True)
        shutil.rmtree(folder, ignore_errors=True)


class _Routed(Exception):
    """Raised by the counting hook: the router has spoken, the experts and the head need not run."""


def moe_routing(name: str, sample_tokens: int) -> dict:
    """Routed calibration tokens per expert at GPTQ's default budget, at the real width: one layer
    with all 64 experts in the router (the experts themselves narrowed to 64: routing reads only
    the router and the attention's output, and the forced-pass threshold only the hidden size),
    the default calibration sequences run up to the router on `sample_tokens` of them, each
    expert's share of the routed slots projected to the whole budget. Random weights: the
    figures show where the default threshold sits against the real shapes and top-k, not how
    a trained router balances (the GPTQ folder's quantize_config.json records that per model)."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from xvq.calib_data import calibration
    from xvq.models.xverse_moe_hf import XverseMoeForCausalLM
    from xvq.quantize.gptq import GptqSettings, calibration_sequences
    from xvq.quantize.gptq_moe import min_expert_tokens
    from xvq.synth import write_random_safetensors
    cfg = slice_config(full_config(name), 1, 64) | {"intermediate_size": 64}
    folder = WORK / name / "routing"
    shutil.rmtree(folder, ignore_errors=True)
    write_random_safetensors(folder, cfg, dtype="float32")
    tokenizer_for(cfg, folder)
    settings = GptqSettings()
    texts = calibration(budget_tokens=settings.calib_tokens, tokenizer_dir=folder, seed=settings.seed).texts
    seqs = calibration_sequences(AutoTokenizer.from_pretrained(folder), texts, settings.calib_tokens,
                                 settings.max_seq_len, settings.seed)
    n_tokens = sum(len(q["input_ids"]) for q in seqs)
    model = XverseMoeForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    counts, seen = np.zeros(cfg["num_experts"]), [0]

    def count(block, x, chosen):
        counts[:] += np.bincount(chosen.reshape(-1).numpy(), minlength=len(counts))
        seen[0] += chosen.shape[0]
        raise _Routed
    for m in model.modules():
        if "calibration_hook" in vars(type(m)):
            m.calibration_hook = count
    with torch.no_grad():
        for q in seqs[::max(1, n_tokens // sample_tokens)]:   # spread over the mix's languages
            if seen[0] >= sample_tokens:
                break
            try:
                model(torch.tensor([q["input_ids"]]))
            except _Routed:
                pass
    shutil.rmtree(folder, ignore_errors=True)
    routed = counts / seen[0] * n_tokens      # each token fills moe_top_k slots
    threshold = min_expert_tokens(n_tokens, settings.moe_min_tokens, cfg["hidden_size"])
    return {"model": name, "calib_tokens": n_tokens, "sampled_tokens": seen[0], "top_k": cfg["moe_top_k"],
            "min_tokens": threshold, "mean": float(routed.mean()), "min": float(routed.min()),
            "p5": float(np.percentile(routed, 5)), "max": float(routed.max()),
            "forced": int((routed < threshold).sum()), "forced_share": float((routed < threshold).mean()),
            "threshold_share_of_mean": threshold / float(routed.mean())}


def print_routing(rows: list[dict]) -> None:
    print("\n| model | calibration tokens (default budget) | routed tokens per expert: mean / min / 5th pct / max "
          "| forced-pass threshold | experts forced |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['calib_tokens']:,} (top-{r['top_k']}, sampled {r['sampled_tokens']:,}) | "
              f"{r['mean']:,.0f} / {r['min']:,.0f} / {r['p5']:,.0f} / {r['max']:,.0f} | {r['min_tokens']:,} "
              f"({100 * r['threshold_share_of_mean']:.0f} % of the mean) | {r['forced']} of 64 "
              f"({100 * r['forced_share']:.0f} %) |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the two smallest models only")
    ap.add_argument("--models", nargs="*", default=None)
    ap.add_argument("--stages", nargs="*", default=STAGES)
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per stage")
    ap.add_argument("--json", type=Path, default=None, help="also write the measurements here (after each model)")
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 2], metavar="N",
                    help="the depths of the two slices (default 1 2); one depth alone, for stages too slow to run "
                         "twice here, counts its fixed cost per layer")
    ap.add_argument("--one-layer", action="store_true", help=argparse.SUPPRESS)   # = --layers 1
    ap.add_argument("--table", type=Path, nargs="*", default=None,
                    help="only print the table of earlier --json files (runs of different models merge)")
    ap.add_argument("--moe-routing", type=int, nargs="?", const=16384, default=None, metavar="TOKENS",
                    help="only the MoE models' routed calibration tokens per expert at GPTQ's default budget, "
                         "from TOKENS routed tokens (default 16384)")
    ap.add_argument("--convert-must-hold", action="store_true",
                    help="only convert one full-width layer of XVERSE-65B and of MoE-A36B (64 experts): peak < 1 GB")
    a = ap.parse_args()
    if a.table:   # projections recomputed, so a fix to project() reaches earlier measurements
        rows = [r for f in a.table for r in json.loads(f.read_text())]
        for r in rows:
            if "one" in r:
                cfg = full_config(r["model"])
                depths = r.get("layers", [1, 2])
                r["projection"] = project(r["one"], r["two"], cfg["num_hidden_layers"], r.get("more"),
                                          cfg.get("num_experts", 0), depths)
        return print_table(rows)
    if not (SHARED / "xverse-configs").is_dir():
        sys.exit(f"needs {SHARED}/xverse-configs and xverse-style-tokenizer (the real models' shapes)")
    if a.moe_routing:
        rows = [moe_routing(m, a.moe_routing) for m in (a.models or [m for m in MODELS if "MoE" in m])]
        if a.json:
            a.json.write_text(json.dumps(rows, indent=1))
        return print_routing(rows)
    if a.convert_must_hold:
        print("| slice | checkpoint | convert time | peak anon memory | < 1 GB |\n|---|---|---|---|---|")
        return convert_must_hold(a.timeout)
    models = a.models or (QUICK if a.quick else MODELS)
    tx = texts()
    rows = []
    for name in models:
        cfg = full_config(name)
        stages = [s for s in a.stages if s != "delta" or name.startswith("Ziya")]
        depths = (([1] if a.one_layer else a.layers[:2]) + [0])[:2]   # [A, B], B = 0: one slice
        one = measure_slice(name, slice_config(cfg, depths[0]), stages, tx, a.timeout)
        two = measure_slice(name, slice_config(cfg, depths[1]), stages, tx, a.timeout) if depths[1] else None
        more = measure_slice(name, slice_config(cfg, depths[0], 2 * EXPERTS), stages, tx, a.timeout) \
            if "num_experts" in cfg else None
        for s in stages:
            if not all(m[s]["ok"] for m in (one, two, more) if m is not None):
                rows.append({"model": name, "stage": s,
                             "failed": next(m[s]["err"] for m in (one, two, more) if m and not m[s]["ok"])})
                continue
            p = project(one[s], two and two[s], cfg["num_hidden_layers"], more and more[s], cfg.get("num_experts", 0),
                        depths)
            rows.append({"model": name, "stage": s, "layers": depths, "one": one[s], "two": two and two[s],
                         "more": more and more[s], "projection": p})
        shutil.rmtree(WORK / name, ignore_errors=True)
        if a.json:  # after each model: a long run that stops keeps what it measured
            a.json.write_text(json.dumps(rows, indent=1))
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    print("\n| model | stage | slice A: layers, s / MB | slice B: layers, s / MB | per layer s / MB / GB written | "
          "projected full: time | peak anon memory | disk written |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "failed" in r:
            print(f"| {r['model']} | {r['stage']} | failed: {r['failed']} | | | | | |")
            continue
        o, t, p = r["one"], r["two"], r["projection"]
        pl = p["per_layer"]
        la, lb = r.get("layers", [1, 2])
        two = f"{lb}: {t['s']:.1f} / {t['mb']:.0f}" if t else "(one slice only)"
        print(f"| {r['model']} | {r['stage']} | {la}: {o['s']:.1f} / {o['mb']:.0f} | {two} | "
              f"{pl['s']:.1f} / {p.get('depth_mb', 0):+.0f} / {pl['bytes'] / 1e9:.2f} | {p['s'] / 60:.1f} min | "
              f"{p['mb'] / 1e3:.2f} GB | {p['bytes'] / 1e9:.1f} GB |")
    print_mix_against_stock(rows)
    print("\nper layer: slice B minus slice A, per layer (MoE: with all 64 experts, priced from the slice with 16); "
          "MB: peak memory's growth with depth; projected = fixed + depth x per layer on this machine's cores; "
          "peak memory = slice A's + its growth with depth + the experts one layer adds.")


def print_mix_against_stock(rows: list[dict]) -> None:
    """The mix's projected time against imatrix + quantize of the same model (what a stock file
    costs), and the bytes it wrote against its file."""
    by = {(r["model"], r["stage"]): r for r in rows if "projection" in r}
    models = sorted({m for m, s in by if s == "mix"})
    if not models:
        return
    print("\n| model | mix: projected | imatrix + quantize: projected | ratio | bytes written / mix file (slices) | ablated |")
    print("|---|---|---|---|---|---|")
    for m in models:
        mix = by[(m, "mix")]
        stock = [by.get((m, s)) for s in ("imatrix", "quantize")]
        if None in stock:
            continue
        base = sum(r["projection"]["s"] for r in stock)
        w = [x for x in (mix["one"], mix["two"]) if x and x.get("written_by_process")]
        wr = " / ".join(f"{x['written_by_process'] / x['mix_bytes']:.2f}x" for x in w) or "-"
        print(f"| {m} | {mix['projection']['s'] / 60:.1f} min | {base / 60:.1f} min | "
              f"{mix['projection']['s'] / base:.2f} | {wr} | {' / '.join(x.get('ablated', '-') for x in w)} |")


if __name__ == "__main__":
    main()
