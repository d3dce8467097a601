"""`batchgen bench --plot`: tokens/s against batch size, and each workload's figures as bars."""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from batchgen.bench.engine import BenchFigures, Workload
from batchgen.report.figures import COLORS, WIDTH_IN

BATCHGEN, BASELINE = COLORS[0], "0.6"
COLUMNS = 3


def bench_figure(figures: BenchFigures, title: str) -> Figure:
    """The batch-size curve (when `uniform` ran) on top, a panel per workload below."""
    rows = math.ceil(len(figures.workloads) / COLUMNS)
    top = 1 if figures.batches else 0
    figure = Figure(figsize=(WIDTH_IN, 3.2 * top + 2.2 * rows), layout="constrained")
    figure.suptitle(title, fontsize=10)
    grid = figure.add_gridspec(top + rows, COLUMNS)
    if figures.batches:
        _batches(figure.add_subplot(grid[0, :]), figures.batches)
    for i, workload in enumerate(figures.workloads):
        _bars(figure.add_subplot(grid[top + i // COLUMNS, i % COLUMNS]), workload)
    return figure


def _batches(ax: Axes, points: list[tuple[int, float, float | None]]) -> None:
    batches = [b for b, _, _ in points]
    ax.plot(batches, [ours for _, ours, _ in points], "o-", color=BATCHGEN, label="batchgen")
    hf = [(b, theirs) for b, _, theirs in points if theirs is not None]
    if hf:
        ax.plot(*zip(*hf, strict=True), "s--", color=BASELINE, label="HF generate")
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel("batch size (rows)")
    ax.set_ylabel("generated tokens/s")
    ax.set_ylim(bottom=0)
    ax.set_title("uniform batches: tokens/s against batch size", loc="left", fontsize=10)
    ax.legend(frameon=False, fontsize=8)


def _bars(ax: Axes, workload: Workload) -> None:
    """Horizontal bars, batchgen's coloured and the baseline grey, each labelled with its
    value; the title gives batchgen's first bar (its default setting) against the baseline."""
    labels = [bar.label for bar in workload.bars]
    values = [bar.value for bar in workload.bars]
    colors = [BASELINE if bar.baseline else BATCHGEN for bar in workload.bars]
    ax.barh(labels, values, color=colors, height=0.6)
    ax.invert_yaxis()  # first bar on top, as the table prints them
    ax.bar_label(ax.containers[0], fmt="{:,.0f}", padding=2, fontsize=8)
    ax.set_xlim(0, 1.25 * max(values) or 1.0)
    ax.set_xlabel(workload.unit, fontsize=8)
    ax.tick_params(labelsize=8)
    title = workload.title
    baseline = next((bar.value for bar in workload.bars if bar.baseline), 0.0)
    if baseline > 0:
        first = workload.bars[0]
        title += f"\n{first.label}: {first.value / baseline:.2f}x the baseline"
    ax.set_title(title, loc="left", fontsize=8)


def write_plot(figures: BenchFigures, path: Path, title: str) -> None:
    """The bench plot, in the format the file's suffix names (png, svg, pdf)."""
    bench_figure(figures, title).savefig(path, dpi=120)
