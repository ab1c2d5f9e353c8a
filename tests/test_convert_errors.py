"""Bad input to `xvq convert`: a one-line error naming the file and the fix, a non-zero exit,
and nothing half-written in the output folder (no .gguf, no temporary files)."""
from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from xvq.cli import main


def run_convert(model: Path, out_dir: Path, *extra: str):
    return CliRunner().invoke(main, ["convert", str(model), "--outtype", "f16",
                                     "--outfile", str(out_dir / "model.gguf"), *extra])


def error_line(res) -> str:
    """The command failed cleanly: non-zero exit through click (no traceback) with exactly one
    line of error text."""
    assert res.exit_code != 0, res.output
    assert isinstance(res.exception, SystemExit), repr(res.exception)
    text = res.stderr if hasattr(res, "stderr") else res.output
    lines = [ln for ln in text.replace("\r", "\n").splitlines() if ln.strip().startswith("Error")]
    assert len(lines) == 1, text
    assert "Traceback" not in res.output
    return lines[0]


def assert_nothing_written(out_dir: Path, keep: set[str] = frozenset()) -> None:
    left = {p.name for p in out_dir.iterdir()} - set(keep) if out_dir.exists() else set()
    assert not left, f"left behind: {sorted(left)}"


@pytest.fixture
def model(tiny_xverse, tmp_path) -> Path:
    """A private copy of the sharded-pickle XVERSE fixture to damage."""
    return Path(shutil.copytree(tiny_xverse, tmp_path / "model"))


@pytest.fixture
def st_model(tiny_llama_gqa, tmp_path) -> Path:
    """A private copy of the LLaMA fixture, re-saved as two safetensors shards with an index."""
    from safetensors.torch import load_file, save_file
    d = Path(shutil.copytree(tiny_llama_gqa, tmp_path / "st", ignore=shutil.ignore_patterns("model*.safetensors*")))
    src = tiny_llama_gqa / "model.safetensors"
    if not src.exists():
        pytest.skip("fixture is not a single safetensors file")
    state = load_file(src)
    names = sorted(state)
    half = len(names) // 2
    weight_map = {}
    for k, part in enumerate((names[:half], names[half:])):
        fname = f"model-{k + 1:05d}-of-00002.safetensors"
        save_file({n: state[n] for n in part}, d / fname, metadata={"format": "pt"})
        weight_map |= {n: fname for n in part}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d


def test_intact_copies_convert(model, st_model, tmp_path):
    """The fixtures the other tests damage are fine as they are."""
    for m in (model, st_model):
        res = run_convert(m, tmp_path / f"ok-{m.name}")
        assert res.exit_code == 0, res.output
        assert (tmp_path / f"ok-{m.name}" / "model.gguf").is_file()


def test_missing_shard_named_by_bin_index(model, tmp_path):
    (model / "pytorch_model-00002-of-00002.bin").unlink()
    msg = error_line(run_convert(model, tmp_path / "out"))
    assert "pytorch_model-00002-of-00002.bin" in msg and "missing" in msg
    assert_nothing_written(tmp_path / "out")


def test_index_names_a_file_that_does_not_exist(st_model, tmp_path):
    index = st_model / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    first = next(iter(data["weight_map"]))
    data["weight_map"][first] = "model-00003-of-00003.safetensors"
    index.write_text(json.dumps(data))
    msg = error_line(run_convert(st_model, tmp_path / "out"))
    assert "model-00003-of-00003.safetensors" in msg and "model.safetensors.index.json" in msg
    assert_nothing_written(tmp_path / "out")


def test_missing_shard_without_index(st_model, tmp_path):
    (st_model / "model.safetensors.index.json").unlink()
    (st_model / "model-00002-of-00002.safetensors").unlink()
    msg = error_line(run_convert(st_model, tmp_path / "out"))
    assert "model-00002-of-00002.safetensors" in msg
    assert_nothing_written(tmp_path / "out")


