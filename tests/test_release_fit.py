"""Laptop fit against llama.cpp's own memory report (weights + KV cache + compute buffer)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from xvq.llamacpp.memory import compute_buffer_bytes, gguf_shapes, kv_cache_bytes

MiB = 1 << 20
REPORT = r"""
import sys
from llama_cpp import Llama
Llama(sys.argv[1], n_ctx=int(sys.argv[2]), n_batch=512, n_ubatch=512, verbose=True, n_threads=1).close()
"""


def llama_cpp_reported(path: Path, ctx: int) -> dict[str, float]:
    """Buffer sizes llama.cpp prints when it loads the file (MiB)."""
    out = subprocess.run([sys.executable, "-c", REPORT, str(path), str(ctx)], capture_output=True, text=True).stderr
    grab = lambda pat: sum(float(x) for x in re.findall(pat, out))  # noqa: E731
    return {"model": grab(r"model buffer size =\s+([\d.]+) MiB"),
            "kv": grab(r"KV buffer size =\s+([\d.]+) MiB"),
            "compute": grab(r"compute buffer size =\s+([\d.]+) MiB"),
            "output": grab(r"output buffer size =\s+([\d.]+) MiB")}


def synthetic_gguf(path: Path, n_layer=10, n_embd=2048, n_ff=5632, n_head=16, n_head_kv=4, n_vocab=32000):
    """A LLaMA-shaped f16 GGUF of zeros (about 1.2 GB): shapes are all llama.cpp's memory depends on."""
    import gguf
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(16384); w.add_embedding_length(n_embd); w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff); w.add_head_count(n_head); w.add_head_count_kv(n_head_kv)
    w.add_rope_dimension_count(n_embd // n_head); w.add_layer_norm_rms_eps(1e-5); w.add_file_type(1)
    w.add_tokenizer_model("llama"); w.add_tokenizer_pre("default")
    w.add_token_list([f"t{i}" for i in range(n_vocab)]); w.add_token_scores([0.0] * n_vocab)
    w.add_token_types([1] * n_vocab)
    hd = n_embd // n_head
    shapes = {"token_embd.weight": (n_vocab, n_embd), "output_norm.weight": (n_embd,), "output.weight": (n_vocab, n_embd)}
    for i in range(n_layer):
        shapes |= {f"blk.{i}.attn_norm.weight": (n_embd,), f"blk.{i}.ffn_norm.weight": (n_embd,),
                   f"blk.{i}.attn_q.weight": (n_embd, n_embd), f"blk.{i}.attn_k.weight": (n_head_kv * hd, n_embd),
                   f"blk.{i}.attn_v.weight": (n_head_kv * hd, n_embd), f"blk.{i}.attn_output.weight": (n_embd, n_embd),
                   f"blk.{i}.ffn_gate.weight": (n_ff, n_embd), f"blk.{i}.ffn_up.weight": (n_ff, n_embd),
                   f"blk.{i}.ffn_down.weight": (n_embd, n_ff)}
    for name, shape in shapes.items():
        dtype = np.float32 if len(shape) == 1 else np.float16
        w.add_tensor_info(name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_ti_data_to_file()
    for name, shape in shapes.items():
        w.write_tensor_data(np.zeros(shape, np.float32 if len(shape) == 1 else np.float16))
    w.close()
    return path


def assert_estimate_close(path: Path, ctx: int):
    s = gguf_shapes(path)
    got = llama_cpp_reported(path, ctx)
    theirs = (got["model"] + got["kv"] + got["compute"] + got["output"]) * MiB
    ours = s.weights_bytes + kv_cache_bytes(s, ctx) + compute_buffer_bytes(s, ctx)
    assert got["model"] > 0 and got["compute"] > 0, got
    assert abs(kv_cache_bytes(s, ctx) - got["kv"] * MiB) <= 0.01 * got["kv"] * MiB
    assert abs(ours - theirs) <= 0.10 * theirs, (ours / MiB, got)


@pytest.fixture(scope="module")
def demo_f16(tmp_path_factory):
    from tests.conftest import DEMO
    from xvq.convert import convert
    if not DEMO.is_dir():
        pytest.skip("demo model not built")
    return convert(DEMO, tmp_path_factory.mktemp("fit") / "demo-f16.gguf", "f16", progress=False)[0]


@pytest.mark.parametrize("ctx", [4096, 8192])
def test_fit_matches_llama_cpp_on_demo(demo_f16, ctx):
    assert_estimate_close(demo_f16, ctx)


def test_fit_matches_llama_cpp_on_synthetic_1gb(tmp_path):
    path = synthetic_gguf(tmp_path / "synthetic-1b-f16.gguf")
    assert 1.0e9 < path.stat().st_size < 2.0e9
    for ctx in (4096, 16384):
        assert_estimate_close(path, ctx)


def test_fit_command_recommends_largest_that_fits(tmp_path, demo_f16):
    from click.testing import CliRunner
    from xvq.cli import main
    r = CliRunner().invoke(main, ["fit", str(demo_f16), "--ram", "8G"])
    assert r.exit_code == 0, r.output
    assert "recommended for 8 GB: demo-f16.gguf" in r.output
    r = CliRunner().invoke(main, ["fit", str(demo_f16), "--ram", "0.1G", "--ctx", "65536"])
    assert r.exit_code != 0 and "nothing fits 0.1 GB" in r.output, r.output
    # no machine has 0 bytes or 1 kB: a wrong unit, refused before any work
    for ram, says in (("0G", "must be more than 0"), ("1K", "1 kB is below 100 MB, e.g. 16G; did you mean 1G?")):
        r = CliRunner().invoke(main, ["fit", str(demo_f16), "--ram", ram])
        assert r.exit_code != 0 and says in r.output and "nothing fits" not in r.output, r.output


def test_run_generates_what_transformers_generates(tmp_path):
    """`xvq run` (greedy, llama.cpp) continues a prompt as transformers' greedy generate does."""
    import torch
    import xvq  # noqa: F401
    from click.testing import CliRunner
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from tests.conftest import DEMO
    from xvq.cli import main
    from xvq.convert import convert
    if not DEMO.is_dir():
        pytest.skip("demo model not built")
    gguf_path = convert(DEMO, tmp_path / "demo-f32.gguf", "f32", progress=False)[0]
    prompt = "The old lighthouse on the northern cape"
    r = CliRunner().invoke(main, ["run", str(gguf_path), "-p", prompt, "-n", "12"])
    assert r.exit_code == 0, r.output
    tok = AutoTokenizer.from_pretrained(DEMO)
    model = AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32)
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    expected = tok.decode(out[0], skip_special_tokens=True)
    assert r.output.strip().splitlines()[-1] == expected
