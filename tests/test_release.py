"""End to end on the demo model: build, validate, package, verify, resume, gate."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.conftest import DEMO
from xvq.cli import main

pytestmark = pytest.mark.slow
TYPES = ["--gguf-type", "Q4_K_M", "--gguf-type", "Q8_0"]
QUICK = ["--max-tokens", "2048", "--calib-tokens", "4096"]


def release(out_root: Path, *extra: str):
    return CliRunner().invoke(main, ["release", str(DEMO), "--name", "XVERSE-Demo", "--out-root", str(out_root),
                                     *TYPES, "--gptq-bits", "4", *QUICK, *extra], catch_exceptions=False)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    if not DEMO.is_dir():
        pytest.skip("demo model not built")
    root = tmp_path_factory.mktemp("release")
    r = release(root, "--allow-partial")
    assert r.exit_code == 0, r.output
    return root, r.output


def package_dir(root: Path) -> Path:
    return root / "XVERSE-Demo" / "release"


def card_rows(card: str) -> dict[str, list[str]]:
    """Rows of the card's first results table, by file name."""
    rows = {}
    for line in card.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 12 and cells[0].endswith((".gguf", "Int4", "Int8")):
            rows.setdefault(cells[0], cells)
    return rows


def test_package_has_every_file(built):
    root, _ = built
    pkg = package_dir(root)
    gguf_dir = pkg / "XVERSE-Demo-GGUF"
    assert sorted(p.name for p in gguf_dir.glob("*.gguf")) == ["xverse-demo-q4_k_m.gguf", "xverse-demo-q8_0.gguf"]
    for f in ("README.md", "Modelfile"):
        assert (gguf_dir / f).is_file()
    gptq = pkg / "XVERSE-Demo-GPTQ-Int4"
    assert (gptq / "quantize_config.json").is_file() and (gptq / "README.md").is_file()
    manifest = json.loads((pkg / "manifest.json").read_text())
    listed = {f["path"] for f in manifest["files"]}
    on_disk = {p.relative_to(pkg).as_posix() for p in pkg.rglob("*") if p.is_file()} - {"manifest.json", "SHA256SUMS"}
    assert listed == on_disk
    assert re.fullmatch(r"[0-9a-f]{64}", manifest["source_model"]["sha256"])
    assert manifest["tool_versions"]["llama-cpp-python"] == "0.3.36"
    assert manifest["imatrix"]["entries"] > 0


def test_card_metadata_and_instructions(built):
    card = (package_dir(built[0]) / "XVERSE-Demo-GGUF" / "README.md").read_text()
    front = card.split("---")[1]
    assert "base_model_relation: quantized" in front and "license: apache-2.0" in front
    assert "XVERSE Model License Agreement" in card
    for how in ("llama-cli", "LM Studio", "ollama create", "xvq run"):
        assert how in card
    modelfile = (package_dir(built[0]) / "XVERSE-Demo-GGUF" / "Modelfile").read_text()
    assert 'PARAMETER stop "<|endoftext|>"' in modelfile and "Human: {{ .Prompt }}" in modelfile
    assert "vllm serve" in (package_dir(built[0]) / "XVERSE-Demo-GPTQ-Int4" / "README.md").read_text()


def test_card_table_equals_report_json(built):
    root, _ = built
    report = json.loads((root / "XVERSE-Demo" / "validate" / "report.json").read_text())
    card = (package_dir(root) / "XVERSE-Demo-GGUF" / "README.md").read_text()
    rows = card_rows(card)
    ggufs = [a for a in report["artifacts"] if a["kind"] == "gguf"]
    assert set(rows) == {Path(a["path"]).name for a in ggufs}
    for a in ggufs:
        cells = rows[Path(a["path"]).name]
        assert float(cells[5]) == pytest.approx(a["perplexity"], abs=5e-5)
        assert float(cells[6]) == pytest.approx(a["ppl_ratio"], abs=5e-5)
        assert float(cells[7]) == pytest.approx(a["kld_mean"], abs=5e-6)
        assert float(cells[9].rstrip("%")) == pytest.approx(a["top1_agreement"] * 100, abs=5e-3)


def test_verify_passes_then_catches_corruption(built, tmp_path):
    import shutil
    pkg = tmp_path / "pkg"
    shutil.copytree(package_dir(built[0]), pkg)   # a copy: the hard links would corrupt the layout too
    r = CliRunner().invoke(main, ["release", "verify", str(pkg)])
    assert r.exit_code == 0, r.output
    target = pkg / "XVERSE-Demo-GGUF" / "xverse-demo-q8_0.gguf"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.unlink()
    target.write_bytes(bytes(data))
    r = CliRunner().invoke(main, ["release", "verify", str(pkg)])
    assert r.exit_code != 0
    assert "xverse-demo-q8_0.gguf: sha256 differs" in r.output


def test_gptq_folder_loads_in_transformers(built):
    import torch
    import xvq  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = package_dir(built[0]) / "XVERSE-Demo-GPTQ-Int4"
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu")
    ids = AutoTokenizer.from_pretrained(folder)("The old lighthouse", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape[-1] == json.loads((DEMO / "config.json").read_text())["vocab_size"]
    assert torch.isfinite(logits).all()


def test_second_run_does_almost_nothing(built):
    root, _ = built
    r = release(root, "--allow-partial")
    assert r.exit_code == 0, r.output
    assert "steps run: none;" in r.output


def test_gate_leaves_failures_out_and_exits_nonzero(built):
    """A threshold nothing meets: every artifact fails, none is packaged, exit status 1."""
    from xvq.release.pipeline import release as run_release
    root, _ = built
    res = run_release(DEMO, name="XVERSE-Demo", out_root=root, gguf_types=["Q4_K_M"], gptq_bits=[],
                      validate_options={"max_tokens": 2048, "thresholds": {"max_kld": 0.0}}, calib_tokens=4096,
                      log=lambda *_: None)
    assert res.included == []
    assert [Path(x["path"]).name for x in res.left_out] == ["xverse-demo-q4_k_m.gguf"]
    assert any("KLD" in reason or "kld" in reason for reason in res.left_out[0]["reasons"])
    assert not list(res.package.rglob("*.gguf"))


def test_split_package_gguf_loads_in_llama_cpp(tmp_path):
    """A GGUF over the package's size limit is rewritten as llama.cpp shards that load as one model
    and compute the same logits."""
    import numpy as np
    from llama_cpp import Llama
    from xvq.convert import convert
    from xvq.release.package import place_gguf, verify, write_sums
    if not DEMO.is_dir():
        pytest.skip("demo model not built")
    src = convert(DEMO, tmp_path / "src" / "xverse-demo-q8_0.gguf", "q8_0", progress=False)[0]
    pkg = tmp_path / "pkg"
    shards = place_gguf(src, pkg, max_bytes=2_000_000)
    assert len(shards) >= 2 and shards[0].name == "xverse-demo-q8_0-00001-of-%05d.gguf" % len(shards)
    assert all(s.stat().st_size < src.stat().st_size for s in shards)
    ids = list(range(5, 69))

    def logits(path):
        llm = Llama(str(path), n_ctx=128, logits_all=True, verbose=False)
        llm.eval(ids)
        out = np.array(llm.scores[:len(ids)])
        llm.close()
        return out
    np.testing.assert_array_equal(logits(shards[0]), logits(src))
    write_sums(pkg)
    assert verify(pkg) == []
