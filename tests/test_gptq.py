"""GPTQ (xvq quantize gptq) on tiny structured checkpoints, against references:
- quality: KL divergence to the source model on held-out text vs hand-written round-to-nearest on
  the same grid (GPTQ must be <= 0.8x RTN's), perplexity ratio (4-bit <= 1.05, 8-bit <= 1.005);
- format: a hand-written GPTQ v1 dequantizer reads the safetensors and its model agrees with what
  transformers + GPTQModel's CPU kernel compute from the folder; config/tokenizer as shipped;
- loading: AutoModelForCausalLM after `import xvq`, LlamaForCausalLM, and plain transformers in a
  fresh process without xvq (dense XVERSE is saved as LlamaForCausalLM);
- bad input: clear one-line errors, no output folder left behind.
"""
from __future__ import annotations

import csv
import json
import re
import shutil
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("gptqmodel")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.gptq import (CALIB_TEXT, HELDOUT_TEXT, corpus_texts, dequantized_gptq_model, eval_batches, kl_and_ppl,  # noqa: E402
                        loaded_gptq_model, log_probs, rtn_dequant, rtn_model, source_model, structured_checkpoint,
                        unpack_rows)
from xvq.errors import XvqError  # noqa: E402

CALIB = dict(calib_tokens=4096, max_seq_len=256)


@pytest.fixture(scope="module")
def xverse_src(tmp_path_factory, xverse_tokenizer_dir) -> Path:
    """XVERSE as it ships: pickle shards, padded vocab, auto_map to its remote code."""
    d = structured_checkpoint(tmp_path_factory.mktemp("gptq-xverse"), "xverse", xverse_tokenizer_dir, fmt="bin")
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_xverse.XverseConfig",
                       "AutoModelForCausalLM": "modeling_xverse.XverseForCausalLM"}
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    (d / "modeling_xverse.py").write_text("# XVERSE's remote code travels with the checkpoint\n")
    return d


@pytest.fixture(scope="module")
def xverse_int4(xverse_src, tmp_path_factory) -> Path:
    from xvq.quantize.gptq import GptqSettings, quantize_gptq
    out = tmp_path_factory.mktemp("gptq-out") / "tiny-GPTQ-Int4"
    quantize_gptq(xverse_src, out, GptqSettings(max_shard_size="1MB", **CALIB), texts=corpus_texts(heldout=False))
    return out


@pytest.fixture(scope="module")
def heldout(xverse_tokenizer_dir):
    return eval_batches(xverse_tokenizer_dir, corpus_texts(heldout=True), seq_len=128, n_seqs=12)


# ---------------------------------------------------------------- references are what they claim

def test_rtn_reference_grid_by_hand():
    """4-bit symmetric GPTQ grid: scale = 2*max|w|/15, levels scale*(-8..7)."""
    w = torch.tensor([[1.5, -0.75, 0.1, 0.0]])
    s = 2 * 1.5 / 15
    expected = torch.tensor([[7 * s, round(-0.75 / s) * s, round(0.1 / s) * s, 0.0]])  # 1.5/s = 7.5 -> clamps at 7
    assert torch.allclose(rtn_dequant(w, 4, 4), expected)


def test_unpack_by_hand():
    packed = torch.tensor([[0x76543210]], dtype=torch.int32)
    assert unpack_rows(packed, 4, 8, 0).flatten().tolist() == list(range(8))
    assert unpack_rows(packed, 4, 8, 1).flatten().tolist() == list(range(8))


# ---------------------------------------------------------------- XVERSE 4-bit

def test_xverse_int4_beats_rtn(xverse_src, xverse_int4, heldout):
    ref = log_probs(source_model(xverse_src), heldout)
    rtn = kl_and_ppl(ref, log_probs(rtn_model(xverse_src, 4, 128), heldout), heldout)
    gptq = kl_and_ppl(ref, log_probs(dequantized_gptq_model(xverse_src, xverse_int4, 4), heldout), heldout)
    print(f"4-bit g128 KL: GPTQ {gptq['kl']:.6f} RTN {rtn['kl']:.6f} ratio {gptq['kl'] / rtn['kl']:.3f}; "
          f"ppl ratio {gptq['ppl_ratio']:.4f}")
    assert gptq["kl"] <= 0.8 * rtn["kl"]
    assert gptq["ppl_ratio"] <= 1.05


