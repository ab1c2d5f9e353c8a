"""A trained byte-level BPE LLaMA for bench/ (issue 22): what real LLaMA-3-style derivatives are
(GPT-2 byte alphabet, LLaMA-3's Split regex, ignore_merges, BOS added), shrunk: a 3,000-entry
tokenizer learned from the calibration set's train split, LLaMA architecture with tied
embeddings, GQA 4/2, LLaMA-3.1 RoPE scaling, hidden 256, 3 layers, intermediate 512 (widths
multiples of 256, so every k-quant applies), trained on the same split.

    python bench/bytelevel_model.py [--out .cache/bytelevel-model] [--steps 300]   # minutes on 2 CPU cores

Deterministic for a seed and torch build; its held-out perplexity is written to TRAINING.md.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CACHE = Path(os.environ.get("XVQ_BENCH_CACHE", ROOT / ".cache"))
DEFAULT_OUT = CACHE / "bytelevel-model"
CONFIG = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=256, intermediate_size=512,
              num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
              rms_norm_eps=1e-5, hidden_act="silu", initializer_range=0.02, tie_word_embeddings=True,
              use_cache=True, rope_theta=500000.0,
              rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 256})
TOKENIZER_ENTRIES = 3000
SEQ, BATCH, LR, SEED = 128, 16, 2e-3, 2


def ids_of(tok, texts: list[str], eos: int):
    import torch
    ids: list[int] = []
    for t in texts:
        ids += tok.encode(t, add_special_tokens=False).ids + [eos]
    return torch.tensor(ids, dtype=torch.long)


def train(out: Path = DEFAULT_OUT, steps: int = 300) -> Path:
    import torch
    from bench.mix_model import fit
    from xvq.calib_data import corpus_texts, heldout_texts
    from xvq.demo.train import heldout_loss
    from xvq.fsio import atomic_output
    from xvq.synth import LLAMA3_SPECIALS, byte_level_tokenizer, save_byte_level_tokenizer

    torch.manual_seed(SEED)
    texts = list(corpus_texts("train"))
    tok = byte_level_tokenizer(texts, TOKENIZER_ENTRIES, "llama3")
    bos, eos = (tok.token_to_id(s) for s in LLAMA3_SPECIALS[:2])
    config = CONFIG | {"vocab_size": tok.get_vocab_size(), "bos_token_id": bos, "eos_token_id": eos}
    ids, held = ids_of(tok, texts, eos), ids_of(tok, list(heldout_texts().values()), eos)
    with atomic_output(out, is_dir=True) as tmp:
        t0 = time.time()
        model, loss = fit(tmp, config, ids, steps, SEQ, BATCH, LR, SEED)
        val = heldout_loss(model, held, SEQ, "cpu")
        model.to(torch.bfloat16).save_pretrained(tmp)
        (tmp / "config.json").write_text(json.dumps(config | {"torch_dtype": "bfloat16"}, indent=2))
        save_byte_level_tokenizer(tok, tmp, "llama3")
        (tmp / "TRAINING.md").write_text(
            f"bench/bytelevel_model.py: {steps} steps of {BATCH}x{SEQ} tokens, lr {LR}, seed {SEED} on the "
            f"calibration set's train split ({len(ids)} tokens), {time.time() - t0:.0f} s on 2 CPU cores; final "
            f"train loss {loss.item():.3f}, held-out loss {val:.3f} (perplexity {math.exp(val):.1f}, "
            f"{len(held)} tokens).\n")
    print(f"wrote {out}: held-out perplexity {math.exp(val):.1f}")
    return out


if __name__ == "__main__":
    args = sys.argv[1:]
    out = Path(args[args.index("--out") + 1]) if "--out" in args else DEFAULT_OUT
    steps = int(args[args.index("--steps") + 1]) if "--steps" in args else 300
    train(out, steps)
