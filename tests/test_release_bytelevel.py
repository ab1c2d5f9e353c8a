"""`xvq release` end to end on a byte-level BPE LLaMA (LLaMA-3's tokenizer layout, tied embeddings,
llama3 RoPE scaling): every step runs, the package verifies, and the GGUFs keep what makes the
model what it is (gpt2 vocabulary, no output.weight, rope_freqs)."""
from __future__ import annotations

import json

import gguf
import pytest
from click.testing import CliRunner

from tests.conftest import byte_level_llama
from xvq.cli import main

pytestmark = pytest.mark.slow
ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}


def test_release_byte_level_tied_llama3(byte_level_tokenizer_dir, tmp_path):
    if json.loads((byte_level_tokenizer_dir / "tokenizer_config.json").read_text())["bos_token"] != "<|begin_of_text|>":
        pytest.skip("one byte-level layout is enough end to end")
    model = byte_level_llama(tmp_path / "BL-Tiny", byte_level_tokenizer_dir, rope_theta=500000.0, rope_scaling=ROPE)
    root = tmp_path / "out"
    r = CliRunner().invoke(main, ["release", str(model), "--out-root", str(root), "--gguf-type", "Q4_K_M",
                                  "--gguf-type", "Q8_0", "--gptq-bits", "4", "--max-tokens", "1024",
                                  "--calib-tokens", "4096"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    pkg = root / "BL-Tiny" / "release"
    for f in (pkg / "BL-Tiny-GGUF").glob("*.gguf"):
        kv = gguf.GGUFReader(f)
        names = {t.name for t in kv.tensors}
        assert "output.weight" not in names and "rope_freqs.weight" in names, f.name
        assert kv.fields["tokenizer.ggml.model"].contents() == "gpt2"
        assert kv.fields["tokenizer.ggml.pre"].contents() == "llama-bpe"
    report = json.loads((root / "BL-Tiny" / "validate" / "report.json").read_text())
    assert len(report["artifacts"]) == 3 and report["passed"] and all(a["passed"] for a in report["artifacts"])
    assert all(a["token_mismatch_rate"] == 0 for a in report["artifacts"])
    gptq = json.loads((pkg / "BL-Tiny-GPTQ-Int4" / "config.json").read_text())
    assert gptq["tie_word_embeddings"] is True and gptq["rope_scaling"]["rope_type"] == "llama3"
    v = CliRunner().invoke(main, ["release", "verify", str(pkg)], catch_exceptions=False)
    assert v.exit_code == 0, v.output
    # a sensitivity-chosen mix (reusing the release's imatrix) and fit on the same tied model
    m = CliRunner().invoke(main, ["quantize", "gguf", str(model), "--out-root", str(root), "--target-bpw", "5",
                                  "--calib-tokens", "4096"], catch_exceptions=False)
    assert m.exit_code == 0, m.output
    mixed = next((root / "BL-Tiny" / "gguf").glob("*bpw.gguf"))
    names = {t.name for t in gguf.GGUFReader(mixed).tensors}
    assert "output.weight" not in names and "rope_freqs.weight" in names
    f = CliRunner().invoke(main, ["fit", str(root / "BL-Tiny" / "gguf"), "--ram", "1G"], catch_exceptions=False)
    assert f.exit_code == 0 and "recommended for 1 GB" in f.output, f.output