def test_index_not_json(st_model, tmp_path):
    (st_model / "model.safetensors.index.json").write_text("{ not json")
    msg = error_line(run_convert(st_model, tmp_path / "out"))
    assert "model.safetensors.index.json" in msg
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_safetensors_shard(st_model, tmp_path, keep):
    shard = st_model / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:int(len(data) * keep)])
    msg = error_line(run_convert(st_model, tmp_path / "out"))
    assert "model-00002-of-00002.safetensors" in msg and "truncated" in msg
    assert_nothing_written(tmp_path / "out")


def test_truncated_safetensors_header(st_model, tmp_path):
    (st_model / "model-00001-of-00002.safetensors").write_bytes(b"\x10\x00")
    msg = error_line(run_convert(st_model, tmp_path / "out"))
    assert "model-00001-of-00002.safetensors" in msg
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_truncated_pickle_shard(model, tmp_path, keep):
    shard = model / "pytorch_model-00001-of-00002.bin"
    data = shard.read_bytes()
    shard.write_bytes(data[:int(len(data) * keep)])
    msg = error_line(run_convert(model, tmp_path / "out"))
    assert "pytorch_model-00001-of-00002.bin" in msg
    assert_nothing_written(tmp_path / "out")


def test_shape_mismatch_against_config(model, tmp_path):
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(cfg | {"intermediate_size": cfg["intermediate_size"] + 8}))
    msg = error_line(run_convert(model, tmp_path / "out"))
    assert "mlp" in msg and ".bin" in msg and "config" in msg
    assert_nothing_written(tmp_path / "out")


