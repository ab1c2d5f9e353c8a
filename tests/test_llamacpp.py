"""The llama.cpp layer's own contracts and the bugs found while consolidating it, each checked
against something the code does not produce itself (llama.cpp's own accessors, file sizes on
disk, hand-written unit values)."""
from __future__ import annotations

import ctypes
import json

import numpy as np
import pytest
from click.testing import CliRunner

from tests.conftest import DEMO
from xvq.errors import XvqError
from xvq.units import parse_size


@pytest.mark.parametrize("text,bytes_", [("4G", 4_000_000_000), ("48GB", 48_000_000_000), ("500M", 500_000_000),
                                         ("2GiB", 2 * 2**30), ("1.5KiB", 1536), ("3 T", 3 * 10**12),
                                         ("512MiB", 512 * 2**20), ("16g", 16_000_000_000)])
def test_one_size_rule(text, bytes_):
    assert parse_size(text) == bytes_


@pytest.mark.parametrize("text", ["48", "4 gigabytes", "G", "-1G", "1e9"])
def test_sizes_without_a_unit_are_refused_with_a_hint(text):
    with pytest.raises(XvqError) as e:
        parse_size(text, "--split-max-size")
    msg = str(e.value.message)
    assert "\n" not in msg and "--split-max-size" in msg and "4G" in msg
    if text == "48":
        assert "48G" in msg


@pytest.mark.parametrize("text,says", [("0", "give a number with a unit"), ("0G", "must be more than 0"),
                                       ("-1G", "give a number with a unit")])
def test_a_size_that_must_be_positive_says_so_once(text, says):
    """'--target-size 0' answered "did you mean 0G?", and then 0G was refused as not positive."""
    with pytest.raises(XvqError) as e:
        parse_size(text, "--target-size", minimum=1)
    assert says in e.value.message and "did you mean" not in e.value.message, e.value.message


def test_every_size_option_uses_the_rule(tmp_path):
    from xvq.cli import main
    for args in (["convert", str(tmp_path), "--split-max-size", "48"],
                 ["quantize", "gptq", str(tmp_path), "--max-shard-size", "4"],
                 ["fit", str(tmp_path), "--ram", "32"]):
        r = CliRunner().invoke(main, args)
        assert r.exit_code != 0 and "give a number with a unit" in r.output, (args, r.output)


def test_gguf_bpw_from_gguf_py():
    from xvq.llamacpp import parse_type, type_bpw
    assert type_bpw("Q4_K") == 4.5 and type_bpw("Q8_0") == 8.5 and type_bpw("Q6_K") == 6.5625   # ggml's block sizes
    assert parse_type("q4_k_m").bpw == 4.5 and parse_type("Q2_K").bpw == 2.625


def test_imatrix_rule():
    from xvq.llamacpp import parse_type
    auto = {t: parse_type(t).gets_imatrix(auto=True) for t in ("Q2_K", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "IQ2_M")}
    assert auto == {"Q2_K": True, "Q4_K_M": True, "Q5_K_M": True, "Q6_K": False, "Q8_0": False, "IQ2_M": True}
    assert parse_type("Q8_0").gets_imatrix(auto=False)          # an explicit file applies to every type


def test_gpu_layers_on_a_cpu_build():
    from xvq.llamacpp import resolve_gpu_layers, supports_gpu_offload
    if supports_gpu_offload():
        pytest.skip("this llama.cpp build has a GPU backend")
    assert resolve_gpu_layers("auto") == 0 and resolve_gpu_layers(0) == 0
    with pytest.raises(XvqError, match="no GPU backend.*GPU=cuda"):
        resolve_gpu_layers("99")
    with pytest.raises(XvqError, match="auto, 0"):
        resolve_gpu_layers("many")


# --- the graph tap: ggml's struct checked against the library itself ---------------------------

@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory, tiny_llama_gqa):
    from xvq.convert import convert
    out = tmp_path_factory.mktemp("llamacpp") / "tiny-f32.gguf"
    convert(tiny_llama_gqa, out, "f32", progress=False)
    return out


def test_tap_reads_the_activations_llama_cpp_computes(small_gguf):
    """Rows handed to the tap for attn_q are the normed hidden states: their count is the tokens."""
    from xvq.llamacpp import Gguf, MatMulTap
    seen = {}

    def collect(mm):
        x = mm.activations()
        seen[mm.weight] = (x.shape, float(np.abs(x).sum()))
    tap = MatMulTap(lambda mm: mm.weight == "blk.0.attn_q.weight", collect)
    with Gguf(small_gguf, gpu_layers=0) as m, m.context(64, tap=tap) as ctx:
        ctx.decode(m.tokenize("hello world, this is a test of the tap " * 3)[:32])
    shape, total = seen["blk.0.attn_q.weight"]
    assert shape[-2:] == (32, 256) and total > 0


