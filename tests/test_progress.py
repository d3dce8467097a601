"""Progress lines for logs and input order for results (no model needed)."""

from __future__ import annotations

import io

from batchgen.job.outputs import InputOrder
from batchgen.job.progress import LogProgress


def test_log_progress_prints_a_plain_line_every_interval_and_at_the_end(monkeypatch):
    now = [100.0]
    monkeypatch.setattr("batchgen.job.progress.time.monotonic", lambda: now[0])
    stream = io.StringIO()
    progress = LogProgress(total=10, every_s=30, stream=stream)
    now[0] = 160.0  # a minute of loading and compiling: not part of the rate or the ETA
    progress.reset()
    progress.set_postfix_str("250 tok/s")
    for _ in range(4):
        now[0] += 5
        progress.update(1)  # 5 s apart: under the interval, nothing printed
    assert stream.getvalue() == ""
    now[0] += 15
    progress.update(1)  # 35 s after the reset: 5 of 10 lines done
    assert stream.getvalue() == "batchgen: 5/10 lines, 250 tok/s, elapsed 0:00:35, ETA 0:00:35\n"
    now[0] += 35
    progress.update(4)  # 35 s after the last line: printed
    now[0] += 2
    progress.update(1)  # 2 s later: only at the end
    progress.close()
    progress.close()  # what the last line left out, once
    assert stream.getvalue().splitlines()[1:] == [
        "batchgen: 9/10 lines, 250 tok/s, elapsed 0:01:10, ETA 0:00:08",
        "batchgen: 10/10 lines, 250 tok/s, elapsed 0:01:12, ETA 0:00:00",
    ]
    unknown = LogProgress(total=None, every_s=0, stream=io.StringIO())
    unknown.update(3)
    assert unknown.stream.getvalue().startswith("batchgen: 3 lines, elapsed ")


def test_input_order_holds_lines_that_finish_early_until_those_before_them():
    order = InputOrder()
    for line in (1, 2, 4, 7):
        order.expect(line)
    assert order.ready([(4, b"d"), (2, b"b")]) == []
    assert order.ready([(1, b"a")]) == [b"a", b"b", b"d"]
    order.expect(9)
    assert order.ready([(9, b"i")]) == []  # 7 is still running
    assert order.rest() == [b"i"]  # an interrupted run writes what it holds
    assert order.ready([(7, b"g")]) == []