def test_xverse_int4_loads_and_matches_dequantized(xverse_src, xverse_int4, heldout):
    """transformers + GPTQModel's kernel (after `import xvq`) and the LLaMA class compute what the
    hand-written dequantizer says the file holds."""
    from transformers import LlamaForCausalLM
    batch = heldout[:4]
    auto = loaded_gptq_model(xverse_int4)
    assert type(auto).__name__ == "LlamaForCausalLM"   # saved as LLaMA: no XVERSE class needed
    assert "TorchAten" in type(auto.get_submodule("model.layers.0.mlp.down_proj")).__name__
    lp_auto = log_probs(auto, batch)
    lp_llama = log_probs(LlamaForCausalLM.from_pretrained(xverse_int4, device_map="cpu").eval(), batch)
    lp_deq = log_probs(dequantized_gptq_model(xverse_src, xverse_int4, 4), batch)
    assert torch.equal(lp_auto, lp_llama)
    assert kl_and_ppl(lp_deq, lp_auto, batch)["kl"] < 1e-4   # fp16 kernel arithmetic only


def test_xverse_int4_loads_in_a_fresh_process_without_xvq(xverse_src, xverse_int4, heldout, tmp_path):
    """Plain transformers (+ GPTQModel's kernel), no xvq importable, no remote code: the logits are
    those of the file's weights (hand-written dequantizer, f32) up to fp16 kernel arithmetic, and
    as close to the bf16 source as GPTQ's own error."""
    from tests.without_xvq import logits_without_xvq
    batch = heldout[:4]
    logits, cls = logits_without_xvq(xverse_int4, batch, tmp_path)
    assert cls == "transformers.models.llama.modeling_llama.LlamaForCausalLM"
    src = source_model(xverse_src)
    with torch.no_grad():
        src_logits = torch.cat([src(b[None]).logits.float() for b in batch])
    lp = torch.log_softmax(logits, -1)
    ref, deq = torch.log_softmax(src_logits, -1), log_probs(dequantized_gptq_model(xverse_src, xverse_int4, 4), batch)
    vs_deq, vs_src, deq_src = kl_and_ppl(deq, lp, batch), kl_and_ppl(ref, lp, batch), kl_and_ppl(ref, deq, batch)
    rel = float((logits - src_logits).abs().max() / (src_logits.max() - src_logits.min()))
    print(f"fresh-process LlamaForCausalLM vs bf16 source: max |logit diff| {float((logits - src_logits).abs().max()):.4f} "
          f"({rel:.4f} of the range), KLD {vs_src['kl']:.5f}, ppl ratio {vs_src['ppl_ratio']:.4f}, "
          f"top-1 {vs_src['top1']:.3f}; vs dequantized weights KLD {vs_deq['kl']:.2e}")
    assert vs_deq["kl"] < 1e-4
    assert vs_src["kl"] <= 1.1 * deq_src["kl"] + 1e-4 and vs_src["ppl_ratio"] <= 1.05


