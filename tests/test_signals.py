"""The signal guard's rules, driven with real signals sent to this process."""

from __future__ import annotations

import os
import signal

import pytest

from batchgen.job.signals import Interrupted, SignalGuard


@pytest.fixture(autouse=True)
def sigint_handled():
    """Python's own SIGINT handler, even where pytest runs as a background job of a
    non-interactive shell (SIGINT ignored there, which the guard rightly leaves alone)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def send(signum: int) -> None:
    os.kill(os.getpid(), signum)  # Python runs the handler before the next bytecode


def test_first_signal_is_noted_and_a_second_one_raises():
    with SignalGuard() as guard:
        send(signal.SIGTERM)
        assert guard.signum == signal.SIGTERM  # noted, nothing raised yet
        with pytest.raises(Interrupted) as second:
            send(signal.SIGINT)
        assert second.value.exit_code == 130
        with pytest.raises(Interrupted, match="SIGTERM"):
            guard.check()


def test_a_second_signal_waits_for_the_end_of_a_shielded_write():
    written = []
    with SignalGuard() as guard:
        send(signal.SIGINT)
        with pytest.raises(Interrupted) as second, guard.shielded():
            send(signal.SIGTERM)
            written.append("the whole line")  # still runs: the signal waits
        assert second.value.exit_code == 143
    assert written == ["the whole line"]


def test_the_guard_restores_the_handlers_it_replaced():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with SignalGuard():
        assert signal.getsignal(signal.SIGINT) != before[0]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
