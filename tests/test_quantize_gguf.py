"""`xvq quantize gguf`: llama.cpp's quantizer driven from Python, byte-identical to llama-quantize
with the same imatrix; quality (KL divergence to the f32 model, from llama.cpp logits) falls as
bits rise and xvq's imatrix lowers it; bad inputs fail cleanly."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from tests.conftest import DEMO, shared
from xvq import anchors
from xvq.errors import XvqError
from xvq.layout import Layout
from xvq.llamacpp import parse_type, quant_types
from xvq.quantize.gguf import quantize, quantize_file
from xvq.llamacpp import Gguf
from xvq.quantize.imatrix import Imatrix, chunks_of, compute_imatrix

N_CTX = 128
THREADS = 1   # shared test machine: llama.cpp's spinning worker threads only slow it down
LADDER = ["Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"]


def anchor(name: str) -> Path:
    exe = anchors.tool(name)
    if exe is None:
        pytest.skip(f"llama.cpp tool {name} not built (python -m xvq.anchors build)")
    return exe


def tinystories() -> str:
    return shared("corpus", "tinystories_sample", "TinyStories-valid-excerpt.txt").read_text()


@pytest.fixture(scope="module")
def stories(tmp_path_factory):
    """stories260K (trained) as f32 GGUF; calibration = first half of the TinyStories excerpt."""
    from xvq.convert import convert
    d = tmp_path_factory.mktemp("stories-quant")
    convert(shared("stories260K-hf"), d / "stories-f32.gguf", "f32", progress=False)
    (d / "calib.txt").write_text(tinystories()[:8000])
    return d / "stories-f32.gguf", d / "calib.txt"


@pytest.fixture(scope="module")
def stories_imatrix(stories, tmp_path_factory):
    model, text = stories
    im = compute_imatrix(model, text.read_text(), dataset=text.name, n_ctx=N_CTX, n_threads=THREADS, progress=False)
    return im.save(tmp_path_factory.mktemp("stories-im") / "stories.imatrix.gguf")


def tensors_of(path: Path) -> dict[str, tuple[str, bytes]]:
    return {t.name: (t.tensor_type.name, t.data.tobytes()) for t in gguf.GGUFReader(path).tensors}


def kv(path: Path, prefix: str) -> dict:
    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if k.startswith(prefix)}


# --- types ---------------------------------------------------------------------------------------

def test_types_are_llama_quantize_s():
    """Every type llama-quantize lists (its own usage text), names case-insensitive."""
    out = subprocess.run([str(anchor("llama-quantize")), "--help"], capture_output=True, text=True)
    listed = {name: int(num) for num, name in re.findall(r"^\s+(\d+)\s+or\s+([A-Z0-9_]+)\s*:",
                                                          out.stdout + out.stderr, re.M) if name != "COPY"}
    assert listed, "could not read llama-quantize's type list"
    ours = {name: parse_type(name).ftype for name in [*quant_types(), "Q3_K", "Q4_K", "Q5_K"]}
    assert ours == listed
    assert parse_type("q4_k_m").name == "Q4_K_M" and parse_type("Q4_K").name == "Q4_K_M"
    with pytest.raises(XvqError, match=r"unknown quantization type; use one of ") as e:
        parse_type("Q4_K_X")
    assert all(t in str(e.value) for t in listed)


# --- parity with llama-quantize ------------------------------------------------------------------

@pytest.mark.parametrize("qtype,embd,out", [("Q4_K_M", None, None), ("Q2_K", None, None), ("IQ2_M", None, None),
                                            ("Q3_K_S", "q8_0", "f16")])
def test_byte_identical_to_llama_quantize_with_the_same_imatrix(stories, stories_imatrix, tmp_path, qtype, embd,
                                                                 out):
    model, _ = stories
    ref = tmp_path / "ref.gguf"
    extra = (["--token-embedding-type", embd] if embd else []) + (["--output-tensor-type", out] if out else [])
    # llama-quantize records --imatrix as given: run it beside the file so it records the name, as xvq does
    subprocess.run([str(anchor("llama-quantize")), "--imatrix", stories_imatrix.name, *extra, str(model), str(ref),
                    qtype, str(THREADS)], check=True, capture_output=True, cwd=stories_imatrix.parent)
    ours = quantize_file(model, tmp_path / "ours.gguf", qtype, imatrix=Imatrix.load(stories_imatrix),
                         token_embedding_type=embd, output_tensor_type=out, n_threads=THREADS, progress=False)
    if embd:
        assert tensors_of(ours)["token_embd.weight"][0] == embd.upper()
        assert tensors_of(ours)["output.weight"][0] == out.upper()
    assert tensors_of(ours) == tensors_of(ref)
    assert kv(ours, "quantize.") == kv(ref, "quantize.") == {
        "quantize.imatrix.file": stories_imatrix.name, "quantize.imatrix.dataset": "calib.txt",
        "quantize.imatrix.entries_count": 35, "quantize.imatrix.chunks_count": kv(ref, "quantize.")[
            "quantize.imatrix.chunks_count"]}
    assert ours.read_bytes() == ref.read_bytes()


# --- quality: KL divergence to the f32 model from llama.cpp logits -------------------------------

def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def llama_logits(path: Path, chunks) -> np.ndarray:
    with Gguf(path, gpu_layers=0) as m, m.context(N_CTX, n_ubatch=N_CTX, threads=THREADS) as ctx:
        return np.concatenate([ctx.decode(c).copy() for c in chunks])


def kld(ref_logits: np.ndarray, path: Path, chunks) -> float:
    p, q = log_softmax(ref_logits), log_softmax(llama_logits(path, chunks))
    return float((np.exp(p) * (p - q)).sum(-1).mean())


class KldBench:
    """f32 reference logits on held-out chunks; KLD of any quantization of the same model."""

    def __init__(self, model: Path, calib: str, held_out: str, tmp: Path, n_eval: int = 8):
        self.model, self.tmp = model, tmp
        self.im = compute_imatrix(model, calib, n_ctx=N_CTX, n_threads=THREADS, progress=False)
        with Gguf(model, vocab_only=True) as m:
            self.chunks = chunks_of(m.tokenize(held_out), N_CTX, m.bos if m.add_bos else None, n_eval)
        self.ref = llama_logits(model, self.chunks)

    def __call__(self, qtype: str, imatrix: bool, token_embedding_type: str | None = None) -> float:
        q = quantize_file(self.model, self.tmp / f"{qtype}-{imatrix}-{token_embedding_type}.gguf", qtype,
                          imatrix=self.im if imatrix else None, token_embedding_type=token_embedding_type,
                          n_threads=THREADS, progress=False)
        return kld(self.ref, q, self.chunks)


def test_kld_falls_with_bits_and_imatrix_lowers_it_stories260k(stories, tmp_path):
    """hidden 64 < 256: llama.cpp falls back from k-quants to Q4_0/Q5_0/Q5_1/Q8_0 per tensor, so
    Q6_K and Q8_0 both end up Q8_0 here (equal KLD); the rest of the ladder is strict."""
    model, _ = stories
    text = tinystories()
    k = KldBench(model, text[:8000], text[15000:], tmp_path)
    ladder = [k(t, imatrix=True) for t in LADDER]
    assert all(a > b for a, b in zip(ladder[:4], ladder[1:5])), ladder
    assert ladder[4] >= ladder[5], ladder
    assert ladder[0] < k("Q2_K", imatrix=False)
    assert ladder[2] < k("Q4_K_M", imatrix=False)


def weighted_errors(model: Path, quant: Path, im: Imatrix) -> dict[str, float]:
    """Per imatrix tensor: sum_j E[x_j^2] * ||W[:, j] - Q(W)[:, j]||^2, the activation-weighted
    reconstruction error that the importance matrix asks llama.cpp's quantizer to minimise."""
    ref = {t.name: t for t in gguf.GGUFReader(model).tensors}
    out = {}
    for t in gguf.GGUFReader(quant).tensors:
        if t.name in im.sums:
            cols = int(t.shape[0])
            w = np.asarray(ref[t.name].data, np.float32).reshape(-1, cols)
            q = gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1, cols)
            out[t.name] = float((((q - w) ** 2) * im.values()[t.name]).sum())
    return out


