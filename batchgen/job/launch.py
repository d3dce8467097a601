"""One `batchgen run`: check every argument and file, load the model, then run the job.

The checks come first and import nothing heavy, so a run that cannot start says so at once
and leaves every file as it was; OUTPUT is opened only once the model has loaded.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from batchgen.job import ledger, shards, sources
from batchgen.job.shards import Shard

if TYPE_CHECKING:
    from batchgen.engine import Engine, EngineConfig
    from batchgen.job.inputs import Defaults


class JobError(Exception):
    """The job cannot start (exit 1); no file has been touched."""


@dataclass(frozen=True)
class JobOptions:
    """Everything `batchgen run` was asked to do; paths are None for stdin/stdout."""

    input: Path | None
    output: Path | None
    model: str = "gpt2"
    device: str = "auto"
    dtype: str = "auto"
    kv_cache: str = "auto"
    kv_cache_gb: float | None = None
    kv_cache_dtype: str = "auto"
    batch_size: int = 32
    schedule: str = "continuous"
    step_tokens: int = 2048
    window: int = 1024
    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    chat_template: Path | None = None  # a Jinja file; None: the transcript GPT-2 continues
    input_format: str = "auto"  # or one of inputs.INPUT_FORMATS
    prompt_field: str | None = None  # rows of any shape: where the prompt is
    prompt_template: str | None = None
    resume: bool = False
    overwrite: bool = False
    metrics: Path | None = None
    token_ids: bool = False
    progress: bool = False
    quiet: bool = False
    shard: Shard | None = None
    backend: str = "local"  # or "ray"
    ray_address: str | None = None
    actors: int = 1
    gpus_per_actor: float = 0.0
    cpus_per_actor: float | None = None  # None: 1, or less where Ray Data needs the room


def options_from(settings: dict[str, Any], env: Mapping[str, str], progress: bool) -> JobOptions:
    """JobOptions from the command's settings; ValueError (a usage error) when they clash."""
    if settings["input_path"] is None or settings["output_path"] is None:
        raise ValueError("INPUT and OUTPUT are needed: on the command line or in a --job file")
    shard = None
    if settings["num_shards"] is not None and settings["shard"] != "auto":
        raise ValueError("--num-shards goes with --shard auto")
    if settings["shard"] is not None:
        shard = shards.parse_shard(settings["shard"], env, settings["num_shards"])
    metrics = Path(settings["metrics_path"]) if settings["metrics_path"] else None
    named = {
        "input": _path_or_dash(settings["input_path"]),
        "output": shards.with_shard(_path_or_dash(settings["output_path"]), shard, "OUTPUT"),
        "metrics": shards.with_shard(metrics, shard, "--metrics"),
        "progress": progress and not settings["quiet"],
        "shard": shard,
    }
    known = {f.name for f in fields(JobOptions)}
    rest = {k: v for k, v in settings.items() if k in known and k not in named}
    return JobOptions(**named, **rest)


def _path_or_dash(value: str) -> Path | None:
    return None if value == "-" else Path(value)


def usage_problem(options: JobOptions) -> str | None:
    """What is wrong with the options themselves (a usage error), if anything."""
    if options.resume and options.overwrite:
        return "--resume and --overwrite exclude each other"
    if options.resume and options.output is None:
        return "--resume needs an OUTPUT file, not stdout"
    if "" in options.stop:
        return "--stop must not be empty"
    if options.prompt_field is not None and options.prompt_template is not None:
        return "--prompt-field and --prompt-template exclude each other"
    if options.prompt_template is not None or options.prompt_field is not None:
        try:
            sources.RowShape(options.prompt_field, options.prompt_template)
        except ValueError as error:
            return str(error)
    if options.input is None and options.input_format == "parquet":
        return "a Parquet INPUT must be a file, not stdin (its footer is read first)"
    if options.kv_cache == "slots" and (options.device == "gpu" or options.dtype == "bfloat16"):
        return "--kv-cache slots runs on the CPU in float32; use --kv-cache paged"
    if options.kv_cache_dtype == "float16" and options.kv_cache == "paged":
        return "--kv-cache-dtype float16 goes with the slot cache (--kv-cache slots)"
    ray_only = (
        options.ray_address,
        options.actors != 1,
        options.gpus_per_actor,
        options.cpus_per_actor,
    )
    if options.backend == "local" and any(ray_only):
        return (
            "--ray-address, --actors, --gpus-per-actor and --cpus-per-actor go with --backend ray"
        )
    if options.shard and options.output is None:
        return "--shard needs an OUTPUT file, not stdout: its completion marker goes beside it"
    marker = shards.marker_path(options.output) if options.shard and options.output else None
    if marker and options.metrics and ledger.same_file(options.metrics, marker):
        return f"--metrics {options.metrics} is OUTPUT's shard marker"
    named = {"INPUT": options.input, "OUTPUT": options.output}
    for path, name in ((options.output, "OUTPUT"), (options.metrics, "--metrics")):
        for other_name, other in named.items():
            if path and other and other_name != name and ledger.same_file(path, other):
                return f"{name} {path} is the {other_name} file too"
    return None


