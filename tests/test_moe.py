"""XVERSE-MoE: the torch implementation against an independent naive loop (SGLang's semantics),
and the GGUF against it in llama.cpp (arch `deepseek`): f32 logits, Q8_0 KLD, greedy text."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import shared

torch = pytest.importorskip("torch")
llama_cpp = pytest.importorskip("llama_cpp")


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory, xverse_tokenizer_dir) -> Path:
    """8 experts, top-2, 2 shared (width 320), expert width 160 (not a multiple of 256), padded
    vocab, safetensors. Router weights enlarged so top-2 is decisive: random small routers make
    near-ties that either side may break differently, which would test rounding, not routing."""
    from xvq.synth import make_checkpoint, tiny_config
    d = tmp_path_factory.mktemp("tiny-xverse-moe")
    for f in xverse_tokenizer_dir.iterdir():
        shutil.copy(f, d / f.name)
    make_checkpoint(d, tiny_config("xverse-moe", vocab_size=n_tokenizer(d) + 37), qk_scale=4.0, router_scale=10.0)
    return d


@pytest.fixture(scope="module")
def reference(tiny_moe):
    """The checkpoint loaded the way GPTQ calibration and validate load it."""
    import xvq  # noqa: F401
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(tiny_moe, dtype=torch.float32).eval()


def _convert(tiny_moe: Path, outtype: str) -> Path:
    from xvq.convert.convert import convert
    out = tiny_moe / "gguf" / f"tiny-moe-{outtype}.gguf"
    if not out.exists():
        convert(tiny_moe, out, outtype, progress=False)
    return out


@pytest.fixture(scope="module")
def gguf_f32(tiny_moe) -> Path:
    return _convert(tiny_moe, "f32")


@pytest.fixture(scope="module")
def gguf_q8(tiny_moe) -> Path:
    return _convert(tiny_moe, "q8_0")


def prompt_ids(n_vocab_tok: int, n: int = 48, seed: int = 0) -> list[int]:
    return [int(i) for i in np.random.RandomState(seed).randint(4, n_vocab_tok, n)]


def llama_logits(path: Path, ids: list[int]) -> np.ndarray:
    # f32 KV cache: the default f16 cache alone moves these logits by ~1e-3 (3.5e-4 of their range)
    llm = llama_cpp.Llama(str(path), logits_all=True, n_ctx=256, n_threads=2, verbose=False,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    try:
        llm.eval(ids)
        return np.array(llm.scores[:len(ids)], dtype=np.float64)
    finally:
        llm.close()


def torch_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


def n_tokenizer(d: Path) -> int:
    return len(json.loads((d / "tokenizer.json").read_text())["model"]["vocab"])


# ---------------------------------------------------------------- family / config

def test_family_claims_real_moe_config_and_leaves_dense_to_xverse():
    from xvq.models import family_for
    from xvq.models.xverse import Xverse
    from xvq.models.xverse_moe import XverseMoe
    cfg = json.loads(shared("xverse-configs", "XVERSE-MoE-A4.2B", "config.json").read_text())
    fam = family_for(cfg)
    assert isinstance(fam, XverseMoe) and fam.gguf_arch == "deepseek"
    hp = fam.hp
    assert (hp.n_layer, hp.n_embd, hp.n_head, hp.n_expert, hp.n_expert_used, hp.n_shared_expert, hp.n_ff_exp) == \
        (28, 2560, 32, 64, 6, 2, 1728)
    assert hp.rope_theta == 500000.0 and fam.n_ff_shared == 3456
    shapes = fam.expected_shapes()
    assert shapes["model.layers.27.mlp.router.weight"] == (64, 2560)
    assert shapes["model.layers.0.mlp.experts.63.down_proj.weight"] == (2560, 1728)
    assert shapes["model.layers.0.mlp.shared_experts.gate_proj.weight"] == (3456, 2560)
    assert "model.layers.0.mlp.gate_proj.weight" not in shapes
    # the serving stacks' architecture name is accepted too; without num_experts it is dense XVERSE
    assert isinstance(family_for(cfg | {"architectures": ["XverseMoeForCausalLM"]}), XverseMoe)
    dense = {k: v for k, v in cfg.items() if k not in ("num_experts", "moe_top_k", "num_shared_experts")}
    assert type(family_for(dense)) is Xverse


# ---------------------------------------------------------------- torch implementation

def test_real_config_builds_the_published_model_on_meta_device():
    """XVERSE-MoE-A4.2B from its real config: 25.8B parameters, 4.2B of them active per token
    (6 of 64 experts), and exactly the tensor names/shapes the family expects in a checkpoint."""
    import transformers  # noqa: F401
    from transformers import AutoConfig
    from xvq.models import family_for
    from xvq.models.xverse_moe_hf import XverseMoeForCausalLM
    folder = shared("xverse-configs", "XVERSE-MoE-A4.2B")
    with torch.device("meta"):
        model = XverseMoeForCausalLM(AutoConfig.from_pretrained(folder))
    total = sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    assert round(total / 1e9, 1) == 25.8 and round((total - expert * (64 - 6) / 64) / 1e9, 1) == 4.2
    fam = family_for(json.loads((folder / "config.json").read_text()))
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == fam.expected_shapes()


def naive_moe(block, x: torch.Tensor, top_k: int) -> torch.Tensor:
    """SGLang's XverseMoE written out token by token from the raw weights: softmax over all
    experts, the top-k probabilities as weights (not renormalised), shared experts added."""
    def weights(m):
        return [getattr(m, n).weight.detach().double() for n in ("gate_proj", "up_proj", "down_proj")]

    def swiglu(w, v):
        g = w[0] @ v
        return w[2] @ (g * torch.sigmoid(g) * (w[1] @ v))
    experts = [weights(m) for m in block.experts]
    shared = weights(block.shared_experts)
    router = block.router.weight.detach().double()
    out = []
    for v in x.double():
        logits = router @ v
        p = torch.exp(logits - logits.max())
        p = p / p.sum()
        order = sorted(range(len(p)), key=lambda e: -float(p[e]))[:top_k]
        y = sum(float(p[e]) * swiglu(experts[e], v) for e in order)
        out.append(y + swiglu(shared, v))
    return torch.stack(out)


def test_moe_block_matches_naive_per_token_loop():
    import transformers  # noqa: F401  (before xvq.models.hf: xvq registers on transformers' import)
    from xvq.models.hf import XverseConfig
    from xvq.models.xverse_moe_hf import XverseMoeBlock, route
    from xvq.synth import tiny_config
    cfg = XverseConfig(**{k: v for k, v in tiny_config("xverse-moe").items() if k not in ("architectures",)})
    torch.manual_seed(1)
    block = XverseMoeBlock(cfg)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(2, 5, cfg.hidden_size)
    with torch.no_grad():
        got = block(x).reshape(-1, cfg.hidden_size).double()
        want = naive_moe(block, x.reshape(-1, cfg.hidden_size), cfg.moe_top_k)
        weights, _ = route(block.router(x.reshape(-1, cfg.hidden_size)), cfg.moe_top_k)
    assert block.shared_experts.gate_proj.weight.shape == (cfg.intermediate_size * 2, cfg.hidden_size)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # not renormalised: the kept probabilities of 2 of 8 experts sum to less than one
    assert float(weights.sum(-1).max()) < 0.99


def test_checkpoint_names_and_auto_class_round_trip(tiny_moe, reference, tmp_path):
    import xvq  # noqa: F401
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM
    from xvq.models.xverse_moe_hf import XverseMoeForCausalLM
    assert type(reference) is XverseMoeForCausalLM
    with safe_open(tiny_moe / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert {"model.layers.1.mlp.router.weight", "model.layers.1.mlp.experts.7.down_proj.weight",
            "model.layers.1.mlp.shared_experts.up_proj.weight"} <= names
    assert not any(".mlp.gate_proj." in n for n in names)
    assert set(reference.state_dict()) == names  # nothing missing, nothing extra
    reference.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    ids = prompt_ids(n_tokenizer(tiny_moe), 12)
    np.testing.assert_array_equal(torch_logits(again, ids), torch_logits(reference, ids))


def test_routing_is_decisive_in_the_test_model(tiny_moe, reference):
    """Guard for the parity tests below: the k-th and (k+1)-th router logits are apart (no
    near-ties to break differently), and the second expert's weight matters (real top-2)."""
    gaps, second = [], []

    def hook(mod, inp, out):
        top = out.float().sort(-1, descending=True).values
        gaps.append(float((top[:, 1] - top[:, 2]).min()))
        second.append(torch.softmax(out.float(), -1).sort(-1, descending=True).values[:, 1])
    handles = [layer.mlp.router.register_forward_hook(hook) for layer in reference.model.layers]
    try:
        torch_logits(reference, prompt_ids(n_tokenizer(tiny_moe)))
    finally:
        for h in handles:
            h.remove()
    assert min(gaps) > 1e-3
    assert float(torch.cat(second).median()) > 0.05


