"""What the report draws, computed from a run's columns: time series and histograms.

Downsampling rule: an engine's windows tile its time (each starts where the one before it
ended), and a figure gets at most MAX_POINTS spans per engine. Past that, consecutive windows
are merged into MAX_POINTS groups of floor or ceil(n / MAX_POINTS) windows: a group's rate is
its tokens (requests) over its seconds, and its per-step figures (rows, occupancy, waiting)
are averaged weighted by steps, so every total drawn stays exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from batchgen.report.runs import WINDOW_COLUMNS, Run, Windows

MAX_POINTS = 1000
HISTOGRAM_BINS = 40

_PER_STEP = ("mean_rows", "occupancy", "waiting")
_SUMMED = tuple(name for name in WINDOW_COLUMNS if name not in _PER_STEP)


@dataclass(frozen=True)
class Timeline:
    """One engine's windows as spans of time: `edges` (seconds, len n + 1) and per span the
    figures drawn over it."""

    label: str
    edges: np.ndarray
    tokens_per_s: np.ndarray
    requests_per_s: np.ndarray
    mean_rows: np.ndarray
    occupancy: np.ndarray  # percent of the KV cache
    waiting: np.ndarray  # NaN where the file predates the field


def downsample(windows: Windows, max_points: int = MAX_POINTS) -> Windows:
    """At most `max_points` windows: consecutive ones merged by the rule above."""
    n = len(windows)
    if n <= max_points:
        return windows
    starts = np.arange(max_points) * n // max_points
    columns = windows.columns
    merged = {name: np.add.reduceat(columns[name], starts) for name in _SUMMED}
    for name in _PER_STEP:
        weighted = np.add.reduceat(columns[name] * columns["steps"], starts)
        merged[name] = weighted / merged["steps"]
    return Windows(merged)


def timelines(run: Run) -> list[Timeline]:
    """Each engine of each session on the run's time axis: a resumed run's sessions follow
    one another; Ray's actors each have their own line, on their own engine time."""
    lines = []
    offsets = session_offsets(run)
    for number, (session, offset) in enumerate(zip(run.sessions, offsets, strict=True), 1):
        for worker, windows in session.engines.items():
            if not len(windows):
                continue
            shown = downsample(windows)
            c = shown.columns
            seconds = c["ms"] / 1e3
            edges = offset + np.concatenate(([0.0], np.cumsum(seconds)))
            with np.errstate(divide="ignore", invalid="ignore"):
                tokens_per_s = np.where(seconds > 0, c["generated_tokens"] / seconds, 0.0)
                requests_per_s = np.where(seconds > 0, c["requests"] / seconds, 0.0)
            parts = [run.label]
            if len(run.sessions) > 1:
                parts.append(f"session {number}")
            if worker:
                parts.append(worker)
            lines.append(
                Timeline(
                    " · ".join(parts),
                    edges,
                    tokens_per_s,
                    requests_per_s,
                    c["mean_rows"],
                    100 * c["occupancy"],
                    c["waiting"],
                )
            )
    return lines


def session_offsets(run: Run) -> list[float]:
    """Where each session begins on the run's time axis: where the one before it ended."""
    offsets, offset = [], 0.0
    for session in run.sessions:
        offsets.append(offset)
        engine_s = (w.columns["ms"].sum() / 1e3 for w in session.engines.values())
        offset += max(engine_s, default=0.0)
    return offsets


@dataclass(frozen=True)
class Histogram:
    label: str
    counts: np.ndarray
    edges: np.ndarray
    p50: float
    p99: float


def histograms(
    values: dict[str, np.ndarray], counts: bool = False, bins: int = HISTOGRAM_BINS
) -> list[Histogram]:
    """Per run, over bins shared so runs overlay: `bins` equal ones from 0 to the largest
    value, or for `counts` (tokens) whole tokens wide, at most `bins` of them."""
    present = {label: v for label, v in values.items() if len(v)}
    if not present:
        return []
    top = max(float(v.max()) for v in present.values())
    if counts:
        width = max(1, math.ceil((top + 1) / bins))
        edges = np.arange(0.0, top + width + 1, width)
    else:
        edges = np.linspace(0.0, top if top > 0 else 1.0, bins + 1)
    return [
        Histogram(label, np.histogram(v, edges)[0], edges, *np.percentile(v, [50, 99]))
        for label, v in present.items()
    ]
