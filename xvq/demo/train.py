"""Train the demo model: XVERSE architecture (hidden 256 so k-quants apply), an XVERSE-style BPE
tokenizer of a few thousand entries, both learned from the calibration set's train split.

    python -m xvq.demo.train --out xvq/demo/model [--steps 600] [--seed 0]

Deterministic for a given seed and torch build. Takes about 30 minutes on 2 CPU cores, under a minute on a GPU.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import click

DEMO_CONFIG = dict(
    architectures=["XverseForCausalLM"], model_type="xverse", hidden_size=256, intermediate_size=768,
    num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=1024, rms_norm_eps=1e-6,
    hidden_act="silu", initializer_range=0.02, tie_word_embeddings=False, use_cache=True,
    pad_token_id=1, bos_token_id=2, eos_token_id=3,
)
TOKENIZER_ENTRIES = 3000
PAD_ROWS_TO = 64  # like XVERSE (100,257 entries, 100,534 rows): rows past the tokenizer are padding


def training_ids(tokenizer, texts: list[str]):
    import torch
    eos = tokenizer.token_to_id("<|endoftext|>")
    ids: list[int] = []
    for t in texts:
        ids += tokenizer.encode(t).ids + [eos]
    return torch.tensor(ids, dtype=torch.long)


def batches(ids, seq: int, batch: int, gen):
    import torch
    n = len(ids) - seq - 1
    while True:
        starts = torch.randint(0, n, (batch,), generator=gen)
        x = torch.stack([ids[s:s + seq + 1] for s in starts.tolist()])
        yield x[:, :-1], x[:, 1:]


def train_step(model, opt, sched, x, y):
    """One AdamW step on next-token cross-entropy, gradients clipped at 1; returns the loss."""
    import torch
    loss = torch.nn.functional.cross_entropy(model(x).logits.flatten(0, 1), y.flatten())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    return loss


def heldout_loss(model, ids, seq: int, device: str) -> float:
    import torch
    n = (len(ids) - 1) // seq
    x = ids[: n * seq + 1]
    inputs, targets = x[:-1].view(n, seq), x[1:].view(n, seq)
    model.eval()
    with torch.no_grad():
        losses = [torch.nn.functional.cross_entropy(model(i.to(device)[None]).logits[0], t.to(device)).item()
                  for i, t in zip(inputs, targets)]
    model.train()
    return sum(losses) / len(losses)


@click.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path(__file__).parent / "model")
@click.option("--steps", default=800, show_default=True)
@click.option("--seq", default=512, show_default=True)
@click.option("--batch", default=16, show_default=True)
@click.option("--lr", default=1e-3, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda")
def main(out: Path, steps: int, seq: int, batch: int, lr: float, seed: int, device: str):
    import torch
    from tqdm import tqdm
    import xvq  # noqa: F401  (registers xverse with transformers)
    from transformers import AutoConfig, AutoModelForCausalLM
    from xvq.calib_data import corpus_texts, heldout_texts
    from xvq.fsio import atomic_output
    from xvq.synth import save_xverse_tokenizer, xverse_style_tokenizer

    torch.manual_seed(seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    texts = list(corpus_texts("train"))
    tok = xverse_style_tokenizer(texts, TOKENIZER_ENTRIES)
    n_tok = tok.get_vocab_size()
    config = DEMO_CONFIG | {"vocab_size": -(-n_tok // PAD_ROWS_TO) * PAD_ROWS_TO}
    ids = training_ids(tok, texts)
    heldout_ids = training_ids(tok, list(heldout_texts().values()))
    print(f"train split: {len(texts)} records, {len(ids)} tokens; held-out {len(heldout_ids)} tokens; "
          f"vocab {n_tok} entries, {config['vocab_size']} rows; device {device}")

    with atomic_output(out, is_dir=True) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp), dtype=torch.float32).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
        gen = torch.Generator().manual_seed(seed)
        data = batches(ids, seq, batch, gen)
        t0 = time.time()
        model.train()
        bar = tqdm(range(steps), desc="train demo")
        best = (float("inf"), None, 0)
        for step in bar:
            loss = train_step(model, opt, sched, *(t.to(device) for t in next(data)))
            if (step + 1) % 25 == 0 or step + 1 == steps:
                # the corpus is small: keep the weights that generalise best, not the last ones
                val = heldout_loss(model, heldout_ids, seq, device)
                if val < best[0]:
                    best = (val, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, step + 1)
                bar.set_postfix(loss=f"{loss.item():.3f}", heldout=f"{val:.3f}", best_step=best[2])
        model.load_state_dict(best[1])
        model = model.cpu().to(torch.bfloat16)
        model.save_pretrained(tmp)
        (tmp / "config.json").write_text(json.dumps(config | {"torch_dtype": "bfloat16"}, indent=2))
        save_xverse_tokenizer(tok, tmp)
        (tmp / "TRAINING.md").write_text(
            f"Trained by `python -m xvq.demo.train --steps {steps} --seq {seq} --batch {batch} --lr {lr} "
            f"--seed {seed}` on the xvq calibration set's train split ({len(ids)} tokens) in "
            f"{time.time() - t0:.0f} s on {device}; weights from step {best[2]} (best held-out loss "
            f"{best[0]:.3f}, perplexity {math.exp(best[0]):.1f} on the held-out split).\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