# ---------------------------------------------------------------- GGUF

def test_stacked_rows_read_one_expert_at_a_time():
    from xvq.models.base import SourceTensor
    from xvq.models.xverse_moe import stacked_rows
    rng = np.random.default_rng(0)
    mats = [rng.standard_normal((5, 3)).astype(np.float32) for _ in range(4)]
    calls = []

    def reader(e):
        def rows(sel):
            calls.append((e, sel if isinstance(sel, slice) else tuple(np.asarray(sel).tolist())))
            return mats[e][sel]
        return rows
    parts = [SourceTensor(f"e{e}", (5, 3), "F32", reader(e)) for e in range(4)]
    rows = stacked_rows(parts)
    full = np.concatenate(mats)
    np.testing.assert_array_equal(rows(slice(3, 12)), full[3:12])
    assert calls == [(0, slice(3, 5)), (1, slice(0, 5)), (2, slice(0, 2))]
    idx = np.array([19, 0, 6, 7, 4])
    np.testing.assert_array_equal(rows(idx), full[idx])
    np.testing.assert_array_equal(rows(slice(0, 20)), full)


def test_gguf_keys_and_stacked_experts(tiny_moe, gguf_f32):
    import gguf
    from safetensors.numpy import load_file
    r = gguf.GGUFReader(gguf_f32)

    def kv(key):
        return r.fields[key].contents()
    assert kv("general.architecture") == "deepseek"
    assert (kv("deepseek.expert_count"), kv("deepseek.expert_used_count"), kv("deepseek.expert_shared_count"),
            kv("deepseek.expert_feed_forward_length"), kv("deepseek.leading_dense_block_count")) == (8, 2, 2, 160, 0)
    assert kv("deepseek.expert_weights_scale") == 1.0 and kv("deepseek.rope.freq_base") == 500000.0
    t = {x.name: x for x in r.tensors}
    assert tuple(t["blk.1.ffn_gate_exps.weight"].shape) == (256, 160, 8)   # ggml ne order
    assert tuple(t["blk.1.ffn_down_exps.weight"].shape) == (160, 256, 8)
    assert tuple(t["blk.1.ffn_down_shexp.weight"].shape) == (320, 256)
    assert tuple(t["blk.1.ffn_gate_inp.weight"].shape) == (256, 8)
    w = load_file(tiny_moe / "model.safetensors")
    down = np.asarray(t["blk.1.ffn_down_exps.weight"].data)
    for e in (0, 5, 7):
        np.testing.assert_array_equal(down[e], w[f"model.layers.1.mlp.experts.{e}.down_proj.weight"])
    router = np.asarray(t["blk.0.ffn_gate_inp.weight"].data)
    np.testing.assert_array_equal(router, w["model.layers.0.mlp.router.weight"])


