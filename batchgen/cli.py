"""The `batchgen` command line."""

from __future__ import annotations

import contextlib
import signal
import sys
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import click
from tqdm import tqdm

from batchgen import jobfile, runner
from batchgen.engine import Engine, EngineConfig, Request
from batchgen.sampling import SamplingParams


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
            default="auto",
            show_default=True,
            help="auto picks the GPU when MAX sees one.",
        ),
        click.option(
            "--dtype",
            type=click.Choice(["auto", "float32", "bfloat16"]),
            default="auto",
            show_default=True,
            help="auto is bfloat16 on GPU, float32 on CPU.",
        ),
    ]
    return _with_options(command, options)


def sampling_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Per-request decoding options."""
    options = [
        click.option("--max-tokens", default=16, show_default=True, help="New tokens at most."),
        click.option("--temperature", default=0.0, show_default=True, help="0 decodes greedily."),
        click.option("--top-k", default=0, show_default=True, help="0 keeps every token."),
        click.option("--top-p", default=1.0, show_default=True, help="Nucleus mass kept."),
    ]
    return _with_options(command, options)


def _with_options(
    command: Callable[..., Any], options: list[Callable[[Any], Any]]
) -> Callable[..., Any]:
    """Apply click options so that --help lists them in the order given."""
    for option in reversed(options):
        command = option(command)
    return command


def load_engine(model: str, device: str, dtype: str) -> Engine:
    try:
        return Engine.from_pretrained(model, EngineConfig(device=device, dtype=dtype))
    except (OSError, ValueError) as error:
        raise click.ClickException(f"cannot load model {model!r}: {error}") from error


@click.group()
@click.version_option(package_name="batchgen")
def main() -> None:
    """Batch and offline text generation with GPT-2 on Modular MAX."""
    from transformers.utils import logging

    logging.disable_progress_bar()


# Exit codes of `batchgen run`, documented in the README.
EXIT_LINES_FAILED = 3


@main.command()
@click.argument("input_path", metavar="INPUT", type=click.Path(dir_okay=False, allow_dash=True))
@click.argument("output_path", metavar="OUTPUT", type=click.Path(dir_okay=False, allow_dash=True))
@engine_options
@click.option("--batch-size", default=16, show_default=True, help="Requests per batch.")
@click.option(
    "--window",
    default=1024,
    show_default=True,
    help="Requests read ahead and sorted by length before batching; wider pads less.",
)
@sampling_options
@click.option(
    "--seed",
    type=int,
    default=None,
    help="Base seed: a line without its own seed samples with one derived from this and "
    "its id, so reruns and resumes reproduce it.",
)
@click.option("--stop", multiple=True, help="Stop string (repeatable); not part of the text.")
@click.option("--resume", is_flag=True, help="Continue OUTPUT: skip lines it already holds.")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUTPUT.")
@click.option(
    "--metrics",
    "metrics_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write per-batch timing and a run summary to this JSONL file.",
)
@click.option("--token-ids", is_flag=True, help="Add each completion's token ids to its line.")
@click.option("--quiet", is_flag=True, help="No progress bar and no summary on stderr.")
@click.pass_context
def run(
    ctx: click.Context,
    input_path: str,
    output_path: str,
    model: str,
    device: str,
    dtype: str,
    batch_size: int,
    window: int,
    max_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int | None,
    stop: tuple[str, ...],
    resume: bool,
    overwrite: bool,
    metrics_path: Path | None,
    token_ids: bool,
    quiet: bool,
) -> None:
    """Generate a completion for every prompt line of INPUT (JSONL) into OUTPUT (JSONL).

    Lines are native ({"prompt": ...}) or OpenAI batch /v1/completions requests; each gets
    one result or error line in OUTPUT as soon as its batch is done. "-" is stdin/stdout.
    Exit code 0: all lines ok; 3: some lines failed; 130/143: interrupted (--resume goes on).
    """
    from batchgen.weights import load_tokenizer

    if resume and overwrite:
        raise click.UsageError("--resume and --overwrite exclude each other")
    if batch_size < 1 or window < 1:
        raise click.UsageError("--batch-size and --window must be at least 1")
    try:
        params = SamplingParams(
            max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p
        )
    except ValueError as error:
        raise click.UsageError(str(error)) from error
    defaults = jobfile.Defaults(params, stop, seed)
    output = _job_output(input_path, output_path, resume, overwrite)
    metrics = _job_output(input_path, metrics_path, resume, overwrite) if metrics_path else None
    try:
        done = jobfile.scan_output(output.path) if output.append else jobfile.Done()
    except jobfile.OutputError as error:
        raise click.ClickException(str(error)) from error

    engine = load_engine(model, device, dtype)
    tokenizer = load_tokenizer(model)
    config = runner.RunConfig(batch_size, window, token_ids, model)
    with (
        output.open() as out_stream,
        metrics.open() if metrics else contextlib.nullcontext() as metrics_stream,
        _open_input(input_path) as in_stream,
        tqdm(
            total=_lines_to_do(input_path, done),
            unit="req",
            disable=quiet or not sys.stderr.isatty(),
            file=sys.stderr,
        ) as progress,
    ):
        summary = runner.run_job(
            jobfile.read_lines(in_stream),
            engine,
            tokenizer,
            defaults,
            config,
            jobfile.JobWriter(out_stream),
            jobfile.JobWriter(metrics_stream) if metrics_stream else None,
            done,
            progress,
        )
    if not quiet:
        click.echo(_summary_text(summary, output_path), err=True)
    if summary["interrupted"]:
        ctx.exit(128 + signal.Signals[summary["interrupted"]].value)
    if summary["requests_failed"] or summary["requests_failed_earlier"]:
        ctx.exit(EXIT_LINES_FAILED)


@dataclass(frozen=True)
class _Output:
    """A job output file, checked against clobbering before any work starts."""

    path: Path
    append: bool  # --resume of an existing file
    overwrite: bool

    def open(self) -> AbstractContextManager[IO[bytes]]:
        if str(self.path) == "-":
            return contextlib.nullcontext(sys.stdout.buffer)
        mode = "ab" if self.append else "wb" if self.overwrite else "xb"
        return self.path.open(mode)


def _job_output(input_path: str, path: str | Path, resume: bool, overwrite: bool) -> _Output:
    """Refuse to clobber an existing file unless --resume or --overwrite says what to do."""
    if str(path) == "-":
        if resume:
            raise click.UsageError("--resume needs an OUTPUT file, not stdout")
        return _Output(Path("-"), False, False)
    path = Path(path)
    if input_path != "-" and path.resolve() == Path(input_path).resolve():
        raise click.UsageError(f"{path} is the INPUT file too")
    exists = path.exists()
    if exists and not (resume or overwrite):
        raise click.ClickException(
            f"{path} exists: pass --resume to continue it or --overwrite to replace it"
        )
    return _Output(path, append=resume and exists, overwrite=overwrite)


def _open_input(input_path: str) -> AbstractContextManager[IO[bytes]]:
    if input_path == "-":
        return contextlib.nullcontext(sys.stdin.buffer)
    try:
        return open(input_path, "rb")  # noqa: SIM115 - closed by the caller's with
    except OSError as error:
        raise click.ClickException(f"cannot read {input_path}: {error.strerror}") from error


def _lines_to_do(input_path: str, done: jobfile.Done) -> int | None:
    """Non-blank lines of INPUT not yet in OUTPUT, for the progress bar; unknown for stdin."""
    if input_path == "-":
        return None
    with open(input_path, "rb") as stream:
        return sum(1 for line in stream if line.strip()) - len(done)


def _summary_text(summary: dict[str, Any], output_path: str) -> str:
    latency = summary["batch_latency_ms"]
    head = f"batchgen run: {summary['requests_ok']} ok, {summary['requests_failed']} failed"
    if summary["requests_skipped"]:
        head += (
            f", {summary['requests_skipped']} skipped as already in {output_path} "
            f"({summary['requests_failed_earlier']} of them errors)"
        )
    lines = [
        head,
        f"  {summary['model']} on {summary['device']} {summary['dtype']}: "
        f"load {summary['load_s']:.2f} s, compile {summary['compile_s']:.2f} s, "
        f"sampler compile {summary['sampler_compile_s']:.2f} s",
        f"  {summary['generated_tokens']} tokens in {summary['batches']} batches, "
        f"{summary['run_s']:.2f} s: {summary['requests_per_s']} requests/s, "
        f"{summary['generated_tokens_per_s']} tokens/s",
        f"  batch latency p50 {latency['p50']} ms, p90 {latency['p90']} ms, "
        f"p99 {latency['p99']} ms; padding efficiency {100 * summary['padding_efficiency']:.1f}%",
    ]
    if summary["requests_failed"] or summary["requests_failed_earlier"]:
        lines.append(f"  failed lines have error lines in {output_path}: exit code 3")
    if summary["interrupted"]:
        lines.append(f"  interrupted by {summary['interrupted']}: rerun with --resume to finish")
    return "\n".join(lines)


@main.command("gpt2")
@engine_options
@click.option("--prompt", help="Generate once from PROMPT and exit.")
@click.option("--chat", is_flag=True, help="Rich terminal chat, Human vs GPT-2, streamed.")
@click.option("--benchmark", is_flag=True, help="Timed generation, then the same batched.")
@click.option(
    "--max-new-tokens",
    type=click.IntRange(min=1),
    help="Default: 50 in the prompt loop, 20 with --prompt, 100 in chat, 32 in the benchmark.",
)
@click.option("--temperature", default=0.8, show_default=True, help="0 decodes greedily.")
@click.option("--chat-temperature", default=0.8, show_default=True, help="Temperature in chat.")
@click.option("--seed", type=int, help="Session seed: every mode reproduces its output with it.")
@click.option("--batch-sizes", default="1,4,16", show_default=True, help="Benchmark batches.")
@click.option("--runs", default=3, show_default=True, help="Benchmark timed runs.")
def gpt2(
    model: str,
    device: str,
    dtype: str,
    prompt: str | None,
    chat: bool,
    benchmark: bool,
    max_new_tokens: int | None,
    temperature: float,
    chat_temperature: float,
    seed: int | None,
    batch_sizes: str,
    runs: int,
) -> None:
    """The MAX GPT-2 tutorial's modes: a prompt loop (default), --prompt, --chat, --benchmark."""
    from batchgen import interactive
    from batchgen.weights import load_tokenizer

    if sum((prompt is not None, chat, benchmark)) > 1:
        raise click.UsageError("choose one of --prompt, --chat and --benchmark")
    if seed is not None and not 0 <= seed < 2**64:
        raise click.UsageError("--seed must be in 0..2**64-1")
    click.echo(f"Loading {model} ...")
    engine = load_engine(model, device, dtype)
    tokenizer = load_tokenizer(model)
    for line in interactive.banner(engine, model):
        click.echo(line)
    if benchmark:
        from batchgen.bench import tutorial_benchmark

        ids = tokenizer("The history of artificial intelligence began").input_ids
        sizes = tuple(int(b) for b in batch_sizes.split(","))
        tutorial_benchmark(engine, ids, max_new_tokens or 32, runs, sizes, click.echo)
    elif chat:
        from rich.console import Console

        from batchgen.chat import chat as run_chat

        run_chat(engine, tokenizer, chat_temperature, max_new_tokens or 100, seed, Console())
    elif prompt is not None:
        decoding = interactive.Decoding(max_new_tokens or 20, temperature, seed)
        try:
            text = interactive.generate_text(engine, tokenizer, prompt, decoding.params(0))
        except ValueError as error:
            raise click.ClickException(str(error)) from error
        click.echo(f"Generated text:\n{prompt}{text}")
    else:
        decoding = interactive.Decoding(max_new_tokens or 50, temperature, seed)
        interactive.prompt_loop(engine, tokenizer, decoding, input, click.echo)


