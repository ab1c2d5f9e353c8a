"""Quiet by default: what third-party libraries print (GPTQModel's tables, transformers, torch and
torchao warnings, their progress bars) goes to a log file per step, and the console gets one
progress bar per step. `--verbose` shows everything as it comes.

Output is redirected at the file-descriptor level (fd 1 and 2), so C code and loggers bound to
sys.stderr before the step started are caught too; where the streams have no descriptor (click's
test runner) the Python objects are swapped for a sink instead."""
from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Callable, TextIO

THIRD_PARTY = ("gptqmodel", "logbar", "transformers", "torch", "torchao", "accelerate", "optimum",
               "huggingface_hub", "datasets", "tokenicer", "defuser")


def set_verbosity(verbose: bool) -> None:
    """xvq's own INFO lines when verbose; third-party loggers at their defaults then, errors only
    otherwise (what they still write lands in the step's log file)."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    for name in THIRD_PARTY:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.ERROR)
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from xvq.llamacpp import set_verbose
        set_verbose(verbose)   # llama.cpp's own log: stderr when verbose, silent otherwise
    except ImportError:   # a build without llama-cpp-python: nothing of it to silence
        pass


class _Sink(io.TextIOBase):
    """A stream that writes to whichever log file is current (one object for the whole run, so a
    handler that captured it in one step stays valid in the next)."""

    def __init__(self):
        self.target: TextIO | None = None

    def write(self, s: str) -> int:
        if self.target is not None:
            self.target.write(s)
        return len(s)

    def flush(self) -> None:
        if self.target is not None:
            self.target.flush()


def _fd(stream) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _valid(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


class Capture:
    """Sends fd 1/2, and sys.stdout/sys.stderr where they are not those descriptors (click's test
    runner, pytest), to `switch(path)`'s file until `close()`."""

    def __init__(self):
        self.fds = [fd for fd in (1, 2) if _valid(fd)]
        self.saved = {fd: os.dup(fd) for fd in self.fds}
        self.sink = _Sink()
        self.saved_streams = (sys.stdout, sys.stderr)
        self.file: TextIO | None = None
        if _fd(sys.stdout) != 1:
            sys.stdout = self.sink
        if _fd(sys.stderr) != 2:
            sys.stderr = self.sink

    def console(self) -> TextIO:
        """A stream to the real console (the original stderr), for xvq's progress bars."""
        if _fd(self.saved_streams[1]) == 2 and 2 in self.saved:
            return os.fdopen(os.dup(self.saved[2]), "w", buffering=1, encoding="utf-8", errors="replace")
        return self.saved_streams[1]

    def switch(self, path: Path, mode: str = "a") -> None:
        self._flush()
        path.parent.mkdir(parents=True, exist_ok=True)
        old, self.file = self.file, open(path, mode, encoding="utf-8", errors="replace")
        for fd in self.fds:
            os.dup2(self.file.fileno(), fd)
        self.sink.target = self.file
        if old is not None:
            old.close()

    def close(self) -> None:
        self._flush()
        for fd, saved in self.saved.items():
            os.dup2(saved, fd)
            os.close(saved)
        self.saved = {}
        sys.stdout, sys.stderr = self.saved_streams
        self.sink.target = None
        if self.file is not None:
            self.file.close()

    def _flush(self) -> None:
        for s in (sys.stdout, sys.stderr, *self.saved_streams):
            with contextlib.suppress(Exception):
                s.flush()


class Steps:
    """One progress bar per step on the console; each step's output in `log_dir/<step>.log`
    (quiet), or everything on the console (verbose). `run` has Stamps.run's signature, so the
    release pipeline passes a Steps where it passed its Stamps."""

    def __init__(self, stamps, log_dir: Path, verbose: bool = False, session: str = "release"):
        self.stamps, self.log_dir, self.verbose = stamps, Path(log_dir), verbose
        self.session_log = self.log_dir / f"{session}.log"   # output between steps
        self.capture: Capture | None = None
        self.out: TextIO = sys.stderr

    def __getattr__(self, name):   # ran, skipped, ... of the wrapped Stamps
        return getattr(self.stamps, name)

    def __enter__(self) -> "Steps":
        if not self.verbose:
            self.capture = Capture()
            self.out = self.capture.console()
            self.capture.switch(self.session_log)
        return self

    def __exit__(self, *exc) -> None:
        if self.capture is not None:
            self.capture.close()
            if self.out is not self.capture.saved_streams[1]:   # our own dup of fd 2
                self.out.close()
            self.capture = None

    def run(self, name: str, inputs: dict, outputs: list[Path], fn: Callable):
        if self.verbose:
            return self.stamps.run(name, inputs, outputs, fn)
        log_file = self.log_dir / f"{name}.log"
        bar = _Bar(name, self.out)

        def logged():
            self.capture.switch(log_file, "w")   # this run's output only
            try:
                return fn()
            finally:
                self.capture.switch(self.session_log)
        try:
            ran = self.stamps.run(name, inputs, outputs, logged)
        except BaseException:
            bar.close("failed")
            if log_file.is_file():
                print(f"  its output: {log_file}", file=self.out, flush=True)
            raise
        bar.close("done" if ran else "up to date")
        return ran


class Always:
    """A Stamps that always runs (one-off commands that use Steps for their quiet output)."""
    ran: list = []
    skipped: list = []

    def run(self, name, inputs, outputs, fn) -> bool:
        fn()
        return True


class _Bar:
    """A tqdm bar for one step, its elapsed time refreshed each second; closes as one line."""

    def __init__(self, name: str, out: TextIO):
        from tqdm import tqdm
        self.bar = tqdm(total=1, desc=f"{name:<14}", file=out, leave=True, disable=False,
                        bar_format="{desc} |{bar:20}| {elapsed}{postfix}")
        self.stop = threading.Event()
        # a live clock on a terminal; in a log file (CI) each refresh would only add text
        self.thread = threading.Thread(target=self._tick, daemon=True)
        if _isatty(out):
            self.thread.start()

    def _tick(self) -> None:
        while not self.stop.wait(1.0):
            self.bar.refresh()

    def close(self, status: str) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()
        if status != "failed":
            self.bar.update(1)
        self.bar.set_postfix_str(status, refresh=False)
        self.bar.close()
