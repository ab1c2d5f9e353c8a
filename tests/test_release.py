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


def front_matter(card: str) -> dict:
    """The card's front matter, its `key: value` lines (lists left out)."""
    assert card.startswith("---\n")
    head = card.split("---")[1]
    return dict(line.split(": ", 1) for line in head.splitlines() if ": " in line and not line.startswith("-"))


def test_card_metadata_and_instructions(built):
    card = (package_dir(built[0]) / "XVERSE-Demo-GGUF" / "README.md").read_text()
    front = front_matter(card)
    assert front["base_model_relation"] == "quantized"
    # a model licence that is not SPDX: `other` + its id + its link (the hubs' convention)
    assert (front["license"], front["license_name"]) == ("other", "xverse-model-license-agreement")
    assert front["license_link"].startswith("https://")
    assert "XVERSE Model License Agreement" in card
    for how in ("llama-cli -m xverse-demo-q4_k_m.gguf", "ollama create xverse-demo -f Modelfile", "xvq run"):
        assert how in card, how
    sizes = re.findall(r"\| \[xverse-demo-[^|]+\| ([^|]+) \|", card)
    assert sizes and all(re.fullmatch(r"\d+\.\d (KB|MB)", s.strip()) for s in sizes), sizes   # not "0.00 GB"
    modelfile = (package_dir(built[0]) / "XVERSE-Demo-GGUF" / "Modelfile").read_text()
    assert 'PARAMETER stop "<|endoftext|>"' in modelfile and "Human: {{ .Prompt }}" in modelfile
    gptq = (package_dir(built[0]) / "XVERSE-Demo-GPTQ-Int4" / "README.md").read_text()
    assert 'from_pretrained("XVERSE-Demo-GPTQ-Int4", device_map="auto")' in gptq and "trust_remote_code" not in gptq
    assert "vLLM and SGLang" in gptq and "not tested" in gptq and "vllm serve" not in gptq
    assert front_matter(gptq)["license"] == "other"


def test_each_folder_has_what_both_hubs_read(built):
    """Hugging Face reads README.md's front matter; ModelScope also needs configuration.json."""
    for folder in ("XVERSE-Demo-GGUF", "XVERSE-Demo-GPTQ-Int4"):
        d = package_dir(built[0]) / folder
        assert front_matter((d / "README.md").read_text())["pipeline_tag"] == "text-generation"
        cfg = json.loads((d / "configuration.json").read_text())
        assert cfg == {"framework": "pytorch", "task": "text-generation"}, folder


def test_summary_table_and_upload_commands(built):
    """The run ends with one row per artifact (values as in report.json), where things are, and
    the upload commands per folder (it uploads nothing)."""
    root, output = built
    report = json.loads((root / "XVERSE-Demo" / "validate" / "report.json").read_text())
    lines = output.splitlines()
    for a in report["artifacts"]:
        row = next(line.split() for line in lines if line.startswith(Path(a["path"]).name + " "))
        assert float(row[-3]) == pytest.approx(a["kld_mean"], abs=5e-6)
        assert float(row[-2]) == pytest.approx(a["ppl_ratio"], abs=5e-5)
        assert row[-1] == ("pass" if a["passed"] else "FAIL")
    assert f"release folder: {package_dir(root)}" in output and "report.md" in output
    assert lines[-1].startswith(Path(report["artifacts"][-1]["path"]).name)   # it ends with the table
    # quiet: no library output (GPTQModel's INFO tables, torch warnings), each bar's refreshes on one line
    assert len(output.split("\n")) <= 80 and "INFO" not in output and "torch" not in output, output
    for folder in ("XVERSE-Demo-GGUF", "XVERSE-Demo-GPTQ-Int4"):
        assert f"hf upload <your-org>/{folder} {package_dir(root) / folder} ." in output
        assert f"modelscope upload <your-org>/{folder} {package_dir(root) / folder}" in output


def test_report_plot_names_the_model(built):
    report = json.loads((built[0] / "XVERSE-Demo" / "validate" / "report.json").read_text())
    assert report["reference"]["name"] == "XVERSE-Demo"   # the plot's title reads it (not "model")


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
    from xvq.pipeline.release import release as run_release
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
