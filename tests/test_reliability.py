"""Issue 13: no input destroyed, nothing stale reused, killed runs leave nothing behind, every bad
input one line. Each test reproduces one reported failure of the earlier code."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tests.conftest import DEMO, ROOT
from xvq.cli import main
from xvq.errors import XvqError


def invoke(*args: str, **kw):
    return CliRunner().invoke(main, [str(a) for a in args], **kw)


def error_line(res) -> str:
    """Failed cleanly: non-zero exit through click, one `Error` line, no traceback."""
    assert res.exit_code != 0, res.output
    assert isinstance(res.exception, SystemExit), repr(res.exception)
    lines = [ln for ln in res.output.splitlines() if ln.strip().startswith("Error")]
    assert len(lines) == 1, res.output
    assert "Traceback" not in res.output
    return lines[0]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) if folder.exists() else []


def env_with_worktree() -> dict:
    return os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture
def st_model(tiny_llama_gqa, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_llama_gqa, tmp_path / "st"))


@pytest.fixture
def bin_model(tiny_xverse, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_xverse, tmp_path / "bin"))


# ---------------------------------------------------------------- 1. data loss

def test_convert_never_overwrites_the_checkpoint(st_model, tmp_path):
    weights = st_model / "model.safetensors"
    before = sha(weights)
    msg = error_line(invoke("convert", st_model, "--outfile", weights))
    assert "model.safetensors" in msg and ".gguf" in msg
    assert sha(weights) == before
    msg = error_line(invoke("convert", st_model, "--outfile", tmp_path / "out" / "model.bin"))
    assert "model.bin" in msg and ".gguf" in msg
    assert not (tmp_path / "out").exists()


def test_convert_refuses_a_gguf_that_is_a_checkpoint_file(st_model, tmp_path):
    """Even under a .gguf name: a link to the weights is the weights."""
    link = tmp_path / "weights.gguf"
    os.link(st_model / "model.safetensors", link)
    before = sha(link)
    msg = error_line(invoke("convert", st_model, "--outfile", link))
    assert "weights.gguf" in msg and "model.safetensors" in msg
    assert sha(st_model / "model.safetensors") == before


# ---------------------------------------------------------------- 2. stale artifacts

def other_weights_same_stat(model: Path) -> None:
    """Replace model.safetensors with other weights of the same size, keeping its mtime (`cp -p`)."""
    from safetensors.torch import load_file, save_file
    f = model / "model.safetensors"
    st = f.stat()
    state = {k: (v.flip(0).contiguous() if v.dim() == 2 else v) for k, v in load_file(f).items()}
    save_file(state, f, metadata={"format": "pt"})
    assert f.stat().st_size == st.st_size
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_quantize_does_not_reuse_an_f16_of_replaced_weights(st_model, tmp_path):
    root = tmp_path / "out"
    q8 = ["quantize", "gguf", st_model, "--type", "Q8_0", "--imatrix", "none", "--out-root", root, "--name", "m"]
    assert invoke(*q8).exit_code == 0
    old = (root / "m" / "gguf" / "m-q8_0.gguf").read_bytes()
    other_weights_same_stat(st_model)
    res = invoke(*q8)
    assert res.exit_code == 0, res.output
    # reference: the new weights converted and quantized from scratch elsewhere
    ref_root = tmp_path / "ref"
    assert invoke("convert", st_model, "--name", "m", "--outfile", ref_root / "m-f16.gguf").exit_code == 0
    assert invoke("quantize", "gguf", ref_root / "m-f16.gguf", "--type", "Q8_0", "--imatrix", "none",
                  "--outfile", ref_root / "m-q8_0.gguf").exit_code == 0
    new = (root / "m" / "gguf" / "m-q8_0.gguf").read_bytes()
    assert new != old
    assert new == (ref_root / "m-q8_0.gguf").read_bytes()


def test_quantize_reuses_the_f16_of_unchanged_weights(st_model, tmp_path, monkeypatch):
    import xvq.convert
    root = tmp_path / "out"
    q8 = ["quantize", "gguf", st_model, "--type", "Q8_0", "--imatrix", "none", "--out-root", root]
    assert invoke(*q8).exit_code == 0
    os.utime(st_model / "model.safetensors")           # touched, same bytes: no reconversion

    def no_convert(*a, **k):
        raise AssertionError("converted again")
    monkeypatch.setattr(xvq.convert, "convert", no_convert)
    res = invoke(*q8)
    assert res.exit_code == 0, res.output


def test_make_gguf_converts_once(st_model, tmp_path, monkeypatch):
    """`make gguf`: `xvq convert` into the layout, then `xvq quantize gguf MODEL_DIR` reuses that f16."""
    import xvq.convert
    root = tmp_path / "out"
    assert invoke("convert", st_model, "--out-root", root, "--outtype", "f16").exit_code == 0
    monkeypatch.setattr(xvq.convert, "convert", lambda *a, **k: pytest.fail("converted again"))
    res = invoke("quantize", "gguf", st_model, "--type", "Q8_0", "--imatrix", "none", "--out-root", root)
    assert res.exit_code == 0, res.output


def test_identity_sees_content_not_mtime(tmp_path, monkeypatch):
    from xvq import identity
    d = tmp_path / "m"
    d.mkdir()
    (d / "a.bin").write_bytes(b"x" * 1000)
    (d / "config.json").write_text("{}")
    cache = tmp_path / "cache.json"
    first = identity.source_identity(d, cache)
    assert first == identity.source_identity(d, cache)
    # independent reference: sha256 over "name\tsha256(content)\n" of the sorted files
    ref = hashlib.sha256("".join(f"{n}\t{hashlib.sha256((d / n).read_bytes()).hexdigest()}\n"
                                 for n in ("a.bin", "config.json")).encode()).hexdigest()
    assert first == ref
    st = (d / "a.bin").stat()
    (d / "a.bin").write_bytes(b"y" * 1000)
    os.utime(d / "a.bin", ns=(st.st_atime_ns, st.st_mtime_ns))
    identity._memory.clear()
    identity._loaded.clear()
    assert identity.source_identity(d, cache) != first
    # a second lookup (fresh process: empty memory) reads the cache, written when a step succeeds
    identity.flush()
    identity._memory.clear()
    identity._loaded.clear()
    monkeypatch.setattr(identity, "sha256_file", lambda p: pytest.fail(f"hashed {p} again"))
    identity.source_identity(d, cache)


def test_release_stamp_invalidated_by_replaced_source(tmp_path):
    """A step stamped with the source identity reruns after the weights change, mtime kept."""
    from xvq.identity import source_identity
    from xvq.stamps import Stamps
    d = tmp_path / "m"
    d.mkdir()
    (d / "w.bin").write_bytes(b"a" * 64)
    out = tmp_path / "o.txt"
    out.write_text("made")
    stamps = Stamps(tmp_path / ".stamps")
    runs = []
    step = lambda: stamps.run("convert", {"model": source_identity(d, stamps.cache)}, [out],  # noqa: E731
                              lambda: runs.append(1))
    assert step() and not step()
    st = (d / "w.bin").stat()
    (d / "w.bin").write_bytes(b"b" * 64)
    os.utime(d / "w.bin", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert step() and len(runs) == 2
    out.write_text("edited by hand")                    # a replaced output is not trusted either
    assert step() and len(runs) == 3


# ---------------------------------------------------------------- 3. stamps written in place

def test_damaged_stamp_means_rerun_not_crash(tmp_path):
    from xvq.stamps import Stamps
    folder = tmp_path / ".stamps"
    folder.mkdir()
    (folder / "gguf-q4_k_m.json").write_text("")        # what a full disk left with the earlier code
    out = tmp_path / "x.gguf"
    out.write_bytes(b"GGUF")
    ran = []
    assert Stamps(folder).run("gguf-q4_k_m", {"a": 1}, [out], lambda: ran.append(1))
    assert ran and json.loads((folder / "gguf-q4_k_m.json").read_text())["inputs"] == {"a": 1}


FSIZE_CHILD = """
import resource, signal, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)       # writes past the limit fail with EFBIG instead
from xvq.stamps import Stamps
out = Path(sys.argv[1]) / "x.gguf"
resource.setrlimit(resource.RLIMIT_FSIZE, (40, 40))  # room for the lock, not for a stamp
Stamps(Path(sys.argv[1]) / ".stamps").record("gguf-q4_k_m", {"type": "Q4_K_M", "pad": "x" * 200}, [out])
"""


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")
def test_stamp_write_that_fails_leaves_the_old_stamp(tmp_path):
    from xvq.stamps import Stamps
    out = tmp_path / "x.gguf"
    out.write_bytes(b"GGUF")
    Stamps(tmp_path / ".stamps").record("gguf-q4_k_m", {"type": "old"}, [out])
    before = (tmp_path / ".stamps" / "gguf-q4_k_m.json").read_text()
    r = subprocess.run([sys.executable, "-c", FSIZE_CHILD, str(tmp_path), str(ROOT)], capture_output=True, text=True)
    assert r.returncode != 0
    assert (tmp_path / ".stamps" / "gguf-q4_k_m.json").read_text() == before
    assert Stamps(tmp_path / ".stamps").fresh("gguf-q4_k_m", {"type": "old"}, [out])
    assert tree(tmp_path / ".stamps") == ["gguf-q4_k_m.json", "identity-cache.json"]


# ---------------------------------------------------------------- 4. killed runs leak

WRITER = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from xvq.fsio import atomic_output
with atomic_output(Path(sys.argv[1])) as tmp:
    tmp.write_bytes(b"partial" * 1000)
    print("writing", flush=True)
    time.sleep(60)
"""