def test_a_wrong_struct_layout_stops_with_one_line(small_gguf, monkeypatch):
    """A ggml whose ggml_tensor differs from the declared one must not be read as garbage."""
    from xvq.llamacpp import Gguf, MatMulTap
    from xvq.llamacpp import tap as T

    class Shifted(ctypes.Structure):   # `ne` one field late, as if ggml had inserted a member
        pass
    Shifted._fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("pad", ctypes.c_int64)] + \
        [f for f in T.GgmlTensor._fields_[2:]]
    monkeypatch.setattr(T, "GgmlTensor", Shifted)
    tap = MatMulTap(lambda mm: True, lambda mm: None)
    with Gguf(small_gguf, gpu_layers=0) as m, m.context(32, tap=tap) as ctx:
        with pytest.raises(XvqError, match="ggml_tensor layout differs"):
            ctx.decode(m.tokenize("hello world " * 8)[:16])


def test_fit_takes_ram_in_any_unit(small_gguf):
    """`xvq fit --ram 512M` raised a traceback (float('512M'))."""
    from xvq.cli import main
    r = CliRunner().invoke(main, ["fit", str(small_gguf), "--ram", "512M"])
    assert r.exit_code == 0 and "recommended for 0.512 GB" in r.output, r.output


# --- bugs found while consolidating ------------------------------------------------------------

def test_manifest_names_the_imatrix_dataset(tmp_path):
    """manifest.json read `im.dataset` (no such attribute): the dataset was always null."""
    from xvq.layout import Layout
    from xvq.quantize import Imatrix
    from xvq.pipeline.release import manifest_meta
    layout = Layout("Tiny", tmp_path)
    im = Imatrix(datasets=["xvq-calib-v1-65536-seed0"], chunk_count=3, chunk_size=512)
    im.sums["blk.0.ffn_up.weight"] = np.ones((1, 8))
    im.counts["blk.0.ffn_up.weight"] = np.array([4])
    im.save(layout.imatrix())
    meta = manifest_meta(DEMO, layout, {}, "0" * 64, [])
    assert meta["imatrix"]["dataset"] == "xvq-calib-v1-65536-seed0"
    assert meta["imatrix"]["chunks"] == 3 and meta["imatrix"]["entries"] == 1


def test_folder_with_both_formats_reports_its_real_size(tmp_path):
    """Repositories ship model.safetensors and pytorch_model.bin side by side: count one."""
    import torch
    from safetensors.torch import save_file
    from xvq.validate.artifacts import inspect
    d = tmp_path / "both"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "torch_dtype": "float16",
                                               "vocab_size": 16}))
    w = {"model.embed_tokens.weight": torch.zeros(16, 64, dtype=torch.float16)}
    save_file(w, str(d / "model.safetensors"))
    torch.save(w, d / "pytorch_model.bin")
    info = inspect(d)
    assert info.size_bytes == (d / "model.safetensors").stat().st_size


def test_expert_calibration_hook_is_per_model():
    """The MoE calibration hook was class state: a second model in the process saw it too."""
    import torch.nn as nn
    from transformers import PretrainedConfig
    from xvq.models.xverse_moe_hf import XverseMoeBlock
    from xvq.quantize.gptq_moe import expert_calibration
    from xvq.synth import tiny_config
    cfg = PretrainedConfig(**(tiny_config("xverse-moe") | {"hidden_size": 32, "intermediate_size": 16}))
    a, b = nn.Sequential(XverseMoeBlock(cfg)), nn.Sequential(XverseMoeBlock(cfg))
    with expert_calibration(a, n_tokens=8, min_tokens=1) as calib:
        assert a[0].calibration_hook is calib
        assert b[0].calibration_hook is None and XverseMoeBlock.calibration_hook is None
    assert a[0].calibration_hook is None


def test_header_data_offset_matches_gguf_py(small_gguf):
    """The fast header reader finds the start of tensor data where gguf-py's full reader does."""
    import gguf
    from xvq.llamacpp import read_header
    assert read_header(small_gguf).data_offset == gguf.GGUFReader(small_gguf).data_offset > 0


@pytest.mark.parametrize("qtype", ["Q4_K", "Q2_K", "Q8_0"])
def test_quantize_rows_in_slices_is_ggml_in_one_call(monkeypatch, qtype):
    """Big matrices are quantized a slice of rows per C call (a signal then waits a slice, not a
    whole 65B tensor): the bytes are ggml_quantize_chunk's over all rows at once."""
    from xvq.llamacpp import kernels
    rng = np.random.default_rng(0)
    rows, imatrix = rng.standard_normal((96, 512), dtype=np.float32), rng.random(512, dtype=np.float32) + 0.1
    whole = kernels.quantize_rows(qtype, rows, imatrix)
    monkeypatch.setattr(kernels, "QUANTIZE_VALUES_PER_CALL", 512 * 7)   # 7 rows a call: slices that do not divide 96
    assert np.array_equal(kernels.quantize_rows(qtype, rows, imatrix), whole)
