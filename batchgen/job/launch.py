"""One `batchgen run`: check every argument and file, load the model, then run the job.

The checks come first and import nothing heavy, so a run that cannot start says so at once
and leaves every file as it was; OUTPUT is opened only once the model has loaded.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import IO, Any

from batchgen.job import ledger, shards, sources
from batchgen.job.errors import JobError
from batchgen.job.loading import locate_model
from batchgen.job.options import JobOptions, RaySettings, RunSettings, grouped

__all__ = ["JobError", "JobOptions", "check_file_job", "options_from", "run_file_job"]


def options_from(settings: dict[str, Any], env: Mapping[str, str], terminal: bool) -> JobOptions:
    """JobOptions from the command's settings (None: not given); ValueError when they clash."""
    if settings["input_path"] is None or settings["output_path"] is None:
        raise ValueError("INPUT and OUTPUT are needed: on the command line or in a --job file")
    shard = None
    if settings["num_shards"] is not None and settings["shard"] != "auto":
        raise ValueError("--num-shards goes with --shard auto")
    if settings["shard"] is not None:
        shard = shards.parse_shard(settings["shard"], env, settings["num_shards"])
    metrics = Path(settings["metrics_path"]) if settings["metrics_path"] else None
    errors = Path(settings["errors_path"]) if settings["errors_path"] else None
    if shard is not None and "{shard" in str(settings["output_path"]):
        # Shards writing OUTPUT by the template would all claim one file beside it.
        for path, name in ((metrics, "--metrics"), (errors, "--errors")):
            if path is not None and "{shard" not in str(path):
                raise ValueError(f"{name} {path} needs {{shard}} too, as OUTPUT has it")
    groups = grouped(settings)
    run = RunSettings(**groups["run"])
    return JobOptions(
        input=_path_or_dash(settings["input_path"]),
        output=shards.with_shard(_path_or_dash(settings["output_path"]), shard, "OUTPUT"),
        metrics=shards.with_shard(metrics, shard, "--metrics"),
        errors=shards.with_shard(errors, shard, "--errors"),
        shard=shard,
        **groups["job"],
        engine=groups["engine"],
        scheduler=groups["scheduler"],
        sampling=groups["sampling"],
        run=replace(run, progress="none" if run.quiet else "bar" if terminal else "log"),
        ray=RaySettings(**groups["ray"]),
    )


def _path_or_dash(value: str) -> Path | None:
    return None if value == "-" else Path(value)


def usage_problem(options: JobOptions) -> str | None:
    """What is wrong with the options themselves (a usage error), if anything."""
    run, engine = options.run, options.engine
    if run.resume and run.overwrite:
        return "--resume and --overwrite exclude each other"
    if run.resume and options.output is None:
        return "--resume needs an OUTPUT file, not stdout"
    if run.prompt_field is not None and run.prompt_template is not None:
        return "--prompt-field and --prompt-template exclude each other"
    if run.prompt_field is not None or run.prompt_template is not None:
        try:
            sources.RowShape(run.prompt_field, run.prompt_template)
        except ValueError as error:
            return str(error)
    if options.input is None and run.input_format == "parquet":
        return "a Parquet INPUT must be a file, not stdin (its footer is read first)"
    if "" in options.sampling.get("stop", ()):
        return "--stop must not be empty"
    slots = engine.get("kv_cache") == "slots"
    if slots and (engine.get("device") == "gpu" or engine.get("dtype") == "bfloat16"):
        return "--kv-cache slots runs on the CPU in float32; use --kv-cache paged"
    if engine.get("kv_cache_dtype") == "float16" and engine.get("kv_cache") == "paged":
        return "--kv-cache-dtype float16 goes with the slot cache (--kv-cache slots)"
    if run.backend == "local" and options.ray != RaySettings():
        return (
            "--ray-address, --actors, --gpus-per-actor and --cpus-per-actor go with --backend ray"
        )
    if options.shard and options.output is None:
        return "--shard needs an OUTPUT file, not stdout: its completion marker goes beside it"
    marker = shards.marker_path(options.output) if options.shard and options.output else None
    for path, name in ((options.metrics, "--metrics"), (options.errors, "--errors")):
        if marker and path and ledger.same_file(path, marker):
            return f"{name} {path} is OUTPUT's shard marker"
    named = {"INPUT": options.input, "OUTPUT": options.output, "--metrics": options.metrics}
    written = (
        (options.output, "OUTPUT"),
        (options.metrics, "--metrics"),
        (options.errors, "--errors"),
    )
    for path, name in written:
        for other_name, other in named.items():
            if path and other and other_name != name and ledger.same_file(path, other):
                return f"{name} {path} is the {other_name} file too"
    return None


def check_file_job(options: JobOptions) -> dict[str, Any]:
    """Every check a run makes before loading the model, and a pass over every line: the
    resolved options, and under "lines" how many would run, be skipped or fail."""
    from batchgen.job import backends

    run = options.run
    _stale_marker(options)
    _chat_template(options)
    backends.backend_class(run.backend).check(options)
    with _open_input(options.input) as source:
        with contextlib.ExitStack() as stack:
            output, _, errors = _claims(options, stack)
        locate_model(options.model)
        from batchgen.job.survey import survey

        done = output.done.joined(errors.done) if errors else output.done
        found = survey(_lines(options, source), options.defaults(), done, options.shard)
    return {**options.resolved(), "lines": found.record()}