def test_kld_falls_with_bits_and_imatrix_lowers_it_demo_model(tmp_path):
    """The demo model (hidden 256: real k-quants), calibrated on xvq's calibration set, evaluated
    on its held-out split: KLD falls strictly along the ladder. What the imatrix optimises, the
    activation-weighted error of every weight, falls with it at Q2_K and Q4_K_M. (The end-to-end
    KLD of this small demo model moves by only about ±5% with the imatrix, either way depending
    on the training run, so it is measured by bench/quantize.py, not asserted here.)"""
    from xvq.calib_data import heldout_texts, sample
    from xvq.convert import convert
    if not (DEMO / "config.json").is_file():
        pytest.skip("demo model (xvq/demo/model) not present")
    model = tmp_path / "demo-f32.gguf"
    convert(DEMO, model, "f32", progress=False)
    k = KldBench(model, sample(budget_tokens=4096, tokenizer_dir=DEMO).text,
                 "\n\n".join(heldout_texts().values()), tmp_path)
    ladder = [k(t, imatrix=True) for t in LADDER]
    assert all(a > b for a, b in zip(ladder, ladder[1:])), ladder
    for t in ("Q2_K", "Q4_K_M"):
        plain = quantize_file(model, tmp_path / f"{t}-plain.gguf", t, n_threads=THREADS, progress=False)
        e_plain = weighted_errors(model, plain, k.im)
        e_im = weighted_errors(model, tmp_path / f"{t}-True-None.gguf", k.im)
        assert e_plain and all(e_im[n] < e_plain[n] for n in e_plain), (t, e_plain, e_im)
        assert sum(e_im.values()) < sum(e_plain.values()), t


