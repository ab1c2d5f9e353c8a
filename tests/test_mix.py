"""Mixed-precision GGUF for a target size (xvq.quantize.mix): ggml's kernels as llama-quantize
uses them, predicted against measured sensitivity (held-out single-tensor ablations), the
knapsack against exhaustive search, the written file against its target and llama.cpp's loader,
and a target below the smallest file. Quality against the stock recipes: bench/mix.py."""
from __future__ import annotations

import itertools

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from tests.conftest import DEMO

THREADS = 1    # shared test machine: llama.cpp's spinning worker threads only slow it down
CTX = 128      # the tests' chunks; the command uses 256 (KLD_CHUNKS of them)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo model as f16 GGUF, a small xvq imatrix on the calibration split, the text."""
    from xvq.convert import convert
    from xvq.calib_data import calibration
    from xvq.quantize.imatrix import compute_imatrix
    if not (DEMO / "config.json").is_file():
        pytest.skip("demo model (xvq/demo/model) not present")
    d = tmp_path_factory.mktemp("mix")
    src = convert(DEMO, d / "demo-f16.gguf", "f16", progress=False)[0]
    calib = calibration(None, budget_tokens=8192, tokenizer_dir=DEMO)
    im = compute_imatrix(src, calib.text, dataset="calib", n_ctx=CTX, n_threads=THREADS, progress=False)
    im.save(d / "demo.imatrix.gguf")
    return src, im, calib.text, d


def test_kernels_quantize_as_llama_quantize_does(demo):
    """ggml_quantize_chunk through xvq.llamacpp.kernels gives the bytes llama_model_quantize
    writes (with and without an imatrix), and to_float inverts them as gguf-py's dequantizer does."""
    from xvq.llamacpp.kernels import dequantize_rows, quantize_rows
    from xvq.quantize.gguf import quantize_file
    src, im, _, d = demo
    stock = quantize_file(src, d / "q4km.gguf", "Q4_K_M", imatrix=im, n_threads=THREADS, progress=False)
    theirs = {t.name: t for t in gguf.GGUFReader(stock).tensors}
    w = {t.name: np.asarray(t.data, np.float32) for t in gguf.GGUFReader(src).tensors}
    for name, imx in (("blk.0.ffn_up.weight", im.values()["blk.0.ffn_up.weight"]), ("output.weight", None)):
        t = theirs[name]
        ours = quantize_rows(t.tensor_type.name, w[name], imx)
        assert ours.tobytes() == np.asarray(t.data).tobytes(), name
        rows, cols = w[name].shape
        back = dequantize_rows(t.tensor_type.name, ours, rows, cols)
        np.testing.assert_array_equal(back.reshape(-1), gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1))


