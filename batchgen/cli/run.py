"""`batchgen run`: the batch job, its options from the command line and a --job file."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import click

from batchgen.cli.options import JSONL_FILE, SEED, engine_options, on_off, sampling_options
from batchgen.job.backends import BACKENDS

# Exit codes beyond Click's own (1: a ClickException, 2: a usage error); see the README.
EXIT_LINES_FAILED = 3


@click.command()
@click.argument("input_path", metavar="INPUT", required=False, type=JSONL_FILE)
@click.argument("output_path", metavar="OUTPUT", required=False, type=JSONL_FILE)
@click.option(
    "--job",
    "job_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="TOML job file of these options (keys as long names, - as _, plus input and "
    "output); a flag given here overrides it.",
)
@engine_options
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    help="Rows the engine runs at once, at most (default: 32).",
)
@click.option(
    "--schedule",
    type=click.Choice(["continuous", "static"]),
    help="continuous (the default): a finished row's place is refilled at once; static: a "
    "batch at a time, each waiting for its slowest row.",
)
@click.option(
    "--step-tokens",
    type=click.IntRange(min=1),
    help="Prompt tokens prefilled per step beside the decoding rows; longer prompts go in chunks "
    "(default: 2048).",
)
@click.option(
    "--prefix-cache",
    type=click.Choice(["on", "off"]),
    callback=on_off,
    help="on (the default): a prompt's blocks of 16 tokens (128 on the paged cache) that an "
    "earlier or running prompt began with are taken from the KV cache, not prefilled again.",
)
@click.option(
    "--window",
    type=click.IntRange(min=1),
    help="Requests read ahead (default: 1024): with --schedule static sorted by length "
    "before batches are cut; with --order input, results held at most.",
)
@sampling_options
@click.option(
    "--seed",
    type=SEED,
    default=None,
    help="Base seed: a line without its own seed samples with one derived from this and "
    "its id, so reruns and resumes reproduce it.",
)
@click.option("--stop", multiple=True, help="Stop string (repeatable); not part of the text.")
@click.option(
    "--chat-template",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Jinja chat template for chat lines (as Hugging Face's and vLLM's); default: the "
    '"Human: ... AI:" transcript, each reply ending where the next turn would begin.',
)
@click.option(
    "--input-format",
    type=click.Choice(["auto", "jsonl", "text", "json", "parquet"]),
    help="auto (the default): by INPUT's suffix (.txt text, one prompt per line; .json a "
    "JSON array of rows; .parquet), JSONL otherwise.",
)
@click.option(
    "--prompt-field",
    metavar="NAME",
    help="Rows of any shape: the prompt is the row's NAME field; its id stays its id, its "
    "other fields travel as metadata.",
)
@click.option(
    "--prompt-template",
    metavar="FORMAT",
    help="Rows of any shape: the prompt is FORMAT over the row's fields, e.g. "
    '"{instruction}\\n\\n{input}"; its other fields travel as metadata.',
)
# --no-X turns off what a job file turned on.
@click.option("--resume/--no-resume", help="Continue OUTPUT: skip lines it already holds.")
@click.option("--overwrite/--no-overwrite", help="Replace an existing OUTPUT.")
@click.option(
    "--metrics",
    "metrics_path",
    type=click.Path(dir_okay=False),
    help="Also write per-batch timing and a run summary to this JSONL file.",
)
@click.option(
    "--errors",
    "errors_path",
    type=click.Path(dir_okay=False),
    help="Write error lines to this JSONL file instead of OUTPUT (as OpenAI's batches keep an "
    "error file); resume, no-clobber, the lock and merge treat it as OUTPUT.",
)
@click.option(
    "--order",
    type=click.Choice(["finished", "input"]),
    help="finished (the default): lines as their requests finish; input: in INPUT's order, "
    "a line that finishes early held until those before it are written (at most --window "
    "of them: then nothing new starts).",
)
@click.option("--token-ids/--no-token-ids", help="Add each completion's token ids to its line.")
@click.option(
    "--quiet/--no-quiet",
    help="No progress (a bar on a terminal, a line every 30 s in a log) and no summary.",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Check the options, job file, shard, files and every line without loading the "
    "model; print what would run (exit 3 if a line would fail).",
)
@click.option(
    "--shard",
    metavar="I/N|auto",
    help="Run only shard I/N (0-based) of INPUT's lines, split by a hash of each id; "
    "auto reads a Slurm array's or a Kubernetes Indexed Job's index. OUTPUT may hold "
    "{shard} and {shards}.",
)
@click.option(
    "--num-shards",
    type=click.IntRange(min=1),
    help="Shard count for --shard auto in a Kubernetes Indexed Job (or BATCHGEN_NUM_SHARDS).",
)
@click.option(
    "--backend",
    type=click.Choice(list(BACKENDS)),
    help="local (the default): this process; ray: Ray Data actors, each with its own engine "
    "(pip install 'batchgen[ray]').",
)
@click.option("--ray-address", help="Join this Ray cluster; default: start a local Ray.")
@click.option(
    "--actors", type=click.IntRange(min=1),
    help="Ray actors, each loading and compiling the model once; default: one.",
)  # fmt: skip
@click.option(
    "--gpus-per-actor", type=click.FloatRange(min=0), help="GPUs each Ray actor reserves."
)
@click.option(
    "--cpus-per-actor",
    type=click.FloatRange(min=0, min_open=True),
    help="CPUs each Ray actor reserves; default: 1, or less on a small machine so that "
    "Ray Data keeps a CPU for its own tasks.",
)
@click.pass_context
def run(ctx: click.Context, **settings: Any) -> None:
    """Generate a completion for every prompt line of INPUT (JSONL) into OUTPUT (JSONL).

    Lines are native ({"prompt": ...}) or OpenAI batch /v1/completions requests; each gets
    one result or error line in OUTPUT as soon as its batch is done. "-" is stdin/stdout.
    Exit code 0: all lines ok; 1: the job could not start (worth a retry); 2: bad arguments
    or job file; 3: some lines failed; 130/143: interrupted (--resume goes on).
    An option left out takes its default (--dry-run prints every option's value).
    """
    from batchgen.job import jobfile, launch

    job_file, dry_run = settings.pop("job_file"), settings.pop("dry_run")
    if job_file is not None:
        try:
            settings.update(jobfile.settings(ctx, job_file))
        except jobfile.JobFileError as error:
            raise click.UsageError(str(error)) from None
    try:
        options = launch.options_from(settings, os.environ, terminal=sys.stderr.isatty())
    except ValueError as error:
        raise click.UsageError(str(error)) from None
    problem = launch.usage_problem(options)
    if problem:
        raise click.UsageError(problem)
    try:
        if dry_run:
            import orjson

            plan = launch.check_file_job(options)
            click.echo(orjson.dumps(plan, default=str, option=orjson.OPT_INDENT_2).decode())
            if plan["lines"]["would_fail"]:
                ctx.exit(EXIT_LINES_FAILED)
            return
        summary = launch.run_file_job(options)
    except launch.JobError as error:
        raise click.ClickException(str(error)) from None
    if not options.run.quiet:
        from batchgen.job.metrics import summary_text

        errors = str(options.errors) if options.errors else None
        click.echo(summary_text(summary, str(options.output or "-"), errors), err=True)
    if summary["interrupted"]:
        ctx.exit(128 + signal.Signals[summary["interrupted"]].value)
    if summary["requests_failed"] or summary["requests_failed_earlier"]:
        ctx.exit(EXIT_LINES_FAILED)
