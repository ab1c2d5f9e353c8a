"""xvq's importance matrix against llama.cpp's own llama-imatrix (same model, same text), its
GGUF/legacy file formats, and MoE expert statistics (MUL_MAT_ID)."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import FALLBACK_TEXT, shared
from xvq import anchors
from xvq.errors import XvqError
from xvq.quantize.imatrix import Imatrix, compute_imatrix

N_CTX = 128
THREADS = 1   # the test machine's cores are shared: spinning worker threads only slow llama.cpp down


def anchor(name: str):
    exe = anchors.tool(name)
    if exe is None:
        pytest.skip(f"llama.cpp tool {name} not built (python -m xvq.anchors build)")
    return exe


def llama_imatrix(model, text_file, out, *extra) -> None:
    # run beside the text so llama-imatrix records its name, as xvq does (no local paths in files)
    subprocess.run([str(anchor("llama-imatrix")), "-m", str(Path(model).resolve()), "-f", Path(text_file).name,
                    "-o", str(Path(out).resolve()), "-c", str(N_CTX), "-b", str(N_CTX), "--no-ppl", "-t", "1", *extra],
                   check=True, capture_output=True, text=True, cwd=Path(text_file).parent)


@pytest.fixture(scope="module")
def stories(tmp_path_factory):
    """(f32 GGUF of the trained stories260K, calibration text file)."""
    from xvq.convert import convert
    src = shared("stories260K-hf")
    text = shared("corpus", "tinystories_sample", "TinyStories-valid-excerpt.txt").read_text()[:6000]
    d = tmp_path_factory.mktemp("stories-imatrix")
    (d / "calib.txt").write_text(text)
    convert(src, d / "stories-f32.gguf", "f32", progress=False)
    return d / "stories-f32.gguf", d / "calib.txt"


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory, xverse_tokenizer_dir):
    """XVERSE-MoE-shaped (8 experts, top-2, 2 shared), decisive routing, as f32 GGUF + text."""
    from xvq.convert import convert
    from xvq.synth import make_checkpoint, tiny_config
    d = tmp_path_factory.mktemp("tiny-moe")
    model = d / "model"
    shutil.copytree(xverse_tokenizer_dir, model)
    n_tok = len(json.loads((model / "tokenizer.json").read_text())["model"]["vocab"])
    make_checkpoint(model, tiny_config("xverse-moe", vocab_size=n_tok), router_scale=4.0)
    convert(model, d / "moe-f32.gguf", "f32", progress=False)
    (d / "calib.txt").write_text("\n".join(FALLBACK_TEXT[:30]))
    return d / "moe-f32.gguf", d / "calib.txt"


@pytest.fixture(scope="module")
def stories_ref(stories, tmp_path_factory):
    out = tmp_path_factory.mktemp("stories-ref") / "ref.imatrix.gguf"
    llama_imatrix(*stories, out)
    return out


@pytest.fixture(scope="module")
def moe_ref(tiny_moe, tmp_path_factory):
    out = tmp_path_factory.mktemp("moe-ref") / "ref.imatrix.gguf"
    llama_imatrix(*tiny_moe, out)
    return out


def ours(model, text, **kw) -> Imatrix:
    return compute_imatrix(model, text.read_text(), n_ctx=N_CTX, n_threads=THREADS, progress=False, **kw)


def assert_agrees_with_llama_imatrix(ours: Imatrix, ref: Imatrix) -> None:
    assert sorted(ours.sums) == sorted(ref.sums)
    assert ours.chunk_count == ref.chunk_count and ours.chunk_size == ref.chunk_size
    for name in ref.sums:
        # same tokens reach the same matrices (per expert for MUL_MAT_ID)
        np.testing.assert_array_equal(ours.counts[name], ref.counts[name], err_msg=name)
        for row_ours, row_ref in zip(ours.sums[name], ref.sums[name]):
            cos = row_ours @ row_ref / (np.linalg.norm(row_ours) * np.linalg.norm(row_ref))
            assert cos >= 0.99, (name, cos)
        np.testing.assert_allclose(ours.sums[name], ref.sums[name], rtol=1e-3, err_msg=name)


def test_matches_llama_imatrix_on_trained_model(stories, stories_ref):
    model, text = stories
    ref = Imatrix.load(stories_ref)
    im = ours(model, text, dataset=text.name)
    assert_agrees_with_llama_imatrix(im, ref)
    assert min(im.cosine(ref).values()) >= 0.99
    assert ref.datasets == im.datasets == [text.name]


def test_moe_expert_statistics_match_llama_imatrix(tiny_moe, moe_ref):
    """MUL_MAT_ID: one row per expert, each over the tokens routed to it only."""
    model, text = tiny_moe
    ref = Imatrix.load(moe_ref)
    im = ours(model, text)
    experts = [n for n in ref.sums if "_exps." in n]
    assert experts and all(ref.sums[n].shape[0] == 8 for n in experts)
    assert all(len(set(ref.counts[n])) > 1 for n in experts)   # routing is uneven, so per-expert counts matter
    assert_agrees_with_llama_imatrix(im, ref)


def test_file_format_is_llama_imatrix_s(stories_ref, moe_ref, tmp_path):
    """Loading llama-imatrix's file and saving it again reproduces it byte for byte (dense and MoE)."""
    for i, ref_file in enumerate((stories_ref, moe_ref)):
        out = Imatrix.load(ref_file).save(tmp_path / f"again{i}.imatrix.gguf")
        assert out.read_bytes() == ref_file.read_bytes()


