"""Byte-level BPE LLaMA-family checkpoints (issue 22) against references: Hugging Face token ids on
the held-out text of all 41 languages + code, transformers' logits, llama.cpp's own converter
(its tensors and keys) and llama.cpp's own pre-tokenizer table in llama-vocab.cpp."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from tests.conftest import BYTE_LEVEL_PROBES, byte_level_llama
from tests.test_convert import gguf_logits, gguf_tensor_data, hf_logits, rel_max_diff
from xvq.convert import convert
from xvq.convert.vocab import read_vocab, write_vocab_only_gguf
from xvq.errors import XvqError
from xvq.llamacpp import pretok
from xvq.convert.tokparity import compare_tokenization

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               # short, so that most of a 64-wide head's frequencies are rescaled at 80 positions
               "original_max_position_embeddings": 64}
# keys xvq writes otherwise than llama.cpp's converter, each for a reason: the name (xvq's layout
# names files and models), head key/value lengths (the converter writes n_embd/n_head, which llama.cpp
# assumes when absent), add_eos/add_sep (the converter leaves them out or reads a pair template; xvq
# writes what HF does with one text, and llama.cpp's default for both is off).
NOT_COMPARED = {"general.name", "general.basename", "llama.attention.key_length", "llama.attention.value_length",
                "tokenizer.ggml.add_eos_token", "tokenizer.ggml.add_sep_token"}


def style(tok_dir: Path) -> str:
    bos = json.loads((tok_dir / "tokenizer_config.json").read_text())["bos_token"]
    return "llama3" if bos == "<|begin_of_text|>" else "smollm"


def heldout() -> list[dict]:
    from xvq.calib_data import records
    return records("heldout")


def llama_cpp_convert(model: Path, out: Path, pre: str, outtype: str = "f16") -> Path:
    """llama.cpp's convert_hf_to_gguf.py, run with its own gguf-py. It names byte-level
    pre-tokenizers by hashing sample tokenizations of tokenizers it has seen, so a tokenizer trained
    here is refused; its hash check alone is answered with `pre`, the rest is its own code."""
    from xvq import anchors
    wrapper = out.with_suffix(".py")
    wrapper.write_text(
        "import runpy, sys\n"
        f"sys.path.insert(0, {str(anchors.sdist_dir())!r})\n"
        "import conversion.base as base\n"
        f"base.TextModel.get_vocab_base_pre = lambda self, tokenizer: {pre!r}\n"
        f"runpy.run_path({str(anchors.convert_script())!r}, run_name='__main__')\n")
    env = os.environ | {"PYTHONPATH": str(anchors.gguf_py())}
    proc = subprocess.run([sys.executable, str(wrapper), str(model), "--outtype", outtype, "--outfile", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def fields(path: Path) -> dict:
    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if not k.startswith("GGUF.")}


def assert_same_as_llama_cpp_converter(model: Path, tmp_path: Path) -> dict:
    ours = convert(model, tmp_path / "ours.gguf", "f16", progress=False)[0]
    ours_kv = fields(ours)
    theirs = llama_cpp_convert(model, tmp_path / "theirs.gguf", ours_kv["tokenizer.ggml.pre"])
    theirs_kv = fields(theirs)
    keys = (set(ours_kv) | set(theirs_kv)) - NOT_COMPARED
    assert {k: ours_kv.get(k) for k in keys} == {k: theirs_kv.get(k) for k in keys}
    a, b = gguf_tensor_data(theirs), gguf_tensor_data(ours)
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    return ours_kv


# --- tokenizer ----------------------------------------------------------------------------------

def test_pre_tokenizer_chosen_from_the_declared_regex(byte_level_tokenizer_dir):
    v = read_vocab(byte_level_tokenizer_dir)
    assert (v.model, v.pre) == ("gpt2", {"llama3": "llama-bpe", "smollm": "smollm"}[style(byte_level_tokenizer_dir)])
    assert not v.scores and any(t.startswith("\u0120") for t in v.tokens)   # GPT-2's byte alphabet (Ġ = space)


def test_token_ids_equal_huggingface_in_every_language(byte_level_tokenizer_dir, tmp_path):
    """Held-out text of all 41 languages + code, and the probes (emoji, whitespace runs, digits,
    contractions): llama.cpp's ids are HF's, text for text."""
    path = write_vocab_only_gguf(tmp_path / "vocab.gguf", byte_level_tokenizer_dir)
    recs = heldout()
    texts = [r["text"] for r in recs] + BYTE_LEVEL_PROBES
    r = compare_tokenization(path, byte_level_tokenizer_dir, texts)
    assert len({x["lang"] for x in recs}) == 42
    assert r.n_equal == r.n_texts == len(texts), r.summary()
    special = compare_tokenization(path, byte_level_tokenizer_dir, ["<|im_start|>hi<|end_of_text|>"], special=True)
    assert special.n_equal == 1, special.summary()


def test_bos_as_huggingface_adds_it(byte_level_tokenizer_dir, tmp_path):
    """LLaMA-3's post-processor adds <|begin_of_text|>; SmolLM's adds nothing: the GGUF says the same."""
    from tokenizers import Tokenizer
    path = write_vocab_only_gguf(tmp_path / "vocab.gguf", byte_level_tokenizer_dir)
    hf = Tokenizer.from_file(str(byte_level_tokenizer_dir / "tokenizer.json"))
    kv = fields(path)
    assert kv["tokenizer.ggml.add_bos_token"] == (len(hf.encode("a").ids) > len(hf.encode("a", add_special_tokens=False).ids))
    assert kv["tokenizer.ggml.add_bos_token"] == (style(byte_level_tokenizer_dir) == "llama3")


def test_pre_tokenizer_table_is_llama_cpps(tmp_path):
    """Every entry of xvq.llamacpp.pretok, in llama.cpp's spelling, is what llama-vocab.cpp runs for
    that name: its name maps to a pre type whose regex_exprs are exactly these."""
    from xvq import anchors
    src = (anchors.sdist_dir() / "src" / "llama-vocab.cpp").read_text(encoding="utf-8")
    for p in pretok.PRE_TOKENIZERS:
        m = re.search(rf'tokenizer_pre == "{re.escape(p.name)}".*?pre_type = (LLAMA_VOCAB_PRE_TYPE_\w+);(.*?)\}}',
                      src, re.S)
        assert m, p.name
        assert ("ignore_merges = true" in m.group(2)) == p.ignore_merges, p.name
        case = re.search(rf"case {m.group(1)}:.*?regex_exprs = \{{(.*?)\}};", src, re.S).group(1)
        code = "\n".join(line.split("//")[0] if line.strip().startswith("//") else line for line in case.splitlines())
        literals = [bytes(s, "utf-8").decode("unicode_escape").encode("latin-1").decode("utf-8")
                    for s in re.findall(r'"((?:[^"\\]|\\.)*)"', code)]
        # llama.cpp writes some CR/LF as C escapes (the characters), some as regex escapes: the same regex
        as_escapes = [x.replace("\r", r"\r").replace("\n", r"\n") for x in literals]
        assert as_escapes == [pretok.llama_cpp_form(r) for r in p.splits], p.name


@pytest.mark.parametrize("pre_tokenizer, names", [
    ({"type": "Whitespace"}, "step Whitespace"),
    ({"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": r"\p{L}+|\s+"}, "behavior": "Isolated",
                                             "invert": False},
                                            {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]},
     r"\p{L}+|\s+"),
    ({"type": "ByteLevel", "add_prefix_space": True, "use_regex": True}, "add_prefix_space"),
])
def test_unknown_pre_tokenizer_is_one_line_naming_it(byte_level_tokenizer_dir, tmp_path, pre_tokenizer, names):
    tj = json.loads((byte_level_tokenizer_dir / "tokenizer.json").read_text())
    if pre_tokenizer["type"] == "Whitespace":
        pre_tokenizer = {"type": "Sequence", "pretokenizers": [pre_tokenizer, {"type": "ByteLevel", "use_regex": True}]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj | {"pre_tokenizer": pre_tokenizer}))
    with pytest.raises(XvqError) as e:
        read_vocab(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "tokenizer.json") in msg and names in msg


def test_normalizers_nfc_noted_others_refused(byte_level_tokenizer_dir, tmp_path):
    tj = json.loads((byte_level_tokenizer_dir / "tokenizer.json").read_text())
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj | {"normalizer": {"type": "NFC"}}))
    assert any("NFC" in n for n in read_vocab(tmp_path).notes)
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj | {"normalizer": {"type": "Lowercase"}}))
    with pytest.raises(XvqError, match="normalizer Lowercase"):
        read_vocab(tmp_path)


@pytest.mark.parametrize("model", [
    {"type": "WordPiece", "vocab": {"[UNK]": 0, "a": 1}, "unk_token": "[UNK]"},
    {"type": "Unigram", "vocab": [["<unk>", 0.0], ["a", -1.0]], "unk_id": 0},
])
def test_wordpiece_and_unigram_are_one_line_naming_them(tmp_path, model):
    (tmp_path / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": model, "added_tokens": []}))
    with pytest.raises(XvqError) as e:
        read_vocab(tmp_path)
    assert "\n" not in str(e.value) and model["type"] in str(e.value)


# --- weights: tied embeddings, RoPE scaling --------------------------------------------------------

@pytest.fixture(scope="module")
def tied(byte_level_tokenizer_dir, tmp_path_factory) -> Path:
    return byte_level_llama(tmp_path_factory.mktemp("tied"), byte_level_tokenizer_dir)


def ids_of(model: Path, n: int = 80) -> list[int]:
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    return tok.encode(" ".join(r["text"] for r in heldout()[:8]), add_special_tokens=False).ids[:n]


def test_tied_f32_logits_match_transformers(tied, tmp_path):
    f = convert(tied, tmp_path / "f32.gguf", "f32", progress=False)[0]
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(f).tensors}
    ids = ids_of(tied)
    assert len(ids) == 80
    assert rel_max_diff(hf_logits(tied, ids), gguf_logits(f, ids)) <= 1e-5   # the bar: 1e-3


def test_convert_says_which_pre_tokenizer_and_the_parity(tied, byte_level_tokenizer_dir, tmp_path):
    from click.testing import CliRunner
    from xvq.cli import main
    r = CliRunner().invoke(main, ["convert", str(tied), "--outfile", str(tmp_path / "m.gguf")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    pre = {"llama3": "llama-bpe", "smollm": "smollm"}[style(byte_level_tokenizer_dir)]
    assert f"byte-level BPE (tokenizer.ggml.model gpt2), llama.cpp pre-tokenizer '{pre}'" in r.output
    assert re.search(r"sample: (\d+)/\1 texts identical", r.output), r.output


def test_tied_same_tensors_and_keys_as_llama_cpp_converter(tied, tmp_path):
    kv = assert_same_as_llama_cpp_converter(tied, tmp_path)
    assert kv["tokenizer.ggml.model"] == "gpt2" and len(kv["tokenizer.ggml.merges"]) > 1000


def test_llama3_rope_logits_and_converter(byte_level_tokenizer_dir, tmp_path, monkeypatch):
    if style(byte_level_tokenizer_dir) != "llama3":
        pytest.skip("one tokenizer is enough for the weights")
    m = byte_level_llama(tmp_path / "m", byte_level_tokenizer_dir, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE)
    kv = assert_same_as_llama_cpp_converter(m, tmp_path)
    assert "llama.rope.scaling.type" not in kv
    f = convert(m, tmp_path / "f32.gguf", "f32", progress=False)[0]
    factors = gguf_tensor_data(f)["rope_freqs.weight"]
    assert factors.shape == (32,) and factors.min() == 1.0 and factors.max() == 8.0
    ids = ids_of(m)
    ref = hf_logits(m, ids)
    assert rel_max_diff(ref, gguf_logits(f, ids)) <= 1e-5
    # teeth: without the factors llama.cpp computes plain RoPE, measurably off
    import xvq.models.base as base
    monkeypatch.setattr(base.Family, "extra_tensors", lambda self: iter(()))
    plain = convert(m, tmp_path / "plain.gguf", "f32", progress=False)[0]
    assert rel_max_diff(ref, gguf_logits(plain, ids)) > 1e-3


@pytest.mark.parametrize("scaling", [
    {"type": "linear", "factor": 2.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "beta_fast": 32.0, "beta_slow": 1.0,
     "attention_factor": 1.1},
])
def test_linear_and_yarn_keys_as_llama_cpp_converter(byte_level_tokenizer_dir, tmp_path, scaling):
    if style(byte_level_tokenizer_dir) != "smollm":
        pytest.skip("one tokenizer is enough for the weights")
    m = byte_level_llama(tmp_path / "m", byte_level_tokenizer_dir, tie_word_embeddings=False, rope_scaling=scaling)
    kv = assert_same_as_llama_cpp_converter(m, tmp_path)
    assert kv["llama.rope.scaling.factor"] == scaling["factor"]


def test_unknown_rope_scaling_is_one_line(byte_level_tokenizer_dir, tmp_path):
    if style(byte_level_tokenizer_dir) != "smollm":
        pytest.skip("one tokenizer is enough")
    from xvq.models import family_for
    from xvq.synth import tiny_config
    with pytest.raises(XvqError, match="longrope") as e:
        family_for(tiny_config("llama", rope_scaling={"rope_type": "longrope", "factor": 4.0}), "m/config.json")
    assert str(e.value).startswith("m/config.json: ") and "\n" not in str(e.value)