# --- the command ---------------------------------------------------------------------------------

def test_cli_from_model_folder_writes_the_layout(tmp_path, stories):
    """`make gguf`'s call: MODEL_DIR --out-root OUT --type ... → f16, one imatrix, one file per type."""
    from xvq.cli import main
    src = shared("stories260K-hf")
    _, calib = stories
    args = ["quantize", "gguf", str(src), "--out-root", str(tmp_path), "--type", "q4_k_m", "--type", "Q8_0",
            "--calib-file", str(calib), "--ctx", str(N_CTX), "--threads", str(THREADS)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    lay = Layout.for_model(src, None, tmp_path)
    assert lay.gguf("f16").is_file() and lay.imatrix().is_file()
    q4, q8 = lay.gguf("Q4_K_M"), lay.gguf("Q8_0")
    assert q4.name == "stories260k-hf-q4_k_m.gguf" and q8.is_file()
    meta = kv(q4, "quantize.")
    # names only: a published file carries no path of the machine that built it
    assert meta["quantize.imatrix.file"] == lay.imatrix().name
    assert meta["quantize.imatrix.dataset"] == calib.name
    assert meta["quantize.imatrix.entries_count"] == 35 and meta["quantize.imatrix.chunks_count"] > 0
    assert kv(q8, "quantize.") == {}                       # auto: no imatrix at Q6_K and above
    assert kv(q4, "general.file_type")["general.file_type"] == parse_type("Q4_K_M").ftype
    # a second call reuses the layout's imatrix instead of measuring again
    mtime = lay.imatrix().stat().st_mtime_ns
    r = CliRunner().invoke(main, args[:5] + ["--type", "Q3_K_M", "--calib-file", str(calib),
                                            "--threads", str(THREADS)])
    assert r.exit_code == 0, r.output
    assert "reusing" in r.output and lay.imatrix().stat().st_mtime_ns == mtime
    assert lay.gguf("Q3_K_M").is_file()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_bad_inputs_fail_cleanly(stories, stories_imatrix, tmp_path):
    model, _ = stories
    out = tmp_path / "out"
    out.mkdir()
    junk = tmp_path / "weights.gguf"
    junk.write_bytes(b"not a gguf at all")
    with pytest.raises(XvqError, match="not a GGUF file"):
        quantize(junk, ["Q4_K_M"], imatrix="none", outdir=out, progress=False)
    # a source already quantized at or below the asked type
    q4 = quantize_file(model, tmp_path / "q4.gguf", "Q4_K_M", n_threads=THREADS, progress=False)
    with pytest.raises(XvqError, match="already quantized"):
        quantize(q4, ["Q8_0"], imatrix="none", outdir=out, progress=False)
    # an imatrix of another model: tensor names differ, or the same names with other widths
    im = Imatrix.load(stories_imatrix)
    renamed = Imatrix({k.replace("blk.", "layers."): v for k, v in im.sums.items()},
                      {k.replace("blk.", "layers."): v for k, v in im.counts.items()}, ["x"], 1, N_CTX)
    wider = Imatrix({k: np.tile(v, 2) for k, v in im.sums.items()}, dict(im.counts), ["x"], 1, N_CTX)
    for i, other in enumerate((renamed, wider)):
        f = other.save(tmp_path / f"other{i}.imatrix.gguf")
        with pytest.raises(XvqError, match="another model"):
            quantize(model, ["Q4_K_M"], imatrix=f, outdir=out, progress=False)
    # IQ2 without an importance matrix, as llama.cpp refuses
    with pytest.raises(XvqError, match="requires an importance matrix"):
        quantize(model, ["IQ2_XXS"], imatrix="none", outdir=out, progress=False)
    with pytest.raises(XvqError, match="--outfile names one file"):
        quantize(model, ["Q4_K_M", "Q8_0"], imatrix="none", outfile=out / "x.gguf", progress=False)
    assert leftovers(out) == []
    # the CLI turns these into one line and exit status 1
    from xvq.cli import main
    r = CliRunner().invoke(main, ["quantize", "gguf", str(junk), "--type", "q4_k_m", "--outdir", str(out)])
    assert r.exit_code == 1 and "not a GGUF file" in r.output and leftovers(out) == []


def test_requantize_from_q8_0_is_allowed_downwards(stories, tmp_path):
    """Q8_0 → Q4_K_M is what llama-quantize --allow-requantize does; same bytes."""
    model, _ = stories
    q8 = quantize_file(model, tmp_path / "q8.gguf", "Q8_0", n_threads=THREADS, progress=False)
    ours = quantize_file(q8, tmp_path / "q4.gguf", "Q4_K_M", n_threads=THREADS, progress=False)
    ref = tmp_path / "ref.gguf"
    subprocess.run([str(anchor("llama-quantize")), "--allow-requantize", str(q8), str(ref), "Q4_K_M", str(THREADS)],
                   check=True, capture_output=True)
    assert tensors_of(ours) == tensors_of(ref)


def test_header_reader_agrees_with_gguf_py(stories, stories_imatrix, tmp_path):
    """xvq's array-skipping header reader against gguf-py's full reader."""
    from xvq.llamacpp import read_header
    model, _ = stories
    q = quantize_file(model, tmp_path / "q.gguf", "Q4_K_M", imatrix=Imatrix.load(stories_imatrix),
                      n_threads=THREADS, progress=False)
    for path in (model, q):
        ref = gguf.GGUFReader(path)
        ours = read_header(path)
        assert ours.tensors == {t.name: (tuple(int(x) for x in t.shape), int(t.tensor_type)) for t in ref.tensors}
        scalars = {k: f.contents() for k, f in ref.fields.items()
                   if not k.startswith("GGUF.") and f.types[0] != gguf.GGUFValueType.ARRAY}
        assert {k: ours.kv[k] for k in scalars} == pytest.approx(scalars)
        assert set(ours.kv) == set(scalars)


# ---------------------------------------------------------------- what a command writes, and where

@pytest.fixture(scope="module")
def spaced_f16(tmp_path_factory):
    """The demo's f16 GGUF whose general.name has spaces, as published GGUFs' names do."""
    from tests.conftest import DEMO
    from xvq.convert import convert
    if not DEMO.is_dir():
        pytest.skip("demo model not built")
    return convert(DEMO, tmp_path_factory.mktemp("spaced") / "demo-f16.gguf", "f16", name="Demo Model 1",
                   progress=False)[0]


def test_outdir_holds_everything_the_command_writes(spaced_f16, tmp_path, monkeypatch):
    """The imatrix (and its stamps) went to ./out/<name>/ under the current folder."""
    from click.testing import CliRunner
    from xvq.cli import main
    cwd, out = tmp_path / "cwd", tmp_path / "dest"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    r = CliRunner().invoke(main, ["quantize", "gguf", str(spaced_f16), "--type", "Q4_K_M", "--calib-tokens", "2048",
                                  "--outdir", str(out)])
    assert r.exit_code == 0, r.output
    assert list(cwd.iterdir()) == []
    assert (out / "demo-model-1-q4_k_m.gguf").is_file()
    # the layout below --outdir is named for a folder, not with general.name's spaces
    assert [p.name for p in out.iterdir() if p.is_dir()] == ["Demo-Model-1"]
    assert (out / "Demo-Model-1" / "imatrix" / "demo-model-1.imatrix.gguf").is_file()


def test_truncated_gguf_is_named_with_the_fix(spaced_f16, tmp_path):
    """A Q8_0 file cut short passed llama.cpp's "tensor data is not within the file bounds" on."""
    from click.testing import CliRunner
    from xvq.cli import main
    q8 = quantize(spaced_f16, ["Q8_0"], imatrix="none", outdir=tmp_path / "q", progress=False)[0]
    cut = tmp_path / "cut-q8_0.gguf"
    cut.write_bytes(q8.read_bytes()[: q8.stat().st_size * 2 // 3])
    for args in (["quantize", "gguf", str(cut), "--type", "Q4_0", "--imatrix", "none", "--outdir", str(tmp_path / "o")],
                 ["fit", str(cut), "--ram", "8G"]):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 1, r.output
        line = [ln for ln in r.output.splitlines() if ln.startswith("Error")]
        assert len(line) == 1 and "cut-q8_0.gguf: truncated GGUF" in line[0] and "again" in line[0], r.output
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").rglob("*.gguf"))
