"""Faults, for real: `xvq release` of the demo model SIGKILLed at several points (separate
processes, no mocks), resumed, and a disk that fills mid-release (a small tmpfs, where this
machine lets the test mount one). Afterwards: nothing left behind (no partial, no lock, no empty
folder, every stamp readable), `xvq release verify` passes, and every GGUF and GPTQ file is
byte-identical to an uninterrupted release's.

To stay affordable (2.5-3 minutes on 2 shared cores: one reference release of ~40 s, six killed
runs and a resume, three disk-full runs and their resumes) the release is limited to one GGUF type
that needs an importance matrix (Q4_K_M: convert, imatrix, quantize) and GPTQ Int4, with small
calibration and validation budgets; every run uses the same out root so that any path recorded
in an artifact is the same too. GPTQ's quant_log.csv holds timings and is not compared."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.conftest import DEMO, ROOT
from xvq.cli import main

pytestmark = pytest.mark.slow
NAME = "XVERSE-Demo"
ARGS = ["release", str(DEMO), "--name", NAME, "--gguf-type", "Q4_K_M", "--gptq-bits", "4",
        "--max-tokens", "1024", "--calib-tokens", "2048", "--allow-partial"]
LEFTOVER_MARKS = (".xvq-partial", ".xvq-tmp", ".lock")


def xvq_process(root: Path, **kw) -> subprocess.Popen:
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, "-m", "xvq.cli", *ARGS, "--out-root", str(root)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def artifacts(base: Path) -> dict[str, str]:
    """sha256 of every GGUF and GPTQ file (layout and package), by path relative to the model's folder."""
    files = [*base.glob("gguf/*.gguf"), *base.glob("imatrix/*"), *(p for p in base.glob("gptq/**/*") if p.is_file()),
             *(p for p in base.glob("release/**/*") if p.is_file() and (p.suffix in (".gguf", ".safetensors")
                                                                        or "GPTQ" in p.parent.name))]
    return {p.relative_to(base).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files if p.name not in ("README.md", "report.png", "quant_log.csv")}   # the log holds timings


def assert_clean(root: Path) -> None:
    left = [p for p in root.rglob("*") if any(m in p.name for m in LEFTOVER_MARKS)]
    assert not left, f"left behind: {left}"
    empty = [p for p in root.rglob("*") if p.is_dir() and not any(p.iterdir())]
    assert not empty, f"empty folders: {empty}"
    for stamp in root.rglob(".stamps/*.json"):
        json.loads(stamp.read_text())


def assert_verifies(base: Path) -> None:
    r = CliRunner().invoke(main, ["release", "verify", str(base / "release")])
    assert r.exit_code == 0, r.output


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted release: its artifacts' hashes; the out root is then emptied for reuse."""
    if not DEMO.is_dir():
        pytest.skip("demo model not built")
    root = tmp_path_factory.mktemp("faults") / "out"
    t = time.perf_counter()
    p = xvq_process(root)
    out, err = p.communicate(timeout=1200)
    assert p.returncode == 0, out + err
    seconds = time.perf_counter() - t
    ref = artifacts(root / NAME)
    assert any(k.startswith("gptq/") for k in ref) and any(k.endswith("q4_k_m.gguf") for k in ref)
    sizes = {k: (root / NAME / k).stat().st_size for k in ref}
    shutil.rmtree(root)
    root.mkdir()
    return root, ref, sizes, seconds