def test_legacy_dat_gives_the_same_means(stories, stories_ref, tmp_path):
    model, text = stories
    llama_imatrix(model, text, tmp_path / "ref.dat", "--output-format", "dat")
    g, d = Imatrix.load(stories_ref).values(), Imatrix.load(tmp_path / "ref.dat")
    assert d.datasets == [text.name] and d.chunk_count > 0
    dv = d.values()
    assert sorted(dv) == sorted(g)
    for name in g:
        np.testing.assert_allclose(dv[name], g[name], rtol=1e-6, err_msg=name)


def test_routed_accumulation_by_hand():
    """add_routed against an explicit loop over (token, slot): expert e sums x^2 of its tokens only."""
    rng = np.random.default_rng(0)
    n_tok, n_used, n_exp, cols = 7, 2, 4, 5
    x = rng.normal(size=(n_tok, n_used, cols)).astype(np.float32)
    ids = np.array([[0, 1], [1, 2], [0, 2], [2, 1], [0, 1], [1, 0], [2, 0]], np.int32)   # expert 3 unused
    im = Imatrix()
    im.add_routed("blk.0.ffn_up_exps.weight", x, ids, n_exp)
    sums, counts = np.zeros((n_exp, cols)), np.zeros(n_exp, np.int64)
    for t in range(n_tok):
        for s in range(n_used):
            sums[ids[t, s]] += x[t, s].astype(np.float64) ** 2
            counts[ids[t, s]] += 1
    np.testing.assert_allclose(im.sums["blk.0.ffn_up_exps.weight"], sums, rtol=1e-12)
    np.testing.assert_array_equal(im.counts["blk.0.ffn_up_exps.weight"], counts)
    v = im.values()["blk.0.ffn_up_exps.weight"].reshape(n_exp, cols)
    np.testing.assert_array_equal(v[3], np.ones(cols, np.float32))   # unrouted expert: ones, like llama-quantize


def test_rejects_imatrix_of_another_model(stories, tiny_moe):
    import gguf
    im = ours(*stories, n_chunks=2)
    moe_tensors = {t.name: tuple(int(x) for x in t.shape) for t in gguf.GGUFReader(tiny_moe[0]).tensors}
    with pytest.raises(XvqError, match="another model"):
        im.check_model(moe_tensors, tiny_moe[0])


