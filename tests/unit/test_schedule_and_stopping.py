"""Schedule (when a part acts) and stopping (the stop-request code every rank agrees on), in-process."""

import os
import signal

import pytest

from dcgan_dist import stopping
from dcgan_dist.training.schedule import Schedule


def due_steps(schedule: Schedule, last: int, stop_at: int | None = None) -> list[int]:
    return [s for s in range(1, last + 1) if schedule.due(s, stopping=s == stop_at)]


@pytest.mark.parametrize(
    "schedule, stop_at, expected",
    [
        (Schedule(every=3, last=10), None, [3, 6, 9, 10]),  # multiples and the last step
        (Schedule(every=5, last=10), None, [5, 10]),  # the last step is a multiple: once
        (Schedule(every=0, last=10), None, [10]),  # 0: only at the end
        (Schedule(every=0, last=10, on_stop=True), 4, [4, 10]),  # a stop at 4 is due with on_stop
        (Schedule(every=0, last=10, on_stop=False), 4, [10]),  # ... and not without
        (Schedule(every=4, last=10, on_stop=True), 4, [4, 8, 10]),  # a stop on a multiple: still once
        (Schedule(every=20, last=10), None, [10]),  # every beyond the run: the last step only
    ],
)
def test_schedule_due(schedule, stop_at, expected):
    assert due_steps(schedule, 10, stop_at) == expected


def test_schedule_is_a_value():
    assert Schedule(2, 10) == Schedule(2, 10, False) and Schedule(2, 10) != Schedule(2, 10, True)
    with pytest.raises(AttributeError):
        Schedule(2, 10).every = 3  # frozen: a part's schedule cannot drift between ranks


@pytest.fixture
def clean_stop():
    stopping.clear()
    yield
    stopping.clear()


def test_first_request_wins_and_codes_decode(clean_stop):
    assert stopping.code() == 0
    stopping.request(signal.SIGTERM)  # this process's own signal: + 1000
    stopping.request(signal.SIGINT, from_driver=True)  # a later request changes nothing
    code = stopping.code()
    assert code == 1000 + signal.SIGTERM
    assert stopping.signal_of(code) == signal.SIGTERM and stopping.own_signal(code)
    stopping.clear()
    assert stopping.code() == 0
    stopping.request(signal.SIGINT, from_driver=True)
    assert stopping.code() == signal.SIGINT
    assert stopping.signal_of(signal.SIGINT) == signal.SIGINT and not stopping.own_signal(signal.SIGINT)


def test_handle_signals_turns_the_first_signal_into_a_request_and_passes_the_second_on(clean_stop):
    received = []
    before = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        with stopping.handle_signals():
            signal.raise_signal(signal.SIGTERM)
            assert stopping.code() == 1000 + signal.SIGTERM and received == []  # the process lives on
            signal.raise_signal(signal.SIGTERM)  # the second: to the handler that was there before
            assert received == [signal.SIGTERM]
        assert stopping.code() == 0  # cleared on leaving the block, and the earlier handler is back:
        signal.raise_signal(signal.SIGTERM)
        assert received == [signal.SIGTERM, signal.SIGTERM] and stopping.code() == 0
    finally:
        signal.signal(signal.SIGTERM, before)


def test_an_ignored_signal_stays_ignored(clean_stop):
    before = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with stopping.handle_signals():
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGTERM)
            assert stopping.code() == 0
    finally:
        signal.signal(signal.SIGTERM, before)


def test_raise_on_signals(clean_stop):
    before = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with pytest.raises(stopping.StoppedBySignal) as stopped:
            with stopping.raise_on_signals():
                signal.raise_signal(signal.SIGTERM)
        assert stopped.value.signum == signal.SIGTERM and not isinstance(stopped.value, Exception)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, before)


def test_report_exit_code(capsys):
    assert stopping.report(signal.SIGINT, 7, "run/checkpoints/step_0000007.pt", ["run.dir=run"]) == 130
    assert stopping.report(signal.SIGTERM, 7, None, []) == 143
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and lines[0].endswith("resume with: python -m dcgan_dist.train run.dir=run")
