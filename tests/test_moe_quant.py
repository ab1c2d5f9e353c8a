"""XVERSE-MoE quantization: per-expert importance statistics against llama.cpp's llama-imatrix
and the HF model's own routing; GPTQ with every expert calibrated on its routed tokens (starved
experts forced through the whole calibration set) against round-to-nearest written here; both
artifacts scored by `xvq validate`."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import FALLBACK_TEXT

torch = pytest.importorskip("torch")
pytest.importorskip("llama_cpp")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.gptq import corpus_texts, eval_batches, gptq_v1_dequant, kl_and_ppl, load_safetensors_folder  # noqa: E402

BITS, GROUP = 4, 32            # expert width 160 = 5 x 32: the automatic group size
CALIB = dict(calib_tokens=2048, max_seq_len=128)
N_CTX = 128


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory, xverse_tokenizer_dir) -> Path:
    """8 experts of width 160, top-2, 2 shared; routers enlarged so routing is decisive (no
    near-ties that llama.cpp and torch could break differently)."""
    from xvq.synth import make_checkpoint, tiny_config
    d = tmp_path_factory.mktemp("moe-quant") / "tiny-xverse-moe"
    shutil.copytree(xverse_tokenizer_dir, d)
    n_tok = len(json.loads((d / "tokenizer.json").read_text())["model"]["vocab"])
    make_checkpoint(d, tiny_config("xverse-moe", vocab_size=n_tok + 37), qk_scale=4.0, router_scale=10.0)
    return d


@pytest.fixture(scope="module")
def reference(tiny_moe):
    import xvq  # noqa: F401
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(tiny_moe, dtype=torch.float32).eval()


def routed_counts(model, batches) -> np.ndarray:
    """[layer, expert] tokens the HF model routes to each expert (hooks on the routers)."""
    from xvq.models.xverse_moe_hf import route
    layers = model.model.layers
    counts = np.zeros((len(layers), model.config.num_experts), np.int64)
    hooks = [layer.mlp.router.register_forward_hook(
        lambda m, inp, out, i=i: np.add.at(counts[i], route(out, model.config.moe_top_k)[1].reshape(-1).numpy(), 1))
        for i, layer in enumerate(layers)]
    with torch.no_grad():
        for b in batches:
            model(torch.as_tensor(b)[None])
    for h in hooks:
        h.remove()
    return counts


@pytest.fixture(scope="module")
def calibration(tiny_moe, reference):
    """The calibration sequences xvq's GPTQ builds, their full-precision routing, and a minimum
    that starves the few least-routed experts (the tiny text reaches all of them)."""
    from transformers import AutoTokenizer
    from xvq.quantize.gptq import calibration_sequences
    texts = corpus_texts(heldout=False)
    seqs = calibration_sequences(AutoTokenizer.from_pretrained(tiny_moe), texts, CALIB["calib_tokens"],
                                 CALIB["max_seq_len"], 0)
    counts = routed_counts(reference, [s["input_ids"] for s in seqs])
    min_tokens = int(np.sort(counts.reshape(-1))[3]) + 1
    return texts, sum(len(s["input_ids"]) for s in seqs), counts, min_tokens


@pytest.fixture(scope="module")
def gptq_out(tiny_moe, calibration):
    from xvq.quantize.gptq import GptqSettings, quantize_gptq
    texts, _, _, min_tokens = calibration
    out = tiny_moe.parent / "tiny-xverse-moe-GPTQ-Int4"
    result = quantize_gptq(tiny_moe, out, GptqSettings(moe_min_tokens=min_tokens, **CALIB), texts=texts)
    return out, result


@pytest.mark.slow
def test_default_budget_routes_every_expert(tiny_moe, reference):
    """At GPTQ's default budget (131,072 tokens of the calibration mix, sampled for the model's
    tokenizer) every expert of the tiny MoE is routed at least its input width of tokens (the
    default minimum), so none falls back to the forced pass; the counts are the HF model's own
    routing, printed per expert."""
    from transformers import AutoTokenizer
    from xvq.models import family_for
    from xvq.calib_data import calibration
    from xvq.quantize.gptq import GptqSettings, calibration_sequences
    from xvq.quantize.gptq_moe import min_expert_tokens
    budget, seq = GptqSettings().calib_tokens, 2048
    assert budget == 131072
    texts = calibration(budget_tokens=budget, tokenizer_dir=tiny_moe, seed=0).texts
    seqs = calibration_sequences(AutoTokenizer.from_pretrained(tiny_moe), texts, budget, seq, 0)
    n_tokens = sum(len(s["input_ids"]) for s in seqs)
    assert n_tokens >= 0.97 * budget
    counts = routed_counts(reference, [s["input_ids"] for s in seqs])
    fam = family_for(json.loads((tiny_moe / "config.json").read_text()))
    need = min_expert_tokens(n_tokens, None, fam.hp.n_embd)
    print(f"\n{n_tokens} calibration tokens; routed per expert (min {need}): {counts.tolist()}")
    assert (counts.sum(1) == n_tokens * reference.config.moe_top_k).all()
    assert (counts >= need).all(), counts


# ---------------------------------------------------------------- imatrix per expert

def test_per_expert_imatrix_matches_llama_imatrix_and_torch_routing(tiny_moe, reference, tmp_path):
    """xvq's imatrix and llama-imatrix on the same GGUF and text: one row per expert of each
    *_exps tensor, each over its routed tokens; the per-expert token counts are the HF model's
    routing of the same chunks, and each row the HF expert's input mean squares."""
    from xvq import anchors
    from xvq.convert import convert
    from xvq.models import family_for
    from xvq.llamacpp import Gguf
    from xvq.quantize.imatrix import Imatrix, chunks_of, compute_imatrix
    exe = anchors.tool("llama-imatrix", build=False)
    if exe is None:
        pytest.skip("llama.cpp tool llama-imatrix not built (python -m xvq.anchors build)")
    gguf = tmp_path / "moe-f32.gguf"
    convert(tiny_moe, gguf, "f32", progress=False)
    text = tmp_path / "calib.txt"
    text.write_text("\n".join(FALLBACK_TEXT[:30]))
    subprocess.run([str(exe), "-m", str(gguf), "-f", str(text), "-o", str(tmp_path / "ref.gguf"), "-c", str(N_CTX),
                    "-b", str(N_CTX), "--no-ppl", "-t", "1"], check=True, capture_output=True, text=True)
    ref = Imatrix.load(tmp_path / "ref.gguf")
    ours = compute_imatrix(gguf, text.read_text(), n_ctx=N_CTX, n_threads=1, progress=False)

    # the same chunks through the HF model: routing counts and experts' input squares
    with Gguf(gguf, vocab_only=True) as m:
        chunks = chunks_of(m.tokenize(text.read_text()), N_CTX, m.bos if m.add_bos else None)
    fam = family_for(json.loads((tiny_moe / "config.json").read_text()))
    n_layer, n_expert = fam.hp.n_layer, fam.hp.n_expert
    sums = {(i, p): np.zeros((n_expert, fam.hp.n_embd if p != "down" else fam.hp.n_ff_exp))
            for i in range(n_layer) for p in ("gate", "down")}
    hooks = []
    for i in range(n_layer):
        for e in range(n_expert):
            for p in ("gate", "down"):
                mod = reference.get_submodule(fam.expert_module_pattern.format(layer=i, expert=e, proj=p))
                hooks.append(mod.register_forward_pre_hook(
                    lambda mod, inp, k=(i, p), e=e: sums[k].__setitem__(
                        e, sums[k][e] + (inp[0].double() ** 2).sum(0).numpy())))
    counts = routed_counts(reference, chunks)
    for h in hooks:
        h.remove()

    cosines, lines = [], []
    for i in range(n_layer):
        for p in ("gate", "up", "down"):
            name = f"blk.{i}.ffn_{p}_exps.weight"
            assert ref.sums[name].shape[0] == n_expert
            np.testing.assert_array_equal(ours.counts[name], ref.counts[name], err_msg=name)
            # llama.cpp (f32 ggml) and torch route the same tokens to the same experts
            assert np.abs(ref.counts[name] - counts[i]).sum() <= 0.01 * counts[i].sum(), (name, ref.counts[name], counts[i])
            torch_rows = sums[(i, "down" if p == "down" else "gate")]
            for e in range(n_expert):
                a, b, t = ours.sums[name][e], ref.sums[name][e], torch_rows[e]
                cosines.append(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
                cosines.append(t @ b / np.linalg.norm(t) / np.linalg.norm(b))
            lines.append(f"{name}: llama-imatrix counts {ref.counts[name].tolist()}, torch routing differs by "
                         f"{int(np.abs(ref.counts[name] - counts[i]).sum())}")
    print("\n".join(lines), f"\nmin per-expert cosine {min(cosines):.6f}")
    assert min(cosines) >= 0.99


# ---------------------------------------------------------------- GPTQ

def test_automatic_group_size_divides_moe_widths(tmp_path):
    """No --group-size: 128 halved until it divides every width (real MoE: 1728/3456 -> 64,
    tiny: 160 -> 32); an explicit non-dividing size stays an error."""
    from tests.conftest import shared
    from xvq.errors import XvqError
    from xvq.models import family_for
    from xvq.quantize.gptq import GptqSettings, linear_input_widths, quantize_gptq
    from xvq.quantize.gptq_moe import resolve_group_size
    from xvq.synth import tiny_config
    assert resolve_group_size(GptqSettings(), linear_input_widths(family_for(tiny_config("xverse-moe")))).group_size == 32
    dense = linear_input_widths(family_for(tiny_config("xverse", intermediate_size=768)))
    assert resolve_group_size(GptqSettings(), dense).group_size == 128
    assert resolve_group_size(GptqSettings(), {"mlp.down_proj": 688}).group_size == 128   # nothing fits: the usual error
    assert resolve_group_size(GptqSettings(group_size=128), {"x": 160}).group_size == 128
    real = json.loads(shared("xverse-configs", "XVERSE-MoE-A4.2B", "config.json").read_text())
    assert resolve_group_size(GptqSettings(), linear_input_widths(family_for(real))).group_size == 64
    (tmp_path / "config.json").write_text(json.dumps(tiny_config("xverse-moe")))
    with pytest.raises(XvqError, match=r"--group-size 128 does not divide .*down_proj \(160\)"):
        quantize_gptq(tmp_path, tmp_path / "out", GptqSettings(group_size=128), texts=["unused"])


def test_every_expert_quantized_and_starved_experts_forced(gptq_out, calibration, reference):
    out, result = gptq_out
    _, n_tokens, fp_counts, min_tokens = calibration
    qcfg = json.loads((out / "quantize_config.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    assert (qcfg["bits"], qcfg["group_size"]) == (BITS, GROUP)
    assert cfg["architectures"] == ["XverseForCausalLM"] and cfg["quantization_config"]["group_size"] == GROUP

    # every routed and shared expert in GPTQ form; the router stays in floating point
    tensors = load_safetensors_folder(out)
    n_layer, n_expert = fp_counts.shape
    for i in range(n_layer):
        p = f"model.layers.{i}.mlp."
        for proj in ("gate", "up", "down"):
            for e in range(n_expert):
                assert f"{p}experts.{e}.{proj}_proj.qweight" in tensors
            assert f"{p}shared_experts.{proj}_proj.qweight" in tensors
        assert f"{p}router.weight" in tensors and f"{p}router.qweight" not in tensors

    # per-expert record: routed tokens while calibrated, forced below the minimum
    rec = qcfg["xvq_expert_calibration"]
    assert rec == cfg["quantization_config"]["xvq_expert_calibration"] and rec["min_tokens"] == min_tokens
    experts = rec["experts"]
    assert sorted(experts) == sorted(f"layer.{i}.expert.{e}" for i in range(n_layer) for e in range(n_expert))
    routed = np.array([[experts[f"layer.{i}.expert.{e}"]["routed_tokens"] for e in range(n_expert)]
                       for i in range(n_layer)])
    forced = {k for k, v in experts.items() if v["forced"]}
    assert (routed.sum(1) == n_tokens * reference.config.moe_top_k).all()
    assert forced == {f"layer.{i}.expert.{e}" for i in range(n_layer) for e in range(n_expert) if routed[i, e] < min_tokens}
    assert 0 < len(forced) < n_layer * n_expert
    assert rec["n_experts"] == n_layer * n_expert and rec["n_forced"] == len(forced)
    assert rec["forced_share"] == pytest.approx(len(forced) / (n_layer * n_expert))
    from xvq.release.card import moe_calibration_line
    assert f"{len(forced)} of {n_layer * n_expert} routed experts" in moe_calibration_line(out)
    # routing while calibrating (quantized attention, earlier layers quantized) ~ full precision
    assert np.abs(routed - fp_counts).sum() <= 0.1 * routed.sum()

    # GPTQModel's own per-module sample count: a forced expert's Hessian saw every calibration
    # token, the others exactly their routed tokens
    samples = {(int(r["layer"]), r["module"]): int(r["samples"]) for r in result.layers}
    for i in range(n_layer):
        for e in range(n_expert):
            want = n_tokens if f"layer.{i}.expert.{e}" in forced else routed[i, e]
            for proj in ("gate", "up", "down"):
                assert samples[(i, f"mlp.experts.{e}.{proj}_proj")] == want, (i, e, proj)
    print(f"\nrouted tokens per expert {routed.tolist()} (min {min_tokens}); forced {sorted(forced)}")


def rtn(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Symmetric round-to-nearest per row and group of `group` input columns, GPTQ's grid:
    scale = 2 max|w| / (2^bits - 1), integer levels 0..2^bits-1 around the midpoint."""
    maxq = 2 ** bits - 1
    g = w.reshape(w.shape[0], -1, group)
    scale = (2 * g.abs().amax(-1, keepdim=True) / maxq).clamp(min=1e-10)
    zero = (maxq + 1) / 2
    q = torch.clamp(torch.round(g / scale) + zero, 0, maxq)
    return (scale * (q - zero)).reshape_as(w)


def test_gptq_beats_round_to_nearest_and_runs_in_transformers(gptq_out, tiny_moe, reference, tmp_path):
    """KLD to the f32 reference on held-out text: GPTQ's weights (dequantized from its files)
    below RTN's at the same bits/group; the folder loads and runs in transformers."""
    import copy

    import xvq  # noqa: F401
    from transformers import AutoModelForCausalLM
    out, _ = gptq_out
    batches = eval_batches(tiny_moe, corpus_texts(heldout=True), seq_len=128, n_seqs=16)
    with torch.no_grad():
        ref_lp = torch.cat([torch.log_softmax(reference(b[None]).logits.float(), -1) for b in batches])
    tensors = load_safetensors_folder(out)
    quantized = [n for n, m in reference.named_modules() if isinstance(m, torch.nn.Linear) and f"{n}.qweight" in tensors]
    assert len(quantized) == 2 * (4 + 3 * 8 + 3)
    gptq_model, rtn_model = copy.deepcopy(reference), copy.deepcopy(reference)
    with torch.no_grad():
        for n in quantized:
            gptq_model.get_submodule(n).weight.copy_(gptq_v1_dequant(tensors, n, BITS))
            w = rtn_model.get_submodule(n).weight
            w.copy_(rtn(w, BITS, GROUP))
        lp = {k: torch.cat([torch.log_softmax(m(b[None]).logits.float(), -1) for b in batches])
              for k, m in (("gptq", gptq_model), ("rtn", rtn_model))}
    res = {k: kl_and_ppl(ref_lp, v, batches) for k, v in lp.items()}
    print(f"\nKLD GPTQ {res['gptq']['kl']:.5f} vs RTN {res['rtn']['kl']:.5f} "
          f"(ratio {res['gptq']['kl'] / res['rtn']['kl']:.3f}); top1 {res['gptq']['top1']:.3f} vs {res['rtn']['top1']:.3f}")
    assert 0 < res["gptq"]["kl"] < res["rtn"]["kl"]

    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float16).eval()
    with torch.no_grad():
        lp_loaded = torch.cat([torch.log_softmax(loaded(b[None]).logits.float(), -1) for b in batches[:2]])
    assert torch.isfinite(lp_loaded).all()
    # transformers' fp16 kernels vs the f32 dequantization of the files: the same model
    kl_loaded = kl_and_ppl(lp["gptq"][:2], lp_loaded, batches[:2])["kl"]
    print(f"KLD transformers-loaded (fp16) vs dequantized GPTQ {kl_loaded:.2e}")
    assert kl_loaded < 0.1 * res["gptq"]["kl"]
    # GPTQModel itself loads it through the family's definition (its own XVERSE one needs
    # transformers <= 4.38), from a view without auto_map: GPTQModel 7.6's remote-code config
    # compatibility pass (utils/hf.py normalize_hf_config_compat) resets rope_theta to 10000 when
    # config.json has an auto_map (measured here: log-probs off by 1.3)
    from xvq.models import family_for
    from xvq.quantize.gptq import qmodel_class
    view = tmp_path / "no-auto-map"
    shutil.copytree(out, view)
    cfg = json.loads((view / "config.json").read_text())
    cfg.pop("auto_map")
    (view / "config.json").write_text(json.dumps(cfg))
    fam = family_for(cfg)
    qm = qmodel_class(fam).from_quantized(str(view), device="cpu")
    with torch.no_grad():
        lp_qm = torch.log_softmax(qm.model(batches[:1]).logits.float(), -1)
    assert kl_and_ppl(lp["gptq"][:1], lp_qm, batches[:1])["kl"] < 0.1 * res["gptq"]["kl"]


def test_gptq_folder_loads_with_its_own_code_without_xvq(gptq_out, tiny_moe, reference, tmp_path):
    """The folder ships xvq's transformers-5 modeling file (auto_map): trust_remote_code=True loads
    it in a fresh process where xvq cannot be imported, and it computes what the file's weights
    (hand-written dequantizer, f32 reference model) compute, up to fp16 kernel arithmetic."""
    import copy

    from tests.without_xvq import logits_without_xvq
    from xvq.models.xverse_moe import XverseMoe
    out, _ = gptq_out
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["auto_map"] == XverseMoe.gptq_auto_map
    assert {"configuration_xverse.py", "modeling_xverse_moe.py"} <= {p.name for p in out.glob("*.py")}
    batches = eval_batches(tiny_moe, corpus_texts(heldout=True), seq_len=128, n_seqs=2)
    logits, cls = logits_without_xvq(out, batches, tmp_path, remote_code=True)
    assert cls.startswith("transformers_modules.") and cls.endswith(".modeling_xverse_moe.XverseMoeForCausalLM")
    tensors = load_safetensors_folder(out)
    deq = copy.deepcopy(reference)
    with torch.no_grad():
        for n, m in reference.named_modules():
            if isinstance(m, torch.nn.Linear) and f"{n}.qweight" in tensors:
                deq.get_submodule(n).weight.copy_(gptq_v1_dequant(tensors, n, BITS))
        lp = {k: torch.cat([torch.log_softmax(m(b[None]).logits.float(), -1) for b in batches])
              for k, m in (("ref", reference), ("deq", deq))}
    fresh = torch.log_softmax(logits, -1)
    vs_deq, vs_ref, deq_ref = (kl_and_ppl(lp["deq"], fresh, batches), kl_and_ppl(lp["ref"], fresh, batches),
                               kl_and_ppl(lp["ref"], lp["deq"], batches))
    print(f"\nremote-code MoE GPTQ in a fresh process: KLD vs dequantized {vs_deq['kl']:.2e}, vs source "
          f"{vs_ref['kl']:.5f} (dequantized vs source {deq_ref['kl']:.5f}), ppl ratio {vs_ref['ppl_ratio']:.4f}")
    assert vs_deq["kl"] < 0.1 * deq_ref["kl"]


def test_validate_scores_gguf_and_gptq(tiny_moe, gptq_out, tmp_path):
    from xvq.convert import convert
    from xvq.validate import validate
    out, _ = gptq_out
    q8 = tmp_path / "tiny-xverse-moe-Q8_0.gguf"
    convert(tiny_moe, q8, "q8_0", progress=False)
    texts = {"en": " ".join(corpus_texts(heldout=True))[:6000]}
    report = validate(tiny_moe, [q8, out], text=texts, ctx=64, max_tokens=1024, report_dir=tmp_path / "rep",
                      progress=False)
    for art in (q8, out):
        e = report.entry(art)
        print(f"\n{art.name}: kind {e['kind']} ppl {e.get('perplexity')} kld {e.get('kld_mean')}")
        assert np.isfinite(e["kld_mean"]) and e["kld_mean"] >= 0
        assert np.isfinite(e["perplexity"]) and e["perplexity"] > 1
    assert report.entry(q8)["kld_mean"] < report.entry(out)["kld_mean"]


def test_each_expert_beats_rtn_on_its_routed_inputs(gptq_out, calibration, reference, tiny_moe):
    """What GPTQ minimises, per expert: the output error ||(W_q - W) X||^2 over the calibration
    tokens routed to that expert (inputs from the f32 model), GPTQ's weights against RTN's. A
    forced expert was calibrated on every token, so it must still beat RTN on its own."""
    from transformers import AutoTokenizer
    from xvq.quantize.gptq import calibration_sequences
    out, _ = gptq_out
    texts, _, _, _ = calibration
    qcfg = json.loads((out / "quantize_config.json").read_text())
    forced = {k for k, v in qcfg["xvq_expert_calibration"]["experts"].items() if v["forced"]}
    seqs = calibration_sequences(AutoTokenizer.from_pretrained(tiny_moe), texts, CALIB["calib_tokens"],
                                 CALIB["max_seq_len"], 0)
    tensors = load_safetensors_folder(out)
    inputs: dict[str, list] = {}
    names = [n for n, m in reference.named_modules() if ".experts." in n and isinstance(m, torch.nn.Linear)]
    hooks = [reference.get_submodule(n).register_forward_pre_hook(
        lambda m, inp, n=n: inputs.setdefault(n, []).append(inp[0].detach().reshape(-1, inp[0].shape[-1])))
        for n in names]
    with torch.no_grad():
        for s in seqs:
            reference(torch.tensor([s["input_ids"]]))
    for h in hooks:
        h.remove()
    ratios = {}
    for n in names:
        x = torch.cat(inputs[n]).double()
        w = reference.get_submodule(n).weight.detach().double()
        err_g = ((gptq_v1_dequant(tensors, n, BITS).double() - w) @ x.T).pow(2).sum().item()
        err_r = ((rtn(w.float(), BITS, GROUP).double() - w) @ x.T).pow(2).sum().item()
        ratios[n] = err_g / err_r
    layer_expert = {n: "layer.{}.expert.{}".format(*n.split(".")[2:6:3]) for n in names}
    rf = [r for n, r in ratios.items() if layer_expert[n] in forced]
    ru = [r for n, r in ratios.items() if layer_expert[n] not in forced]
    print(f"\nexpert output error GPTQ/RTN on routed inputs: routed-calibrated mean {np.mean(ru):.3f} "
          f"max {max(ru):.3f}; forced mean {np.mean(rf):.3f} max {max(rf):.3f}")
    assert rf and ru and max(ratios.values()) < 1.0


def test_forcing_feeds_every_token_and_leaves_the_output_alone(reference):
    """With every expert starved (minimum above any count), each expert's Linear layers see every
    token of the replay exactly once (routed + forced), and the logits are bit-identical."""
    from xvq.quantize.gptq_moe import expert_calibration
    ids = torch.randint(4, 400, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = [reference(row[None]).logits for row in ids]
    seen: dict[str, int] = {}
    hooks = [m.register_forward_hook(lambda m, inp, out, n=n: seen.__setitem__(n, seen.get(n, 0) + inp[0].shape[0]))
             for n, m in reference.named_modules() if ".experts." in n and isinstance(m, torch.nn.Linear)]
    try:
        with torch.no_grad(), expert_calibration(reference, n_tokens=ids.numel(), min_tokens=10 ** 6) as calib:
            forced = [reference(row[None]).logits for row in ids]
    finally:
        for h in hooks:
            h.remove()
    assert all(torch.equal(a, b) for a, b in zip(plain, forced))
    assert len(seen) == 2 * 8 * 3 and set(seen.values()) == {ids.numel()}
    rec = calib.record()["experts"]
    assert all(v["forced"] for v in rec.values())
    assert sum(v["routed_tokens"] for k, v in rec.items() if k.startswith("layer.0.")) == 2 * ids.numel()
    from xvq.models.xverse_moe_hf import XverseMoeBlock
    assert XverseMoeBlock.calibration_hook is None    # uninstalled afterwards


def test_starvation_threshold_defaults_to_hidden_size():
    """Default: an expert under hidden-size routed tokens (rank-deficient gate/up Hessian) is
    forced; never below GPTQModel's 0.5% fallback (it would round such an expert to nearest)."""
    from xvq.quantize.gptq_moe import min_expert_tokens
    assert min_expert_tokens(131072, None, 2560) == 2560      # XVERSE-MoE-A4.2B, default budget
    assert min_expert_tokens(2048, 16, 256) == 16
    assert min_expert_tokens(10 ** 6, 16, 256) == 5000        # 0.5% of the calibration tokens
