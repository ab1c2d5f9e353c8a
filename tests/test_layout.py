"""The one naming function: expected paths written out by hand, following XVERSE's own release
names (xverse-13b-chat-q4_k_m.gguf, XVERSE-13B-Chat-GPTQ-Int4)."""
from pathlib import Path

from xvq.layout import Layout, model_name, quant_tag, slug


def test_gguf_names_follow_xverse_releases():
    lay = Layout.for_model("/models/XVERSE-13B-Chat")
    assert lay.gguf("Q4_K_M") == Path("out/XVERSE-13B-Chat/gguf/xverse-13b-chat-q4_k_m.gguf")
    assert lay.gguf("f16") == Path("out/XVERSE-13B-Chat/gguf/xverse-13b-chat-f16.gguf")
    assert lay.gguf(" Q8_0 ") == Path("out/XVERSE-13B-Chat/gguf/xverse-13b-chat-q8_0.gguf")


def test_other_stage_folders():
    lay = Layout.for_model("/models/XVERSE-13B-Chat")
    assert lay.gptq(4) == Path("out/XVERSE-13B-Chat/gptq/XVERSE-13B-Chat-GPTQ-Int4")
    assert lay.gptq(8) == Path("out/XVERSE-13B-Chat/gptq/XVERSE-13B-Chat-GPTQ-Int8")
    assert lay.imatrix() == Path("out/XVERSE-13B-Chat/imatrix/xverse-13b-chat.imatrix.gguf")
    assert lay.validate_dir == Path("out/XVERSE-13B-Chat/validate")
    assert lay.release_dir == Path("out/XVERSE-13B-Chat/release")


def test_name_override_and_root():
    lay = Layout.for_model("/data/ckpt/final", name="Ziya-LLaMA-13B-v1", root="/srv/builds")
    assert lay.gguf("Q5_K_M") == Path("/srv/builds/Ziya-LLaMA-13B-v1/gguf/ziya-llama-13b-v1-q5_k_m.gguf")
    assert lay.gptq(4) == Path("/srv/builds/Ziya-LLaMA-13B-v1/gptq/Ziya-LLaMA-13B-v1-GPTQ-Int4")


def test_name_from_folder(tmp_path, monkeypatch):
    assert model_name("/models/XVERSE-65B/") == "XVERSE-65B"
    assert model_name("/models/XVERSE-65B", "Mine") == "Mine"
    d = tmp_path / "XVERSE-MoE-A4.2B"
    d.mkdir()
    monkeypatch.chdir(d)
    assert model_name(".") == "XVERSE-MoE-A4.2B"
    assert Layout.for_model(".").gguf("Q4_K_M") == Path("out/XVERSE-MoE-A4.2B/gguf/xverse-moe-a4.2b-q4_k_m.gguf")


def test_slug_and_quant_tag():
    assert slug("XVERSE 13B (Chat)") == "xverse-13b-chat"
    assert slug("XVERSE-7B-Chat") == "xverse-7b-chat"
    assert quant_tag("IQ4_XS") == "iq4_xs"


def test_ggufs_lists_finished_files_and_first_shards(tmp_path):
    lay = Layout("XVERSE-65B", tmp_path)
    lay.gguf_dir.mkdir(parents=True)
    for n in ["xverse-65b-f16.gguf", "xverse-65b-q4_k_m-00001-of-00012.gguf",
              "xverse-65b-q4_k_m-00002-of-00012.gguf", "xverse-65b-q4_k_m-00012-of-00012.gguf",
              ".xverse-65b-q8_0.gguf.xvq-tmp-123", "notes.txt"]:
        (lay.gguf_dir / n).write_text("")
    assert [p.name for p in lay.ggufs()] == ["xverse-65b-f16.gguf", "xverse-65b-q4_k_m-00001-of-00012.gguf"]
    assert Layout("Nothing", tmp_path).ggufs() == []
