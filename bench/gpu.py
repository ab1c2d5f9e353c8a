"""xvq's llama.cpp paths on a GPU against llama.cpp's own tools on the same GPU.

    .venv/bin/python bench/gpu.py           # CUDA: builds, measures, prints the table (~8 min on one GPU)
    .venv/bin/python bench/gpu.py --cpu     # the same comparison on the CPU, where no GPU is

One cmake build of the locked sdist's llama.cpp (vendor/llama.cpp; CUDA for the local GPU's
architecture only, shared libraries) serves both sides: llama-imatrix and llama-perplexity, and
the libllama that xvq's processes load through LLAMA_CPP_LIB_PATH (llama-cpp-python's switch,
which xvq's llama.cpp layer follows for ggml too), so both run the same sources built with the
same flags. `--cpu` uses the anchors' build (python -m xvq.anchors build) the same way.

The model is random and LLaMA-shaped, big enough that the GPU, not Python, sets the pace
(default width 4096, ffn 11008, 8 layers; XVERSE's 100,534-row vocabulary when ../shared has the
XVERSE-style tokenizer, else the demo's), converted to f16 by xvq and to Q4_K_M by llama-quantize.
Timed, each side in its own process, on the same text at ctx 512:

    imatrix   xvq quantize imatrix --gpu-layers auto    vs  llama-imatrix -ngl 99
    validate  xvq's GGUF scoring of the Q4_K_M file     vs  llama-perplexity -ngl 99
              (load + decode + NLL/KLD/top-1 statistics)     (load + decode + perplexity)

Tokens per second count the tokens each side evaluated (chunks x ctx).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHARED = Path(os.environ.get("XVQ_SHARED", ROOT.parent / "shared")) / "assets"
CACHE = ROOT / ".cache" / "bench" / "gpu"
CTX = 512
CMAKE_COMMON = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
                "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"]
TARGETS = ["llama", "llama-imatrix", "llama-perplexity", "llama-quantize"]


def build_llamacpp(cpu: bool) -> Path:
    """The folder holding the tools and the shared libraries of one build."""
    from xvq import anchors
    if cpu:
        anchors.build_tools()
        return anchors.build_dir() / "bin"
    if shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").is_file():
        sys.exit("nvcc not found: the CUDA toolkit is needed to build llama.cpp for this GPU (or run with --cpu)")
    build = CACHE / "build-cuda"
    env = dict(os.environ)
    if shutil.which("nvcc") is None:
        env["PATH"] = f"/usr/local/cuda/bin{os.pathsep}{env['PATH']}"
    t = time.perf_counter()
    subprocess.run(["cmake", "-S", str(anchors.sdist_dir()), "-B", str(build), *CMAKE_COMMON, "-DGGML_CUDA=ON",
                    "-DCMAKE_CUDA_ARCHITECTURES=native", "-DGGML_NATIVE=ON"], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2), "--target", *TARGETS],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    print(f"llama.cpp built for CUDA in {time.perf_counter() - t:.0f} s", flush=True)
    return build / "bin"


def make_model(width: int, ffn: int, layers: int) -> Path:
    from xvq.synth import tiny_config, write_random_safetensors
    tok = SHARED / "xverse-style-tokenizer"
    tok = tok if tok.is_dir() else ROOT / "xvq" / "demo" / "model"
    n_vocab = 100534 if tok.name == "xverse-style-tokenizer" else json.loads((tok / "config.json").read_text())["vocab_size"]
    d = CACHE / f"model-{width}x{layers}-{n_vocab}"
    if (d / "config.json").is_file():
        return d
    cfg = tiny_config("xverse", hidden_size=width, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=width // 128, vocab_size=n_vocab, max_position_embeddings=4096)
    write_random_safetensors(d, cfg, dtype="bfloat16", shard_bytes=2 << 30)
    for f in tok.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, d / f.name)
    return d


def timed(cmd: list, env: dict, log: Path, cwd: Path | None = None) -> tuple[float, str]:
    t = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd).returncode
    dt = time.perf_counter() - t
    text = log.read_text(errors="replace")
    if rc:
        sys.exit(f"{Path(str(cmd[0])).name} {' '.join(map(str, cmd[1:3]))} failed ({log}):\n{text[-1500:]}")
    return dt, text


def validate_child(gguf: str, model: str, text: str, threads: str) -> None:
    """In a process whose llama.cpp is the build under test: xvq's timed GGUF scoring pass."""
    from bench.validate import xvq_pass
    work = CACHE / "validate-work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    dt, n_windows = xvq_pass(Path(gguf), Path(model), Path(text), CTX, int(threads), work)
    print(json.dumps({"s": dt, "tokens": n_windows * CTX}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu", action="store_true", help="compare on the CPU (the anchors' build) instead of CUDA")
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--ffn", type=int, default=None)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--chunks", type=int, default=None, help="ctx-512 chunks of text per pass")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--validate-child", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.validate_child:
        return validate_child(*a.validate_child)
    from xvq.calib_data import calibration
    from xvq.convert import convert
    from xvq.llamacpp import default_threads
    # on a CPU the defaults keep the run to minutes on two cores
    width, ffn, layers = a.width or (1024 if a.cpu else 4096), a.ffn or (2816 if a.cpu else 11008), \
        a.layers or (2 if a.cpu else 8)
    chunks = a.chunks or (8 if a.cpu else 64)
    threads = a.threads or default_threads()
    CACHE.mkdir(parents=True, exist_ok=True)
    lib = build_llamacpp(a.cpu)
    env = dict(os.environ, LLAMA_CPP_LIB_PATH=str(lib))
    model = make_model(width, ffn, layers)
    f16, q4, im_ref = CACHE / f"{model.name}-f16.gguf", CACHE / f"{model.name}-q4_k_m.gguf", CACHE / "ref.imatrix"
    if not f16.is_file():
        convert(model, f16, "f16", progress=False)
    text = CACHE / "text.txt"
    text.write_text(calibration(budget_tokens=(chunks + 2) * CTX).text, encoding="utf-8")
    if not q4.is_file():
        timed([lib / "llama-quantize", f16, q4, "Q4_K_M"], env, CACHE / "quantize.log")
    ngl = ["-ngl", "0" if a.cpu else "99"]
    gl = "0" if a.cpu else "auto"
    logs = CACHE / "logs"
    logs.mkdir(exist_ok=True)
    rows = []

    t_ref, out = timed([lib / "llama-imatrix", "-m", f16, "-f", text.name, "-o", im_ref, "-c", CTX, "-b", CTX,
                        "--chunks", chunks, "--no-ppl", "-t", threads, *ngl], env, logs / "llama-imatrix.log", cwd=CACHE)
    t_xvq, out_x = timed([sys.executable, "-m", "xvq.cli", "quantize", "imatrix", f16, "-o", CACHE / "xvq.imatrix.gguf",
                          "--calib-file", text, "--ctx", CTX, "--calib-tokens", chunks * CTX, "--threads", threads,
                          "--gpu-layers", gl], env, logs / "xvq-imatrix.log", cwd=ROOT)
    rows.append(("imatrix", chunks * CTX, t_xvq, t_ref, device_line(out_x)))

    t_ppl, out = timed([lib / "llama-perplexity", "-m", q4, "-f", text, "-c", CTX, "--chunks", chunks,
                        "-t", threads, *ngl], env, logs / "llama-perplexity.log")
    n_ppl = int(m.group(1)) * CTX if (m := re.search(r"over (\d+) chunks", out)) else chunks * CTX
    child = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--validate-child", str(q4), str(model),
                            str(text), str(threads)], env=env, capture_output=True, text=True, cwd=ROOT)
    if child.returncode:
        sys.exit(f"xvq validate pass failed:\n{child.stderr[-1500:]}")
    r = json.loads(child.stdout.strip().splitlines()[-1])
    rows.append(("validate (Q4_K_M)", r["tokens"], r["s"], t_ppl * r["tokens"] / n_ppl, ""))
    print_table(rows, a.cpu, width, layers, model, threads)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))


def device_line(log: str) -> str:
    """The device xvq's imatrix progress line names: cpu, or gpu (the device's description)."""
    m = re.search(r"imatrix \S+ \((cpu|gpu \([^)]*\))\)", log)
    return m.group(1) if m else ""


def print_table(rows, cpu: bool, width: int, layers: int, model: Path, threads: int) -> None:
    n_vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    print(f"\n{'CPU' if cpu else 'CUDA'}, model width {width}, {layers} layers, vocabulary {n_vocab:,}, "
          f"ctx {CTX}, {threads} threads\n")
    print("| stage | tokens | xvq tok/s | llama.cpp tool tok/s | ratio (xvq / tool) | xvq says |")
    print("|---|---|---|---|---|---|")
    for stage, n, t_xvq, t_tool, says in rows:
        print(f"| {stage} | {n:,} | {n / t_xvq:,.0f} | {n / t_tool:,.0f} | {t_tool / t_xvq:.2f} | {says} |")
    print("\nwhole processes, load included; validate's tool time is scaled to the same number of tokens")


if __name__ == "__main__":
    main()
