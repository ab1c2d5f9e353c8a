"""xvq.interrupt: a signal that arrives while C code is calling back into Python is kept, not
lost ("Exception ignored on calling ctypes callback function" let a release run on with a
different imatrix and exit 0), and a C call that cannot be told to stop does not delay the exit.
The callbacks here are real ones: libc's qsort calling a Python comparison through ctypes."""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from tests.conftest import ROOT
from xvq import interrupt

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
CMP = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int))


@pytest.fixture
def policy():
    previous = interrupt.install()
    yield
    interrupt.restore(previous)


def qsort_with(compare) -> tuple[np.ndarray, int]:
    """Sort 2,000 ints with libc's qsort calling `compare` back; returns them and the call count."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    data = np.random.default_rng(0).permutation(2000).astype(np.int32)
    calls = [0]

    def counted(a, b):
        calls[0] += 1
        return compare(a[0], b[0], calls[0])
    thunk = CMP(counted)
    libc.qsort(data.ctypes.data_as(ctypes.c_void_p), len(data), 4, thunk)
    return data, calls[0]


def test_signal_inside_c_callback_is_recorded_then_raised_after_the_call(policy):
    @interrupt.c_callback
    def compare(a, b, n):
        if n == 10:
            signal.raise_signal(signal.SIGTERM)   # the handler runs here, inside the callback
        return (a > b) - (a < b)
    data, calls = qsort_with(compare)
    # the C call ran to its end with every comparison answered (nothing unwound through C) ...
    assert calls > 10 and (np.diff(data) > 0).all()
    assert interrupt.requested() and interrupt.exit_code() == 143
    # ... and the signal is raised after it
    with pytest.raises(interrupt.Interrupted):
        interrupt.check()


def test_recorded_signal_raised_even_where_no_check_comes(policy):
    """The watchdog re-signals the main thread: plain Python code after the C call is stopped
    within a second although it never calls check()."""
    @interrupt.c_callback
    def compare(a, b, n):
        if n == 1:
            signal.raise_signal(signal.SIGINT)
        return (a > b) - (a < b)
    qsort_with(compare)
    t = time.monotonic()
    with pytest.raises(interrupt.Interrupted):
        while time.monotonic() - t < 10:
            sum(range(100))
    assert time.monotonic() - t < 1.0
    assert interrupt.exit_code() == 130


def test_signal_in_plain_python_raises_at_once(policy):
    threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()
    t = time.monotonic()
    with pytest.raises(interrupt.Interrupted) as e:
        while time.monotonic() - t < 10:
            sum(range(100))
    assert e.value.signum == signal.SIGTERM and time.monotonic() - t < 1.0


def test_blocking_call_does_not_delay_the_stop(policy):
    """A C call with no stop (llama.cpp's quantizer) runs in a worker; the main thread leaves."""
    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
    t = time.monotonic()
    with pytest.raises(interrupt.Interrupted):
        interrupt.blocking(time.sleep, 20)
    assert time.monotonic() - t < 1.0


def test_blocking_returns_the_value_and_raises_the_worker_error(policy):
    assert interrupt.blocking(pow, 2, 10) == 1024
    with pytest.raises(ZeroDivisionError):
        interrupt.blocking(divmod, 1, 0)


SLOW_QUANTIZE = """
import sys, time
sys.path.insert(0, sys.argv[1])
from llama_cpp import llama_cpp as C
real = C.llama_model_quantize
def slow(*a):   # a quantizer that takes 30 s, as on a 135M-parameter model and more
    time.sleep(30)
    return real(*a)
C.llama_model_quantize = slow
from xvq.cli import entry
sys.argv = ["xvq", *sys.argv[2:]]
print("ready", flush=True)
entry()
"""


def test_sigterm_during_llama_quantize_exits_143_at_once(tmp_path):
    """llama_model_quantize is one C call: xvq ignored SIGTERM for over 60 s there. The signal now
    ends the command at once, with no partial and no stamp."""
    from tests.conftest import DEMO
    out = tmp_path / "out"
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    args = ["quantize", "gguf", str(DEMO), "--name", "demo", "--type", "Q4_K_M", "--imatrix", "none",
            "--out-root", str(out)]
    p = subprocess.Popen([sys.executable, "-c", SLOW_QUANTIZE, str(ROOT), *args], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    end = time.monotonic() + 120
    while not list(out.glob("demo/gguf/.*q4_k_m*")) and time.monotonic() < end:
        time.sleep(0.05)
    time.sleep(0.5)
    t = time.monotonic()
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    took = time.monotonic() - t
    assert p.returncode == 143 and took < 2.0, (p.returncode, took, err)
    assert "Traceback" not in err and "Exception ignored" not in err
    assert not [q for q in out.rglob("*") if ".xvq-partial" in q.name or q.name.endswith("q4_k_m.gguf")]
    assert not (out / "demo" / ".stamps" / "gguf-q4_k_m.json").exists()


def run_xvq(*args: str) -> subprocess.Popen:
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "xvq.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


class stderr_collector(bytearray):
    """What a process writes to stderr, read as it comes (progress bars end lines with \\r)."""

    def __init__(self, p: subprocess.Popen):
        super().__init__()
        self.reader = threading.Thread(target=self._read, args=(p,), daemon=True)
        self.reader.start()

    def _read(self, p) -> None:
        while chunk := p.stderr.buffer.read1(4096):
            self.extend(chunk)

    def text(self) -> str:
        self.reader.join(10)
        return bytes(self).decode("utf-8", "replace")


def wait_for_bytes(p: subprocess.Popen, seen: bytearray, marker: bytes, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while marker not in seen and time.monotonic() < end and p.poll() is None:
        time.sleep(0.05)


def sigterm_once_under_way(p: subprocess.Popen, marker: bytes, what: str) -> None:
    """SIGTERM once `marker` is on the process's stderr: it must exit 143 within 2 s, cleanly."""
    seen = stderr_collector(p)
    wait_for_bytes(p, seen, marker)
    time.sleep(0.3)
    assert p.poll() is None, f"the {what} finished before the signal"
    t = time.monotonic()
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=60)
    took = time.monotonic() - t
    err = seen.text()
    assert p.returncode == 143 and took < 2.0, (p.returncode, took, err[-2000:])
    assert "Exception ignored" not in err and "Traceback" not in err


def test_sigterm_mid_imatrix_exits_143_at_once_and_the_rerun_matches_a_clean_run(tmp_path):
    """The imatrix is measured inside llama.cpp's eval callback, where the KeyboardInterrupt was
    swallowed: the run went on, and its imatrix and Q4_K_M differed from a clean run's."""
    from tests.conftest import DEMO
    if not DEMO.is_dir():
        pytest.skip("demo model not built")
    args = ["quantize", "imatrix", str(DEMO), "--name", "demo", "--calib-tokens", "32768"]
    clean, interrupted = tmp_path / "clean", tmp_path / "interrupted"
    p = run_xvq(*args, "--out-root", str(clean))
    assert p.wait(timeout=600) == 0, p.stderr.read()
    p = run_xvq(*args, "--out-root", str(interrupted))
    sigterm_once_under_way(p, b"imatrix demo-f16.gguf", "imatrix")   # its bar: decoding has begun
    left = [q.name for q in interrupted.rglob("*") if "imatrix" in q.name or ".xvq-partial" in q.name]
    assert left == [] and not (interrupted / "demo" / ".stamps" / "imatrix.json").exists(), left
    p = run_xvq(*args, "--out-root", str(interrupted))
    assert p.wait(timeout=600) == 0, p.stderr.read()
    name = "demo/imatrix/demo.imatrix.gguf"
    assert (interrupted / name).read_bytes() == (clean / name).read_bytes()


def test_sigterm_mid_mix_sensitivity_exits_143_at_once_and_the_rerun_matches_a_clean_run(tmp_path):
    """The mix's ablations run inside llama.cpp's eval callback too (xvq/llamacpp/ablation.py)."""
    from tests.conftest import DEMO
    if not DEMO.is_dir():
        pytest.skip("demo model not built")
    imatrix = tmp_path / "demo.imatrix.gguf"
    p = run_xvq("quantize", "imatrix", str(DEMO), "--name", "demo", "--calib-tokens", "8192", "-o", str(imatrix),
                "--out-root", str(tmp_path / "im"))
    assert p.wait(timeout=600) == 0, p.stderr.read()
    args = ["quantize", "gguf", str(DEMO), "--name", "demo", "--target-size", "3.2M", "--imatrix", str(imatrix),
            "--calib-tokens", "8192"]
    clean, interrupted = tmp_path / "clean", tmp_path / "interrupted"
    p = run_xvq(*args, "--out-root", str(clean))
    assert p.wait(timeout=600) == 0, p.stderr.read()
    p = run_xvq(*args, "--out-root", str(interrupted))
    sigterm_once_under_way(p, b"sensitivity", "mix")   # its bar: the ablations have begun
    left = [q.name for q in interrupted.rglob("*") if "bpw" in q.name or ".xvq-partial" in q.name]
    assert left == [], left
    p = run_xvq(*args, "--out-root", str(interrupted))
    assert p.wait(timeout=600) == 0, p.stderr.read()
    made = {q.relative_to(interrupted): q.read_bytes() for q in interrupted.rglob("*bpw.gguf")}
    assert made and made == {q.relative_to(clean): q.read_bytes() for q in clean.rglob("*bpw.gguf")}
