"""The `batchgen` command: options in, one call per command, exit codes out.

Only Click and the standard library are imported up front, so `--help`, `--version` and
usage errors answer at once; each command imports what it needs when it runs.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from batchgen import __version__
from batchgen.job.backends import BACKENDS
from batchgen.job.signals import Interrupted, raise_on_signals, restore_default_signals

# Exit codes beyond Click's own (1: a ClickException, 2: a usage error); see the README.
EXIT_LINES_FAILED = 3
SEED = click.IntRange(0, 2**64 - 1)
JSONL_FILE = click.Path(dir_okay=False, allow_dash=True)  # "-": stdin or stdout
BENCH_WORKLOADS = ("uniform", "step", "mixed", "long")  # as batchgen.bench.engine runs them


def main() -> None:
    """The console script: a Ctrl-C or SIGTERM at any moment ends it with 130/143, one line."""
    raise_on_signals()
    try:
        cli.main(prog_name="batchgen")
    except Interrupted as interrupt:
        click.echo(f"batchgen: interrupted by {interrupt}", err=True)
        # Every line written is already flushed. Exit now: a compile may still be running in
        # the loader thread, and the interpreter's shutdown would wait on it or trip over it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(interrupt.exit_code)


def _finite(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number")
    return value


def engine_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The options every model-running command shares: which model, where, in what dtype."""
    options = [
        click.option(
            "--model",
            default="gpt2",
            show_default=True,
            help="Hugging Face model name or local checkpoint directory.",
        ),
        click.option(
            "--device",
            type=click.Choice(["auto", "cpu", "gpu"]),
            help="auto (the default) picks the GPU when MAX sees one.",
        ),
        click.option(
            "--dtype",
            type=click.Choice(["auto", "float32", "bfloat16"]),
            help="auto (the default) is bfloat16 on GPU, float32 on CPU.",
        ),
        click.option(
            "--kv-cache",
            type=click.Choice(["auto", "slots", "paged"]),
            help="slots: batchgen's Mojo attention over a slot per row (CPU, auto there); "
            "paged: MAX's paged kernels (auto, the default, on GPU).",
        ),
        click.option(
            "--kv-cache-gb",
            type=click.FloatRange(min=0, min_open=True),
            help="KV cache memory; default: up to 4 GB (a quarter of free memory at most) on "
            "CPU, half of the free memory on GPU.",
        ),
        click.option(
            "--kv-cache-dtype",
            type=click.Choice(["auto", "float32", "float16"]),
            help="auto (the default): the model's; float16 (slots): half the memory and the "
            "bytes each step reads, maths in float32, logits within ~1e-2 of float32's.",
        ),
    ]
    return _with_options(command, options)