def test_unknown_dtype_safetensors(st_model, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file
    shard = st_model / "model-00001-of-00002.safetensors"
    state = load_file(shard)
    name = next(iter(state))
    state[name] = torch.zeros(state[name].shape, dtype=torch.int8)
    save_file(state, shard)
    msg = error_line(run_convert(st_model, tmp_path / "out"))
    assert "model-00001-of-00002.safetensors" in msg and "I8" in msg and name in msg
    assert_nothing_written(tmp_path / "out")


def test_unknown_dtype_pickle(model, tmp_path):
    import torch
    shard = model / "pytorch_model-00001-of-00002.bin"
    state = torch.load(shard, weights_only=True)
    name = next(iter(state))
    state[name] = torch.zeros(state[name].shape, dtype=torch.int8)
    torch.save(state, shard)
    msg = error_line(run_convert(model, tmp_path / "out"))
    assert "pytorch_model-00001-of-00002.bin" in msg and "int8" in msg
    assert_nothing_written(tmp_path / "out")


def test_tokenizer_missing(model, tmp_path):
    (model / "tokenizer.json").unlink()
    msg = error_line(run_convert(model, tmp_path / "out"))
    assert str(model) in msg and "tokenizer" in msg
    assert_nothing_written(tmp_path / "out")


def test_config_missing_and_broken(model, tmp_path):
    (model / "config.json").write_text("{")
    assert "config.json" in error_line(run_convert(model, tmp_path / "out"))
    (model / "config.json").unlink()
    assert "config.json" in error_line(run_convert(model, tmp_path / "out"))
    assert "not a folder" in error_line(run_convert(tmp_path / "nowhere", tmp_path / "out"))
    assert_nothing_written(tmp_path / "out")


def test_no_weights(model, tmp_path):
    for p in model.glob("pytorch_model*"):
        p.unlink()
    assert "no weights" in error_line(run_convert(model, tmp_path / "out"))
    assert_nothing_written(tmp_path / "out")


def test_unwritable_output(model, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    msg = error_line(run_convert(model, blocker / "sub"))
    assert str(blocker) in msg
    assert blocker.read_text() == ""


def test_bad_split_size(model, tmp_path):
    msg = error_line(run_convert(model, tmp_path / "out", "--split-max-size", "lots"))
    assert "split" in msg.lower() and "lots" in msg
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("split", [None, "1M"])
def test_disk_full_leaves_nothing_and_keeps_previous_file(model, tmp_path, monkeypatch, split):
    """A write that fails with ENOSPC midway: clean error, no partial shard, no temp file, and a
    finished file from an earlier run is untouched."""
    import xvq.convert.writer as writer
    out = tmp_path / "out"
    extra = ["--split-max-size", split] if split else []
    assert run_convert(model, out, *extra).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = {"n": 0}
    real_encode = writer.encode

    def encode_then_fail(*args):
        calls["n"] += 1
        if calls["n"] > 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_encode(*args)
    monkeypatch.setattr(writer, "encode", encode_then_fail)
    msg = error_line(run_convert(model, out, *extra))
    assert "disk full" in msg and "model" in msg
    assert calls["n"] > 5
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_disk_full_fresh_folder(model, tmp_path, monkeypatch):
    import xvq.convert.writer as writer

    def no_space(*args):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(writer, "encode", no_space)
    msg = error_line(run_convert(model, tmp_path / "out"))
    assert "disk full" in msg and str(tmp_path / "out") in msg
    assert_nothing_written(tmp_path / "out")


def test_interrupt_leaves_nothing(model, tmp_path, monkeypatch):
    import xvq.convert.writer as writer

    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(writer, "encode", interrupted)
    res = run_convert(model, tmp_path / "out")
    assert res.exit_code != 0
    assert_nothing_written(tmp_path / "out")


def test_corrupt_safetensors_header(st_model, tmp_path):
    shard = st_model / "model-00001-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[8:12] = b"\xff\xfe{["  # not JSON any more, length unchanged
    shard.write_bytes(bytes(data))
    msg = error_line(run_convert(st_model, tmp_path / "out"))
    assert "model-00001-of-00002.safetensors" in msg and "header" in msg
    assert_nothing_written(tmp_path / "out")


def test_safetensors_shape_disagrees_with_its_data(st_model, tmp_path):
    """A header whose shape does not match the byte range it gives (hand-edited or corrupt)."""
    shard = st_model / "model-00001-of-00002.safetensors"
    data = shard.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    name = next(k for k, v in header.items() if k != "__metadata__" and len(v["shape"]) == 2)
    rows, cols = header[name]["shape"]
    header[name]["shape"] = [rows // 2, cols]
    blob = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(blob) == n
    shard.write_bytes(data[:8] + blob + data[8 + n:])
    msg = error_line(run_convert(st_model, tmp_path / "out"))
    assert "model-00001-of-00002.safetensors" in msg and name in msg
    assert_nothing_written(tmp_path / "out")


def test_config_missing_a_required_field(model, tmp_path):
    cfg = json.loads((model / "config.json").read_text())
    del cfg["num_attention_heads"]
    (model / "config.json").write_text(json.dumps(cfg))
    msg = error_line(run_convert(model, tmp_path / "out"))
    assert "config.json" in msg and "num_attention_heads" in msg
    assert_nothing_written(tmp_path / "out")


def test_resplitting_replaces_the_earlier_files(model, tmp_path):
    """Converting again with another split leaves only the new file(s): no stale shard that a
    loader would pick up as a second model."""
    out = tmp_path / "out"
    assert run_convert(model, out, "--split-max-size", "1M").exit_code == 0
    shards = sorted(p.name for p in out.iterdir())
    assert len(shards) > 1 and all("-of-" in s for s in shards)
    (out / "other-model.gguf").write_text("not ours")
    assert run_convert(model, out).exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == ["model.gguf", "other-model.gguf"]
    assert run_convert(model, out, "--split-max-size", "1M").exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(shards + ["other-model.gguf"])


def test_outfile_is_a_folder(model, tmp_path):
    target = tmp_path / "out" / "model.gguf"
    target.mkdir(parents=True)
    (target / "keep.txt").write_text("x")
    msg = error_line(run_convert(model, tmp_path / "out"))
    assert str(target) in msg and "folder" in msg
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.gguf"]
    assert (target / "keep.txt").read_text() == "x"


def test_unknown_chat_template(model, tmp_path):
    msg = error_line(run_convert(model, tmp_path / "out", "--chat-template", "chatml-please"))
    assert "chatml-please" in msg and "xverse" in msg
    assert_nothing_written(tmp_path / "out")