def test_xverse_int4_folder(xverse_src, xverse_int4):
    src_cfg = json.loads((xverse_src / "config.json").read_text())
    cfg = json.loads((xverse_int4 / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama" and "auto_map" not in cfg
    renamed = ("quantization_config", "torch_dtype", "architectures", "model_type", "auto_map", "rms_norm_eps")
    assert {k: v for k, v in cfg.items() if k not in renamed} == {k: v for k, v in src_cfg.items() if k not in renamed}
    assert cfg["rms_norm_eps"] == src_cfg.get("rms_norm_eps", 1e-6)
    assert cfg["torch_dtype"] == "float16"
    q = cfg["quantization_config"]
    assert q["xvq_source_model"]["architectures"] == ["XverseForCausalLM"] and q["xvq_source_model"]["model_type"] == "xverse"
    assert (q["quant_method"], q["bits"], q["group_size"], q["desc_act"], q["sym"]) == ("gptq", 4, 128, True, True)
    assert q["checkpoint_format"] == "gptq" and q["meta"]["static_groups"] and q["meta"]["true_sequential"]
    assert (q["damp_percent"], q["static_groups"], q["true_sequential"]) == (0.01, True, True)   # AutoGPTQ's keys
    assert q == json.loads((xverse_int4 / "quantize_config.json").read_text())
    assert "xvq:" in str(q["meta"]["quantizer"]) and "dataset" not in q
    assert not (xverse_int4 / "generation_config.json").exists()   # the source has none
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (xverse_int4 / name).read_bytes() == (xverse_src / name).read_bytes(), name
    assert not (xverse_int4 / "modeling_xverse.py").exists()   # config.json no longer names XVERSE's code
    shards = sorted(xverse_int4.glob("*.safetensors"))
    index = json.loads((xverse_int4 / "model.safetensors.index.json").read_text())
    assert len(shards) > 1 and set(index["weight_map"].values()) == {s.name for s in shards}
    from safetensors import safe_open
    dtypes = set()
    for s in shards:
        with safe_open(str(s), "pt") as f:
            dtypes |= {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"F16", "I32"}
    for f in xverse_int4.iterdir():
        text = f.read_text(errors="replace") if f.suffix in (".json", ".csv") else ""
        assert "/tmp" not in text and str(xverse_src) not in text and "xvq-gptq-" not in text, f.name
    assert not list(xverse_int4.parent.glob(".*xvq-tmp*")) and not list(xverse_int4.parent.glob(".xvq-gptq-work*"))


def test_xverse_int4_deterministic_and_pickle_read_in_place(xverse_src, xverse_int4, tmp_path):
    """Same seed and text -> the same weights, byte for byte (quant_log.csv differs in timings only),
    whether GPTQModel read the pickle shards in place (the fixture) or a safetensors copy of them."""
    from safetensors.torch import save_file

    from xvq.quantize.gptq import GptqSettings, quantize_gptq
    copy = tmp_path / "as-safetensors"
    shutil.copytree(xverse_src, copy, ignore=shutil.ignore_patterns("*.bin", "*.bin.index.json"))
    weight_map = {}
    for i, f in enumerate(sorted(xverse_src.glob("*.bin"))):
        state = torch.load(f, weights_only=True)
        save_file(state, copy / f"model-{i}.safetensors", metadata={"format": "pt"})
        weight_map |= dict.fromkeys(state, f"model-{i}.safetensors")
    (copy / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    again = tmp_path / "again"
    quantize_gptq(copy, again, GptqSettings(max_shard_size="1MB", **CALIB), texts=corpus_texts(heldout=False))
    shards = sorted(p.name for p in xverse_int4.glob("*.safetensors"))
    assert shards == sorted(p.name for p in again.glob("*.safetensors"))
    for name in shards + ["quantize_config.json", "model.safetensors.index.json"]:
        assert (again / name).read_bytes() == (xverse_int4 / name).read_bytes(), name


def test_pickle_shards_are_read_in_place_not_copied(xverse_src, tmp_path, monkeypatch):
    """What GPTQModel is handed for XVERSE's pickle shards: links to them and an index naming them,
    no weight copy, and GPTQModel's own reader returns the shard's tensors through it. A legacy
    (pre-zip) pickle, which cannot be memory-mapped, and a file system that cannot link are staged
    as safetensors instead."""
    import os

    import gptqmodel.utils.structure as lazy_reader
    from safetensors import safe_open
    from safetensors.torch import load_file

    import xvq.quantize.gptq_source as gptq_source
    from xvq.quantize.gptq_source import gptq_readable, staged_bytes
    shard = sorted(xverse_src.glob("*.bin"))[0]
    state = torch.load(shard, weights_only=True)
    name = next((k for k in state if k.endswith("down_proj.weight")), next(iter(state)))
    weights = sum(f.stat().st_size for f in xverse_src.glob("*.bin"))
    assert staged_bytes(xverse_src) == 0

    def written(folder: Path) -> int:
        return sum(f.lstat().st_size for f in folder.rglob("*") if f.is_file() or f.is_symlink())
    with gptq_readable(xverse_src, tmp_path / "work") as folder:
        assert written(tmp_path / "work") < weights / 20
        index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
        assert not any(Path(v).is_absolute() for v in index.values())   # no local path GPTQModel could copy
        with lazy_reader.safe_open(os.path.join(folder, index[name]), framework="pt", device="cpu") as h:
            assert torch.equal(h.get_tensor(name), state[name])
    assert lazy_reader.safe_open is safe_open   # restored

    def staged(src: Path, work: Path) -> dict:
        with gptq_readable(src, work) as folder:
            assert written(work) >= 0.9 * sum(f.stat().st_size for f in src.glob("*.bin"))
            return {k: v for f in folder.glob("*.safetensors") for k, v in load_file(f).items()}
    legacy = tmp_path / "legacy"
    shutil.copytree(xverse_src, legacy, ignore=shutil.ignore_patterns("*.bin", "*.bin.index.json"))
    torch.save(state, legacy / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    assert staged_bytes(legacy) > 0
    assert torch.equal(staged(legacy, tmp_path / "work2")[name], state[name])
    monkeypatch.setattr(gptq_source, "link", lambda target, name: False)
    assert torch.equal(staged(xverse_src, tmp_path / "work3")[name], state[name])


def test_keep_architecture_keeps_xverse_config(xverse_src, xverse_int4, tmp_path):
    """--keep-architecture: XVERSE's own config (architectures, auto_map) and remote code, as
    before; the default's LLaMA form differs from it in those keys only."""
    import shutil

    from xvq.models import family_for
    from xvq.quantize.gptq import GptqSettings, carry_source_files, loads_as, write_configs
    fam = family_for(json.loads((xverse_src / "config.json").read_text()))
    assert loads_as(fam, GptqSettings()) == "llama" and loads_as(fam, GptqSettings(keep_architecture=True)) is None
    out = tmp_path / "kept"
    out.mkdir()
    quant = {k: v for k, v in json.loads((xverse_int4 / "quantize_config.json").read_text()).items()
             if k != "xvq_source_model"}
    (out / "quantize_config.json").write_text(json.dumps(quant))
    write_configs(out, xverse_src, [], "float16", loads_as(fam, GptqSettings(keep_architecture=True)))
    carry_source_files(out, xverse_src, None)
    src_cfg = json.loads((xverse_src / "config.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    assert {k: v for k, v in cfg.items() if k not in ("quantization_config", "torch_dtype")} == \
        {k: v for k, v in src_cfg.items() if k != "torch_dtype"}
    assert "xvq_source_model" not in cfg["quantization_config"]
    assert (out / "modeling_xverse.py").read_bytes() == (xverse_src / "modeling_xverse.py").read_bytes()
    shutil.rmtree(out)


def test_gptq_help_names_what_loads_the_output():
    from click.testing import CliRunner

    from xvq.cli import main
    res = CliRunner().invoke(main, ["quantize", "gptq", "--help"])
    text = " ".join(res.output.split())
    assert res.exit_code == 0
    for phrase in ("--keep-architecture", "LlamaForCausalLM", "trust_remote_code=True", "without xvq"):
        assert phrase in text, phrase
    assert "vLLM" not in text   # not tested, so not claimed


# ---------------------------------------------------------------- LLaMA 8-bit through the CLI

@pytest.fixture(scope="module")
def spm_tokenizer_dir(tmp_path_factory) -> Path:
    """LLaMA / Ziya style: tokenizer.model (SentencePiece) only, no tokenizer.json."""
    from tests.test_delta import train_llama_spm, write_llama_tokenizer
    d = tmp_path_factory.mktemp("spm-tok")
    write_llama_tokenizer(d, train_llama_spm(d / "sp", (CALIB_TEXT + HELDOUT_TEXT) * 20, vocab_size=800))
    (d / "sp.model").unlink()
    (d / "sp.vocab").unlink(missing_ok=True)
    return d


def test_llama_spm_int8_cli_layout(tmp_path, spm_tokenizer_dir):
    """LLaMA with a SentencePiece vocabulary (Ziya's kind) through `xvq quantize gptq` and the layout."""
    from click.testing import CliRunner
    from transformers import AutoTokenizer

    from xvq.cli import main
    src = structured_checkpoint(tmp_path / "tiny-llama", "llama", spm_tokenizer_dir, num_key_value_heads=2)
    res = CliRunner().invoke(main, ["quantize", "gptq", str(src), "--out-root", str(tmp_path / "out"),
                                    "--bits", "8", "--calib-tokens", "4096"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    out = tmp_path / "out" / "tiny-llama" / "gptq" / "tiny-llama-GPTQ-Int8"
    # every calibration token reached GPTQ: windows cut at the model's 512 positions, not GPTQModel's trim
    tokens = int(re.search(r"(\d+) tokens\)", res.output).group(1))
    samples = {row["samples"] for row in csv.DictReader((out / "quant_log.csv").open())}
    assert 3000 < tokens <= 4096 and samples == {str(tokens)}
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert (out / "tokenizer.model").read_bytes() == (src / "tokenizer.model").read_bytes()
    assert not (out / "tokenizer.json").exists()
    text = corpus_texts(heldout=True)[0][:300]
    assert AutoTokenizer.from_pretrained(out)(text).input_ids == AutoTokenizer.from_pretrained(src)(text).input_ids
    batches = eval_batches(src, corpus_texts(heldout=True), seq_len=128, n_seqs=8)
    ref = log_probs(source_model(src), batches)
    r = kl_and_ppl(ref, log_probs(loaded_gptq_model(out), batches), batches)
    print(f"8-bit: KL {r['kl']:.2e} ppl ratio {r['ppl_ratio']:.5f}")
    assert abs(r["ppl_ratio"] - 1) <= 0.005
    # and as a user without xvq loads it: plain transformers in a fresh process
    from tests.without_xvq import logits_without_xvq
    logits, cls = logits_without_xvq(out, batches[:2], tmp_path / "fresh")
    assert cls == "transformers.models.llama.modeling_llama.LlamaForCausalLM"
    fresh = kl_and_ppl(ref[:2], torch.log_softmax(logits, -1), batches[:2])
    assert abs(fresh["ppl_ratio"] - 1) <= 0.005 and fresh["kl"] <= 2 * r["kl"] + 1e-5


# ---------------------------------------------------------------- bad input

def test_group_size_must_divide(xverse_src, tmp_path):
    from xvq.quantize.gptq import GptqSettings, quantize_gptq
    out = tmp_path / "x"
    with pytest.raises(XvqError, match=r"config.json: --group-size 96 does not divide .*self_attn.q_proj \(256\)"):
        quantize_gptq(xverse_src, out, GptqSettings(group_size=96), texts=["unused"])
    assert not out.exists() and not list(tmp_path.iterdir())


def test_bits_not_allowed(xverse_src, tmp_path):
    from click.testing import CliRunner

    from xvq.cli import main
    from xvq.quantize.gptq import GptqSettings, quantize_gptq
    with pytest.raises(XvqError, match="--bits 5"):
        quantize_gptq(xverse_src, tmp_path / "x", GptqSettings(bits=5), texts=["unused"])
    res = CliRunner().invoke(main, ["quantize", "gptq", str(xverse_src), "--bits", "5", "--outdir", str(tmp_path / "y")])
    assert res.exit_code != 0 and "--bits" in res.output
    assert not list(tmp_path.iterdir())


def test_no_calibration_text(xverse_src, tmp_path):
    from xvq.quantize.gptq import GptqSettings, quantize_gptq
    with pytest.raises(XvqError, match="no calibration text"):
        quantize_gptq(xverse_src, tmp_path / "x", GptqSettings(), texts=["", "hi"])
    assert not list(tmp_path.iterdir())


def test_calibration_is_seeded(xverse_tokenizer_dir):
    from transformers import AutoTokenizer

    from xvq.quantize.gptq import calibration_sequences
    tok = AutoTokenizer.from_pretrained(xverse_tokenizer_dir)
    texts = corpus_texts(heldout=False)

    def ids(seed):
        return [s["input_ids"] for s in calibration_sequences(tok, texts, 3000, 64, seed)]
    a, b = ids(0), ids(0)
    assert a == b and a != ids(1)
    assert all(len(s) == 64 for s in a[:-1]) and 16 <= len(a[-1]) <= 64
    assert 3000 - 16 < sum(map(len, a)) <= 3000


def test_damp_raised_is_reported_and_total_failure_refused(tmp_path):
    """GPTQModel raises damp by itself on a Cholesky failure; its per-module log says where."""
    from xvq.quantize.gptq import GptqSettings, check_damp
    s = GptqSettings()
    log = [{"layer": 0, "module": "self_attn.q_proj", "damp": "0.01000"},
           {"layer": 1, "module": "mlp.down_proj", "damp": "0.03000"}]
    assert check_damp(log, s, tmp_path) == ["layer 1 mlp.down_proj: damp 0.01 -> 0.0300"]
    with pytest.raises(XvqError, match="layer 1 mlp.down_proj stayed singular"):
        check_damp(log[:1] + [{"layer": 1, "module": "mlp.down_proj", "damp": 1.0}], s, tmp_path)


def test_local_paths_scrubbed_not_urls():
    """GPTQModel records its offload folder; a model folder named /model must not eat the URL."""
    from xvq.quantize.gptq import scrub_paths
    meta = {"uri": "https://github.com/modelcloud/gptqmodel", "offload_to_disk_path": "/data/x/.work/offload",
            "quantizer": ["gptqmodel:7.6.0"], "note": "/model/tmp", "dataset": ["calibration text"]}
    assert scrub_paths(meta, ["/model"]) == {"uri": "https://github.com/modelcloud/gptqmodel",
                                             "offload_to_disk_path": None, "quantizer": ["gptqmodel:7.6.0"],
                                             "note": None}
