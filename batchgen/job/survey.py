"""`--dry-run`'s pass over INPUT: every line read and checked as the run would, no model."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from batchgen.job.inputs import Defaults, JobLine, LineError
from batchgen.job.ledger import Done
from batchgen.job.metrics import RunStats
from batchgen.job.runner import LineFilter
from batchgen.job.shards import Shard

SHOWN_PROBLEMS = 5


@dataclass
class Survey:
    """What a run of these lines would do, as far as it is known before the model loads:
    a prompt too long for the context is found only by the run itself."""

    read: int = 0
    would_run: int = 0
    skipped: int = 0  # another shard's, or already in OUTPUT
    would_fail: int = 0
    problems: list[dict[str, Any]] = field(default_factory=list)  # the first few

    def record(self) -> dict[str, Any]:
        return {
            "read": self.read,
            "would_run": self.would_run,
            "skipped": self.skipped,
            "would_fail": self.would_fail,
            "first_problems": self.problems,
        }


def survey(
    lines: Iterable[tuple[int, bytes]], defaults: Defaults, done: Done, shard: Shard | None
) -> Survey:
    """Every line through the run's own filter: shard, resume, duplicate ids, its fields."""
    found = Survey()
    admit = LineFilter(defaults, done, RunStats(), shard).admit
    for number, raw in lines:
        found.read += 1
        item = admit(number, raw)
        if isinstance(item, JobLine):
            found.would_run += 1
        elif isinstance(item, LineError):
            found.would_fail += 1
            if len(found.problems) < SHOWN_PROBLEMS:
                found.problems.append(
                    {"line": item.line, "id": item.id, "field": item.field, "message": item.message}
                )
        else:
            found.skipped += 1
    return found
