"""What `batchgen run` is asked to do, in groups: the engine, the sampling defaults, the run, Ray.

The engine's groups hold only the values given: EngineConfig, SchedulerConfig and
SamplingParams keep the defaults, written once where each field is declared, and are built
only when the job needs them, so that a usage error answers before MAX or numpy load.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchgen.job.shards import Shard

if TYPE_CHECKING:
    from batchgen.engine import EngineConfig
    from batchgen.job.inputs import Defaults


@dataclass(frozen=True)
class RunSettings:
    """How the job runs and reports, beside the engine and the lines' defaults."""

    backend: str = "local"  # a name in batchgen.job.backends.BACKENDS
    window: int = 1024  # requests read ahead and ordered before they start
    order: str = "finished"  # OUTPUT's lines as they finish, or "input": in INPUT's order
    token_ids: bool = False  # also write each completion's token ids
    chat_template: Path | None = None  # a Jinja file; None: the transcript GPT-2 continues
    input_format: str = "auto"  # or one of sources.INPUT_FORMATS; auto: by INPUT's suffix
    prompt_field: str | None = None  # rows of any shape: the field that is the prompt,
    prompt_template: str | None = None  # or a format over the row's fields
    resume: bool = False
    overwrite: bool = False
    quiet: bool = False
    progress: str = "none"  # "bar" on a terminal, "log" lines otherwise; none with --quiet


@dataclass(frozen=True)
class RaySettings:
    """The Ray backend's cluster and actor pool."""

    address: str | None = None  # None: start a local Ray
    actors: int = 1
    gpus_per_actor: float = 0.0
    cpus_per_actor: float | None = None  # None: 1, or less where Ray Data needs the room


# Where each setting of `batchgen run` goes: (group, field). "engine", "scheduler" and
# "sampling" are EngineConfig's, SchedulerConfig's and SamplingParams' fields; "job" is
# JobOptions' own. A setting that is neither here nor in OWN_SETTINGS is an error.
SETTINGS: dict[str, tuple[str, str]] = {
    "model": ("job", "model"),
    "device": ("engine", "device"),
    "dtype": ("engine", "dtype"),
    "kv_cache": ("engine", "kv_cache"),
    "kv_cache_gb": ("engine", "kv_cache_gb"),
    "kv_cache_dtype": ("engine", "kv_cache_dtype"),
    "batch_size": ("scheduler", "max_rows"),
    "schedule": ("scheduler", "policy"),
    "step_tokens": ("scheduler", "step_tokens"),
    "prefix_cache": ("scheduler", "prefix_cache"),
    "max_tokens": ("sampling", "max_tokens"),
    "temperature": ("sampling", "temperature"),
    "top_k": ("sampling", "top_k"),
    "top_p": ("sampling", "top_p"),
    "stop": ("sampling", "stop"),
    "seed": ("job", "seed"),
    "backend": ("run", "backend"),
    "window": ("run", "window"),
    "order": ("run", "order"),
    "token_ids": ("run", "token_ids"),
    "chat_template": ("run", "chat_template"),
    "input_format": ("run", "input_format"),
    "prompt_field": ("run", "prompt_field"),
    "prompt_template": ("run", "prompt_template"),
    "resume": ("run", "resume"),
    "overwrite": ("run", "overwrite"),
    "quiet": ("run", "quiet"),
    "ray_address": ("ray", "address"),
    "actors": ("ray", "actors"),
    "gpus_per_actor": ("ray", "gpus_per_actor"),
    "cpus_per_actor": ("ray", "cpus_per_actor"),
}
# Settings that options_from resolves itself: paths, and the shard they may name.
OWN_SETTINGS = ("input_path", "output_path", "metrics_path", "errors_path", "shard", "num_shards")


@dataclass(frozen=True)
class JobOptions:
    """Everything `batchgen run` was asked to do; paths are None for stdin/stdout."""

    input: Path | None
    output: Path | None
    model: str
    metrics: Path | None = None
    errors: Path | None = None  # error lines go here instead of OUTPUT
    shard: Shard | None = None
    seed: int | None = None  # base seed: a line without its own gets one derived from it
    engine: Mapping[str, Any] = field(default_factory=dict)  # EngineConfig's, as given
    scheduler: Mapping[str, Any] = field(default_factory=dict)  # SchedulerConfig's
    sampling: Mapping[str, Any] = field(default_factory=dict)  # SamplingParams'
    run: RunSettings = field(default_factory=RunSettings)
    ray: RaySettings = field(default_factory=RaySettings)

    def engine_config(self) -> EngineConfig:
        """The engine the job asks for, defaults filled in (imports the engine)."""
        from batchgen.engine import EngineConfig, SchedulerConfig

        return EngineConfig(**self.engine, scheduler=SchedulerConfig(**self.scheduler))

    def defaults(self) -> Defaults:
        """How a line is read: the decoding it gets for every field it does not set itself,
        and where the prompt of a row of any shape is."""
        from batchgen.engine import SamplingParams
        from batchgen.job.inputs import Defaults
        from batchgen.job.sources import RowShape

        run, shape = self.run, None
        if run.prompt_field is not None or run.prompt_template is not None:
            shape = RowShape(run.prompt_field, run.prompt_template)
        return Defaults(SamplingParams(**self.sampling), self.seed, shape)

    def resolved(self) -> dict[str, Any]:
        """Every option with its defaults filled in, grouped (what --dry-run prints)."""
        run = {k: v for k, v in asdict(self.run).items() if k != "progress"}
        params = asdict(self.defaults().params)
        del params["seed"]  # a line's own; the job's base seed is shown apart
        top = {"input": self.input, "output": self.output, "model": self.model}
        top |= {"metrics": self.metrics, "errors": self.errors, "shard": self.shard}
        top["seed"] = self.seed
        return {
            **top,
            "engine": asdict(self.engine_config()),
            "sampling": params,
            "run": run,
            "ray": asdict(self.ray),
        }


def grouped(settings: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The given settings (None: not given) by group; TypeError for one that reaches no field."""
    unknown = sorted(set(settings) - set(SETTINGS) - set(OWN_SETTINGS))
    if unknown:
        raise TypeError(f"settings that reach no option field: {', '.join(unknown)}")
    groups: dict[str, dict[str, Any]] = {g: {} for g in ("job", "engine", "scheduler")}
    groups |= {g: {} for g in ("sampling", "run", "ray")}
    for name, value in settings.items():
        if name in SETTINGS and value is not None:
            group, name_in_group = SETTINGS[name]
            groups[group][name_in_group] = value
    return groups
