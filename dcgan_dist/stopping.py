"""Graceful stop: SIGTERM or SIGINT lets the current step finish; that step is checkpointed, metrics.jsonl and W&B
are flushed, the loader processes stop, and the run ends. A second signal stops at once, as without this.

Where a request comes from, and what follows:
- the training process's own signal (`handle_signals`: the local launcher; in every Ray worker the Ray launcher
  installs the handlers in the worker's main thread): locally the run exits with 128 + the signal's number;
  under Ray this is a preempted worker: the workers stop and Ray restarts them from that checkpoint.
- the Ray driver (`ray job stop`, Ctrl-C), which passes the request to every worker (`request(...,
  from_driver=True)`): the run ends, exiting with 128 + the signal's number.
Every rank must stop after the same step (the checkpoint gathers every rank), so each step the ranks agree on
it with one small collective of `code()` (the Trainer, through `DistEnv.agree_max`).
"""

from __future__ import annotations

import shlex
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_OWN_SIGNAL = 1000  # added to the code when this process itself received the signal (a preempted Ray worker)
_code = 0  # this process's first stop request (see code()); 0: none


class StoppedBySignal(BaseException):
    """SIGTERM/SIGINT stopped work that has no step to finish (generating the synthetic faces, `data synth`):
    what it wrote is removed; the same command starts it again. BaseException, like KeyboardInterrupt: no
    `except Exception` on the way takes it for an error."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def raise_on_signals() -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT raise StoppedBySignal in the main thread (elsewhere: no change)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise StoppedBySignal(signum)

    previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
    for signum, before in previous.items():
        if before is not signal.SIG_IGN:
            signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, before in previous.items():
            signal.signal(signum, before)


def request(signum: int, from_driver: bool = False) -> None:
    """Ask this process's run to stop after its current step; the first request wins. Signal-handler safe: it
    only sets a number (the Trainer says what happens when it acts on it)."""
    global _code
    if not _code:
        _code = signum + (0 if from_driver else _OWN_SIGNAL)


def code() -> int:
    """0: no stop; else the signal number, plus 1000 when this process received it itself. The largest code of
    all ranks is the run's decision."""
    return _code


def signal_of(code: int) -> int:
    return code % _OWN_SIGNAL


def own_signal(code: int) -> bool:
    return code >= _OWN_SIGNAL


def clear() -> None:
    global _code
    _code = 0


def report(signum: int, step: int, checkpoint: str | None, argv: list[str]) -> int:
    """The one line a stopped run ends with (stderr), and its exit code (128 + the signal's number)."""
    command = shlex.join(["python", "-m", "dcgan_dist.train", *argv])
    sys.stderr.write(
        f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint: {checkpoint}; "
        f"resume with: {command}\n"
    )
    sys.stderr.flush()
    return 128 + signum


def install_handlers() -> dict:
    """SIGTERM and SIGINT request a graceful stop; the second one goes to the handler that was there before
    (SIGINT: KeyboardInterrupt; SIGTERM: the default, death). A signal that was ignored stays ignored (nohup,
    background jobs). Main thread only. Returns the previous handlers."""
    previous = {signum: signal.getsignal(signum) for signum in SIGNALS}

    def handler(signum, frame):
        if not _code:
            request(signum)
            return
        before = previous[signum]
        if callable(before):
            before(signum, frame)
        else:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)

    for signum, before in previous.items():
        if before is not signal.SIG_IGN:
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