def wait_for(p: subprocess.Popen, base: Path, patterns: tuple[str, ...], timeout: float = 600) -> Path:
    """Poll until a file matching one of `patterns` (globs under base) exists; the process must
    still run. A later pattern is the fallback for a step too quick to catch in the act."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        hit = next((h for pat in patterns for h in base.glob(pat)), None)
        if hit is not None:
            return hit
        if p.poll() is not None:
            out, err = p.communicate()
            pytest.fail(f"the release ended (code {p.returncode}) before {patterns} appeared:\n{out}\n{err}")
        time.sleep(0.01)
    p.kill()
    pytest.fail(f"{patterns} did not appear within {timeout} s")


# where to kill, in pipeline order: each resumed run gets past the previous point
KILL_POINTS = [
    ("gguf/.*-f16.gguf.xvq-partial",),                               # convert writing the f16
    (".stamps/convert.json",),                                       # imatrix being measured
    ("gguf/.*-q4_k_m.gguf.xvq-partial", ".stamps/gguf-q4_k_m.json"),  # llama.cpp quantizing
    ("gptq/.*.work.xvq-partial/*",),                                 # GPTQ calibrating
    (".stamps/gptq-int4.json",),                                     # validating
    (".release.xvq-partial/*", ".stamps/package.json"),               # packaging
]


def test_sigkill_at_every_stage_then_resume(reference):
    root, ref, _, _ = reference
    base = root / NAME
    for patterns in KILL_POINTS:
        p = xvq_process(root)
        hit = wait_for(p, base, patterns)
        p.send_signal(signal.SIGKILL)
        p.wait()
        print(f"SIGKILL at {hit.relative_to(base)}")
    p = xvq_process(root)
    out, err = p.communicate(timeout=1200)
    assert p.returncode == 0, out + err
    assert "Traceback" not in err
    assert_clean(root)
    assert_verifies(base)
    assert artifacts(base) == ref
    # nothing stale: a run after success redoes nothing
    p = xvq_process(root)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0 and "steps run: none;" in out, out + err


# SIGTERM with each step in the act: the same points, but validate's own log (made as the step
# starts) instead of GPTQ's stamp (the signal could land before validate began), and none at a
# run's very end (package's stamp), so the signal always lands in the middle of a run
TERM_POINTS = [("logs/validate.log",) if pats == (".stamps/gptq-int4.json",) else
               pats if pats[-1] != ".stamps/package.json" else pats[:1] for pats in KILL_POINTS]
FAILED_STEP = re.compile(r"(\S+)\s+\|[^|\n]*\|[^,\n]*, failed")


def test_sigterm_at_every_stage_stops_at_once_then_resume(reference):
    """`timeout`, `docker stop`, systemd and CI runners send SIGTERM and SIGKILL 10-30 s later:
    every step stops within 2 s with 143, its partials gone and no stamp, and the resumed
    release's files are byte-identical to an uninterrupted one's."""
    root, ref, _, _ = reference
    shutil.rmtree(root / NAME, ignore_errors=True)
    base = root / NAME
    stopped = {}
    for patterns in TERM_POINTS:
        p = xvq_process(root)
        wait_for(p, base, patterns)
        t = time.monotonic()
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=120)
        took = time.monotonic() - t
        assert p.returncode == 143, out + err
        assert "stopped by SIGTERM" in err and "Traceback" not in err and "Exception ignored" not in err, err
        failed = FAILED_STEP.findall(err)
        step = failed[-1] if failed else "between steps"   # a quick step can end before the signal lands
        stopped[step] = max(took, stopped.get(step, 0.0))
        assert took < 2.0, f"{step} took {took:.2f} s to stop"
        assert not (base / ".stamps" / f"{step}.json").exists(), f"{step} stamped after SIGTERM"
        assert_clean(root)
    print("stopped within (s):", {k: round(v, 2) for k, v in stopped.items()})
    assert {"gptq-int4", "validate", "package"} <= set(stopped), stopped   # the long steps were caught in the act
    p = xvq_process(root)
    out, err = p.communicate(timeout=1200)
    assert p.returncode == 0, out + err
    assert_clean(root)
    assert_verifies(base)
    assert artifacts(base) == ref


def can_mount_tmpfs(where: Path) -> bool:
    if sys.platform != "linux" or not shutil.which("mount"):
        return False
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], capture_output=True)
    if r.returncode != 0:
        return False
    subprocess.run(["umount", str(where)], check=True)
    return True


# room left on the disk, from the reference's sizes: the wall comes in that stage
DISK_WALLS = {
    "convert": lambda size: size["f16"] // 2,                                    # numpy's tofile (no errno)
    "quantize": lambda size: size["f16"] + (1 << 20),                            # llama.cpp's iostreams
    # GPTQModel ends the process (os._exit) on a write error: xvq checks the space first
    "gptq": lambda size: size["f16"] + size["q4_k_m"] + size["imatrix"] + (2 << 20),
}


@pytest.mark.parametrize("stage", list(DISK_WALLS))
def test_disk_full_mid_release_then_resume(reference, stage):
    """A tmpfs too small for the whole release: the run that hits the wall exits with one line
    naming the file, leaves no partial; with space freed, a rerun finishes byte-identically."""
    root, ref, sizes, _ = reference
    shutil.rmtree(root / NAME, ignore_errors=True)
    if not can_mount_tmpfs(root):
        pytest.skip("cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN on Linux)")
    size = {"f16": next(v for k, v in sizes.items() if k.endswith("-f16.gguf")),
            "q4_k_m": next(v for k, v in sizes.items() if k.startswith("gguf/") and k.endswith("q4_k_m.gguf")),
            "imatrix": sum(v for k, v in sizes.items() if k.startswith("imatrix/"))}
    total = 2 * sum(sizes.values()) + (64 << 20)      # everything, twice (layout + package), and slack
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={total}", "tmpfs", str(root)], check=True)
    try:
        filler = root / "filler"
        with open(filler, "wb") as f:
            f.write(b"\0" * (shutil.disk_usage(root).free - DISK_WALLS[stage](size)))
        p = xvq_process(root)
        out, err = p.communicate(timeout=1200)
        assert p.returncode == 1, out + err
        errors = [ln for ln in err.splitlines() if ln.startswith("Error")]
        assert len(errors) == 1 and "Traceback" not in err, err
        assert "disk full" in errors[0] or "not enough free disk" in errors[0], errors[0]
        print(errors[0])
        filler.unlink()
        assert_clean(root)
        p = xvq_process(root)
        out, err = p.communicate(timeout=1200)
        assert p.returncode == 0, out + err
        assert_clean(root)
        assert_verifies(root / NAME)
        assert artifacts(root / NAME) == ref
    finally:
        subprocess.run(["umount", "-l", str(root)])
