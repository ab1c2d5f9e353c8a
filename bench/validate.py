"""xvq validate's GGUF scoring speed against llama.cpp's own llama-perplexity, same file, same
text, same context and threads, one run each, measured in the same session.

    .venv/bin/python bench/validate.py [--ctx 512] [--threads N] [--gguf F --reference DIR --text T]

Cases (each skipped when its input is missing):
  stories260K   trained tiny LLaMA, vocab 512 (../shared/assets/stories260K-hf), f32 GGUF
  xverse-100k   random XVERSE-shaped model with the 100,257-entry XVERSE-style tokenizer
                (../shared/assets/xverse-style-tokenizer): the log-softmax over a real-size vocabulary
                dominates, the hardest case for a Python scorer
  demo          the committed demo model (xvq/demo/model), f16 GGUF, when present

xvq's time: model load + llama.cpp decode + the numpy statistics (NLL, KLD against the cached
reference, top-1) for every scored position. llama-perplexity's time: the whole process, in
plain perplexity mode and in --kl-divergence mode (against a base file it wrote beforehand).
Tokens per second count window tokens (n_windows x ctx), as llama-perplexity does.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("XVQ_SHARED", ROOT.parent / "shared")) / "assets"
CACHE = ROOT / ".cache" / "bench-validate"


def corpus_text(n_chars: int) -> str:
    parts = []
    for rel in ("corpus/tinystories_sample/TinyStories-valid-excerpt.txt", "corpus/zh_classical/西游记.txt",
                "corpus/wikitext2_pytorch_examples/test.txt"):
        p = SHARED / rel
        if p.is_file():
            parts.append(p.read_text(encoding="utf-8")[: n_chars // 3])
    return "\n\n".join(parts)


def build_xverse_100k() -> Path | None:
    tok_dir = SHARED / "xverse-style-tokenizer"
    if not tok_dir.is_dir():
        return None
    d = CACHE / "xverse-100k"
    if (d / "config.json").is_file():
        return d
    import shutil
    from xvq.synth import make_checkpoint, tiny_config
    d.mkdir(parents=True, exist_ok=True)
    for f in tok_dir.iterdir():
        shutil.copy(f, d / f.name)
    tok = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
    n = max(list(tok["model"]["vocab"].values()) + [a["id"] for a in tok.get("added_tokens", [])]) + 1
    make_checkpoint(d, tiny_config("xverse", vocab_size=n, hidden_size=256, num_hidden_layers=2), qk_scale=4.0)
    return d


def gguf_of(model_dir: Path, outtype: str) -> Path:
    from xvq.convert import convert
    out = CACHE / f"{model_dir.name}-{outtype}.gguf"
    if not out.is_file():
        convert(model_dir, out, outtype, progress=False)
    return out


def llama_perplexity(args: list, log: Path) -> tuple[float, str]:
    from xvq import anchors
    exe = anchors.tool("llama-perplexity")
    t = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run([str(exe), *map(str, args)], stdout=f, stderr=subprocess.STDOUT).returncode
    dt = time.perf_counter() - t
    text = log.read_text(errors="replace")
    if rc:
        raise RuntimeError(f"llama-perplexity failed:\n{text[-2000:]}")
    return dt, text


def chunks_of(text: str) -> int:
    m = re.search(r"over (\d+) chunks", text)
    return int(m.group(1)) if m else 0


def xvq_pass(gguf: Path, reference: Path, text_file: Path, ctx: int, threads: int, work: Path) -> tuple[float, int]:
    """Reference cached first (untimed), then the timed artifact pass: load + decode + statistics."""
    from xvq.validate.backends import GgufScorer
    from xvq.validate.core import score
    from xvq.validate.reference import reference_for
    from xvq.validate.windows import load_tokenizer, make_windows
    tok = load_tokenizer(reference)
    windows = make_windows(tok, {"t": text_file.read_text(encoding="utf-8")}, ctx, model_dir=reference)
    ref = reference_for(lambda: GgufScorer(gguf, ctx, n_threads=threads), gguf, windows, 128, work, progress=False)
    t = time.perf_counter()
    scorer = GgufScorer(gguf, ctx, n_threads=threads)
    score(scorer, windows, ref, gguf.name, progress=False)
    scorer.close()
    return time.perf_counter() - t, windows.n_windows


def run_case(name: str, gguf: Path, reference: Path, text: str, ctx: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        text_file = work / "text.txt"
        text_file.write_text(text, encoding="utf-8")
        common = ["-m", gguf, "-f", text_file, "-c", ctx, "-t", threads]
        # llama-perplexity first writes the KLD base (untimed), then the two timed runs
        llama_perplexity([*common, "--kl-divergence-base", work / "base.kld"], work / "base.log")
        t_ppl, out = llama_perplexity(common, work / "ppl.log")
        t_kld, _ = llama_perplexity(["-m", gguf, "-c", ctx, "-t", threads, "--kl-divergence-base",
                                     work / "base.kld", "--kl-divergence"], work / "kld.log")
        n_chunks = chunks_of(out)
        t_xvq, n_windows = xvq_pass(gguf, reference, text_file, ctx, threads, work)
    tok = lambda n, t: n * ctx / t if t else 0.0  # noqa: E731
    return {"case": name, "windows": f"{n_windows} (llama: {n_chunks})", "ctx": ctx,
            "xvq_tok_s": tok(n_windows, t_xvq), "ppl_tok_s": tok(n_chunks, t_ppl), "kld_tok_s": tok(n_chunks, t_kld)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--chars", type=int, default=60000, help="characters of corpus text per case")
    ap.add_argument("--gguf", type=Path)
    ap.add_argument("--reference", type=Path)
    ap.add_argument("--text", type=Path)
    ap.add_argument("--only", default=None, help="run only cases whose name contains this")
    a = ap.parse_args()
    from xvq import anchors
    from xvq.llamacpp import default_threads
    if not anchors.available():
        sys.exit("llama.cpp tools are not built: python -m xvq.anchors build")
    threads = a.threads or default_threads()
    CACHE.mkdir(parents=True, exist_ok=True)
    text = a.text.read_text(encoding="utf-8") if a.text else corpus_text(a.chars)
    cases = []
    if a.gguf:
        cases.append(("given", a.gguf, a.reference))
    else:
        if (SHARED / "stories260K-hf").is_dir():
            cases.append(("stories260K f32", gguf_of(SHARED / "stories260K-hf", "f32"), SHARED / "stories260K-hf"))
        xv = build_xverse_100k()
        if xv:
            cases.append(("xverse-100k f16", gguf_of(xv, "f16"), xv))
        demo = ROOT / "xvq" / "demo" / "model"
        if (demo / "config.json").is_file():
            cases.append(("demo f16", gguf_of(demo, "f16"), demo))
    rows = [run_case(n, g, r, text, a.ctx, threads) for n, g, r in cases if not a.only or a.only in n]
    print(f"\nthreads={threads}, ctx={a.ctx}, load average {os.getloadavg()[0]:.1f} "
          f"(on a shared machine compare ratios, not absolutes)\n")
    print(f"| case | windows | xvq tok/s | llama-perplexity tok/s | ratio | --kl-divergence tok/s | ratio |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['windows']} | {r['xvq_tok_s']:.0f} | {r['ppl_tok_s']:.0f} | "
              f"{r['xvq_tok_s'] / r['ppl_tok_s']:.2f} | {r['kld_tok_s']:.0f} | {r['xvq_tok_s'] / r['kld_tok_s']:.2f} |")


if __name__ == "__main__":
    main()
