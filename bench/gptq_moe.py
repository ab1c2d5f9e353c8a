"""MoE GPTQ: what forcing calibration tokens through starved experts buys.

A tiny XVERSE-MoE (8 experts of width 160, top-2, 2 shared, decisive routers) is quantized to
GPTQ-Int4 g32 on a small calibration budget twice: without forcing (each expert's Hessian from
its routed tokens only) and with experts under --min-tokens (default: the hidden size, below
which an expert's Hessian is rank-deficient) calibrated on every token. Per expert Linear, the
output error ||(W_q - W) X||^2 on HELD-OUT tokens routed to that expert (inputs from the f32
model) is divided by round-to-nearest's at the same bits/group: below 1 GPTQ helps.

    python bench/gptq_moe.py [--budget 768] [--min-tokens 256] [--out /tmp/xvq-bench-gptq-moe]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BITS, GROUP = 4, 32


def rtn(w, bits: int, group: int):
    """Symmetric round-to-nearest per row and group, GPTQ's grid (as tests/test_moe_quant.py)."""
    import torch
    maxq = 2 ** bits - 1
    g = w.reshape(w.shape[0], -1, group)
    scale = (2 * g.abs().amax(-1, keepdim=True) / maxq).clamp(min=1e-10)
    zero = (maxq + 1) / 2
    return (scale * (torch.clamp(torch.round(g / scale) + zero, 0, maxq) - zero)).reshape_as(w)


def make_model(folder: Path) -> Path:
    from tests.conftest import training_text
    from xvq.synth import make_checkpoint, save_xverse_tokenizer, tiny_config, xverse_style_tokenizer
    if not (folder / "config.json").is_file():
        save_xverse_tokenizer(xverse_style_tokenizer(training_text(), 1200), folder)
        n = len(json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"])
        make_checkpoint(folder, tiny_config("xverse-moe", vocab_size=n + 37), qk_scale=4.0, router_scale=10.0)
    return folder


def routed_inputs(model, batches, names: list[str]) -> dict:
    import torch
    inputs: dict[str, list] = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, i, n=n: inputs.setdefault(n, []).append(i[0].reshape(-1, i[0].shape[-1]))) for n in names]
    with torch.no_grad():
        for b in batches:
            model(b[None])
    for h in hooks:
        h.remove()
    return {n: torch.cat(v).double() for n, v in inputs.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=int, default=768, help="calibration tokens")
    ap.add_argument("--min-tokens", type=int, default=256)
    ap.add_argument("--out", type=Path, default=Path("/tmp/xvq-bench-gptq-moe"))
    args = ap.parse_args()
    import torch

    import xvq  # noqa: F401
    from transformers import AutoModelForCausalLM

    from bench.gptq import corpus_texts, eval_batches, gptq_v1_dequant, load_safetensors_folder
    from xvq.quantize.gptq import GptqSettings, quantize_gptq
    src = make_model(args.out / "tiny-xverse-moe")
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    names = [n for n, m in ref.named_modules() if ".experts." in n and isinstance(m, torch.nn.Linear)]
    held = routed_inputs(ref, eval_batches(src, corpus_texts(heldout=True), seq_len=128, n_seqs=16), names)
    runs = {}
    for label, min_tokens in (("routed only", 0), (f"forced < {args.min_tokens}", args.min_tokens)):
        out = args.out / f"gptq-min{min_tokens}"
        t0 = time.time()
        quantize_gptq(src, out, GptqSettings(calib_tokens=args.budget, max_seq_len=128, moe_min_tokens=min_tokens),
                      texts=corpus_texts(heldout=False))
        seconds = time.time() - t0
        tensors = load_safetensors_folder(out)
        rec = json.loads((out / "quantize_config.json").read_text())["xvq_expert_calibration"]["experts"]
        ratios, routed = {}, {}
        for n in names:
            w = ref.get_submodule(n).weight.detach().double()
            x = held[n]
            err_q = ((gptq_v1_dequant(tensors, n, BITS).double() - w) @ x.T).pow(2).sum().item()
            err_r = ((rtn(w.float(), BITS, GROUP).double() - w) @ x.T).pow(2).sum().item()
            key = "layer.{}.expert.{}".format(*n.split(".")[2:6:3])
            ratios[n], routed[n] = err_q / err_r, rec[key]["routed_tokens"]
        runs[label] = (ratios, routed, seconds, sum(v["forced"] for v in rec.values()))
    base_routed = runs["routed only"][1]
    starved = [n for n in names if base_routed[n] < args.min_tokens]
    rest = [n for n in names if n not in starved]
    print(f"\n{args.budget} calibration tokens, GPTQ-Int{BITS} g{GROUP}; {len(starved) // 3} of {len(names) // 3} "
          f"experts got < {args.min_tokens} routed tokens")
    print(f"{'calibration':22s} {'forced':>6s} {'starved GPTQ/RTN mean':>22s} {'max':>6s} {'others mean':>12s} {'time s':>7s}")
    for label, (ratios, _, seconds, n_forced) in runs.items():
        s = [ratios[n] for n in starved] or [float("nan")]
        o = [ratios[n] for n in rest] or [float("nan")]
        print(f"{label:22s} {n_forced:6d} {np.mean(s):22.3f} {max(s):6.3f} {np.mean(o):12.3f} {seconds:7.1f}")


if __name__ == "__main__":
    main()
