"""The report's figures, drawn with matplotlib: one Figure per question, several runs overlaid.

Figures are built with `matplotlib.figure.Figure` (no pyplot, no global state); the page
inlines them as SVG, `--png` writes them as images.
"""

from __future__ import annotations

import io
import itertools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from batchgen.report.runs import TIMING_FIELDS, USAGE_FIELDS, Run
from batchgen.report.series import Timeline, histograms, session_offsets, timelines

COLORS = matplotlib.colormaps["tab10"].colors
WIDTH_IN = 10.0
ROW_IN = 2.4


@dataclass(frozen=True)
class Drawn:
    """A figure of the report: its file name (for --png), title, and the figure itself."""

    name: str
    title: str
    figure: Figure


def figure_names(runs: list[Run]) -> list[str]:
    """The figures the runs have data for: time series always, distributions when OUTPUT
    files were given."""
    names = ["throughput", "engine"]
    return names + ["latency", "tokens"] if any(r.requests is not None for r in runs) else names


def report_figures(runs: list[Run]) -> list[Drawn]:
    """Every figure of figure_names(runs), drawn."""
    drawers = {
        "throughput": ("Throughput over the run", throughput_figure),
        "engine": ("How full the engine was", engine_figure),
        "latency": ("Where each request's time went", latency_figure),
        "tokens": ("Tokens per request", tokens_figure),
    }
    drawn = []
    # File names and worker names are text, not math: a "$" in one must not be parsed.
    with matplotlib.rc_context({"text.parse_math": False}):
        for name in figure_names(runs):
            title, draw = drawers[name]
            drawn.append(Drawn(name, title, draw(runs)))
    return drawn


def new_figure(rows: int, columns: int = 1) -> tuple[Figure, list[Axes]]:
    """A figure of rows x columns panels, laid out by matplotlib's constrained layout."""
    figure = Figure(figsize=(WIDTH_IN, ROW_IN * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel().tolist()
    return figure, axes


@dataclass(frozen=True)
class _Traced:
    """A run's engines on its time axis, where its resumed sessions begin, and its colour."""

    color: tuple[float, float, float]
    lines: list[Timeline]
    resumed: list[float]


def _traced(runs: list[Run]) -> list[_Traced]:
    return [
        _Traced(color, timelines(run), session_offsets(run)[1:])
        for color, run in zip(itertools.cycle(COLORS), runs)
    ]


def throughput_figure(runs: list[Run]) -> Figure:
    figure, (tokens, requests) = new_figure(2)
    traced = _traced(runs)
    _over_time(traced, tokens, lambda t: t.tokens_per_s, "generated tokens/s")
    _over_time(traced, requests, lambda t: t.requests_per_s, "requests finished/s")
    _legend([tokens])
    return figure


def engine_figure(runs: list[Run]) -> Figure:
    figure, (rows, occupancy, waiting) = new_figure(3)
    traced = _traced(runs)
    _over_time(traced, rows, lambda t: t.mean_rows, "active rows (mean per step)")
    _over_time(traced, occupancy, lambda t: t.occupancy, "KV cache held (%)")
    _over_time(traced, waiting, lambda t: t.waiting, "requests waiting to start")
    _legend([rows])
    return figure


def latency_figure(runs: list[Run]) -> Figure:
    titles = {
        "queue_ms": "queue wait (ms): read until admitted",
        "first_token_ms": "time to first token (ms): read until the first token",
        "decode_ms": "decode time (ms): first token until the last",
    }
    figure, axes = new_figure(len(TIMING_FIELDS))
    for ax, name in zip(axes, TIMING_FIELDS, strict=True):
        _distribution(runs, ax, name, titles[name], counts=False)
    _legend(axes)
    return figure


def tokens_figure(runs: list[Run]) -> Figure:
    titles = {"prompt_tokens": "prompt tokens", "completion_tokens": "completion tokens"}
    figure, axes = new_figure(1, len(USAGE_FIELDS))
    for ax, name in zip(axes, USAGE_FIELDS, strict=True):
        _distribution(runs, ax, name, titles[name] + " per request", counts=True)
    _legend(axes)
    return figure


def _over_time(
    traced: list[_Traced], ax: Axes, value: Callable[[Timeline], np.ndarray], title: str
) -> None:
    """Each engine's figure held over each span of its time (a step line)."""
    drawn = False
    for run in traced:
        for line in run.lines:
            values = value(line)
            if np.isnan(values).all():
                continue  # a file from before the field
            ax.stairs(values, line.edges, color=run.color, label=line.label, linewidth=1.2)
            drawn = True
        for start in run.resumed:
            ax.axvline(start, color=run.color, linestyle=":", linewidth=1)
    ax.set_title(title, loc="left", fontsize=10)
    ax.set_xlabel("seconds of engine time")
    ax.set_ylim(bottom=0)
    if not drawn:
        _nothing(ax, "no engine windows: no request ran")


def _distribution(runs: list[Run], ax: Axes, name: str, title: str, counts: bool) -> None:
    values = {r.label: r.requests.column(name) for r in runs if r.requests is not None}
    colors = {run.label: color for run, color in zip(runs, itertools.cycle(COLORS))}
    for histogram in histograms(values, counts):
        ax.stairs(
            histogram.counts,
            histogram.edges,
            color=colors[histogram.label],
            label=f"{histogram.label} (p50 {histogram.p50:.4g}, p99 {histogram.p99:.4g})",
            linewidth=1.2,
        )
    ax.set_title(title, loc="left", fontsize=10)
    ax.set_ylabel("requests")
    if not any(len(v) for v in values.values()):
        _nothing(ax, "no result lines: no request finished")


def _nothing(ax: Axes, why: str) -> None:
    ax.text(0.5, 0.5, why, transform=ax.transAxes, ha="center", va="center", color="0.4")
    ax.set_yticks([])


def _legend(axes: Sequence[Axes]) -> None:
    """A legend on each of these panels (time series: the first; histograms: each, as each
    label carries that panel's percentiles)."""
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best", frameon=False)


def svg(drawn: Drawn) -> str:
    """The figure as an SVG element for a page: text kept as text (smaller, selectable), ids
    prefixed with the figure's name (matplotlib numbers every figure's from 1)."""
    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "batchgen"}):
        drawn.figure.savefig(buffer, format="svg", metadata={"Date": None})
    text = buffer.getvalue()
    text = re.sub(r'( id="|href="#|url\(#)', rf"\g<1>{drawn.name}-", text)
    return text[text.index("<svg") :]


def png(drawn: Drawn) -> bytes:
    buffer = io.BytesIO()
    drawn.figure.savefig(buffer, format="png", dpi=120, metadata={"Software": None})
    return buffer.getvalue()
