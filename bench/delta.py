"""`xvq delta apply` memory and time against the published merge (Ziya's apply_delta.py: both
models loaded whole with transformers in fp16, added, saved), on a LLaMA-shaped model of a few
hundred MB with Ziya's vocabulary extension (32,000 -> 39,424 rows).

    .venv/bin/python bench/delta.py                       # hidden 1024, 8 layers: ~330 MB + ~345 MB
    .venv/bin/python bench/delta.py --hidden 2048 --layers 8

Each merge runs in its own process; peak memory is sampled from /proc/self/status: RssAnon
(anonymous memory: what the process itself holds) and VmHWM (peak resident set, including the
memory-mapped pages of the inputs, which the kernel can drop at will). The two outputs are then
compared bit for bit with `check_merge` (xvq's verifier) and with safetensors' own reader.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Runs in a child: sample RssAnon while `work` runs, print one JSON line.
CHILD = r"""
import json, sys, threading, time
sys.path.insert(0, {root!r})

def status():
    out = {{}}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("RssAnon", "VmHWM", "VmRSS"):
            out[k] = int(v.split()[0]) * 1024
    return out

peak = {{"anon": 0}}
done = threading.Event()
def sample():
    while not done.is_set():
        peak["anon"] = max(peak["anon"], status()["RssAnon"])
        time.sleep(0.005)

{imports}
base_anon = status()["RssAnon"]
t = threading.Thread(target=sample, daemon=True); t.start()
t0 = time.perf_counter()
{work}
wall = time.perf_counter() - t0
done.set(); t.join()
s = status()
print("RESULT " + json.dumps({{"wall_s": wall, "peak_anon": max(peak["anon"], s["RssAnon"]),
                              "base_anon": base_anon, "vm_hwm": s["VmHWM"]}}))
"""

XVQ_IMPORTS = "from xvq.delta import apply_delta\nimport torch"
XVQ_WORK = "apply_delta({base!r}, {delta!r}, {out!r})"

# The published procedure (Fengshenbang-LM fengshen/utils/apply_delta.py, after FastChat's):
# both models whole in fp16, delta += base where shapes agree, delta saved with its tokenizer.
PUBLISHED_IMPORTS = "import torch\nfrom transformers import AutoModelForCausalLM"
PUBLISHED_WORK = """
base = AutoModelForCausalLM.from_pretrained({base!r}, dtype=torch.float16, low_cpu_mem_usage=True)
delta = AutoModelForCausalLM.from_pretrained({delta!r}, dtype=torch.float16, low_cpu_mem_usage=True)
bs = base.state_dict()
for name, param in delta.state_dict().items():
    if name in bs and param.shape == bs[name].shape:
        param.data += bs[name]
