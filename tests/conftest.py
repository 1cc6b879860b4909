"""Shared fixtures: every notebook of the course executed once per test session, in parallel on the cores."""
import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("DLOPT_PROGRESS", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")
WORKERS = int(os.environ.get("DLOPT_TEST_WORKERS", "2"))


def _execute_foundation(args):
    """Run one foundation notebook (its asserts are its tests); return (name, error or None, seconds)."""
    import papermill as pm
    path, out = args
    t0 = time.perf_counter()
    try:
        pm.execute_notebook(str(path), str(out), kernel_name="python3", cwd=str(path.parent),
                            progress_bar=False, log_output=False)
        return path.name, None, time.perf_counter() - t0
    except pm.PapermillExecutionError as e:
        return path.name, f"cell {e.cell_index}: {e.ename}: {e.evalue}", time.perf_counter() - t0


def selected_chapters():
    """Written chapters, or only those in DLOPT_CHAPTERS (e.g. DLOPT_CHAPTERS=15,29) to test a few."""
    from dlopt_labs.course import written_chapters
    found = written_chapters()
    only = os.environ.get("DLOPT_CHAPTERS")
    if only:
        keep = {int(x) for x in only.split(",") if x.strip()}
        found = {n: m for n, m in found.items() if n in keep}
    return found


def foundation_notebooks():
    if os.environ.get("DLOPT_CHAPTERS"): return []
    return sorted((ROOT / "nbs" / "foundations").glob("*.ipynb"))


@pytest.fixture(scope="session")
def notebook_runs(tmp_path_factory):
    """Execute every written chapter (smoke mode, through the course runner) and every foundation notebook."""
    from dlopt_labs.course import run_many
    out = tmp_path_factory.mktemp("runs")
    chapters = sorted(selected_chapters())
    t0 = time.perf_counter()
    with cf.ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as ex:
        # the foundations run beside the chapter pool, which takes WORKERS - 1 ... so both cores stay busy
        fut = ex.submit(_run_foundations, [(p, out / p.name) for p in foundation_notebooks()])
        chapter_results = run_many(chapters, "smoke", out, workers=max(1, WORKERS - 1), progress=False)
        foundations = fut.result()
    wall = time.perf_counter() - t0
    return dict(chapters={r.chapter: r for r in chapter_results}, foundations=foundations, out=out, wall=wall)


def _run_foundations(jobs):
    return {name: (err, secs) for name, err, secs in map(_execute_foundation, jobs)}


@pytest.fixture(scope="session")
def records(notebook_runs):
    return {n: json.loads(Path(r.record).read_text()) for n, r in notebook_runs["chapters"].items() if r.ok}


_TIMES = {}


def pytest_terminal_summary(terminalreporter):
    """Print the smoke-mode time of each chapter against its budget (reported, not asserted: timings are noisy)."""
    if not _TIMES: return
    tr = terminalreporter
    tr.section("chapter smoke runs (wall seconds, kernel start included, run two at a time)")
    for n, (title, secs, budget) in sorted(_TIMES.items()):
        tr.write_line(f"  ch{n:02d} {title:<32} {secs:6.1f} s   budget {budget} s")