def run_file_job(options: JobOptions) -> dict[str, Any]:
    """Run the job; return its summary. JobError when it cannot start."""
    opened = _open_input(options.input)
    marker = _stale_marker(options)
    with contextlib.ExitStack() as stack:
        source = stack.enter_context(opened)
        claims = _claims(options, stack)
        lines = _lines(options, source)
        locate_model(options.model)
        progress = stack.enter_context(_progress(options, claims))
        try:
            summary = _run(options, lines, claims, progress, marker)
        except ledger.ClaimError as error:
            raise JobError(str(error)) from None
        except OSError as error:  # a full disk, say; --resume cuts a line torn by it
            raise JobError(
                f"I/O error mid-run: {error}; --resume continues once it is fixed"
            ) from error
    if options.shard and options.output and not summary["interrupted"]:
        try:
            shards.write_marker(options.output, options.shard, summary)
        except OSError as error:
            raise JobError(f"OUTPUT is complete, but its shard marker: {error}") from error
    return summary


def _claims(
    options: JobOptions, stack: contextlib.ExitStack
) -> tuple[ledger.Claim, ledger.Claim | None, ledger.Claim | None]:
    """OUTPUT, the metrics file and the error file, claimed (closed with `stack`)."""
    run = options.run
    claimed: list[ledger.Claim | None] = []
    named = ((options.output, "output"), (options.metrics, "metrics"), (options.errors, "output"))
    for i, (path, kind) in enumerate(named):
        if i and path is None:
            claimed.append(None)
            continue
        try:
            claim = ledger.claim(path, resume=run.resume, overwrite=run.overwrite, kind=kind)
        except ledger.ClaimError as error:
            raise JobError(str(error)) from None
        stack.callback(claim.close)
        claimed.append(claim)
    output, metrics, errors = claimed
    assert output is not None
    return output, metrics, errors


def _progress(
    options: JobOptions, claims: tuple[ledger.Claim, ledger.Claim | None, ledger.Claim | None]
) -> contextlib.AbstractContextManager[Any]:
    """A bar on a terminal, plain lines in a log, or none; the heavy imports start here."""
    run = options.run
    output, _, errors = claims
    total = None  # the total costs a pass over INPUT: only with progress, only for a file
    if run.progress != "none" and options.input is not None and options.shard is None:
        fmt = sources.input_format(options.input, run.input_format)
        done = output.done.joined(errors.done) if errors else output.done
        total = sources.count_lines(options.input, fmt) - len(done)
    if run.progress == "log":
        from batchgen.job.progress import LogProgress

        return LogProgress(total)
    from tqdm import tqdm

    return tqdm(total=total, unit="req", disable=run.progress != "bar", file=sys.stderr)


def _run(
    options: JobOptions,
    lines: Iterator[tuple[int, bytes]],
    claims: tuple[ledger.Claim, ledger.Claim | None, ledger.Claim | None],
    progress: Any,
    marker: Path | None,
) -> dict[str, Any]:
    """The job through its backend, from the options' one description of it."""
    from batchgen.job import backends
    from batchgen.job.runner import RunConfig, drive

    run = options.run
    backend_class = backends.backend_class(run.backend)
    config = RunConfig(
        options.engine_config().scheduler,
        run.window,
        run.token_ids,
        options.model,
        options.shard,
        _chat_template(options),
        run.order,
    )
    backend = backend_class(options, config)
    output, metrics, errors = claims
    defaults = options.defaults()
    return drive(backend, lines, defaults, config, output, metrics, progress, marker, errors)


def _lines(options: JobOptions, source: IO[bytes]) -> Iterator[tuple[int, bytes]]:
    """INPUT's requests in its format; JobError at once if it cannot be read in it."""
    try:
        return sources.read_input(
            source, sources.input_format(options.input, options.run.input_format)
        )
    except sources.InputError as error:
        raise JobError(str(error)) from None


def _chat_template(options: JobOptions) -> str | None:
    """The --chat-template file's text; JobError if it cannot be read."""
    path = options.run.chat_template
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise JobError(f"cannot read --chat-template {path}: {error}") from None


def _stale_marker(options: JobOptions) -> Path | None:
    """The shard's marker from an earlier run, if any; JobError if that file is not batchgen's."""
    if options.shard is None or options.output is None:
        return None
    marker = shards.marker_path(options.output)
    if not marker.exists():
        return None
    if not shards.is_marker(marker):
        raise JobError(f"{marker} exists and is not a batchgen shard marker; move it away")
    return marker


def _open_input(path: Path | None) -> contextlib.AbstractContextManager[IO[bytes]]:
    if path is None:
        return contextlib.nullcontext(sys.stdin.buffer)
    try:
        return path.open("rb")
    except OSError as error:
        raise JobError(f"cannot read {path}: {error.strerror}") from None