def start_writer(final: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", WRITER, str(final), str(ROOT)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "writing"
    return p


def test_sigkilled_writer_is_swept_by_the_next_run(tmp_path):
    from xvq.fsio import atomic_output
    final = tmp_path / "gguf" / "demo-q4_k_m.gguf"
    p = start_writer(final)
    assert any(n.endswith(".xvq-partial") for n in tree(tmp_path / "gguf"))
    # while the writer lives, another run may not take its output
    with pytest.raises(XvqError, match=f"PID {p.pid}"):
        with atomic_output(final):
            pass
    p.kill()
    p.wait()
    (tmp_path / "gguf" / f".old.gguf.xvq-tmp-{p.pid}").write_bytes(b"earlier xvq")   # the earlier naming
    with atomic_output(tmp_path / "gguf" / "other.gguf") as tmp:    # any later write into the folder
        tmp.write_bytes(b"ok")
    assert tree(tmp_path / "gguf") == ["other.gguf"]


def test_sweep_keeps_partials_of_live_writers(tmp_path):
    from xvq.fsio import sweep_tree
    p = start_writer(tmp_path / "a" / "f.gguf")
    try:
        assert sweep_tree(tmp_path) == []
        assert len(tree(tmp_path / "a")) == 2
    finally:
        p.kill()
        p.wait()
    assert len(sweep_tree(tmp_path)) == 2 and tree(tmp_path / "a") == []


SLOW_CONVERT = """
import sys, time
sys.path.insert(0, sys.argv[1])
import xvq.convert.writer as w
real = w.encode
def slow(*a):
    print("encoding", flush=True)
    time.sleep(0.2)
    return real(*a)
w.encode = slow
from xvq.cli import main
main(sys.argv[2:])
"""


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM")
def test_sigterm_cleans_up_like_ctrl_c(bin_model, tmp_path):
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-c", SLOW_CONVERT, str(ROOT), "convert", str(bin_model),
                          "--outfile", str(out / "m.gguf")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env_with_worktree())
    assert p.stdout.readline().strip() == "encoding"
    assert tree(out)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode != 0 and "Traceback" not in err
    assert tree(out) == []