def check_file_job(options: JobOptions) -> dict[str, Any]:
    """Every check a run makes before loading the model, and a pass over every line: the
    resolved options, and under "lines" how many would run, be skipped or fail."""
    _stale_marker(options)
    _chat_template(options)
    if options.backend == "ray":
        _ray_module().check_reachable(options.ray_address)
    with _open_input(options.input) as source:
        done = None
        for path, kind in ((options.output, "output"), (options.metrics, "metrics")):
            try:
                claim = ledger.claim(
                    path, resume=options.resume, overwrite=options.overwrite, kind=kind
                )
            except ledger.ClaimError as error:
                raise JobError(str(error)) from None
            claim.close()
            done = claim.done if done is None else done
        _locate_model(options.model)
        from batchgen.job.survey import survey

        try:
            lines = sources.read_input(
                source, sources.input_format(options.input, options.input_format)
            )
        except sources.InputError as error:
            raise JobError(str(error)) from None
        found = survey(lines, _defaults(options), done or ledger.Done(), options.shard)
    shown = {f.name: getattr(options, f.name) for f in fields(options) if f.name != "progress"}
    return {**shown, "lines": found.record()}


def run_file_job(options: JobOptions) -> dict[str, Any]:
    """Run the job; return its summary. JobError when it cannot start."""
    opened = _open_input(options.input)
    marker = _stale_marker(options)
    with contextlib.ExitStack() as stack:
        source = stack.enter_context(opened)
        try:
            output = ledger.claim(
                options.output, resume=options.resume, overwrite=options.overwrite
            )
            stack.callback(output.close)
            metrics = None
            if options.metrics:
                metrics = ledger.claim(
                    options.metrics,
                    resume=options.resume,
                    overwrite=options.overwrite,
                    kind="metrics",
                )
                stack.callback(metrics.close)
        except ledger.ClaimError as error:
            raise JobError(str(error)) from None
        fmt = sources.input_format(options.input, options.input_format)
        try:
            lines = sources.read_input(source, fmt)
        except sources.InputError as error:
            raise JobError(str(error)) from None
        _locate_model(options.model)
        # The heavy imports (torch, MAX, transformers) wait until every check has passed.
        from tqdm import tqdm

        total = None  # the bar's total costs a pass over INPUT: only for a bar, only for a file
        if options.progress and options.input is not None and options.shard is None:
            total = sources.count_lines(options.input, fmt) - len(output.done)
        progress = stack.enter_context(
            tqdm(total=total, unit="req", disable=not options.progress, file=sys.stderr)
        )
        try:
            summary = _run(options, lines, output, metrics, progress, marker)
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


