"""`xvq delta`: Ziya-LLaMA's delta weights. References: the published merge computed here with
torch (target = base.to(delta.dtype) + delta), safetensors' own reader, transformers' logits and
sentencepiece's tokenization against llama.cpp (llama-cpp-python) on the converted merge."""
from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tests.conftest import FALLBACK_TEXT, shared
from xvq.errors import XvqError

N_USER_PIECES = 60   # Chinese characters added to the trained vocabulary (Ziya: 7,000+)
N_PAD_ROWS = 6       # config rows past the pieces (Ziya: 39,424 - 39,410 = 14)
NOVEL = ("corpus", "zh_classical", "西游记.txt")   # enough Chinese text to extend a vocabulary with
ZH_TEXTS = ["西游记是中国古典四大名著之一，讲述了唐僧师徒四人西天取经的故事。孙悟空神通广大，七十二变。",
            "话说天下大势，分久必合，合久必分。宝玉听了，忙问：“林妹妹在哪里？”",
            "我们今天去北京大学看看，然后吃饭。Hello 世界 2024年！"]


# --- fixtures: a LLaMA-style SentencePiece base, its Chinese extension, a published-style delta ---

def chinese_text() -> list[str]:
    """Chinese lines to train and extend on: the shared classical novels when present."""
    lines = [t for t in FALLBACK_TEXT[:6] if re.search(r"[\u4e00-\u9fff]", t)]
    novel = shared(*NOVEL, optional=True)
    if novel is not None:
        lines += [ln for ln in novel.read_text(encoding="utf-8")[:60_000].splitlines() if ln.strip()]
    return lines


def train_llama_spm(prefix: Path, texts: list[str], vocab_size: int = 1200) -> Path:
    """SentencePiece BPE with LLaMA's settings: byte fallback, split digits, <unk>/<s>/</s> = 0/1/2."""
    import sentencepiece as spm
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=str(prefix), model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, split_digits=True, character_coverage=0.98, hard_vocab_limit=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", num_threads=1, minloglevel=2)
    return prefix.with_suffix(".model")


def extend_spm(model_file: Path, out_file: Path, lines: list[str], n_new: int) -> list[str]:
    """Ziya's extension: common Chinese characters the base vocabulary lacks (byte-fallback there),
    appended as user-defined pieces by editing the protobuf."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    m = pb.ModelProto()
    m.ParseFromString(model_file.read_bytes())
    have = {p.piece for p in m.pieces}
    counts = Counter(ch for ln in lines for ch in re.findall(r"[\u4e00-\u9fff]", ln))
    new = [w for w, _ in counts.most_common() if w not in have][:n_new]
    for w in new:
        m.pieces.append(pb.ModelProto.SentencePiece(piece=w, score=0.0, type=pb.ModelProto.SentencePiece.USER_DEFINED))
    out_file.write_bytes(m.SerializeToString())
    return new


def write_llama_tokenizer(folder: Path, model_file: Path) -> None:
    shutil.copy(model_file, folder / "tokenizer.model")
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, **special}, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))


def fp16_bound(target: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|fl(b + fl(t - b)) - t| <= u(2|t| + |b|) (+ a subnormal step), u = 2^-11."""
    return 2.0 ** -11 * 1.01 * (2 * target.abs() + base.abs()) + 2.0 ** -23