# ---------------------------------------------------------------- 5. tracebacks instead of one line

@pytest.mark.parametrize("content", [b'{"model": {"type": "BPE", "vocab": {"a": 0', b"\x00\xff\xfe\x89PNG\x00" * 50,
                                     b'{"model": {"type": "BPE", "byte_fallback": true}}', b"[1, 2]"],
                         ids=["truncated", "binary", "no-vocab", "not-object"])
def test_broken_tokenizer_json_one_line(st_model, tmp_path, content):
    (st_model / "tokenizer.json").write_bytes(content)
    msg = error_line(invoke("convert", st_model, "--outfile", tmp_path / "out" / "m.gguf"))
    assert "tokenizer.json" in msg and "restore" in msg
    assert tree(tmp_path / "out") == []


@pytest.mark.parametrize("config,word", [("[]", "object"), ("null", "object"),
                                         ({"hidden_size": "256"}, "hidden_size"),
                                         ({"num_hidden_layers": 2.5}, "num_hidden_layers"),
                                         ({"rms_norm_eps": "1e-6"}, "rms_norm_eps")])
def test_broken_config_one_line(st_model, tmp_path, config, word):
    if isinstance(config, dict):
        config = json.dumps(json.loads((st_model / "config.json").read_text()) | config)
    (st_model / "config.json").write_text(config)
    msg = error_line(invoke("convert", st_model, "--outfile", tmp_path / "out" / "m.gguf"))
    assert "config.json" in msg and word in msg
    assert tree(tmp_path / "out") == []