def sampling_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Per-request decoding options, range-checked before anything loads."""
    options = [
        click.option(
            "--max-tokens",
            type=click.IntRange(min=1),
            help="New tokens at most; default: as many as OpenAI's.",
        ),
        click.option(
            "--temperature",
            type=click.FloatRange(min=0),
            callback=_finite,
            help="0 (the default) decodes greedily.",
        ),
        click.option(
            "--top-k",
            type=click.IntRange(min=0),
            help="0 (the default) keeps every token.",
        ),
        click.option(
            "--top-p",
            type=click.FloatRange(0, 1, min_open=True),
            callback=_finite,
            help="Nucleus mass kept; default: all of it.",
        ),
    ]
    return _with_options(command, options)


def _with_options(
    command: Callable[..., Any], options: list[Callable[[Any], Any]]
) -> Callable[..., Any]:
    """Apply click options so that --help lists them in the order given."""
    for option in reversed(options):
        command = option(command)
    return command


def _load_engine(model: str, **engine_settings: Any) -> Any:
    """The engine `engine_options` describe (device, dtype, kv_cache, ...), compiled."""
    from batchgen.engine import EngineConfig
    from batchgen.job.errors import JobError
    from batchgen.job.loading import load_engine

    given = {name: value for name, value in engine_settings.items() if value is not None}
    try:
        return load_engine(model, EngineConfig(**given))
    except JobError as error:
        raise click.ClickException(str(error)) from None


@click.group()
@click.version_option(__version__, prog_name="batchgen")
def cli() -> None:
    """Batch and offline text generation with GPT-2 on Modular MAX."""


@cli.command()
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
    "--batch-size", type=click.IntRange(min=1), help="Rows the engine runs at once, at most."
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
    help="Prompt tokens prefilled per step beside the decoding rows; longer prompts go in chunks.",
)
@click.option(
    "--window",
    type=click.IntRange(min=1),
    help="With --schedule static: requests read ahead and sorted by length before batches are cut.",
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
# --no-X turns off what a job file turned on.
@click.option("--resume/--no-resume", help="Continue OUTPUT: skip lines it already holds.")
@click.option("--overwrite/--no-overwrite", help="Replace an existing OUTPUT.")
@click.option(
    "--metrics",
    "metrics_path",
    type=click.Path(dir_okay=False),
    help="Also write per-batch timing and a run summary to this JSONL file.",
)
@click.option("--token-ids/--no-token-ids", help="Add each completion's token ids to its line.")
@click.option("--quiet/--no-quiet", help="No progress bar and no summary on stderr.")
@click.option(
    "--dry-run",
    is_flag=True,
    help="Check the options, job file, shard and files, print what would run, and exit.",
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
    """
    from batchgen.job import launch

    job_file, dry_run = settings.pop("job_file"), settings.pop("dry_run")
    if job_file is not None:
        settings.update(_job_file_settings(ctx, job_file))
    try:
        options = launch.options_from(settings, os.environ, progress=sys.stderr.isatty())
    except ValueError as error:
        raise click.UsageError(str(error)) from None
    problem = launch.usage_problem(options)
    if problem:
        raise click.UsageError(problem)
    try:
        if dry_run:
            click.echo(launch.check_file_job(options))
            return
        summary = launch.run_file_job(options)
    except launch.JobError as error:
        raise click.ClickException(str(error)) from None
    if not options.run.quiet:
        from batchgen.job.metrics import summary_text

        click.echo(summary_text(summary, str(options.output or "-")), err=True)
    if summary["interrupted"]:
        ctx.exit(128 + signal.Signals[summary["interrupted"]].value)
    if summary["requests_failed"] or summary["requests_failed_earlier"]:
        ctx.exit(EXIT_LINES_FAILED)


def _job_file_settings(ctx: click.Context, path: Path) -> dict[str, Any]:
    """The job file's values for every option not given on the command line (exit 2 if bad)."""
    from batchgen.job import jobfile

    not_keys = ("job", "dry_run", "help")  # what a run is, not what is run
    by_key = {_job_key(p): p for p in ctx.command.params if _job_key(p) not in not_keys}
    settings: dict[str, Any] = {}
    try:
        for key, value in jobfile.read(path).items():
            param = by_key.get(key)
            if param is None:
                known = ", ".join(sorted(by_key))
                raise jobfile.JobFileError(f"{path}: unknown key '{key}' (known: {known})")
            if ctx.get_parameter_source(param.name) is ParameterSource.COMMANDLINE:
                continue
            value = jobfile.check(path, key, value, _toml_kind(param))
            value = jobfile.relative_to_file(path, key, value)
            try:
                settings[param.name] = param.process_value(ctx, value)
            except click.BadParameter as error:
                raise jobfile.JobFileError(f"{path}: key '{key}': {error.message}") from None
    except jobfile.JobFileError as error:
        raise click.UsageError(str(error)) from None
    return settings


def _job_key(param: click.Parameter) -> str:
    """The job-file key of a parameter: its long option name with - as _, or its argument."""
    if isinstance(param, click.Argument):
        return param.human_readable_name.lower()
    long_names = [o for o in param.opts if o.startswith("--")]
    return long_names[0].removeprefix("--").replace("-", "_")


def _toml_kind(param: click.Parameter) -> str:
    if isinstance(param, click.Option) and param.is_flag:
        return "bool"
    if param.multiple:
        return "strings"
    if isinstance(param.type, click.types.IntParamType):
        return "int"
    if isinstance(param.type, click.types.FloatParamType):
        return "float"
    return "str"


