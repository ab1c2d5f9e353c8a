"""GPTQ's memory against depth: `xvq quantize gptq` on LLaMA-shaped checkpoints of the same width
with 2 and 8 layers, peak anonymous memory (RssAnon, as tests/test_memory.py measures it).

    .venv/bin/python bench/gptq_memory.py                    # width 2048 (ffn 5504): ~7 min on 2 cores
    .venv/bin/python bench/gptq_memory.py --width 1024 --ffn 2816

Goal (issue 16): the 8-layer peak exceeds the 2-layer one by less than a quarter of the 6 extra
layers' float32 weights: GPTQModel keeps layers on disk (offload_to_disk) and loads one at a time,
so what grows is the packed output and bookkeeping, not the weights. What must grow with the
calibration set is printed too: the inputs of the layer being quantized, n_tokens x hidden.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.conftest import FALLBACK_TEXT  # noqa: E402
from tests.test_memory import peak_anon_mb  # noqa: E402

WORK = ROOT / ".cache" / "bench" / "gptq-memory"


def checkpoint(n_layer: int, width: int, ffn: int, tok: Path) -> Path:
    from xvq.synth import tiny_config, write_random_safetensors
    folder = WORK / f"w{width}-{n_layer}"
    if not (folder / "config.json").is_file():
        n_tok = len(json.loads((tok / "tokenizer.json").read_text())["model"]["vocab"])
        cfg = tiny_config("llama", num_hidden_layers=n_layer, vocab_size=n_tok, hidden_size=width,
                          intermediate_size=ffn, num_attention_heads=width // 128, num_key_value_heads=width // 128)
        write_random_safetensors(folder, cfg, dtype="bfloat16", shard_bytes=1 << 30)
        for f in tok.iterdir():
            shutil.copy(f, folder / f.name)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=5504)
    ap.add_argument("--calib-tokens", type=int, default=1024)
    a = ap.parse_args()
    from xvq.synth import save_xverse_tokenizer, xverse_style_tokenizer
    tok = WORK / "tok"
    if not tok.is_dir():
        save_xverse_tokenizer(xverse_style_tokenizer(FALLBACK_TEXT, 1200), tok)
    rows = {}
    for n in (2, 8):
        model = checkpoint(n, a.width, a.ffn, tok)
        out = WORK / f"out-{n}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        peak, proc = peak_anon_mb([sys.executable, "-m", "xvq.cli", "quantize", "gptq", str(model), "--outdir", str(out),
                                   "--bits", "4", "--calib-tokens", str(a.calib_tokens), "--max-seq-len", "256"],
                                  timeout=3600)
        if proc.returncode != 0:
            sys.exit(proc.stderr[-2000:])
        rows[n] = (peak, time.perf_counter() - t0)
        shutil.rmtree(out, ignore_errors=True)
    layer_f32_mb = (4 * a.width * a.width + 3 * a.width * a.ffn) * 4 / 1e6
    growth, bound = rows[8][0] - rows[2][0], 6 * layer_f32_mb / 4
    print(f"\n| width {a.width}, ffn {a.ffn} | 2 layers | 8 layers | growth | bound (1/4 of 6 layers' f32) | ratio |")
    print("|---|---|---|---|---|---|")
    print(f"| peak RssAnon | {rows[2][0]:.0f} MB | {rows[8][0]:.0f} MB | {growth:.0f} MB | {bound:.0f} MB | "
          f"{growth / bound:.2f} |")
    print(f"| wall time | {rows[2][1]:.0f} s | {rows[8][1]:.0f} s | | | |")
    print(f"\nthe layer being quantized holds its inputs: {a.width * 4} bytes per calibration token "
          f"(float32; {a.width * 4 * 131072 / 1e9:.2f} GB at the default 131,072 tokens)")
    print("PASS" if growth < bound else "FAIL: GPTQ memory grows with depth")


if __name__ == "__main__":
    main()
