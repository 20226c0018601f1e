"""Graceful stop: SIGTERM or SIGINT lets the current step finish; the run then checkpoints, flushes metrics.jsonl
and W&B, stops its loader processes and exits with 128 + the signal's number (143, 130). A second signal stops
at once, as without this.

Where a stop request comes from: this process's own signals (`handle_signals`: the local launcher, and every
Ray worker, whose handlers the Ray launcher installs in the worker's main thread), or the Ray driver (`ray job
stop`, Ctrl-C), whose request reaches the workers through `request`. Every rank must stop after the same step
(the last checkpoint gathers every rank), so each step the ranks agree on it with one small collective
(`Trainer`, through `DistEnv.agree_max`).
"""

from __future__ import annotations

import shlex
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_requested = 0  # the signal number of this process's first stop request; 0: none
_lock = threading.Lock()


def request(signum: int) -> None:
    """Ask this process's run to stop after its current step (the first request wins)."""
    global _requested
    with _lock:
        if not _requested:
            _requested = signum
            sys.stderr.write(f"{signal.Signals(signum).name}: stopping after this step, with a checkpoint "
                             "(send it again to stop at once)\n")
            sys.stderr.flush()


def requested() -> int:
    """The signal number of the stop request this process has seen (0: none)."""
    return _requested


def clear() -> None:
    global _requested
    _requested = 0


def report(signum: int, step: int, checkpoint: str | None, argv: list[str]) -> int:
    """The one line a stopped run ends with (stderr), and its exit code (128 + the signal's number)."""
    command = shlex.join(["python", "-m", "dcgan_dist.train", *argv])
    sys.stderr.write(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint: {checkpoint}; "
                     f"resume with: {command}\n")
    sys.stderr.flush()
    return 128 + signum


def install_handlers() -> dict:
    """SIGTERM and SIGINT request a graceful stop; the second signal goes to the handler that was there before
    (SIGINT: KeyboardInterrupt; SIGTERM: the default, death). Main thread only. Returns the previous handlers."""
    previous = {signum: signal.getsignal(signum) for signum in SIGNALS}

    def handler(signum, frame):
        if not _requested:
            request(signum)
            return
        before = previous[signum]
        if callable(before):
            before(signum, frame)
        else:  # SIG_DFL (SIG_IGN would not have let the signal reach here)
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)

    for signum in SIGNALS:
        signal.signal(signum, handler)
    return previous


@contextmanager
def handle_signals() -> Iterator[None]:
    """install_handlers() for the duration of the block (where signals can be handled: the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = install_handlers()
    try:
        yield
    finally:
        for signum, before in previous.items():
            signal.signal(signum, before)
        clear()
