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
CELL_TIMEOUT = 120          # a cell stuck this long fails its notebook instead of stalling the suite
RETRIES = 1                 # a chapter run whose cell timed out is run once more (RunResult.attempts says so): see the note on the rare kernel stall


def _execute_foundation(args):
    """Run one foundation notebook (its asserts are its tests); return (name, error or None, seconds)."""
    import papermill as pm
    path, out = args
    t0 = time.perf_counter()
    try:
        from dlopt_labs.course.runner import ipc_kernel_manager
        pm.execute_notebook(str(path), str(out), kernel_name="python3", cwd=str(path.parent), execution_timeout=CELL_TIMEOUT,
                            progress_bar=False, log_output=False, kernel_manager_class=ipc_kernel_manager())
        return path.name, None, time.perf_counter() - t0
    except pm.PapermillExecutionError as e:
        return path.name, f"cell {e.cell_index}: {e.ename}: {e.evalue}", time.perf_counter() - t0


def selected_chapters():
    """Written chapters, or only those in DLOPT_CHAPTERS (e.g. DLOPT_CHAPTERS=15,29) to test a few."""
    from dlopt_labs.course.chapters import written_chapters
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
    from dlopt_labs.course.runner import run_many
    out = tmp_path_factory.mktemp("runs")
    chapters = sorted(selected_chapters())
    t0 = time.perf_counter()
    with cf.ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as ex:
        # the foundations run beside the chapter pool, which takes WORKERS - 1 ... so both cores stay busy
        fut = ex.submit(_run_foundations, [(p, out / p.name) for p in foundation_notebooks()])
        chapter_results = run_many(chapters, "smoke", out, workers=max(1, WORKERS - 1), progress=False, timeout=CELL_TIMEOUT, retries=RETRIES)
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


# browser ------------------------------------------------------------------------------------------

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic"]
ARTIFACTS = Path(os.environ.get("DLOPT_ARTIFACTS", ROOT / "_artifacts"))


@pytest.fixture(scope="session")
def browser():
    """Debian's Chromium driven by Playwright (no browser download)."""
    import shutil
    from playwright.sync_api import sync_playwright
    exe = shutil.which("chromium")
    assert exe, "Chromium is not installed: run `make browser-deps` (apt-get install -y chromium fonts-wqy-microhei)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=CHROMIUM_FLAGS)
        yield b
        b.close()


class Visit:
    """A page opened with every request outside 127.0.0.1 counted and aborted, and console errors collected."""
    def __init__(self, browser, url):
        self.page = browser.new_page(viewport={"width": 1280, "height": 900})
        self.external, self.console_errors, self.failed = [], [], []
        def route(r):
            u = r.request.url
            if u.startswith(("http://127.0.0.1", "data:", "blob:")): r.continue_()
            else: self.external.append(u); r.abort()
        self.page.route("**/*", route)
        self.page.on("console", lambda m: self.console_errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.console_errors.append(str(e)))
        self.page.on("requestfailed", lambda r: self.failed.append(r.url))
        self.response = self.page.goto(url, wait_until="networkidle")
    def close(self): self.page.close()