def test_f32_gguf_logits_match_torch(tiny_moe, reference, gguf_f32):
    ids = prompt_ids(n_tokenizer(tiny_moe))
    ref, got = torch_logits(reference, ids), llama_logits(gguf_f32, ids)
    err = np.abs(got - ref).max() / (ref.max() - ref.min())
    assert err < 1e-3, f"max |Δlogit| = {err:.2e} of the logit range"


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_q8_0_gguf_kld(tiny_moe, reference, gguf_q8):
    import gguf
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(gguf_q8).tensors}
    assert types["blk.0.ffn_down_exps.weight"] == "Q8_0" and types["blk.0.ffn_gate_inp.weight"] == "F32"
    ids = prompt_ids(n_tokenizer(tiny_moe), seed=1)
    p, q = log_softmax(torch_logits(reference, ids)), log_softmax(llama_logits(gguf_q8, ids))
    kld = float((np.exp(p) * (p - q)).sum(-1).mean())
    assert 0 <= kld <= 1e-3, f"KLD {kld:.2e}"


def test_greedy_generation_matches_reference(tiny_moe, reference, gguf_f32):
    ids = prompt_ids(n_tokenizer(tiny_moe), 8, seed=2)
    with torch.no_grad():
        want = reference.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, min_new_tokens=32,
                                  pad_token_id=1)[0, len(ids):].tolist()
    llm = llama_cpp.Llama(str(gguf_f32), n_ctx=256, n_threads=2, verbose=False,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    try:
        got = []
        for tok in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
            got.append(int(tok))
            if len(got) == 32:
                break
    finally:
        llm.close()
    assert got == want


# ---------------------------------------------------------------- GPTQ module tree

def test_gptqmodel_builds_layer_modules_from_family_tree(tiny_moe, reference):
    """GPTQModel expands the family's module tree on the tiny config into every Linear of a
    decoder layer but the router, each once, in forward order (attention, routed, shared)."""
    pytest.importorskip("gptqmodel")
    from gptqmodel import QuantizeConfig
    from xvq.models import family_for
    from xvq.quantize.gptq import qmodel_class
    fam = family_for(json.loads((tiny_moe / "config.json").read_text()))
    groups = qmodel_class(fam).simple_layer_modules(reference.config, QuantizeConfig(bits=4, group_size=32))
    experts = range(reference.config.num_experts)
    assert groups == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
        [f"mlp.experts.{e}.gate_proj" for e in experts] + [f"mlp.experts.{e}.up_proj" for e in experts],
        [f"mlp.experts.{e}.down_proj" for e in experts],
        ["mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj"], ["mlp.shared_experts.down_proj"],
    ]
    layer = reference.model.layers[0]
    linears = {n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    assert sorted(n for g in groups for n in g) == sorted(linears - {"mlp.router"})


# ---------------------------------------------------------------- what each quant type becomes

def test_effective_types_of_real_moe_by_hand():
    """XVERSE-MoE-A4.2B: rows of 1728 (experts' down) and 3456 (shared down) are not multiples of
    256, so k-quants fall back; Q4_K_M's extra bits on use_more_bits layers become Q8_0."""
    from xvq.models import family_for
    from xvq.quantize import effective_tensor_types
    fam = family_for(json.loads(shared("xverse-configs", "XVERSE-MoE-A4.2B", "config.json").read_text()))
    t = effective_tensor_types(fam, "Q4_K_M")
    more_bits = {0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 24, 25, 26, 27}  # i<28/8, i>=7*28/8, (i-3)%3==2
    for i in range(28):
        down = "Q8_0" if i in more_bits else "Q5_0"   # Q6_K -> Q8_0, Q4_K -> Q5_0
        assert (t[f"blk.{i}.ffn_down_exps.weight"], t[f"blk.{i}.ffn_down_shexp.weight"]) == (down, down)
        assert t[f"blk.{i}.ffn_gate_exps.weight"] == t[f"blk.{i}.ffn_up_shexp.weight"] == "Q4_K"  # rows of 2560
        assert t[f"blk.{i}.attn_v.weight"] == ("Q6_K" if i in more_bits else "Q4_K")
        assert t[f"blk.{i}.ffn_gate_inp.weight"] == t[f"blk.{i}.ffn_norm.weight"] == "F32"
    assert t["output.weight"] == "Q6_K" and t["token_embd.weight"] == "Q4_K"
    q2 = effective_tensor_types(fam, "Q2_K")
    assert q2["blk.3.ffn_down_exps.weight"] == "Q4_0" and q2["blk.3.ffn_up_exps.weight"] == "Q2_K"


@pytest.fixture(scope="module")
def moe_8_layers(tmp_path_factory, xverse_tokenizer_dir) -> tuple[Path, dict]:
    """8 layers (so the per-layer mix rules have first/last/every-third layers to pick), 4
    experts of width 96, f16 GGUF: the source llama.cpp's quantizer reads. Shipped as XVERSE
    ships (bf16 pickle shards, experts split across files) so stacking reads from those too."""
    from xvq.convert.convert import convert
    from xvq.synth import make_checkpoint, tiny_config
    d = tmp_path_factory.mktemp("moe-8-layers")
    for f in xverse_tokenizer_dir.iterdir():
        shutil.copy(f, d / f.name)
    cfg = tiny_config("xverse-moe", vocab_size=n_tokenizer(d), num_hidden_layers=8, num_experts=4,
                      intermediate_size=96)
    make_checkpoint(d, cfg, dtype="bfloat16", fmt="bin", max_shard_size="1MB")
    return convert(d, d / "moe8-f16.gguf", "f16", progress=False)[0], cfg


@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q4_K_S", "Q5_K_M", "Q3_K_M", "Q3_K_L", "Q2_K", "Q6_K", "Q4_0", "IQ4_XS"])
def test_effective_types_match_llama_cpp_quantizer(moe_8_layers, ftype, tmp_path):
    import ctypes
    import gguf
    from llama_cpp import llama_cpp as C
    from xvq.models import family_for
    from xvq.quantize import effective_tensor_types
    src, cfg = moe_8_layers
    params = C.llama_model_quantize_default_params()
    params.ftype = getattr(C, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = 2
    out = tmp_path / f"moe8-{ftype}.gguf"
    assert C.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params)) == 0
    got = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    want = effective_tensor_types(family_for(cfg), ftype)
    assert want == got