@pytest.fixture(scope="module")
def ziya(tmp_path_factory):
    """base (f32 safetensors, 32k-style vocab), target (Ziya-style: extended vocab, fp16),
    delta made the published way (target - base in fp16, embed/lm_head whole, .bin shards,
    a stale rotary inv_freq buffer), and the test's own torch merge of base + delta."""
    from xvq.synth import make_checkpoint, save_pickle_shards, tiny_config
    root = tmp_path_factory.mktemp("ziya")
    lines = chinese_text()
    spm_base = train_llama_spm(root / "base-spm", FALLBACK_TEXT + lines[:40])
    spm_ext = root / "ext-spm.model"
    new_pieces = extend_spm(spm_base, spm_ext, lines, N_USER_PIECES)
    import sentencepiece as spm
    n_base, n_ext = spm.SentencePieceProcessor(model_file=str(spm_base)).vocab_size(), \
        spm.SentencePieceProcessor(model_file=str(spm_ext)).vocab_size()

    base_dir, target_dir, delta_dir = root / "llama-base", root / "Ziya-LLaMA-tiny-target", root / "ziya-delta"
    base_cfg = tiny_config("llama", vocab_size=n_base, bos_token_id=1, eos_token_id=2)
    base_model = make_checkpoint(base_dir, base_cfg, qk_scale=4.0)
    write_llama_tokenizer(base_dir, spm_base)
    base_state = {k: v.detach().clone() for k, v in base_model.state_dict().items()}

    # the fine-tune: base + small updates, vocabulary rows extended (new ones random)
    g = torch.Generator().manual_seed(7)
    target_cfg = base_cfg | {"vocab_size": n_ext + N_PAD_ROWS, "torch_dtype": "float16"}
    target = {}
    for k, v in base_state.items():
        t = v + 0.02 * v.std() * torch.randn(v.shape, generator=g)
        if v.shape[0] == n_base:
            t = torch.cat([t, 0.02 * torch.randn((n_ext + N_PAD_ROWS - n_base, *v.shape[1:]), generator=g)])
        target[k] = t.half()
    target_dir.mkdir()
    from safetensors.torch import save_file
    save_file(target, target_dir / "model.safetensors", metadata={"format": "pt"})
    (target_dir / "config.json").write_text(json.dumps(target_cfg, indent=2))
    write_llama_tokenizer(target_dir, spm_ext)

    # published delta: fp16 target - fp16 base; vocab tensors whole
    delta = {k: (t - base_state[k].half()) if t.shape == base_state[k].shape else t.clone()
             for k, t in target.items()}
    delta["model.layers.0.self_attn.rotary_emb.inv_freq"] = 1.0 / 10000 ** (torch.arange(0, 64, 2).float() / 64)
    delta_dir.mkdir()
    save_pickle_shards(delta, delta_dir, n_shards=2)
    (delta_dir / "config.json").write_text(json.dumps(target_cfg, indent=2))
    (delta_dir / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    write_llama_tokenizer(delta_dir, spm_ext)

    expected = {k: base_state[k].to(d.dtype) + d if d.shape == base_state[k].shape else d
                for k, d in delta.items() if not k.endswith("inv_freq")}
    merged_dir = root / "Ziya-LLaMA-tiny"
    from xvq.cli import main
    res = CliRunner().invoke(main, ["delta", "apply", "--base", str(base_dir), "--delta", str(delta_dir),
                                    "--outdir", str(merged_dir), "--shard-size", "1MB"])
    assert res.exit_code == 0, res.output
    return dict(root=root, base=base_dir, target=target_dir, delta=delta_dir, merged=merged_dir,
                base_state=base_state, target_state=target, delta_state=delta, expected=expected,
                n_base=n_base, n_ext=n_ext, new_pieces=new_pieces, spm=spm_ext, config=target_cfg)


def read_safetensors_folder(folder: Path) -> dict[str, torch.Tensor]:
    """With safetensors' own reader, through the index (the reference for what xvq wrote)."""
    from safetensors import safe_open
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out = {}
    for fname in sorted(set(index["weight_map"].values())):
        with safe_open(folder / fname, framework="pt") as f:
            for k in f.keys():
                assert index["weight_map"][k] == fname
                out[k] = f.get_tensor(k)
    return out


# --- apply / make / check ---

def test_apply_equals_published_merge_bit_for_bit(ziya):
    merged = read_safetensors_folder(ziya["merged"])
    expected = ziya["expected"]
    assert set(merged) == set(expected)  # inv_freq skipped, nothing else dropped or added
    for k, want in expected.items():
        got = merged[k]
        assert got.dtype == torch.float16 and got.shape == want.shape, k
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), k
    emb = merged["model.embed_tokens.weight"]
    assert emb.shape[0] == ziya["n_ext"] + N_PAD_ROWS  # the delta's extended rows, as they are
    assert len({f for f in json.loads((ziya["merged"] / "model.safetensors.index.json").read_text())
                ["weight_map"].values()}) > 1  # sharded at --shard-size
    assert json.loads((ziya["merged"] / "config.json").read_text()) == ziya["config"]
    for f in ("tokenizer.model", "tokenizer_config.json", "generation_config.json"):
        assert (ziya["merged"] / f).read_bytes() == (ziya["delta"] / f).read_bytes()


def test_merge_recovers_finetune_within_fp16_rounding(ziya):
    merged = read_safetensors_folder(ziya["merged"])
    for k, t in ziya["target_state"].items():
        b = ziya["base_state"][k]
        m, t32 = merged[k].float(), t.float()
        if t.shape != b.shape:
            assert torch.equal(m, t32), k
            continue
        excess = (m - t32).abs() - fp16_bound(t32, b.half().float())
        assert excess.max() <= 0, (k, float(excess.max()))


