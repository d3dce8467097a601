"""Progress for logs: when stderr is not a terminal (Slurm, Kubernetes, systemd, nohup), a plain
line every so often instead of a bar, as vLLM's run-batch prints one."""

from __future__ import annotations

import datetime
import sys
import time
from typing import IO

LOG_EVERY_S = 30.0


class LogProgress:
    """A tqdm-like progress that prints `batchgen: done/total lines, rate, ETA` lines."""

    def __init__(
        self, total: int | None, every_s: float = LOG_EVERY_S, stream: IO[str] | None = None
    ):
        self.total = total
        self.every_s = every_s
        self.stream = stream or sys.stderr
        self.n = 0
        self.printed = 0  # lines done at the last line printed
        self.postfix = ""
        self.start = self.last = time.monotonic()

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def reset(self, total: int | None = None) -> None:
        """Start the clock again (once the model has loaded: the rate and ETA leave it out)."""
        self.total = self.total if total is None else total
        self.n = self.printed = 0
        self.start = self.last = time.monotonic()

    def set_postfix_str(self, postfix: str, refresh: bool = True) -> None:
        self.postfix = postfix

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            self._print(now)

    def close(self) -> None:
        if self.n != self.printed:
            self._print(time.monotonic())

    def line(self, now: float) -> str:
        elapsed = now - self.start
        done = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        parts = [f"batchgen: {done} lines"]
        if self.postfix:
            parts.append(self.postfix)
        parts.append(f"elapsed {_clock(elapsed)}")
        if self.total and self.n:
            parts.append(f"ETA {_clock(elapsed / self.n * max(self.total - self.n, 0))}")
        return ", ".join(parts)

    def _print(self, now: float) -> None:
        self.printed = self.n
        print(self.line(now), file=self.stream, flush=True)


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))