def test_rejects_files_that_are_not_imatrices(stories, tmp_path):
    junk = tmp_path / "notes.txt"
    junk.write_text("hello")
    with pytest.raises(XvqError, match="imatrix"):
        Imatrix.load(junk)
    with pytest.raises(XvqError, match="is this a model file"):
        Imatrix.load(stories[0])
    with pytest.raises(XvqError, match="fewer than 2 chunks"):
        compute_imatrix(stories[0], "too short", n_ctx=N_CTX, n_threads=THREADS, progress=False)


def test_moe_quantizes_byte_identically_to_llama_quantize(tiny_moe, moe_ref, tmp_path):
    """Stacked expert tensors take their per-expert imatrix rows through xvq exactly as through
    llama-quantize --imatrix."""
    from xvq.quantize.gguf import quantize_file
    model, _ = tiny_moe
    ref = tmp_path / "ref.gguf"
    # llama-quantize records --imatrix as given: beside the file it records the name, as xvq does
    subprocess.run([str(anchor("llama-quantize")), "--imatrix", moe_ref.name, str(model), str(ref), "Q4_K_M",
                    str(THREADS)], check=True, capture_output=True, cwd=moe_ref.parent)
    ours = quantize_file(model, tmp_path / "ours.gguf", "Q4_K_M", imatrix=Imatrix.load(moe_ref),
                         n_threads=THREADS, progress=False)
    assert ours.read_bytes() == ref.read_bytes()


def test_cli_imatrix_file_agrees_with_llama_imatrix(stories, stories_ref, tmp_path):
    from click.testing import CliRunner
    from xvq.cli import main
    model, text = stories
    out = tmp_path / "cli.imatrix.gguf"
    r = CliRunner().invoke(main, ["quantize", "imatrix", str(model), "-o", str(out), "--calib-file", str(text),
                                  "--ctx", str(N_CTX), "--threads", str(THREADS)])
    assert r.exit_code == 0, r.output
    im, ref = Imatrix.load(out), Imatrix.load(stories_ref)
    assert_agrees_with_llama_imatrix(im, ref)
    assert im.datasets == ref.datasets


def test_runs_on_a_llama_cpp_built_apart(stories, stories_ref, tmp_path):
    """LLAMA_CPP_LIB_PATH (llama-cpp-python's switch for a llama.cpp built elsewhere, as bench/gpu.py
    builds one for the local GPU) moves xvq's whole llama.cpp layer: the tap's ggml comes from the
    same folder as libllama, no second ggml is loaded, and the statistics still agree with llama-imatrix."""
    import os
    import sys
    if not Path("/proc/self/maps").is_file():
        pytest.skip("reads /proc/self/maps")
    lib_dir = anchor("llama-imatrix").parent
    model, text = stories
    out = tmp_path / "apart.imatrix.gguf"
    script = ("import json, sys, re\n"
              "from pathlib import Path\n"
              "from xvq.quantize.imatrix import compute_imatrix\n"
              f"im = compute_imatrix(sys.argv[1], Path(sys.argv[2]).read_text(), dataset=Path(sys.argv[2]).name, "
              f"n_ctx={N_CTX}, n_threads=1, progress=False)\n"
              "im.save(sys.argv[3])\n"
              "maps = Path('/proc/self/maps').read_text()\n"
              "print(json.dumps(sorted(set(re.findall(r'(/\\S*/libggml[-\\w]*\\.so\\S*)', maps)))))\n")
    env = dict(os.environ, LLAMA_CPP_LIB_PATH=str(lib_dir))
    r = subprocess.run([sys.executable, "-c", script, str(model), str(text), str(out)], env=env,
                       capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr[-2000:]
    loaded = json.loads(r.stdout.strip().splitlines()[-1])
    assert loaded and all(Path(p).resolve().parent == lib_dir.resolve() for p in loaded), loaded
    assert_agrees_with_llama_imatrix(Imatrix.load(out), Imatrix.load(stories_ref))