delta.save_pretrained({out!r})
"""


def make_models(root: Path, hidden: int, layers: int, n_base: int = 32000, n_ext: int = 39424) -> tuple[Path, Path]:
    """base: LLaMA-shaped fp16 safetensors; delta: Ziya-shaped fp16 pytorch_model-*.bin shards
    (vocab tensors whole, the rest small differences), as the published deltas ship."""
    import torch
    from safetensors.torch import save_file
    from xvq.synth import save_pickle_shards, tiny_config
    ff = int(hidden * 2.6875) // 64 * 64
    cfg = tiny_config("llama", hidden_size=hidden, intermediate_size=ff, num_hidden_layers=layers,
                      num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128, vocab_size=n_base,
                      max_position_embeddings=2048, bos_token_id=1, eos_token_id=2)
    g = torch.Generator().manual_seed(0)
    base, delta = {}, {}
    shapes = {"model.embed_tokens.weight": (n_base, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (n_base, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
                   **{p + f"self_attn.{x}_proj.weight": (hidden, hidden) for x in "qkvo"},
                   p + "mlp.gate_proj.weight": (ff, hidden), p + "mlp.up_proj.weight": (ff, hidden),
                   p + "mlp.down_proj.weight": (hidden, ff)}
    for name, shape in shapes.items():
        base[name] = (torch.randn(shape, generator=g) * 0.02).half()
        if shape[0] == n_base:
            delta[name] = (torch.randn((n_ext, *shape[1:]), generator=g) * 0.02).half()
        else:
            delta[name] = (torch.randn(shape, generator=g) * 1e-3).half()
    b, d = root / "llama-base", root / "ziya-delta"
    b.mkdir(), d.mkdir()
    save_file(base, b / "model.safetensors", metadata={"format": "pt"})
    (b / "config.json").write_text(json.dumps(cfg | {"torch_dtype": "float16"}, indent=2))
    save_pickle_shards(delta, d, n_shards=2)
    (d / "config.json").write_text(json.dumps(cfg | {"vocab_size": n_ext, "torch_dtype": "float16"}, indent=2))
    return b, d


def folder_bytes(folder: Path, suffixes=(".safetensors", ".bin")) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix in suffixes)


def run_child(imports: str, work: str) -> dict:
    code = CHILD.format(root=str(ROOT), imports=imports, work=work)
    env = os.environ | {"OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if res.returncode or line is None:
        raise SystemExit(f"child failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    os.environ["TQDM_DISABLE"] = "1"
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        base, delta = make_models(root, args.hidden, args.layers)
        sizes = folder_bytes(base), folder_bytes(delta)
        both = sum(sizes)
        rows = []
        for label, imports, work, out in (
                ("xvq delta apply", XVQ_IMPORTS, XVQ_WORK, root / "merged-xvq"),
                ("published apply_delta (transformers, fp16)", PUBLISHED_IMPORTS, PUBLISHED_WORK, root / "merged-published")):
            r = run_child(imports, work.format(base=str(base), delta=str(delta), out=str(out)))
            rows.append((label, r, out))

        from xvq.delta import check_merge
        # tensors only: transformers' save_pretrained rewrites config.json in its own form
        agree = {label: not [m for m in check_merge(base, delta, out) if m.kind == "tensor"] for label, _, out in rows}
        xvq_out, pub_out = rows[0][2], rows[1][2]
        same = tensors_equal(xvq_out, pub_out)

        mb = 1e6
        print(f"\nmodel: hidden {args.hidden}, {args.layers} layers; base {sizes[0] / mb:.0f} MB (fp16 safetensors), "
              f"delta {sizes[1] / mb:.0f} MB (fp16 .bin, vocab 32,000 -> 39,424); sum {both / mb:.0f} MB\n")
        print(f"{'merge':<44} {'wall s':>7} {'peak anon MB':>13} {'- start MB':>11} {'/ sum':>6} {'VmHWM MB':>9}  verified")
        for label, r, _ in rows:
            added = r["peak_anon"] - r["base_anon"]
            print(f"{label:<44} {r['wall_s']:>7.1f} {r['peak_anon'] / mb:>13.0f} {added / mb:>11.0f} "
                  f"{added / both:>6.2f} {r['vm_hwm'] / mb:>9.0f}  {'yes' if agree[label] else 'NO'}")
        x, p = rows[0][1], rows[1][1]
        print(f"\nxvq / published: peak anonymous memory added {(x['peak_anon'] - x['base_anon']) / max(1, p['peak_anon'] - p['base_anon']):.3f}, "
              f"wall {x['wall_s'] / p['wall_s']:.2f}; outputs bit-identical: {same}")
        print("'- start' is the peak less the process's anonymous memory after imports (python, numpy, torch).")


def tensors_equal(a: Path, b: Path) -> bool:
    """Every tensor of the two merged folders equal bit for bit, read with safetensors' own reader."""
    from safetensors import safe_open

    def load(folder):
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(f, framework="pt") as h:
                out |= {k: h.get_tensor(k) for k in h.keys()}
        return out
    ta, tb = load(a), load(b)
    keys = set(ta) & set(tb)
    import torch
    return bool(keys) and set(ta) == set(tb) and all(
        ta[k].dtype == tb[k].dtype and torch.equal(ta[k].view(torch.int16), tb[k].view(torch.int16)) for k in keys)


if __name__ == "__main__":
    main()
