"""One interrupt policy for the whole program: SIGINT and SIGTERM stop any stage within a moment,
never with exit 0, and never let a result be stamped or renamed as complete.

Python runs a signal handler in the main thread between bytecodes. Raising KeyboardInterrupt
there is right in plain Python code, but when the handler runs inside a function that C called
back (llama.cpp's eval, abort and log callbacks), the exception cannot unwind through C: ctypes
prints "Exception ignored" and drops it, and the interrupted computation goes on with a broken
result. So the handler raises only outside C callbacks; inside one it records the signal, the
callback tells C to stop (`requested()`), and the Python code after the C call raises
(`check()`). A C call with no way to stop it (llama.cpp's quantizer) runs in a worker thread
(`blocking`) while the main thread waits where the handler can raise; the process then ends
with `os._exit`, so that thread cannot keep it alive (`exit_now`)."""
from __future__ import annotations

import _thread
import contextlib
import os
import signal
import sys
import threading
import time
from typing import Callable, TypeVar

T = TypeVar("T")
SIGNALS = tuple(s for s in (signal.SIGINT, getattr(signal, "SIGTERM", None)) if s is not None)
RERAISE_AFTER = 1.0                 # seconds: an Interrupted some library swallowed is raised again
_callback_codes: set = set()        # code objects of the functions C calls back
_state: dict = {"signum": None, "raised_at": None, "installed": False, "run": None, "shielded": 0}


class Interrupted(KeyboardInterrupt):
    """The run was stopped by SIGINT or SIGTERM (a KeyboardInterrupt, so every cleanup path that
    handles Ctrl-C handles this too)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def c_callback(fn: Callable) -> Callable:
    """Mark `fn` as called from C: a signal arriving while it runs is recorded, not raised."""
    _callback_codes.add(fn.__code__)
    return fn


def _inside_c_callback(frame) -> bool:
    while frame is not None:
        if frame.f_code in _callback_codes:
            return True
        frame = frame.f_back
    return False


def _handler(signum, frame) -> None:
    if not _state["installed"]:   # a nudge that arrived as the command ended
        return
    if _state["signum"] is None:
        _state["signum"] = signum
        _start_watchdog()
    raised = _state["raised_at"]
    if (_inside_c_callback(frame) or _state["shielded"]
            or (raised is not None and time.monotonic() - raised < RERAISE_AFTER)):
        return   # recorded; or the first Interrupted is still unwinding: let its cleanup run
    _state["raised_at"] = time.monotonic()
    raise Interrupted(_state["signum"])


def _start_watchdog() -> None:
    """Until the command ends, signal the main thread again every quarter second: the handler
    then raises at the first moment it runs outside a C callback, even where no check() comes
    (and again if a library's `except BaseException` swallowed the first)."""
    run, signum = _state["run"], _state["signum"]

    def nudge():
        while True:
            time.sleep(0.25)
            if not _state["installed"] or _state["run"] is not run:   # that command is over
                return
            _thread.interrupt_main(signum)
    threading.Thread(target=nudge, name="xvq-interrupt", daemon=True).start()


def install() -> dict:
    """Install the policy (main thread only); returns the previous handlers for `restore`."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    _state.update(signum=None, raised_at=None, installed=True, run=object())
    return {s: signal.signal(s, _handler) for s in SIGNALS}


def restore(previous: dict) -> None:
    """The command is over: the watchdog stops, the previous handlers return."""
    _state["installed"] = False
    for s, h in previous.items():
        signal.signal(s, h)


@contextlib.contextmanager
def shielded():
    """Cleanup that a signal must not cut short (removing an interrupted run's partials)."""
    _state["shielded"] += 1
    try:
        yield
    finally:
        _state["shielded"] -= 1


def requested() -> bool:
    """A signal arrived: long loops and C callbacks stop."""
    return _state["signum"] is not None


def check() -> None:
    """Raise Interrupted if a signal arrived (after a C call whose callbacks recorded one)."""
    if _state["signum"] is not None:
        _state["raised_at"] = time.monotonic()
        raise Interrupted(_state["signum"])


def exit_code() -> int:
    """128 + the signal's number, as a shell reports a process ended by it (130, 143)."""
    return 128 + (_state["signum"] or signal.SIGINT)


def blocking(fn: Callable[..., T], *args, **kwargs) -> T:
    """Run a long C call that cannot be told to stop in a worker thread; the main thread waits
    where a signal can interrupt it. An interrupted call's thread is abandoned (exit_now ends
    the process before it could finish anything)."""
    if threading.current_thread() is not threading.main_thread():
        return fn(*args, **kwargs)
    result: list = []

    def work():
        try:
            result.append((True, fn(*args, **kwargs)))
        except BaseException as e:   # handed to the main thread, never lost in the worker
            result.append((False, e))
    worker = threading.Thread(target=work, name="xvq-blocking", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.05)
    check()
    ok, value = result[0]
    if not ok:
        raise value
    return value


def exit_now(cleanup: Callable[[], None]) -> None:
    """End an interrupted process at once with 128 + signal: `cleanup` removes what a worker
    thread still writing may have recreated; os._exit skips waiting for such threads."""
    cleanup()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(exit_code())
