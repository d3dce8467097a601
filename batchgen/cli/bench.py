"""`batchgen bench`: throughput next to Hugging Face and to itself; --backends: local vs Ray."""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

import click

from batchgen.cli.options import parse_batch_sizes

# As bench runs them.
BENCH_WORKLOADS = ("uniform", "step", "mixed", "long", "scoring", "choices", "prefix")


@click.command()
@click.option(
    "--model",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Local GPT-2 checkpoint; default: a seeded random one of the 124M shape.",
)
@click.option(
    "--repeats", type=click.IntRange(min=1), default=3, show_default=True,
    help="Timed runs per figure.",
)  # fmt: skip
@click.option(
    "--device",
    type=click.Choice(["cpu", "gpu"]),
    default="cpu",
    show_default=True,
    help="gpu: batchgen in bfloat16 on MAX's paged kernels, HF in bfloat16 on CUDA.",
)
@click.option(
    "--workloads",
    default=",".join(BENCH_WORKLOADS),
    show_default=True,
    help="Which to run, comma-separated: uniform (batches vs HF generate), step (decode "
    "step and its profile), mixed (a mixed job vs --schedule static and an HF loop), long "
    "(long prompts), scoring (echo scoring vs an HF forward pass), choices (n=4 vs four "
    "requests), prefix (a shared preamble and a shared scored document, prefix cache on vs "
    "off).",
)
@click.option(
    "--batch-sizes", default="1,8,32,64", show_default=True, help="Uniform batches."
)  # fmt: skip
@click.option(
    "--lines", type=click.IntRange(min=1), default=128, show_default=True,
    help="Lines in the mixed job (and in the --backends job).",
)  # fmt: skip
@click.option(
    "--backends",
    is_flag=True,
    help="Instead: one job through `batchgen run` locally and on Ray with --actors, "
    "end to end, and the writer's cost per line (needs batchgen[ray]).",
)
@click.option(
    "--actors", type=click.IntRange(min=1), default=2, show_default=True,
    help="Ray actors, with --backends.",
)  # fmt: skip
@click.option(
    "--plot", type=click.Path(dir_okay=False, path_type=Path),
    help="Also draw the figures into FILE (.png, .svg or .pdf): tokens/s against batch size, "
    "batchgen against HF, and each workload as bars (needs batchgen[report]).",
)  # fmt: skip
@click.option("--overwrite", is_flag=True, help="Replace an existing --plot file.")
def bench(
    model: Path | None,
    repeats: int,
    device: str,
    workloads: str,
    batch_sizes: str,
    lines: int,
    backends: bool,
    actors: int,
    plot: Path | None,
    overwrite: bool,
) -> None:
    """Print batchgen's throughput next to Hugging Face and to itself, measured in one run."""
    sizes = parse_batch_sizes(batch_sizes)
    chosen = tuple(w.strip() for w in workloads.split(",") if w.strip())
    if not chosen or set(chosen) - set(BENCH_WORKLOADS):
        known = ", ".join(BENCH_WORKLOADS)
        raise click.BadParameter(f"{workloads!r}: choose from {known}", param_hint="--workloads")
    if plot is not None:
        _check_plot(plot, overwrite, backends)
    from batchgen.bench import backends as backends_bench
    from batchgen.bench import engine as bench_module

    config = bench_module.BenchConfig(
        device=device,
        workloads=chosen,
        batch_sizes=sizes,
        hf_batch_sizes=tuple(b for b in sizes if b <= 32),
        repeats=repeats,
        mixed_lines=lines,
    )
    given = model is not None
    with tempfile.TemporaryDirectory() as tmp:
        if model is None:
            from batchgen.random_checkpoint import write_random_checkpoint

            model = write_random_checkpoint(Path(tmp), "124M")
        if backends:
            scale_config = backends_bench.ScaleBenchConfig(lines=lines, actors=actors)
            backends_bench.run(model, scale_config, click.echo)
        else:
            figures = bench_module.run(model, config, click.echo)
            if plot is not None:
                from batchgen.bench.plot import write_plot

                where = f"{device}, median of {repeats}"
                name = model if given else "GPT-2 124M shape, random weights"
                write_plot(figures, plot, f"batchgen bench: {name} on {where}")
                click.echo(f"plot: {plot}")


def _check_plot(plot: Path, overwrite: bool, backends: bool) -> None:
    """Everything --plot needs, before the bench runs for minutes."""
    if backends:
        raise click.BadParameter("draws the workloads, not --backends", param_hint="--plot")
    if plot.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise click.BadParameter(f"{plot}: name a .png, .svg or .pdf file", param_hint="--plot")
    if plot.exists() and not overwrite:
        message = f"{plot} exists: pass --overwrite to replace it"
        raise click.BadParameter(message, param_hint="--plot")
    if not plot.parent.is_dir():
        raise click.BadParameter(f"{plot.parent} is not a directory", param_hint="--plot")
    if importlib.util.find_spec("matplotlib") is None:
        raise click.ClickException("--plot draws with matplotlib: pip install 'batchgen[report]'")
