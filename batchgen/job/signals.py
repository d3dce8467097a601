"""Ctrl-C and SIGTERM: an exit code and one line at any moment, and never a torn output line.

Until a job runs, a signal raises `Interrupted` at once (nothing has been written). While it
runs, the first signal is only noted, and the runner stops between steps; a second one raises
`Interrupted`, but never in the middle of writing lines (`shielded`).
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from types import FrameType
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived. A BaseException, so no `except Exception` swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _raise(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signum)


def raise_on_signals() -> None:
    """From now on SIGINT/SIGTERM raise Interrupted (SIGINT stays ignored if it was, as nohup)."""
    for signum in SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, _raise)


def restore_default_signals() -> None:
    """Ctrl-C raises KeyboardInterrupt again, SIGTERM ends the process (interactive modes)."""
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class SignalGuard:
    """While a job runs: note the first signal, raise on the second (outside `shielded`)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._pending: int | None = None  # a second signal that arrived while shielded
        self._shielded = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> SignalGuard:
        for signum in SIGNALS:
            if signal.getsignal(signum) is not signal.SIG_IGN:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
        elif self._shielded:
            self._pending = signum
        else:
            raise Interrupted(signum)

    @contextlib.contextmanager
    def shielded(self) -> Iterator[None]:
        """Lines written in here are written whole: a second signal waits until the end."""
        self._shielded += 1
        try:
            yield
        finally:
            self._shielded -= 1
        if self._pending is not None and not self._shielded:
            raise Interrupted(self._pending)

    def check(self) -> None:
        """Raise Interrupted if a first signal has arrived (called between steps)."""
        if self.signum is not None:
            raise Interrupted(self.signum)