@cli.command()
@click.argument(
    "parts", metavar="PART...", nargs=-1, required=True, type=click.Path(path_type=Path)
)
@click.option(
    "--input",
    "input_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The INPUT the shards ran: every line of it must be accounted for.",
)
@click.option(
    "-o",
    "--output",
    "merged",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The merged file (written whole or not at all).",
)
@click.option(
    "--order",
    type=click.Choice(["parts", "input"]),
    default="parts",
    show_default=True,
    help="parts: each part's lines in turn; input: INPUT's line order.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing merged file.")
def merge(
    parts: tuple[Path, ...], input_path: Path, merged: Path, order: str, overwrite: bool
) -> None:
    """Merge shard outputs (PART...) into one file holding every line of INPUT exactly once.

    Exit 1, writing nothing, when a line of INPUT has no result or error line in the parts
    (the first few are named); duplicates are reported and kept once.
    """
    from batchgen.job.merge import MergeError
    from batchgen.job.merge import merge as merge_parts

    try:
        report = merge_parts(list(parts), input_path, merged, order, overwrite)
    except MergeError as error:
        raise click.ClickException(str(error)) from None
    for part in report.unmarked:
        click.echo(f"note: {part} has no completion marker (run without --shard?)", err=True)
    if report.duplicates:
        shown = "; ".join(report.duplicates[:5])
        click.echo(f"{len(report.duplicates)} duplicate lines, kept once: {shown}", err=True)
    click.echo(
        f"batchgen merge: {report.lines} lines from {len(parts)} parts into {merged}", err=True
    )


@cli.command("gpt2")
@engine_options
@click.option("--prompt", help="Generate once from PROMPT and exit.")
@click.option("--chat", is_flag=True, help="Rich terminal chat, Human vs GPT-2, streamed.")
@click.option("--benchmark", is_flag=True, help="Timed generation, then the same batched.")
@click.option(
    "--max-new-tokens",
    type=click.IntRange(min=1),
    help="Default: 50 in the prompt loop, 20 with --prompt, 100 in chat, 32 in the benchmark.",
)
@click.option(
    "--temperature", type=click.FloatRange(min=0), default=0.8, show_default=True,
    callback=_finite, help="0 decodes greedily.",
)  # fmt: skip
@click.option(
    "--chat-temperature", type=click.FloatRange(min=0), default=0.8, show_default=True,
    callback=_finite, help="Temperature in chat.",
)  # fmt: skip
@click.option("--seed", type=SEED, help="Session seed: every mode reproduces its output with it.")
@click.option("--batch-sizes", default="1,4,16", show_default=True, help="Benchmark batches.")
@click.option(
    "--runs", type=click.IntRange(min=1), default=3, show_default=True,
    help="Benchmark timed runs.",
)  # fmt: skip
def gpt2(
    model: str,
    prompt: str | None,
    chat: bool,
    benchmark: bool,
    max_new_tokens: int | None,
    temperature: float,
    chat_temperature: float,
    seed: int | None,
    batch_sizes: str,
    runs: int,
    **engine_settings: Any,
) -> None:
    """The MAX GPT-2 tutorial's modes: a prompt loop (default), --prompt, --chat, --benchmark."""
    if sum((prompt is not None, chat, benchmark)) > 1:
        raise click.UsageError("choose one of --prompt, --chat and --benchmark")
    sizes = _batch_sizes(batch_sizes)
    from batchgen.modes import interactive

    click.echo(f"Loading {model} ...")
    engine = _load_engine(model, **engine_settings)
    restore_default_signals()  # from here Ctrl-C leaves the loop or the chat as it always has
    for line in interactive.banner(engine, model):
        click.echo(line)
    if benchmark:
        from batchgen.modes.benchmark import tutorial_benchmark

        ids = engine.tokenizer("The history of artificial intelligence began").input_ids
        tutorial_benchmark(engine, ids, max_new_tokens or 32, runs, sizes, click.echo)
    elif chat:
        from rich.console import Console

        from batchgen.modes.chat import chat as run_chat

        run_chat(engine, chat_temperature, max_new_tokens or 100, seed, Console())
    elif prompt is not None:
        decoding = interactive.Decoding(max_new_tokens or 20, temperature, seed)
        try:
            text = interactive.generate_text(engine, prompt, decoding.params(0))
        except ValueError as error:
            raise click.ClickException(str(error)) from error
        click.echo(f"Generated text:\n{prompt}{text}")
    else:
        decoding = interactive.Decoding(max_new_tokens or 50, temperature, seed)
        interactive.prompt_loop(engine, decoding, input, click.echo)


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(b) for b in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise click.BadParameter(f"{text!r} is not a list like 1,8,32", param_hint="--batch-sizes")
    return sizes


