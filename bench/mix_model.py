"""A second small trained model for bench/mix.py: XVERSE architecture with the demo model's
tokenizer, but 3 layers and intermediate 512 (widths multiples of 256, so every k-quant applies),
another seed, trained on the calibration set's train split.

    python bench/mix_model.py [--out .cache/mix-model2] [--steps 200]   # minutes on 2 CPU cores

Deterministic for a seed and torch build.
"""
from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_OUT = ROOT / ".cache" / "mix-model2"
DEMO = ROOT / "xvq" / "demo" / "model"
CONFIG = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4)
SEQ, BATCH, LR, SEED = 128, 16, 2e-3, 1


def fit(folder: Path, config: dict, ids, steps: int, seq: int, batch: int, lr: float, seed: int):
    """A float32 model of `config` (written to `folder`) trained `steps` AdamW steps with warm-up and
    cosine decay on `ids`, as xvq.demo.train trains the demo; returns (model, last loss)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from xvq.demo.train import batches, train_step
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    data = batches(ids, seq, batch, torch.Generator().manual_seed(seed))
    t0 = time.time()
    for step in range(steps):
        loss = train_step(model, opt, sched, *next(data))
        if step % 20 == 0 or step + 1 == steps:
            print(f"step {step + 1}/{steps} loss {loss.item():.3f} ({time.time() - t0:.0f} s)", flush=True)
    return model, loss


def train(out: Path = DEFAULT_OUT, steps: int = 200) -> Path:
    import torch
    from tokenizers import Tokenizer
    import xvq  # noqa: F401  (registers xverse with transformers)
    from xvq.calib_data import corpus_texts
    from xvq.demo.train import DEMO_CONFIG, training_ids
    from xvq.fsio import atomic_output

    torch.manual_seed(SEED)
    tok = Tokenizer.from_file(str(DEMO / "tokenizer.json"))
    ids = training_ids(tok, list(corpus_texts("train")))
    demo_cfg = json.loads((DEMO / "config.json").read_text())
    config = DEMO_CONFIG | CONFIG | {"vocab_size": demo_cfg["vocab_size"]}
    with atomic_output(out, is_dir=True) as tmp:
        t0 = time.time()
        model, loss = fit(tmp, config, ids, steps, SEQ, BATCH, LR, SEED)
        model.to(torch.bfloat16).save_pretrained(tmp)
        (tmp / "config.json").write_text(json.dumps(config | {"torch_dtype": "bfloat16"}, indent=2))
        for f in DEMO.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "generation")):
                shutil.copy(f, tmp / f.name)
        (tmp / "TRAINING.md").write_text(f"bench/mix_model.py: {steps} steps of {BATCH}x{SEQ} tokens, lr {LR}, "
                                         f"seed {SEED}, final train loss {loss.item():.3f}, {time.time() - t0:.0f} s\n")
    return out


if __name__ == "__main__":
    args = sys.argv[1:]
    out = Path(args[args.index("--out") + 1]) if "--out" in args else DEFAULT_OUT
    steps = int(args[args.index("--steps") + 1]) if "--steps" in args else 200
    train(out, steps)