def spearman(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def test_predicted_sensitivity_ranks_like_measured_kld(demo, tmp_path):
    """Predicted KLD per tensor (error x gain, every tensor ablated in the one loaded model on the
    calibration split at Q3_K) against KLD measured by llama.cpp on a file with that tensor alone
    quantized, on the held-out split, at a type the calibration did not use (Q2_K; calibration
    uses Q3_K): Spearman >= 0.8 over every tensor."""
    from xvq.calib_data import heldout_texts
    from xvq.quantize.gguf import quantize_with_types
    from xvq.quantize import mix
    src, im, calib_text, _ = demo
    tensors = mix.model_tensors(src, set(im.values()))
    mix.measure_errors(src, tensors, im.values(), progress=False)
    plan = mix.ablation_plan(tensors, budget_tokens=30 * 1024, n_ctx=CTX)
    with mix.make_evaluator(src, calib_text, CTX, n_chunks=plan.tokens_each // CTX, n_threads=THREADS) as ev:
        measured_cal = mix.ablate(src, plan, ev, im.values(), progress=False)
    mix.fit_gains(tensors, measured_cal)
    q = [c for c in tensors if c.quantizable]
    keep = {c.name: c.src_type for c in q}
    predicted, measured = [], []
    with mix.make_evaluator(src, "\n\n".join(heldout_texts().values()), CTX, n_chunks=4, n_threads=THREADS) as held:
        for c in q:
            quantize_with_types(src, tmp_path / "one.gguf", "Q8_0", keep | {c.name: "Q2_K"}, imatrix=im,
                                n_threads=THREADS)
            measured.append(held.kld(tmp_path / "one.gguf"))
            predicted.append(c.predicted("Q2_K"))
    rho = spearman(predicted, measured)
    print(f"Spearman predicted vs measured (held-out, Q2_K, {len(q)} tensors, {len(plan.tensors)} ablations): {rho:.3f}")
    assert len(q) == 30 and plan.complete and len(measured_cal) == 30
    assert rho >= 0.8, list(zip([c.name for c in q], predicted, measured))


def test_partial_plan_fits_unmeasured_layers(demo):
    """Above the size where every tensor fits the token budget: every kind in evenly spread
    layers, the rest fitted (kind term + layer term). The demo's layer 1, left unmeasured, is
    predicted from layers 0, 2, 3 and compared with its own ablations (one loaded model for
    both): the leave-one-layer-out check the command reports is of the size of that real miss."""
    from xvq.quantize import mix
    src, im, calib_text, _ = demo
    tensors = mix.model_tensors(src, set(im.values()))
    mix.measure_errors(src, tensors, im.values(), progress=False)
    plan = mix.ablation_plan(tensors, budget_tokens=(2 + 7 * 3) * 1024, n_ctx=CTX)
    assert not plan.complete and sorted({c.layer for c in plan.tensors} - {None}) == [0, 2, 3]
    with mix.make_evaluator(src, calib_text, CTX, n_chunks=8, n_threads=THREADS) as ev:
        everything = mix.ablate(src, [c for c in tensors if c.quantizable], ev, im.values(), progress=False)
    check = mix.fit_gains(tensors, {c.name: everything[c.name] for c in plan.tensors})
    misses = [abs(np.log(c.gain * c.error[mix.calibration_type(c)] / everything[c.name])) for c in tensors
              if c.layer == 1 and c.quantizable]
    real = float(np.exp(np.median(misses)))
    print(f"layer 1 unmeasured: median miss x{real:.2f}; leave-one-layer-out check x{check['fit_check_factor_median']:.2f}")
    assert check["measured"] == len(plan.tensors) and check["of"] == 30
    # the check is honest: the real miss is within its square and its square root (on the demo
    # both are large, x2-3: gains vary by tensor beyond kind and layer, hence every tensor is
    # measured wherever the budget allows)
    c = check["fit_check_factor_median"]
    assert c > 1 and c ** 0.5 <= real <= c ** 2


def in_model_against_file(src, im_values, imatrix, text, names, tmp_path) -> list[tuple[str, float, float]]:
    """(name, KLD with the tensor's error added inside the loaded source, KLD of the file
    llama.cpp's quantizer writes with that tensor alone at the same type) on the same chunks."""
    from xvq.quantize import mix
    from xvq.quantize.gguf import quantize_with_types
    tensors = {c.name: c for c in mix.model_tensors(src, set(im_values))}
    keep = {n: c.src_type for n, c in tensors.items() if c.quantizable}
    out = []
    with mix.make_evaluator(src, text, CTX, n_chunks=4, n_threads=THREADS) as ev:
        for n in names:
            c = tensors[n]
            k_in = mix.ablate(src, [c], ev, im_values, progress=False)[n]
            quantize_with_types(src, tmp_path / "one.gguf", "Q8_0", keep | {n: mix.calibration_type(c)},
                                imatrix=imatrix, n_threads=THREADS)
            out.append((n, k_in, ev.kld(tmp_path / "one.gguf")))
    return out


def test_in_model_ablation_matches_a_written_file(demo, tmp_path):
    """The ablation tap (xvq.llamacpp.ablation: (Q(W) - W)·x added to the op's output) gives the
    KLD llama.cpp gives for a file with that one tensor quantized: a matrix product in a block,
    the embedding lookup (GET_ROWS) and the output matrix, within 10% (the file's k-quant
    products also round the activations to 8 bits; the tap leaves them at f16)."""
    src, im, calib_text, _ = demo
    names = ["blk.1.attn_q.weight", "blk.2.ffn_down.weight", "token_embd.weight", "output.weight"]
    for n, k_in, k_file in in_model_against_file(src, im.values(), im, calib_text, names, tmp_path):
        print(f"{n}: in-model {k_in:.3g}, file {k_file:.3g}")
        assert k_in > 0 and k_in == pytest.approx(k_file, rel=0.1), (n, k_in, k_file)


def test_in_model_ablation_of_stacked_experts_matches_a_written_file(tmp_path_factory, xverse_tokenizer_dir, tmp_path):
    """MoE: a stacked expert tensor is one unit (MUL_MAT_ID, each token's expert), the shared
    experts apart (a plain product), the router not quantized (llama.cpp keeps it)."""
    import json
    import shutil
    from tests.conftest import FALLBACK_TEXT
    from xvq.convert import convert
    from xvq.quantize import mix
    from xvq.quantize.imatrix import compute_imatrix
    from xvq.synth import make_checkpoint, tiny_config
    d = tmp_path_factory.mktemp("mix-moe")
    model = d / "model"
    shutil.copytree(xverse_tokenizer_dir, model)
    n_tok = len(json.loads((model / "tokenizer.json").read_text())["model"]["vocab"])
    make_checkpoint(model, tiny_config("xverse-moe", vocab_size=n_tok), router_scale=4.0)
    src = convert(model, d / "moe-f32.gguf", "f32", progress=False)[0]
    text = "\n".join(FALLBACK_TEXT[:30])
    im = compute_imatrix(src, text, n_ctx=CTX, n_threads=THREADS, progress=False)
    tensors = {c.name: c for c in mix.model_tensors(src, set(im.values()))}
    assert not tensors["blk.1.ffn_gate_inp.weight"].quantizable
    assert len(tensors["blk.1.ffn_down_exps.weight"].shape) == 3
    names = ["blk.1.ffn_down_exps.weight", "blk.1.ffn_gate_exps.weight", "blk.1.ffn_up_shexp.weight"]
    for n, k_in, k_file in in_model_against_file(src, im.values(), im, text, names, tmp_path):
        print(f"{n}: in-model {k_in:.3g}, file {k_file:.3g}")
        assert k_in > 0 and k_in == pytest.approx(k_file, rel=0.1), (n, k_in, k_file)


def test_knapsack_matches_exhaustive_search():
    """solve() against every assignment of a small instance: within the budget, and its
    predicted KLD no worse than 2% above the true optimum (greedy on convex hulls + fill)."""
    from xvq.quantize.mix import TensorChoice, padded, solve
    rng = np.random.default_rng(0)
    types = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
    sizes = np.array([84, 110, 144, 176, 210])
    tensors = []
    for i in range(6):
        rows = int(rng.integers(1, 6)) * 100
        c = TensorChoice(f"blk.{i}.w", (rows, 256), "F16", True, gain=float(rng.uniform(0.2, 5)))
        c.options = {t: int(s) * rows for t, s in zip(types, sizes)}
        base = rng.uniform(0.5, 2)
        c.error = {t: float(base * 4.0 ** -k * rng.uniform(0.8, 1.2)) for k, t in enumerate(types)}
        tensors.append(c)
    for frac in (0.2, 0.45, 0.7):
        lo = sum(padded(min(c.options.values())) for c in tensors)
        hi = sum(padded(max(c.options.values())) for c in tensors)
        budget = int(lo + frac * (hi - lo))
        best = min(sum(c.predicted(t) for c, t in zip(tensors, combo))
                   for combo in itertools.product(types, repeat=len(tensors))
                   if sum(padded(c.options[t]) for c, t in zip(tensors, combo)) <= budget)
        got = solve(tensors, budget)
        assert sum(padded(c.options[got[c.name]]) for c in tensors) <= budget
        assert sum(c.predicted(got[c.name]) for c in tensors) <= best * 1.02


def test_mix_fits_target_loads_and_records_itself(demo, tmp_path):
    """At the stock Q4_K_M file's size: no larger, every tensor in the type chosen, only standard
    types, loads in llama.cpp, and the recorded measured KLD is what llama.cpp's logits give."""
    from xvq.layout import Layout
    from xvq.quantize import mix
    from xvq.quantize.gguf import quantize_file
    src, im, calib_text, d = demo
    stock = d / "q4km.gguf"
    if not stock.is_file():
        stock = quantize_file(src, stock, "Q4_K_M", imatrix=im, n_threads=THREADS, progress=False)
    wrote = written_by_this_process()
    # a budget that measures every tensor at 1,024 tokens in each pass (the command's default on the
    # demo; the fixture's small imatrix alone would give a partial plan)
    m = mix.choose_and_write(src, None, mix.Target("size", stock.stat().st_size), imatrix=im, calib_text=calib_text,
                             layout=Layout("demo", tmp_path), n_threads=THREADS, progress=False,
                             budget_tokens=2 * 30 * 1024)
    wrote = written_by_this_process() - wrote
    print(f"bytes written {wrote} for a {m.size_bytes}-byte mix ({wrote / m.size_bytes:.3f}x); "
          f"KLD predicted {m.kld_predicted:.5f}, measured {m.kld_measured:.5f}")
    assert wrote <= 1.5 * m.size_bytes        # no file per ablation: the mix (and its temp name) only
    # the prediction (the chosen mix inside the loaded source, no file) against llama.cpp's logits of the file
    assert m.sensitivity["complete"] and m.sensitivity["prediction"] == "in-model"
    assert m.kld_measured / 1.3 <= m.kld_predicted <= 1.3 * m.kld_measured
    assert m.kld_measured / 1.3 <= m.kld_additive <= 1.3 * m.kld_measured   # after the second pass, additive too
    assert m.path.name == f"demo-xvq-{m.bpw:.2f}bpw.gguf" and m.path.parent == tmp_path / "demo" / "gguf"
    assert m.path.stat().st_size <= stock.stat().st_size
    r = gguf.GGUFReader(m.path)
    assert {t.name: t.tensor_type.name for t in r.tensors} == m.types
    assert len(set(m.types.values()) - {"F32"}) >= 2                      # a real mix
    assert r.fields[mix.KEY_MEASURED].contents() == pytest.approx(m.kld_measured, rel=1e-6)
    assert r.fields[mix.KEY_PREDICTED].contents() == pytest.approx(m.kld_predicted, rel=1e-6)
    assert r.fields[mix.KEY_TARGET].contents() == f"size<={stock.stat().st_size}"
    assert not [k for k in r.fields if k.startswith("xvq.") and k not in
                (mix.KEY_MEASURED, mix.KEY_PREDICTED, mix.KEY_TARGET, mix.KEY_TYPES)]
    ev = mix.make_evaluator(src, calib_text, n_threads=THREADS)   # the command's own chunks
    assert ev.kld(m.path) == pytest.approx(m.kld_measured, rel=1e-3)
    assert 0 < m.kld_measured < 0.1
    from xvq.validate.artifacts import inspect
    assert inspect(m.path).quant_type == "Q4_K_M-mix"        # validate labels (and gates) it by its class


def written_by_this_process() -> int:
    """write(2) bytes of this process so far, from the kernel's own count (/proc/self/io)."""
    from pathlib import Path
    io = Path("/proc/self/io")
    if not io.is_file():
        pytest.skip("no /proc/self/io here (Linux only)")
    return int(next(ln for ln in io.read_text().splitlines() if ln.startswith("wchar:")).split()[1])


def test_target_at_or_above_the_source_stops_before_measuring(demo, tmp_path):
    """A --target-size the f16 source already meets, or a --target-bpw above its 16 bits, stops
    with one line before any imatrix is measured (nothing is written), instead of an all-F16
    "mix"."""
    from xvq.cli import main
    src, _, _, _ = demo
    out = tmp_path / "out"
    for opt, val in (("--target-size", "1G"), ("--target-size", f"{src.stat().st_size / 1e6:.6f}M"),
                     ("--target-bpw", "16.5")):
        r = CliRunner().invoke(main, ["quantize", "gguf", str(src), opt, val, "--out-root", str(out),
                                      "--calib-tokens", "4096", "--threads", str(THREADS)])
        lines = r.output.strip().splitlines()
        assert r.exit_code == 1 and len(lines) == 1 and "at or above the source" in lines[0], (opt, val, r.output)
        assert not out.exists(), (opt, val, list(out.rglob("*")))


def test_outdir_holds_the_mix_its_report_and_the_imatrix(demo, tmp_path, monkeypatch):
    """--outdir: the mix, its report and the imatrix it measured are written there, not under
    ./out of the current folder."""
    from xvq.cli import main
    src, _, _, d = demo
    monkeypatch.chdir(tmp_path)
    stock = d / "q4km.gguf"
    size = stock.stat().st_size if stock.is_file() else 3_200_000
    outdir = tmp_path / "elsewhere"
    r = CliRunner().invoke(main, ["quantize", "gguf", str(src), "--target-size", f"{size / 1e6:.6f}M",
                                  "--outdir", str(outdir), "--calib-tokens", "4096", "--threads", str(THREADS)])
    assert r.exit_code == 0, r.output
    made = sorted(p.name for p in outdir.rglob("*"))
    assert any(n.endswith("bpw.gguf") for n in made) and any(n.endswith("bpw.json") for n in made), made
    assert any(n.endswith(".imatrix.gguf") for n in made), made
    # nothing under ./out: the layout the mix needs (imatrix, report, stamps) is below --outdir too
    assert not (tmp_path / "out").exists(), list((tmp_path / "out").rglob("*"))


def test_target_below_smallest_file_fails_in_one_line(demo, tmp_path):
    from xvq.cli import main
    src, im, _, d = demo
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["quantize", "gguf", str(src), "--target-size", "1M", "--out-root", str(out),
                                  "--imatrix", str(d / "demo.imatrix.gguf")])
    assert r.exit_code == 1
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "smallest file this model can make" in lines[0], r.output
    smallest = int(lines[0].split("give at least ")[1])
    assert 1_000_000 < smallest < src.stat().st_size / 4
    assert not out.exists()
    r = CliRunner().invoke(main, ["quantize", "gguf", str(src), "--target-bpw", "1.5", "--out-root", str(out),
                                  "--imatrix", str(d / "demo.imatrix.gguf")])
    assert r.exit_code == 1 and "smallest mix" in r.output and not out.exists()
    r = CliRunner().invoke(main, ["quantize", "gguf", str(src), "--fit", "0.002G", "--ctx", "8192",
                                  "--out-root", str(out), "--imatrix", str(d / "demo.imatrix.gguf")])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
    assert "no file fits; the smallest achievable file" in r.output and not out.exists()


def test_release_tiers_skip_or_fit(demo, tmp_path):
    """A tier above the Q8_0 file and one too small are skipped with a line saying why; one in
    between gives a mix that `xvq fit` (the estimate checked against llama.cpp) says fits."""
    from xvq.quantize.mix import build_tier
    from xvq.llamacpp.memory import fits, gguf_shapes
    src, im, calib_text, _ = demo
    lines = []
    kw = dict(imatrix=im, calib_text=calib_text, n_threads=THREADS, log=lines.append)
    assert build_tier(src, tmp_path / "big.gguf", "8G", **kw) is None
    assert build_tier(src, tmp_path / "small.gguf", "0.1G", **kw) is None
    assert "already fits 8G" in lines[0] and "no file fits" in lines[1]
    assert not (tmp_path / "big.gguf").exists() and not (tmp_path / "small.gguf").exists()
    out = build_tier(src, tmp_path / "tier.gguf", "0.185G", **kw)
    s = gguf_shapes(out)
    assert fits(s, 8192, 0.185) and s.weights_bytes < gguf_shapes(src).weights_bytes / 1.5