def test_make_is_the_published_delta(ziya, tmp_path):
    from xvq.cli import main
    out = tmp_path / "delta"
    res = CliRunner().invoke(main, ["delta", "make", "--base", str(ziya["base"]), "--target", str(ziya["target"]),
                                    "--outdir", str(out)])
    assert res.exit_code == 0, res.output
    made = read_safetensors_folder(out)
    want = {k: v for k, v in ziya["delta_state"].items() if not k.endswith("inv_freq")}
    assert set(made) == set(want)
    for k, v in want.items():
        assert torch.equal(made[k].view(torch.int16), v.view(torch.int16)), k
    assert (out / "tokenizer.model").read_bytes() == (ziya["target"] / "tokenizer.model").read_bytes()


def test_check_verifies_and_names_a_corrupted_tensor(ziya, tmp_path):
    from xvq.cli import main
    from xvq.delta import check_merge
    args = ["delta", "apply", "--base", str(ziya["base"]), "--delta", str(ziya["delta"])]
    ok = CliRunner().invoke(main, args + ["--check", str(ziya["merged"])])
    assert ok.exit_code == 0 and "verified" in ok.output, ok.output

    bad_dir = tmp_path / "merged"
    shutil.copytree(ziya["merged"], bad_dir)
    index = json.loads((bad_dir / "model.safetensors.index.json").read_text())
    name = "model.layers.1.mlp.down_proj.weight"
    from safetensors.torch import load_file, save_file
    shard = bad_dir / index["weight_map"][name]
    tensors = load_file(shard)
    tensors[name][3, 5] += 1.0
    save_file(tensors, shard, metadata={"format": "pt"})
    bad = check_merge(ziya["base"], ziya["delta"], bad_dir)
    assert [m.name for m in bad] == [name] and "1 of" in bad[0].reason
    res = CliRunner().invoke(main, args + ["--check", str(bad_dir)])
    assert res.exit_code != 0 and name in res.output


def _copy_delta_with(ziya, tmp_path, edit) -> Path:
    d = tmp_path / "delta"
    shutil.copytree(ziya["delta"], d)
    state = dict(ziya["delta_state"])
    edit(state)
    for f in d.glob("pytorch_model*"):
        f.unlink()
    from xvq.synth import save_pickle_shards
    save_pickle_shards(state, d, n_shards=1)
    return d