def test_unexpected_error_one_line_traceback_with_debug(st_model, tmp_path, monkeypatch):
    import xvq.convert
    monkeypatch.setattr(xvq.convert, "convert", lambda *a, **k: {}["no such key"])
    args = ["convert", st_model, "--outfile", tmp_path / "m.gguf"]
    msg = error_line(invoke(*args))
    assert "KeyError" in msg and "--debug" in msg
    assert isinstance(invoke("--debug", *args).exception, KeyError)
    assert isinstance(invoke(*args, "--debug").exception, KeyError)
    monkeypatch.setenv("XVQ_DEBUG", "1")
    assert isinstance(invoke(*args).exception, KeyError)


# ---------------------------------------------------------------- 6. wrong words on a full disk

def test_convert_full_disk_without_errno(bin_model, tmp_path, monkeypatch):
    """numpy's tofile reports a full disk as a bare OSError ("cannot write (None)" before)."""
    import xvq.convert.writer as writer
    import xvq.fsio as fsio

    def full(*a):
        raise OSError("524288 requested and 0 written")
    monkeypatch.setattr(writer, "encode", full)
    # room when convert checks before writing, none once the write has failed
    free = iter([10 << 30])
    monkeypatch.setattr(fsio.shutil, "disk_usage",
                        lambda p: shutil._ntuple_diskusage(20 << 30, 10 << 30, next(free, 4096)))
    msg = error_line(invoke("convert", bin_model, "--outfile", tmp_path / "out" / "m.gguf"))
    assert "disk full" in msg and "m.gguf" in msg and "None" not in msg
    assert tree(tmp_path / "out") == []


def test_quantize_full_disk_blames_the_output(tmp_path, monkeypatch):
    """llama.cpp's iostream error on a full disk named the *source* f16 before."""
    from llama_cpp import llama_cpp as C

    import xvq.fsio as fsio
    src = tmp_path / "src" / "demo-f16.gguf"
    assert invoke("convert", DEMO, "--outfile", src).exit_code == 0

    def full_disk_quantize(src_b, dst_b, params):
        Path(dst_b.decode()).write_bytes(b"GGUF" + b"\0" * 100)
        return 1
    monkeypatch.setattr(C, "llama_model_quantize", full_disk_quantize)
    # room when quantize checks before writing, none once llama.cpp's write has failed
    free = iter([10 << 30])
    monkeypatch.setattr(fsio.shutil, "disk_usage",
                        lambda p: shutil._ntuple_diskusage(20 << 30, 10 << 30, next(free, 0)))
    out = tmp_path / "out" / "q.gguf"
    msg = error_line(invoke("quantize", "gguf", src, "--type", "Q8_0", "--imatrix", "none", "--outfile", out))
    assert "disk full" in msg and str(out) in msg and "demo-f16" not in msg
    assert tree(tmp_path / "out") == []


def test_full_disk_message_names_no_missing_option(tmp_path):
    """The imatrix writer has no --outdir; the message must not suggest one."""
    from xvq.fsio import atomic_output
    with pytest.raises(XvqError) as e:
        with atomic_output(tmp_path / "imatrix" / "m.imatrix.gguf") as tmp:
            tmp.write_bytes(b"x")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert "disk full" in str(e.value) and "--outdir" not in str(e.value)
    assert str(tmp_path / "imatrix") in str(e.value)
    assert tree(tmp_path) == []


