"""The job's backends by name (`--backend NAME`); each is a class implementing runner.Backend.

A backend's module is imported only when a job picks it, so an extra it needs (Ray) is
needed only then.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from batchgen.job.errors import JobError

if TYPE_CHECKING:
    from batchgen.job.runner import Backend


@dataclass(frozen=True)
class Entry:
    """Where a backend's class is, and what to install when its module cannot be imported."""

    module: str
    name: str
    needs: str = ""  # e.g. "Ray"
    extra: str = ""  # e.g. "batchgen[ray]"


BACKENDS: dict[str, Entry] = {
    "local": Entry("batchgen.job.runner", "LocalBackend"),
    "ray": Entry("batchgen.scale.ray_data", "RayBackend", "Ray", "batchgen[ray]"),
}


def backend_class(name: str) -> type[Backend]:
    """The backend's class; JobError saying what to install when its module cannot load."""
    entry = BACKENDS[name]
    try:
        module = importlib.import_module(entry.module)
    except ImportError as error:
        if not entry.extra:
            raise
        needs = f"--backend {name} needs {entry.needs} ({error}): pip install '{entry.extra}'"
        raise JobError(needs) from None
    return getattr(module, entry.name)
