"""The report as one self-contained HTML page: tables, and the figures inlined as SVG.

Nothing on the page is fetched or run: no script, font or style sheet from anywhere, and a
Content-Security-Policy that forbids loading any, so it opens the same offline, from a CI
artefact or an e-mail.
"""

from __future__ import annotations

from collections.abc import Callable
from html import escape

from batchgen import __version__
from batchgen.report.figures import Drawn, svg
from batchgen.report.runs import Percentiles, Run, Session, SummaryLine
from batchgen.report.series import MAX_POINTS

ERROR_ROWS = 100  # kinds of error listed per run; the rest are counted in one line

_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 2em; }
table { border-collapse: collapse; margin: .5em 0; }
th, td { border-bottom: 1px solid #ddd; padding: .25em .7em; text-align: left;
         vertical-align: top; }
td { text-align: right; font-variant-numeric: tabular-nums; }
#errors td { text-align: left; } #errors td.n { text-align: right; }
figure { margin: 1em 0; } figure svg { max-width: 100%; height: auto; }
.note { color: #666; font-size: .9em; }
"""
_POLICY = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"


def page(runs: list[Run], drawn: list[Drawn]) -> str:
    """The whole report page."""
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_POLICY}">',
        f"<title>batchgen report: {escape(', '.join(r.label for r in runs))}</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>batchgen report</h1>",
        _runs_list(runs),
        "<h2>Summary</h2>",
        _summary_table(runs),
    ]
    for item in drawn:
        parts.append(f'<h2>{escape(item.title)}</h2><figure id="{item.name}">{svg(item)}</figure>')
    if not any(run.requests is not None for run in runs):
        parts.append(
            '<p class="note">Per-request distributions and errors come from the result lines: '
            "name a run's OUTPUT (and --errors) files after its metrics file.</p>"
        )
    parts += ["<h2>Errors</h2>", _errors(runs), _notes(runs), "</body></html>"]
    return "\n".join(parts)


def _runs_list(runs: list[Run]) -> str:
    items = []
    for run in runs:
        outputs = ", ".join(run.requests.files) if run.requests else "none given"
        items.append(
            f"<li><b>{escape(run.label)}</b>: {len(run.sessions)} session(s); "
            f"OUTPUT files: {escape(outputs)}</li>"
        )
    return f"<ul>{''.join(items)}</ul>"


def _status(s: SummaryLine) -> str:
    if s.interrupted:
        return f"interrupted by {s.interrupted} (--resume finishes it)"
    return "finished"


def _where(s: SummaryLine) -> str:
    if not s.device:
        return "no engine: no line could run"
    if s.kv_cache is None:
        return s.device  # Ray's actors
    return f"{s.device} {s.dtype}, {s.kv_cache} KV cache, {s.max_rows} rows"


def _schedule(s: SummaryLine) -> str:
    prefix = {True: "on", False: "off", None: "-"}[s.prefix_cache]
    return f"{s.schedule}, prefix cache {prefix}"


def _setup(s: SummaryLine) -> str:
    if s.compile_s is None:
        return "inside the run time (each actor's)" if s.device else "none"
    return f"{s.load_s:.2f} / {s.compile_s:.2f} / {s.sampler_compile_s:.2f}"


def _requests(s: SummaryLine) -> str:
    return f"{s.requests_ok:,} / {s.requests_failed:,} / {s.requests_skipped:,}"


def _rates(s: SummaryLine) -> str:
    return f"{s.generated_tokens_per_s:,.1f} / {s.requests_per_s:,.2f}"


def _percentiles(p: Percentiles) -> str:
    return f"{p.p50:,.1f} / {p.p90:,.1f} / {p.p99:,.1f}"


# The summary table's rows: a label, and the cell read off a session's summary line.
_ROWS: list[tuple[str, Callable[[SummaryLine], str]]] = [
    ("status", _status),
    ("model", lambda s: s.model),
    ("device, dtype, KV cache", _where),
    ("schedule, prefix cache", _schedule),
    ("shard", lambda s: s.shard or "-"),
    ("setup s: load / compile / sampler", _setup),
    ("generation s (run_s)", lambda s: f"{s.run_s:,.2f}"),
    ("requests ok / failed / skipped", _requests),
    ("prompt tokens prefilled / reused", lambda s: f"{s.prompt_tokens:,} / {s.reused_tokens:,}"),
    ("generated tokens", lambda s: f"{s.generated_tokens:,}"),
    ("generated tokens/s / requests/s", _rates),
    ("latency ms p50 / p90 / p99", lambda s: _percentiles(s.latency_ms)),
    ("first token ms p50 / p90 / p99", lambda s: _percentiles(s.first_token_ms)),
    ("rows per step, KV cache held", lambda s: f"{s.mean_rows:.2f}, {100 * s.occupancy:.1f}%"),
    ("engine steps", lambda s: f"{s.steps:,}"),
    ("peak RSS MiB", lambda s: "-" if s.peak_rss_mb is None else f"{s.peak_rss_mb:,.0f}"),
]


def _summary_table(runs: list[Run]) -> str:
    """A column per session (a resumed run has several), a row per figure."""
    columns: list[tuple[str, Session]] = []
    for run in runs:
        for number, session in enumerate(run.sessions, start=1):
            name = run.label if len(run.sessions) == 1 else f"{run.label} · session {number}"
            columns.append((name, session))
    head = "".join(f"<th>{escape(name)}</th>" for name, _ in columns)
    rows = [f"<tr><th></th>{head}</tr>"]
    for label, read in _ROWS:
        cells = []
        for _, session in columns:
            if session.summary is not None:
                cells.append(f"<td>{escape(read(session.summary))}</td>")
            elif label == "status" and session.old_lines:
                cells.append("<td>written by batchgen 0.2: not drawn</td>")
            elif label == "status":
                cells.append("<td>no summary line: the run was killed (--resume finishes it)</td>")
            else:
                cells.append("<td>-</td>")
        rows.append(f"<tr><th>{escape(label)}</th>{''.join(cells)}</tr>")
    return f"<table>{''.join(rows)}</table>"


def _errors(runs: list[Run]) -> str:
    rows = []
    for run in runs:
        failed = sum(s.summary.requests_failed for s in run.sessions if s.summary)
        counted = run.requests.errors.most_common() if run.requests else []
        if failed > sum(count for _, count in counted):
            rows.append(
                f"<tr><td>{escape(run.label)}</td><td colspan=3>{failed:,} lines failed, not all "
                "of them in the files given: name OUTPUT or the --errors file to see why</td></tr>"
            )
        for (field, kind), count in counted[:ERROR_ROWS]:
            example = run.requests.examples[(field, kind)]
            rows.append(
                f"<tr><td>{escape(run.label)}</td><td>{escape(field)}</td>"
                f'<td>{escape(example)}</td><td class="n">{count:,}</td></tr>'
            )
        if len(counted) > ERROR_ROWS:
            rest = counted[ERROR_ROWS:]
            rows.append(
                f"<tr><td>{escape(run.label)}</td><td colspan=2>{len(rest)} more kinds of "
                f'error</td><td class="n">{sum(c for _, c in rest):,}</td></tr>'
            )
    if not rows:
        return '<p class="note">No error lines.</p>'
    head = "<tr><th>run</th><th>field</th><th>message (one of the kind)</th><th>lines</th></tr>"
    return f'<table id="errors">{head}{"".join(rows)}</table>'


def _notes(runs: list[Run]) -> str:
    notes = [
        f"Each line holds a window's figure over the window's span of engine time. Past "
        f"{MAX_POINTS:,} windows an engine's consecutive windows are merged into "
        f"{MAX_POINTS:,} groups of nearly equal size (rates: tokens over seconds; per-step "
        "figures weighted by steps), so totals stay exact. Errors are counted by field and by "
        "message with its numbers and quoted values set aside.",
        f"Written by batchgen {escape(__version__)}.",
    ]
    old = sum(s.old_lines for run in runs for s in run.sessions)
    if old:
        notes.append(f"{old} lines of batchgen 0.2 (batch and summary lines) are not drawn.")
    return "".join(f'<p class="note">{note}</p>' for note in notes)