def test_shape_mismatch_names_the_tensor_and_writes_nothing(ziya, tmp_path):
    from xvq.delta import apply_delta
    name = "model.layers.1.self_attn.o_proj.weight"

    def widen(s):
        s[name] = torch.zeros(s[name].shape[0], s[name].shape[1] + 1, dtype=torch.float16)
    d = _copy_delta_with(ziya, tmp_path, widen)
    with pytest.raises(XvqError, match=re.escape(name)):
        apply_delta(ziya["base"], d, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_cli_refuses_to_overwrite_or_guess(ziya, tmp_path):
    from xvq.cli import main
    args = ["delta", "apply", "--base", str(ziya["base"]), "--delta", str(ziya["delta"])]
    before = sorted(p.name for p in ziya["delta"].iterdir())
    res = CliRunner().invoke(main, args + ["--outdir", str(ziya["delta"])])
    assert res.exit_code == 1 and "not empty" in res.output
    assert sorted(p.name for p in ziya["delta"].iterdir()) == before
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1 and "--outdir" in res.output and "--check" in res.output


def test_missing_tensor_is_named(ziya, tmp_path):
    from xvq.delta import apply_delta
    name = "model.layers.0.mlp.up_proj.weight"
    d = _copy_delta_with(ziya, tmp_path, lambda s: s.pop(name))
    with pytest.raises(XvqError, match=re.escape(name)):
        apply_delta(ziya["base"], d, tmp_path / "out")


@pytest.mark.parametrize("delta_dtype,base_dtype", [("bfloat16", "float32"), ("bfloat16", "float16"), ("float16", "float16"),
                                                    ("float16", "bfloat16"), ("float32", "bfloat16")])
def test_dtype_arithmetic_matches_torch(tmp_path, delta_dtype, base_dtype):
    """Rounding edge cases (ties, overflow to inf, subnormals, NaN) in every dtype pairing."""
    from safetensors.torch import save_file
    from xvq.delta import apply_delta
    from xvq.synth import tiny_config
    cfg = tiny_config("llama", vocab_size=64, hidden_size=32, num_hidden_layers=1, intermediate_size=48)
    g = torch.Generator().manual_seed(3)
    special = torch.tensor([65504.0, 65504.0, 3e38, 1e-7, -1e-7, float("nan"), float("inf"), 1.0 + 2 ** -8,
                            1.0 + 2 ** -11, 0.0, -0.0, 6e-5])
    shapes = {"model.embed_tokens.weight": (64, 32), "model.norm.weight": (32,),
              "model.layers.0.mlp.up_proj.weight": (48, 32)}

    def weights(seed_scale):
        out = {}
        for k, s in shapes.items():
            t = torch.randn(s, generator=g) * seed_scale
            t.view(-1)[:len(special)] = special
            out[k] = t
        return out
    base = {k: v.to(getattr(torch, base_dtype)) for k, v in weights(3.0).items()}
    delta = {k: v.to(getattr(torch, delta_dtype)) for k, v in weights(1e-2).items()}
    for folder, state in (("base", base), ("delta", delta)):
        (tmp_path / folder).mkdir()
        save_file(state, tmp_path / folder / "model.safetensors")
        (tmp_path / folder / "config.json").write_text(json.dumps(cfg))
    out = apply_delta(tmp_path / "base", tmp_path / "delta", tmp_path / "out")
    merged = read_safetensors_folder(out)
    for k in shapes:
        want = base[k].to(delta[k].dtype) + delta[k]
        assert merged[k].dtype == want.dtype, k
        bits = torch.int32 if want.dtype == torch.float32 else torch.int16
        same = merged[k].view(bits) == want.view(bits)
        both_nan = merged[k].isnan() & want.isnan()
        assert bool((same | both_nan).all()), k


# --- the merged model in llama.cpp ---

@pytest.fixture(scope="module")
def ziya_gguf(ziya):
    from xvq.cli import main
    out = ziya["root"] / "gguf" / "ziya-llama-tiny-f32.gguf"
    res = CliRunner().invoke(main, ["convert", str(ziya["merged"]), "--outtype", "f32", "--outfile", str(out)])
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def llm(ziya_gguf):
    from llama_cpp import Llama
    model = Llama(model_path=str(ziya_gguf), n_ctx=256, logits_all=True, verbose=False, n_threads=2)
    yield model
    model.close()


def test_converted_merge_logits_match_transformers(ziya, llm):
    shared(*NOVEL)   # the fallback text's few Chinese characters are all in the base vocabulary
    import sentencepiece as spm
    from transformers import AutoModelForCausalLM
    sp = spm.SentencePieceProcessor(model_file=str(ziya["spm"]))
    lines = sorted(chinese_text()[-40:], key=lambda t: -sum(i >= ziya["n_base"] for i in sp.encode(t)))
    ids = [1] + [i for line in lines for i in sp.encode(line)][:120]
    assert sum(i >= ziya["n_base"] for i in ids) >= 5  # the extended rows take part
    model = AutoModelForCausalLM.from_pretrained(ziya["merged"], dtype=torch.float32)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    llm.reset()
    llm.eval(ids)
    got = np.asarray(llm.scores[:len(ids)])
    assert got.shape == ref.shape == (len(ids), ziya["config"]["vocab_size"])
    err = np.abs(got - ref).max() / (ref.max() - ref.min())
    assert err <= 1e-3, err


def test_converted_merge_vocab_and_chat_template(ziya, ziya_gguf, llm):
    import gguf
    import jinja2
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(ziya["spm"]))
    reader = gguf.GGUFReader(ziya_gguf)
    field = reader.fields["tokenizer.ggml.tokens"]
    tokens = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
    n_vocab = ziya["config"]["vocab_size"]
    assert llm.n_vocab() == len(tokens) == n_vocab
    assert tokens[:sp.vocab_size()] == [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    assert tokens[ziya["n_base"]:ziya["n_ext"]] == ziya["new_pieces"]
    assert len(set(tokens)) == n_vocab  # the pad rows get names of their own
    types = reader.fields["tokenizer.ggml.token_type"]
    pad_types = {int(types.parts[types.data[i]][0]) for i in range(ziya["n_ext"], n_vocab)}
    assert pad_types == {gguf.TokenType.UNUSED}  # as llama.cpp's convert_hf_to_gguf.py pads

    template = llm.metadata["tokenizer.chat_template"]
    query = "  帮我写一份去西安的旅游计划 "
    prompt = jinja2.Template(template).render(messages=[{"role": "user", "content": query}],
                                              add_generation_prompt=True)
    assert prompt == "<human>:" + query.strip() + "\n<bot>:"  # Ziya's published inference prompt


def test_converted_merge_tokenizes_chinese_like_sentencepiece(ziya, llm):
    shared(*NOVEL)   # without the novel no extended piece would be exercised
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(ziya["spm"]))
    texts = ZH_TEXTS + chinese_text()[-40:]
    n_extended = 0
    for text in texts:
        want = sp.encode(text)
        got = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        assert got == want, (text, [sp.id_to_piece(i) for i in want], [sp.id_to_piece(i) for i in got])
        n_extended += sum(i >= ziya["n_base"] for i in want)
    assert n_extended >= 20  # the extended pieces are exercised, not just the base vocabulary