@cli.command()
@click.argument("prompt")
@engine_options
@sampling_options
@click.option("--seed", type=SEED, default=None, help="Seed for reproducible sampling.")
def generate(
    prompt: str,
    model: str,
    max_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int | None,
    **engine_settings: Any,
) -> None:
    """Continue one PROMPT and print it with its continuation."""
    from batchgen.engine import Request, SamplingParams

    sampling = dict(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
    given = {name: value for name, value in sampling.items() if value is not None}
    params = SamplingParams(**given, seed=seed)
    engine = _load_engine(model, **engine_settings)
    try:
        out = engine.generate([Request(engine.tokenizer(prompt).input_ids, params)])
    except ValueError as error:  # context too long, empty prompt
        raise click.ClickException(str(error)) from error
    completion = out.completions[0]
    timing = completion.timing
    click.echo(prompt + completion.text)
    click.echo(
        f"[{completion.completion_tokens} tokens, finish {completion.finish_reason}, "
        f"prefill {timing.prefill_ms:.0f} ms, decode {timing.decode_ms:.0f} ms, "
        f"{engine.device.label} {str(engine.dtype).removeprefix('DType.')}, "
        f"{engine.cache.kind} KV cache]",
        err=True,
    )


@cli.command()
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
    default="uniform,step,mixed,long",
    show_default=True,
    help="Which to run, comma-separated: uniform (batches vs HF generate), step (decode "
    "step and its profile), mixed (a mixed job vs --schedule static and an HF loop), long "
    "(long prompts).",
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
def bench(
    model: Path | None,
    repeats: int,
    device: str,
    workloads: str,
    batch_sizes: str,
    lines: int,
    backends: bool,
    actors: int,
) -> None:
    """Print batchgen's throughput next to Hugging Face and to itself, measured in one run."""
    sizes = _batch_sizes(batch_sizes)
    chosen = tuple(w.strip() for w in workloads.split(",") if w.strip())
    if not chosen or set(chosen) - set(BENCH_WORKLOADS):
        known = ", ".join(BENCH_WORKLOADS)
        raise click.BadParameter(f"{workloads!r}: choose from {known}", param_hint="--workloads")
    from batchgen.bench import backends as scale_bench
    from batchgen.bench import engine as bench_module

    config = bench_module.BenchConfig(
        device=device,
        workloads=chosen,
        batch_sizes=sizes,
        hf_batch_sizes=tuple(b for b in sizes if b <= 32),
        repeats=repeats,
        mixed_lines=lines,
    )
    with tempfile.TemporaryDirectory() as tmp:
        if model is None:
            from batchgen.random_checkpoint import write_random_checkpoint

            model = write_random_checkpoint(Path(tmp), "124M")
        if backends:
            scale_config = scale_bench.ScaleBenchConfig(lines=lines, actors=actors)
            scale_bench.run(model, scale_config, click.echo)
        else:
            bench_module.run(model, config, click.echo)


@cli.command("random-model")
@click.argument("path", type=click.Path(file_okay=False, path_type=Path))
@click.option("--shape", type=click.Choice(["tiny", "124M"]), default="tiny", show_default=True)
@click.option("--seed", default=0, show_default=True)
def random_model(path: Path, shape: str, seed: int) -> None:
    """Write a seeded random-weight GPT-2 with the GPT-2 tokenizer to PATH (offline smoke tests)."""
    from transformers.utils import logging

    from batchgen.random_checkpoint import write_random_checkpoint

    logging.disable_progress_bar()
    click.echo(write_random_checkpoint(path, shape, seed))