@main.command()
@click.argument("prompt")
@engine_options
@sampling_options
@click.option("--seed", type=int, default=None, help="Seed for reproducible sampling.")
def generate(
    prompt: str,
    model: str,
    device: str,
    dtype: str,
    max_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int | None,
) -> None:
    """Continue one PROMPT and print it with its continuation."""
    from batchgen.weights import load_tokenizer

    try:
        params = SamplingParams(
            max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed
        )
    except ValueError as error:
        raise click.UsageError(str(error)) from error
    engine = load_engine(model, device, dtype)
    tokenizer = load_tokenizer(model)
    try:
        out = engine.generate([Request(tokenizer(prompt).input_ids, params)])
    except ValueError as error:  # context too long, empty prompt
        raise click.ClickException(str(error)) from error
    completion = out.completions[0]
    click.echo(prompt + tokenizer.decode(completion.token_ids, skip_special_tokens=True))
    click.echo(
        f"[{completion.completion_tokens} tokens, finish {completion.finish_reason}, "
        f"prefill {1e3 * out.prefill_s:.0f} ms, decode {1e3 * out.decode_s:.0f} ms, "
        f"{engine.device.label} {engine.dtype}]",
        err=True,
    )


@main.command()
@click.option(
    "--model",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Local GPT-2 checkpoint; default: a seeded random one of the 124M shape.",
)
@click.option("--repeats", default=3, show_default=True, help="Timed runs per figure.")
@click.option("--batch-sizes", default="1,8,32", show_default=True)
def bench(model: Path | None, repeats: int, batch_sizes: str) -> None:
    """Print engine tokens/s next to Hugging Face generate, measured in the same run."""
    from batchgen import bench as bench_module

    config = bench_module.BenchConfig(
        batch_sizes=tuple(int(b) for b in batch_sizes.split(",")), repeats=repeats
    )
    if model is not None:
        bench_module.run(model, config, click.echo)
        return
    from batchgen.testing import write_random_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        bench_module.run(write_random_checkpoint(Path(tmp), "124M"), config, click.echo)


@main.command("random-model")
@click.argument("path", type=click.Path(file_okay=False, path_type=Path))
@click.option("--shape", type=click.Choice(["tiny", "124M"]), default="tiny", show_default=True)
@click.option("--seed", default=0, show_default=True)
def random_model(path: Path, shape: str, seed: int) -> None:
    """Write a seeded random-weight GPT-2 with the GPT-2 tokenizer to PATH (offline smoke tests)."""
    from batchgen.testing import write_random_checkpoint

    click.echo(write_random_checkpoint(path, shape, seed))