def _run(
    options: JobOptions,
    lines: Iterator[tuple[int, bytes]],
    output: ledger.Claim,
    metrics: ledger.Claim | None,
    progress: Any,
    marker: Path | None,
) -> dict[str, Any]:
    """Start the backend, then run every line; the shard's old marker goes once it has started."""
    from batchgen.job.runner import RunConfig, run_job

    defaults = _defaults(options)
    engine_config = engine_config_of(options)
    config = RunConfig(
        engine_config.scheduler,
        options.window,
        options.token_ids,
        options.model,
        options.shard,
        _chat_template(options),
    )
    if options.backend == "ray":
        ray_data = _ray_module()
        return ray_data.run_ray_job(
            options, lines, defaults, config, output, metrics, progress, marker
        )
    engine = load_engine(options.model, engine_config)
    if marker:
        marker.unlink(missing_ok=True)  # this shard is being rewritten: no longer complete
    return run_job(lines, engine, defaults, config, output, metrics, progress)


def _defaults(options: JobOptions) -> Defaults:
    """How the job reads its lines: the sampling defaults, the base seed, the rows' shape."""
    from batchgen.engine import SamplingParams
    from batchgen.job.inputs import Defaults

    params = SamplingParams(
        max_tokens=options.max_tokens,
        temperature=options.temperature,
        top_k=options.top_k,
        top_p=options.top_p,
        stop=options.stop,
    )
    shape = None
    if options.prompt_field is not None or options.prompt_template is not None:
        shape = sources.RowShape(options.prompt_field, options.prompt_template)
    return Defaults(params, options.seed, shape)


def _locate_model(model: str) -> None:
    """JobError, in one line saying what to do, when the model is nowhere to be loaded from."""
    from batchgen.job.models import ModelNotFound, locate

    try:
        locate(model)
    except ModelNotFound as error:
        raise JobError(str(error)) from None


def _chat_template(options: JobOptions) -> str | None:
    """The --chat-template file's text; JobError if it cannot be read."""
    if options.chat_template is None:
        return None
    try:
        return options.chat_template.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise JobError(f"cannot read --chat-template {options.chat_template}: {error}") from None


def _ray_module() -> Any:
    """batchgen.scale.ray_data, or JobError saying how to install Ray."""
    try:
        from batchgen.scale import ray_data
    except ImportError as error:
        needs = f"--backend ray needs Ray ({error}): pip install 'batchgen[ray]'"
        raise JobError(needs) from None
    return ray_data


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


def engine_config_of(options: JobOptions) -> EngineConfig:
    """The engine a job asks for: where it runs, its KV cache and how rows are admitted."""
    from batchgen.engine import EngineConfig, SchedulerConfig

    scheduler = SchedulerConfig(options.schedule, options.batch_size, options.step_tokens)
    return EngineConfig(
        device=options.device,
        dtype=options.dtype,
        kv_cache=options.kv_cache,
        kv_cache_gb=options.kv_cache_gb,
        kv_cache_dtype=options.kv_cache_dtype,
        scheduler=scheduler,
    )


def load_engine(model: str, config: EngineConfig) -> Engine:
    """The compiled engine, or JobError naming why the model cannot load.

    Loading and compiling run in a worker thread while this one waits: a signal handler runs
    only in the main thread between bytecodes, and a cold compile holds the thread that calls
    it for a minute or more (MAX lets go of the GIL meanwhile), so Ctrl-C is answered at once.
    """
    from transformers.utils import logging

    from batchgen.engine import Engine
    from batchgen.engine.kernels import KernelBuildError

    logging.disable_progress_bar()  # transformers' loading bar would garble the job's stderr
    loaded: list[Engine] = []
    failed: list[BaseException] = []

    def load() -> None:
        try:
            loaded.append(Engine.from_pretrained(model, config))
        except BaseException as error:  # noqa: BLE001 - handed to the waiting thread
            failed.append(error)

    # A daemon: an interrupted start-up exits without waiting for the compile to end.
    worker = threading.Thread(target=load, name="batchgen-load", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.1)
    if failed and isinstance(failed[0], OSError | ValueError | KernelBuildError):
        raise JobError(f"cannot load model {model!r}: {failed[0]}") from failed[0]
    if failed:
        raise failed[0]
    return loaded[0]


def _open_input(path: Path | None) -> contextlib.AbstractContextManager[IO[bytes]]:
    if path is None:
        return contextlib.nullcontext(sys.stdin.buffer)
    try:
        return path.open("rb")
    except OSError as error:
        raise JobError(f"cannot read {path}: {error.strerror}") from None