# ---------------------------------------------------------------- 7. validate checks paths first

def test_validate_missing_artifact_before_reference_pass(tmp_path, monkeypatch):
    import xvq.validate
    monkeypatch.setattr(xvq.validate, "validate", lambda *a, **k: pytest.fail("the reference pass ran"))
    missing = tmp_path / "nope-q4_k_m.gguf"
    msg = error_line(invoke("validate", "--reference", DEMO, missing))
    assert "nope-q4_k_m.gguf" in msg


# ---------------------------------------------------------------- 8. run --ctx -5

def test_run_negative_ctx_is_a_usage_error(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    res = invoke("run", f, "--ctx", "-5")
    assert res.exit_code == 2 and "--ctx" in res.output and "release verify" not in res.output


# ---------------------------------------------------------------- 10. the rest

def test_nonfinite_weights_refused_with_tensor_name(st_model, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file
    f = st_model / "model.safetensors"
    state = load_file(f)
    name = "model.layers.1.mlp.down_proj.weight"
    state[name][5, 3] = float("nan")
    state["model.layers.0.self_attn.q_proj.weight"][0, 0] = float("inf")
    assert state[name].dtype == torch.bfloat16
    save_file(state, f, metadata={"format": "pt"})
    out = tmp_path / "out"
    msg = error_line(invoke("convert", st_model, "--outfile", out / "m.gguf"))
    assert "model.layers.0.self_attn.q_proj.weight" in msg and "NaN/Inf" in msg and "--allow-nonfinite" in msg
    assert tree(out) == []
    res = invoke("convert", st_model, "--outfile", out / "m.gguf", "--outtype", "f32", "--allow-nonfinite")
    assert res.exit_code == 0, res.output
    assert "warning" in res.output and name in res.output
    from gguf import GGUFReader
    t = {t.name: t for t in GGUFReader(out / "m.gguf").tensors}["blk.1.ffn_down.weight"]
    assert np.isnan(np.asarray(t.data)).sum() == 1


def test_failed_conversion_inside_quantize_leaves_no_layout(st_model, tmp_path):
    """The same refusal through `quantize gguf MODEL_DIR`: no f16, no stamp, no cache, no folder."""
    from safetensors.torch import load_file, save_file
    f = st_model / "model.safetensors"
    state = load_file(f)
    state["model.norm.weight"][7] = float("nan")
    save_file(state, f, metadata={"format": "pt"})
    msg = error_line(invoke("quantize", "gguf", st_model, "--type", "Q8_0", "--imatrix", "none",
                            "--out-root", tmp_path / "out"))
    assert "model.norm.weight" in msg
    assert tree(tmp_path / "out") == []


def test_nonfinite_f32_pickle_refused(bin_model, tmp_path):
    import torch
    shard = sorted(bin_model.glob("pytorch_model-*.bin"))[0]
    state = torch.load(shard, weights_only=True)
    name = next(k for k, v in state.items() if v.dim() == 2)
    state[name][1, 1] = float("-inf")
    torch.save(state, shard)
    msg = error_line(invoke("convert", bin_model, "--outfile", tmp_path / "out" / "m.gguf"))
    assert name in msg and shard.name in msg


def test_fit_negative_ctx_is_a_usage_error():
    res = invoke("fit", DEMO, "--ctx", "-1")
    assert res.exit_code == 2 and "--ctx" in res.output


def test_failed_gptq_leaves_no_folder(tmp_path, monkeypatch):
    import xvq.quantize.gptq as gptq
    from xvq.quantize.gptq import GptqSettings, quantize_gptq
    monkeypatch.setattr(gptq, "calibration_sequences", lambda *a: [{"input_ids": [1] * 64}])

    def fail(*a, **k):
        raise XvqError("staging failed")
    monkeypatch.setattr(gptq, "gptq_readable", fail)
    out = tmp_path / "out" / "demo" / "gptq" / "demo-GPTQ-Int4"
    with pytest.raises(XvqError, match="staging failed"):
        quantize_gptq(DEMO, out, GptqSettings(), texts=["unused"])
    assert tree(tmp_path) == []


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_malicious_pickle_says_code_was_refused(bin_model, tmp_path):
    import torch
    marker = tmp_path / "code-ran"
    shard = sorted(bin_model.glob("pytorch_model-*.bin"))[0]
    state = torch.load(shard, weights_only=True)
    state["payload"] = _Exploit(marker)
    torch.save(state, shard)
    msg = error_line(invoke("convert", bin_model, "--outfile", tmp_path / "out" / "m.gguf"))
    assert shard.name in msg and "code" in msg and "refused" in msg and "download it again" not in msg
    assert not marker.exists()


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
def test_first_nonfinite_matches_numpy(dtype):
    """The bit test on stored rows against numpy's isfinite on the float32 values."""
    import torch
    from xvq.convert.writer import first_nonfinite
    rng = np.random.default_rng(0)
    for bad in (None, float("nan"), float("inf"), float("-inf")):
        x = torch.from_numpy(rng.standard_normal((16, 96)).astype(np.float32) * 1e3)
        if bad is not None:
            x[int(rng.integers(16)), int(rng.integers(96))] = bad
            x[15, 95] = bad
        t = x.to({"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[dtype])
        raw = t.view(torch.int16).numpy().view(np.uint16) if dtype == "BF16" else t.numpy()
        ref = np.flatnonzero(~np.isfinite(t.float().numpy()))
        assert first_nonfinite(raw, dtype) == (int(ref[0]) if len(ref) else None)


def test_gguf_carries_no_path_of_the_machine_that_built_it(tmp_path):
    """Two builds of the demo model into different out roots give byte-identical GGUFs (the
    imatrix keys hold names, not the builder's folders)."""
    from xvq.cli import main
    outs = []
    for root in (tmp_path / "a" / "deep" / "root", tmp_path / "b"):
        r = CliRunner().invoke(main, ["quantize", "gguf", str(DEMO), "--name", "Demo", "--out-root", str(root),
                                      "--type", "Q4_K_M", "--calib-tokens", "4096", "--threads", "1"])
        assert r.exit_code == 0, r.output
        outs.append(root / "Demo" / "gguf" / "demo-q4_k_m.gguf")
    data = [p.read_bytes() for p in outs]
    assert data[0] == data[1]
    assert str(tmp_path).encode() not in data[0] and b"quantize.imatrix.file" in data[0]


# ---------------------------------------------------------------- 6. legacy (pre-zip) pickles

def test_legacy_pickle_converts_like_the_zip_format(bin_model, tmp_path):
    """PyTorch < 1.6 wrote `pytorch_model.bin` as a plain pickle, not a zip: a valid file that
    was refused with a message cut mid-word. It converts now, to the same GGUF as the zip format."""
    import torch
    reference = tmp_path / "zip.gguf"
    assert invoke("convert", bin_model, "--outfile", reference, "--outtype", "f32").exit_code == 0
    for shard in bin_model.glob("pytorch_model*.bin"):
        state = torch.load(shard, weights_only=True)
        torch.save(state, shard, _use_new_zipfile_serialization=False)
        assert not zipfile.is_zipfile(shard)
    legacy = tmp_path / "legacy.gguf"
    r = invoke("convert", bin_model, "--outfile", legacy, "--outtype", "f32")
    assert r.exit_code == 0, r.output
    assert sha(legacy) == sha(reference)


def test_library_messages_are_cut_at_a_word():
    """torch's legacy-pickle complaint is 170 characters; it was cut at 120, mid-word ("your che")."""
    from xvq.errors import first_words
    torch_says = ("mmap can only be used with files saved with `torch.save(_use_new_zipfile_serialization=True), "
                  "please torch.save your checkpoint with this option in order to use mmap.\nmore")
    cut = first_words(torch_says, 120)
    assert cut == ("mmap can only be used with files saved with `torch.save(_use_new_zipfile_serialization=True), "
                   "please torch.save your …")
    assert first_words("short\nsecond line") == "short"
