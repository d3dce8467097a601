"""`batchgen report` and `bench --plot`: what is drawn is what the files hold, recomputed here
from the files with the json module; bad files are named by line and field."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import PROMPTS
from matplotlib.patches import StepPatch
from test_runner import openai_line, run_cli, write_jsonl

from batchgen.cli import cli
from batchgen.report.figures import (
    engine_figure,
    latency_figure,
    throughput_figure,
    tokens_figure,
)
from batchgen.report.runs import SummaryLine, WindowLine, Windows, read_runs
from batchgen.report.series import downsample, timelines

FIGURES = 4  # throughput, engine, latency, tokens


def report(*args: Any):
    return CliRunner().invoke(cli, ["report", *map(str, args)])


def json_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def stairs(ax) -> list[tuple[np.ndarray, np.ndarray]]:
    """(values, edges) of each step line drawn in a panel."""
    return [p.get_data()[:2] for p in ax.patches if isinstance(p, StepPatch)]


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Path:
    """A real run: native and OpenAI lines, three that fail (two of one kind), batch 3."""
    where = tmp_path_factory.mktemp("report-job")
    lines: list[dict[str, Any]] = [
        {"id": f"p{i}", "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 3 + 4 * i}
        for i in range(9)
    ]
    lines.append(openai_line("o1", "Once upon a time", max_tokens=6))
    lines += [
        {"id": "bad1", "prompt": "x", "max_tokens": -1},
        {"id": "bad2", "prompt": "y", "max_tokens": -20},
        {"id": "bad3", "prompt": "z", "temperature": -1},
    ]
    write_jsonl(where / "in.jsonl", lines)
    done = run_cli(where / "in.jsonl", where / "out.jsonl", "--model", tiny_dir,
                   "--batch-size", 3, "--metrics", where / "metrics.jsonl", "--quiet")  # fmt: skip
    assert done.exit_code == 3, done.output  # some lines failed
    return where


def test_time_series_are_the_metrics_file_windows(job: Path):
    windows = [r for r in json_lines(job / "metrics.jsonl") if r["type"] == "window"]
    assert len(windows) > 3
    seconds = np.array([w["ms"] / 1e3 for w in windows])
    edges = np.concatenate(([0.0], np.cumsum(seconds)))
    expected = {
        "tokens": [w["generated_tokens"] / s for w, s in zip(windows, seconds, strict=True)],
        "requests": [w["requests"] / s for w, s in zip(windows, seconds, strict=True)],
        "rows": [w["mean_rows"] for w in windows],
        "occupancy": [100 * w["occupancy"] for w in windows],
        "waiting": [w["waiting"] for w in windows],
    }
    runs = read_runs([job / "metrics.jsonl", job / "out.jsonl"])
    panels = [*throughput_figure(runs).axes, *engine_figure(runs).axes]
    for ax, name in zip(panels, expected, strict=True):
        ((values, drawn_edges),) = stairs(ax)
        np.testing.assert_allclose(drawn_edges, edges, err_msg=name)
        np.testing.assert_allclose(values, expected[name], err_msg=name)
    assert any(w["waiting"] > 0 for w in windows)  # 13 lines for 3 rows: some waited


def test_distributions_are_the_result_lines(job: Path):
    lines = json_lines(job / "out.jsonl")
    timings = [r["batchgen"].get("timing") if "custom_id" in r else r.get("timing") for r in lines]
    timings = [t for t in timings if t is not None]
    assert len(timings) == 10
    runs = read_runs([job / "metrics.jsonl", job / "out.jsonl"])
    panels = latency_figure(runs).axes
    for ax, name in zip(panels, ("queue_ms", "first_token_ms", "decode_ms"), strict=True):
        values = np.array([t[name] for t in timings])
        ((counts, edges),) = stairs(ax)
        np.testing.assert_allclose(edges, np.linspace(0, values.max(), 41))
        np.testing.assert_array_equal(counts, np.histogram(values, edges)[0])
        assert f"p50 {np.percentile(values, 50):.4g}" in ax.get_legend().get_texts()[0].get_text()
    usages = [
        r["response"]["body"].get("usage") if "custom_id" in r else r.get("usage") for r in lines
    ]
    usages = [u for u in usages if u]
    for ax, name in zip(tokens_figure(runs).axes, ("prompt_tokens", "completion_tokens"),
                        strict=True):  # fmt: skip
        values = np.array([u[name] for u in usages])
        ((counts, edges),) = stairs(ax)
        width = max(1, int(np.ceil((values.max() + 1) / 40)))  # whole tokens, at most 40 bins
        np.testing.assert_array_equal(edges, np.arange(0, values.max() + width + 1, width))
        np.testing.assert_array_equal(counts, np.histogram(values, edges)[0])


def test_the_page_counts_errors_by_field_and_kind_and_shows_every_figure(job: Path, tmp_path):
    done = report(job / "metrics.jsonl", job / "out.jsonl", "-o", tmp_path / "r.html")
    assert done.exit_code == 0, done.output
    page = (tmp_path / "r.html").read_text()
    rows = re.findall(r'<tr><td>[^<]*</td><td>([^<]*)</td><td>([^<]*)</td><td class="n">(\d+)</td>',
                      page)  # fmt: skip
    errors = [r["error"] for r in json_lines(job / "out.jsonl") if r.get("error")]
    by_field = {f: sum(e["field"] == f for e in errors) for f in ("max_tokens", "temperature")}
    assert {(field, int(count)) for field, _, count in rows} == set(by_field.items())
    assert by_field == {"max_tokens": 2, "temperature": 1}  # -1 and -20: one kind, counted twice
    assert page.count("<figure") == FIGURES and page.count("<svg") == FIGURES
    summary = next(r for r in json_lines(job / "metrics.jsonl") if r["type"] == "summary")
    assert f"{summary['requests_ok']} / {summary['requests_failed']} / 0" in page
    assert f"{summary['generated_tokens']:,}" in page


def test_the_page_fetches_nothing_and_its_figures_share_no_id(job: Path, tmp_path):
    report(job / "metrics.jsonl", job / "out.jsonl", "-o", tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text()
    assert "<script" not in page and "<link" not in page and "@import" not in page
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    references = re.findall(r'(?:href|src)="([^"]*)"', page) + re.findall(r"url\(([^)]*)\)", page)
    assert references and all(ref.startswith("#") for ref in references), references
    ids = re.findall(r' id="([^"]+)"', page)
    assert len(ids) == len(set(ids))


def test_downsampling_keeps_every_total():
    rng = np.random.default_rng(0)
    n = 2500
    steps = rng.integers(1, 9, n).astype(float)
    columns = {
        "steps": steps, "requests": rng.integers(0, 5, n).astype(float),
        "mean_rows": rng.uniform(1, 32, n), "occupancy": rng.uniform(0, 1, n),
        "prompt_tokens": rng.integers(0, 900, n).astype(float),
        "generated_tokens": rng.integers(1, 256, n).astype(float),
        "reused_tokens": np.zeros(n), "ms": rng.uniform(1, 300, n), "waiting": rng.uniform(0, 9, n),
    }  # fmt: skip
    shown = downsample(Windows(columns), 1000)
    assert len(shown) == 1000  # groups of 2 and 3 windows
    for name in ("steps", "requests", "generated_tokens", "ms"):
        assert shown.columns[name].sum() == pytest.approx(columns[name].sum())
    for name in ("mean_rows", "occupancy", "waiting"):  # row-steps etc. are kept
        kept = (shown.columns[name] * shown.columns["steps"]).sum()
        assert kept == pytest.approx((columns[name] * steps).sum())
    # The area under the tokens/s line is every token generated.
    from batchgen.report.runs import Run, Session

    (line,) = timelines(Run("r", [Session({"": Windows(columns)}, None)]))
    assert len(line.tokens_per_s) == 1000
    area = (line.tokens_per_s * np.diff(line.edges)).sum()
    assert area == pytest.approx(columns["generated_tokens"].sum())


def test_runs_overlay_and_a_resumed_run_continues_where_it_stopped(job: Path, tmp_path):
    metrics = (job / "metrics.jsonl").read_bytes()
    resumed = tmp_path / "resumed-metrics.jsonl"
    resumed.write_bytes(metrics + metrics)  # two sessions, as --resume appends one
    runs = read_runs([job / "metrics.jsonl", job / "out.jsonl", resumed])
    assert [len(run.sessions) for run in runs] == [1, 2]
    assert runs[1].requests is None
    first, second = timelines(runs[1])
    assert second.edges[0] == pytest.approx(first.edges[-1])
    tokens_panel = throughput_figure(runs).axes[0]
    assert len(stairs(tokens_panel)) == 3
    assert len(tokens_panel.lines) == 1  # the resumed run's marker
    done = report(job / "metrics.jsonl", job / "out.jsonl", resumed, "-o", tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text()
    assert done.exit_code == 0 and page.count("session 2") >= 1
    assert page.count("<figure") == FIGURES


@pytest.mark.parametrize(
    ("lines", "said"),
    [
        (['{"foo": 1}'], "m.jsonl:1: neither a batchgen metrics line"),
        (["WINDOW", "WINDOW", "{not json"], "m.jsonl:3: not JSON"),
        (["WINDOW", '{"type": "window", "ms": "abc"}'], "m.jsonl:2: field 'index'"),
        (["WINDOW", "WINDOW ms=abc"], "m.jsonl:2: field 'ms': input should be a valid number"),
        (["WINDOW steps=0"], "m.jsonl:1: field 'steps': input should be greater than or equal"),
        (["WINDOW steps=true"], "m.jsonl:1: field 'steps': input should be a valid integer"),
        (["WINDOW ms=12.5s"], "m.jsonl:1: field 'ms': input should be a valid number"),
        (["WINDOW", '{"type": "windows"}'], "m.jsonl:2: field 'type' is 'windows'"),
        (["SUMMARY latency_ms={}"], "m.jsonl:1: field 'latency_ms.p50': field required"),
    ],
)
def test_a_bad_metrics_file_is_named_by_line_and_field_and_nothing_is_written(
    job: Path, tmp_path: Path, lines: list[str], said: str
):
    real = {r["type"]: r for r in json_lines(job / "metrics.jsonl")}

    def line(text: str) -> str:
        kind, *changes = text.split(" ", 1)
        if kind not in ("WINDOW", "SUMMARY"):
            return text
        record = dict(real[kind.lower()])
        for change in changes:
            name, value = change.split("=")
            record[name] = json.loads(value) if value in ("true", "{}") else (
                int(value) if value.isdigit() else value
            )  # fmt: skip
        return json.dumps(record)

    (tmp_path / "m.jsonl").write_text("\n".join(map(line, lines)) + "\n")
    done = report(tmp_path / "m.jsonl", "-o", tmp_path / "r.html", "--png", tmp_path / "png")
    assert done.exit_code == 2, done.output
    assert said in " ".join(done.output.split()), done.output
    assert not (tmp_path / "r.html").exists() and not (tmp_path / "png").exists()


def test_bad_output_files_are_named_by_line_and_field(job: Path, tmp_path: Path):
    metrics = job / "metrics.jsonl"
    good = json_lines(job / "out.jsonl")
    result = next(r for r in good if "timing" in r)
    broken = tmp_path / "out.jsonl"
    write_jsonl(broken, [good[0], {**result, "timing": {**result["timing"], "queue_ms": "x"}}])
    done = report(metrics, broken, "-o", tmp_path / "r.html")
    assert done.exit_code == 2 and "out.jsonl:2: field 'timing.queue_ms' is 'x'" in done.output
    write_jsonl(broken, [good[0], {"foo": 1}])
    done = report(metrics, broken, "-o", tmp_path / "r.html")
    assert done.exit_code == 2 and "out.jsonl:2: not a batchgen result or error" in done.output
    done = report(job / "out.jsonl", metrics, "-o", tmp_path / "r.html")
    assert done.exit_code == 2 and "is an OUTPUT file, and comes before any metrics" in done.output
    (tmp_path / "empty.jsonl").write_bytes(b"")
    done = report(tmp_path / "empty.jsonl", metrics, "-o", tmp_path / "r.html")
    assert done.exit_code == 2 and "empty.jsonl is empty, and comes before any" in done.output
    assert not (tmp_path / "r.html").exists()


def test_targets_are_never_clobbered_and_pngs_are_pngs(job: Path, tmp_path: Path):
    metrics, out = job / "metrics.jsonl", job / "out.jsonl"
    page = tmp_path / "r.html"
    done = report(metrics, out, "-o", metrics, "--overwrite")
    assert done.exit_code == 2 and "is one of the files read" in done.output
    assert report(metrics, out, "-o", page, "--png", tmp_path / "png").exit_code == 0
    pngs = sorted((tmp_path / "png").iterdir())
    assert [p.name for p in pngs] == ["engine.png", "latency.png", "throughput.png", "tokens.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") for p in pngs)
    before = page.read_bytes()
    done = report(metrics, "-o", page)
    assert done.exit_code == 2 and "exists: pass --overwrite" in done.output
    assert page.read_bytes() == before
    assert report(metrics, "-o", page, "--overwrite").exit_code == 0
    assert page.read_text().count("<figure") == 2  # no OUTPUT: no distributions
    (tmp_path / "png" / "latency.png").unlink()  # --png checks only the images it writes
    assert report(metrics, "--png", tmp_path / "png", "--overwrite").exit_code == 0
    assert not (tmp_path / "png" / "latency.png").exists()
    assert report(metrics).exit_code == 2  # neither a page nor images asked for


def test_runs_with_no_line_or_only_errors_render(tiny_dir: Path, tmp_path: Path):
    """Real runs that never load the model: blank lines only, and bad lines only."""
    (tmp_path / "blank.jsonl").write_text("\n\n")
    write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "max_tokens": 0}, {"prompt": ""}])
    for name, code in (("blank", 0), ("bad", 3)):
        done = run_cli(tmp_path / f"{name}.jsonl", tmp_path / f"{name}-out.jsonl", "--model",
                       tiny_dir, "--metrics", tmp_path / f"{name}-metrics.jsonl")  # fmt: skip
        assert done.exit_code == code, done.output
        done = report(tmp_path / f"{name}-metrics.jsonl", tmp_path / f"{name}-out.jsonl",
                      "-o", tmp_path / f"{name}.html")  # fmt: skip
        assert done.exit_code == 0, done.output
        page = (tmp_path / f"{name}.html").read_text()
        assert page.count("<figure") == FIGURES
        assert "no engine windows" in page and "no result lines" in page
    assert re.search(r'<td>max_tokens</td><td>[^<]*</td><td class="n">1</td>', page)
    assert re.search(r'<td>prompt</td><td>[^<]*</td><td class="n">1</td>', page)


def test_error_lines_and_labels_that_could_break_the_page(job: Path, tmp_path: Path):
    """Error lines are checked by field; a "$" in a file name is text, not math; failures
    the files given do not hold are said; a batchgen 0.2 session is noted, not drawn."""
    metrics = tmp_path / "m$\\foo$.jsonl"  # not valid math either
    metrics.write_bytes((job / "metrics.jsonl").read_bytes())
    broken = tmp_path / "out.jsonl"
    for error, said in (
        (None, "out.jsonl:1: field 'error' is missing or not an error object"),
        ({"field": 5, "message": "x"}, "out.jsonl:1: field 'error.field' or '.message' is not"),
    ):
        write_jsonl(broken, [{"id": "a", "line": 1, "error": error}])
        done = report(metrics, broken, "-o", tmp_path / "r.html")
        assert done.exit_code == 2 and said in done.output, done.output
    results = [r for r in json_lines(job / "out.jsonl") if "timing" in r]
    write_jsonl(broken, results)  # the run's 3 error lines are elsewhere (as with --errors)
    old = {"type": "summary", "batches": 1, "requests_ok": 1}
    (tmp_path / "old.jsonl").write_text(json.dumps({"type": "batch"}) + "\n" + json.dumps(old))
    done = report(metrics, broken, tmp_path / "old.jsonl", "-o", tmp_path / "r.html")
    assert done.exit_code == 0, done.output
    page = (tmp_path / "r.html").read_text()
    assert "foo$.jsonl</td><td colspan=3>3 lines failed, not all of them in the files" in page
    assert "2 lines of batchgen 0.2" in page and "m$\\foo$.jsonl (p50" in page


def test_the_report_schemas_read_what_the_job_writes():
    """The report's line schemas against the writer's own records (job/metrics.py)."""
    from batchgen.engine import WindowStats
    from batchgen.job.metrics import RunStats, window_record
    from batchgen.job.runner import RunConfig, run_setup

    window = {"type": "window", **window_record(WindowStats(0, 4, 3.0, 0.5, 10, 12, 0.2), 2)}
    summary = RunStats().summary(1.0, run_setup(RunConfig(), None, None))
    assert set(WindowLine.model_fields) - {"worker"} <= set(window)
    assert set(SummaryLine.model_fields) <= set(summary)
    WindowLine.model_validate(window)
    SummaryLine.model_validate(summary)


def test_bench_plot_draws_the_figures_it_is_given():
    from batchgen.bench.engine import Bar, BenchFigures, Workload
    from batchgen.bench.plot import bench_figure

    figures = BenchFigures(
        [(1, 30.0, 28.0), (8, 190.0, 110.0), (64, 600.0, None)],
        [Workload("mixed", "tok/s", [Bar("batchgen run", 290.0), Bar("static", 320.0),
                                     Bar("HF", 98.0, True)]),
         Workload("long", "tok/s", [Bar("batchgen run", 80.0)])],
    )  # fmt: skip
    curve, mixed, long = bench_figure(figures, "t").axes
    ours, hf = curve.lines
    assert ours.get_xydata().tolist() == [[1, 30], [8, 190], [64, 600]]
    assert hf.get_xydata().tolist() == [[1, 28], [8, 110]]
    assert [bar.get_width() for bar in mixed.patches] == [290.0, 320.0, 98.0]
    assert "batchgen run: 2.96x the baseline" in mixed.get_title(loc="left")
    assert [bar.get_width() for bar in long.patches] == [80.0]


@pytest.mark.browser
def test_a_real_browser_renders_the_page_offline(job: Path, tmp_path: Path):
    """Headless Chromium (Debian's) opens the page with every request refused: no console
    error, each figure drawn at its size, and a screenshot that is not blank."""
    from PIL import Image
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    assert chromium, "pytest -m browser needs Debian's chromium (apt-get install chromium)"
    page_path = tmp_path / "r.html"
    assert report(job / "metrics.jsonl", job / "out.jsonl", "-o", page_path).exit_code == 0
    messages, requests = [], []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.on("console", lambda m: messages.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: messages.append(f"error: {e}"))
        page.on("request", lambda r: requests.append(r.url))
        page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(
            "file:") else route.abort())  # fmt: skip
        page.goto(page_path.as_uri())
        boxes = [svg.bounding_box() for svg in page.locator("figure > svg").all()]
        page.screenshot(path=tmp_path / "shot.png", full_page=True)
        browser.close()
    assert requests == [page_path.as_uri()]
    assert messages == []
    assert len(boxes) == FIGURES
    assert all(box and box["width"] > 500 and box["height"] > 150 for box in boxes), boxes
    pixels = np.asarray(Image.open(tmp_path / "shot.png").convert("L"))
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.005  # lines and text, not a blank page
