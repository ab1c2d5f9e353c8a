"""`xvq convert` against llama.cpp's own converter (convert_hf_to_gguf.py with its own gguf-py)
on the same synthetic LLaMA checkpoint: bf16 safetensors, >= 2 GB, sharded like save_pretrained
does it, converted to f16 by both in one run.

    .venv/bin/python bench/convert.py                 # 15 layers of hidden 2048 (GQA 16/4): 2.18 GB bf16
    .venv/bin/python bench/convert.py --layers 2      # a quick look (~1 GB)

The vocabulary is XVERSE's size (100,534 rows, the xverse-style tokenizer from ../shared padded
like XVERSE's), so the embedding and output matrices are the largest tensors (412 MB bf16 each),
as in the real models. The checkpoint is made once with xvq.synth.write_random_safetensors and
cached in .cache/bench/. Before each run its files are read once so both converters start from a
warm page cache. Each converter runs in its own process (the whole command as a user runs it:
imports, vocabulary, and for xvq its tokenizer parity check); peak memory is the highest RssAnon
(anonymous memory, not the memory-mapped checkpoint) sampled from /proc/<pid>/status by this
process every millisecond (tests/test_memory.py). Both outputs are compared tensor for tensor.
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

CACHE = ROOT / ".cache" / "bench"
SHARED_TOK = ROOT.parent / "shared" / "assets" / "xverse-style-tokenizer"
VOCAB = 100534  # XVERSE-13B's config.json


def bench_model(layers: int, hidden: int, ff: int) -> Path:
    from xvq.synth import tiny_config, write_random_safetensors
    folder = CACHE / f"llama-bf16-{layers}x{hidden}-v{VOCAB}"
    cfg = tiny_config("llama", hidden_size=hidden, intermediate_size=ff, num_hidden_layers=layers,
                      num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128 // 4, vocab_size=VOCAB,
                      max_position_embeddings=4096, bos_token_id=2, eos_token_id=3)
    stamp = folder / ".complete"
    if stamp.is_file() and json.loads(stamp.read_text()) == cfg:
        return folder
    if not (SHARED_TOK / "tokenizer.json").is_file():
        sys.exit(f"needs {SHARED_TOK}")
    shutil.rmtree(folder, ignore_errors=True)
    print(f"making {folder} ...", flush=True)
    write_random_safetensors(folder, cfg, dtype="bfloat16", shard_bytes=1 << 30)
    for f in SHARED_TOK.iterdir():
        shutil.copy(f, folder / f.name)
    stamp.write_text(json.dumps(cfg))
    return folder


def warm(folder: Path) -> int:
    total = 0
    for p in sorted(folder.glob("*.safetensors")):
        with open(p, "rb") as f:
            while chunk := f.read(64 << 20):
                total += len(chunk)
    return total


def run(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    t = time.perf_counter()
    if env:
        old = dict(os.environ)
        os.environ.update(env)
    try:
        peak, proc = peak_anon_mb(cmd, timeout=3600)
    finally:
        if env:
            os.environ.clear()
            os.environ.update(old)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"{cmd[:3]} failed:\n{proc.stderr[-3000:]}")
    return wall, peak


def same_tensors(a: Path, b: Path) -> tuple[int, int]:
    """(tensors compared, tensors that differ) between two GGUF files."""
    import gguf
    import numpy as np
    ta = {t.name: t for t in gguf.GGUFReader(a).tensors}
    tb = {t.name: t for t in gguf.GGUFReader(b).tensors}
    if sorted(ta) != sorted(tb):
        return len(ta), -1
    differ = sum(not np.array_equal(ta[n].data, tb[n].data) for n in ta)
    return len(ta), differ


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=15)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ff", type=int, default=5632)
    ap.add_argument("--outtype", default="f16")
    args = ap.parse_args()
    from xvq import anchors

    model = bench_model(args.layers, args.hidden, args.ff)
    out = CACHE / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    ours_f, theirs_f = out / "xvq.gguf", out / "llama-cpp.gguf"
    size = warm(model)
    print(f"checkpoint: {model} ({size / 1e9:.2f} GB bf16, {args.layers} layers, hidden {args.hidden}); "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}", flush=True)

    results = {}
    warm(model)
    results["xvq convert"] = run([sys.executable, "-m", "xvq.cli", "convert", str(model), "--outtype", args.outtype,
                                  "--outfile", str(ours_f)])
    warm(model)
    results["llama.cpp convert_hf_to_gguf.py"] = run(
        [sys.executable, str(anchors.convert_script()), str(model), "--outtype", args.outtype,
         "--outfile", str(theirs_f)], env={"PYTHONPATH": str(anchors.gguf_py())})
    n, differ = same_tensors(ours_f, theirs_f)

    (w_ours, m_ours), (w_theirs, m_theirs) = results["xvq convert"], results["llama.cpp convert_hf_to_gguf.py"]
    print(f"\nbf16 -> {args.outtype}, {size / 1e9:.2f} GB, load average now {os.getloadavg()[0]:.1f}")
    print(f"| converter | wall s | GB/s | peak anon MB |")
    print(f"|---|---:|---:|---:|")
    for name, (wall, peak) in results.items():
        print(f"| {name} | {wall:.1f} | {size / 1e9 / wall:.2f} | {peak:.0f} |")
    print(f"| ratio xvq / llama.cpp | {w_ours / w_theirs:.2f} | {w_theirs / w_ours:.2f}x faster "
          f"| {m_ours / m_theirs:.2f} |")
    print(f"\noutputs: {n} tensors, {'names differ' if differ < 0 else f'{differ} differ in data'}")
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
