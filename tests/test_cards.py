"""Cards, hub files, the release summary and quiet steps, against hand-written expectations
(fast; the end-to-end release is tests/test_release.py)."""
from __future__ import annotations

import json
import os
import sys

import pytest


def test_human_sizes():
    from xvq.release.card import human_size
    assert [human_size(n) for n in (512, 1_234, 9_500_000, 7_100_000_000)] == \
        ["512 B", "1.2 KB", "9.5 MB", "7.10 GB"]


def test_xverse_front_matter_is_license_other_with_name_and_link():
    from xvq.models.xverse import Xverse
    from xvq.release.card import front_matter
    head = front_matter(Xverse, "xverse/XVERSE-13B", ["gguf"]).splitlines()
    assert "license: other" in head and "license_name: xverse-model-license-agreement" in head
    assert f"license_link: {Xverse.license_link}" in head
    assert not any(line.startswith("license: apache") for line in head)


def test_modelscope_configuration_and_upload_commands(tmp_path):
    from xvq.release.publish import upload_commands, write_hub_files
    plain, remote = tmp_path / "A-GPTQ-Int4", tmp_path / "B-GPTQ-Int4"
    for d, cfg in ((plain, {"architectures": ["LlamaForCausalLM"]}), (remote, {"auto_map": {"AutoConfig": "x.Y"}})):
        d.mkdir()
        (d / "config.json").write_text(json.dumps(cfg))
        write_hub_files(d)
    assert json.loads((plain / "configuration.json").read_text()) == {"framework": "pytorch", "task": "text-generation"}
    assert json.loads((remote / "configuration.json").read_text())["allow_remote"] is True
    assert upload_commands(plain, "me") == [f"hf upload me/A-GPTQ-Int4 {plain} .",
                                            f"modelscope upload me/A-GPTQ-Int4 {plain}"]


def test_summary_table_rows_from_report(tmp_path):
    from xvq.release.summary import summary_lines
    report = {"artifacts": [
        {"path": "/o/gguf/x-q4_k_m.gguf", "kind": "gguf", "quant_type": "Q4_K_M", "size_bytes": 4_200_000,
         "bpw": 4.91, "kld_mean": 0.012345, "ppl_ratio": 1.0312, "passed": True},
        {"path": "/o/gptq/X-GPTQ-Int4", "kind": "gptq", "quant_type": "GPTQ-Int4", "size_bytes": 5_100_000,
         "bpw": None, "kld_mean": 0.5, "ppl_ratio": 1.5, "passed": False}]}
    (tmp_path / "X-GGUF").mkdir()
    (tmp_path / "X-GGUF" / "README.md").write_text("---\n")
    lines = summary_lines(report, tmp_path, tmp_path / "report.md")
    assert lines[-4].split() == ["artifact", "type", "size", "bits/w", "mean", "KLD", "PPL", "ratio", "gate"]
    assert lines[-2].split() == ["x-q4_k_m.gguf", "Q4_K_M", "4.2", "MB", "4.91", "0.01235", "1.0312", "pass"]
    assert lines[-1].split() == ["X-GPTQ-Int4", "GPTQ-Int4", "5.1", "MB", "n/a", "0.50000", "1.5000", "FAIL"]
    assert f"release folder: {tmp_path}" in lines
    assert sum("upload" in line for line in lines) == 2 + 1   # two commands for the one folder, and the heading


def test_quiet_steps_keep_library_output_in_the_log(tmp_path, capfd):
    """Python prints and bytes written straight to fd 1/2 (C code) go to the step's log; the
    console gets the step's bar."""
    from xvq.quiet import Always, Steps

    def noisy():
        print("python stdout")
        print("python stderr", file=sys.stderr)
        os.write(1, b"C stdout\n")
        os.write(2, b"C stderr\n")
    with Steps(Always(), tmp_path / "logs", verbose=False) as steps:
        steps.run("gptq-int4", {}, [], noisy)
    out, err = capfd.readouterr()
    log = (tmp_path / "logs" / "gptq-int4.log").read_text()
    for text in ("python stdout", "python stderr", "C stdout", "C stderr"):
        assert text in log and text not in out + err, text
    assert "gptq-int4" in err and "done" in err
    with pytest.raises(RuntimeError), Steps(Always(), tmp_path / "logs", verbose=False) as steps:
        steps.run("bad", {}, [], lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    out, err = capfd.readouterr()
    assert "failed" in err and f"its output: {tmp_path / 'logs' / 'bad.log'}" in err
    print("console again")
    assert "console again" in capfd.readouterr().out   # the streams are back


@pytest.mark.parametrize("config,files,remote,untested_line", [
    ({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, [], False, True),
    ({"architectures": ["XverseForCausalLM"], "auto_map": {"AutoConfig": "configuration_xverse.XverseConfig"}},
     ["modeling_xverse_moe.py"], True, False)])
def test_gptq_how_to_run_matches_what_was_tested(tmp_path, config, files, remote, untested_line):
    from xvq.release.card import gptq_how_to_run
    folder = tmp_path / "X-GPTQ-Int4"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    for f in files:
        (folder / f).write_text("")
    text = gptq_how_to_run(folder)
    assert ('from_pretrained("X-GPTQ-Int4", device_map="auto", trust_remote_code=True)' in text) == remote
    assert ("vLLM and SGLang" in text and "not tested" in text) == untested_line
    assert "vllm serve" not in text


def test_verbose_steps_show_everything(tmp_path, capfd):
    from xvq.quiet import Always, Steps
    with Steps(Always(), tmp_path / "logs", verbose=True) as steps:
        steps.run("convert", {}, [], lambda: (print("library says hi"), os.write(2, b"C says hi\n")))
    out, err = capfd.readouterr()
    assert "library says hi" in out and "C says hi" in err
    assert not (tmp_path / "logs").exists()
