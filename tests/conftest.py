"""Shared fixtures: every notebook of the course executed once per test session, in parallel on the cores."""
import json
import os
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKERS = int(os.environ.get("DLOPT_TEST_WORKERS", "2"))
CELL_TIMEOUT = 120          # a foundation or tooling notebook's cell stuck this long fails it instead of stalling the suite
# a chapter run whose cell hit its limit is run once more, and the run says so (RunResult.attempts, in the summary below):
# the rare stall (papermill's client and the kernel both idle after a cell with a widget ran) lies outside the project
# (nbclient#312); the course's kernel client polls in one-second slices against it (runner._polling_client)
RETRIES = 1


def cell_limit(n):
    """A chapter's cell limit in the suite: five times its whole smoke budget."""
    from dlopt_labs.course.chapters import written_chapters
    return 5 * written_chapters()[n].budget_s["smoke"]


def session_limit():
    """The time limit of a test that needs the session's runs (they run in its setup): every chapter at its cell limit
    and every foundation notebook at 120 s, shared among the workers, plus a minute of kernel starts."""
    work = sum(cell_limit(n) for n in selected_chapters()) + 120 * len(foundation_notebooks())
    return int(60 + work / WORKERS)


def pytest_collection_modifyitems(config, items):
    """Tests that use the session's notebook runs get `session_limit()` (unless they set their own)."""
    for item in items:
        if item.get_closest_marker("timeout") is None and {"notebook_runs", "records"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.timeout(max(session_limit(), int(config.getini("timeout") or 0))))


def _execute_notebook(path, out, parameters=None, cwd=None):
    """Run one notebook (a foundation or tooling notebook: its asserts are its tests; or a student notebook);
    return (error or None, seconds)."""
    import papermill as pm
    from dlopt_labs.course.runner import ipc_kernel_manager
    t0 = time.perf_counter()
    try:
        pm.execute_notebook(str(path), str(out), parameters=parameters or {}, kernel_name="python3", cwd=str(cwd or path.parent),
                            execution_timeout=CELL_TIMEOUT,
                            progress_bar=False, log_output=False, kernel_manager_class=ipc_kernel_manager(dict(OMP_NUM_THREADS="1")),
                            shutdown_kernel="immediate")   # as run_chapter: no teardown to wait for
        return None, time.perf_counter() - t0
    except pm.PapermillExecutionError as e:
        return f"cell {e.cell_index}: {e.ename}: {e.evalue}", time.perf_counter() - t0


def _job(job):
    """One job of the session's runs: a chapter through the course runner, or a foundation/tooling notebook."""
    kind, what, out, *extra = job
    if kind == "chapter":
        from dlopt_labs.course.runner import run_chapter
        return run_chapter(what, "smoke", out=out, timeout=cell_limit(what), retries=RETRIES, env=dict(OMP_NUM_THREADS="1"))
    return _execute_notebook(what, out / what.name, *extra)


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
    """The notebooks of the foundations and of the course tooling: their cells assert what their code returns."""
    if os.environ.get("DLOPT_CHAPTERS"): return []
    return sorted((ROOT / "nbs" / "foundations").glob("*.ipynb")) + sorted((ROOT / "nbs" / "course").glob("*.ipynb"))


@pytest.fixture(scope="session")
def notebook_runs(tmp_path_factory):
    """Execute every written chapter (smoke mode, through the course runner) and every foundation and tooling notebook,
    on the course's one parallel-run helper."""
    from dlopt_labs.course.runner import parallel
    out = tmp_path_factory.mktemp("runs")
    chapters = sorted(selected_chapters())
    jobs = [("chapter", n, out) for n in chapters] + [("notebook", p, out) for p in foundation_notebooks()]
    t0 = time.perf_counter()
    results = parallel(_job, jobs, workers=WORKERS)
    wall = time.perf_counter() - t0
    runs = dict(zip([(k, w) for k, w, *_ in jobs], results))
    return dict(chapters={n: runs[("chapter", n)] for n in chapters},
                foundations={p.name: runs[("notebook", p)] for p in foundation_notebooks()}, out=out, wall=wall)


@pytest.fixture(scope="session")
def records(notebook_runs):
    return {n: json.loads(Path(r.record).read_text()) for n, r in notebook_runs["chapters"].items() if r.ok}


_TIMES = {}


def pytest_terminal_summary(terminalreporter):
    """Print the smoke-mode time of each chapter against its budget (reported, not asserted: timings are noisy)."""
    if not _TIMES: return
    tr = terminalreporter
    tr.section("chapter smoke runs (wall seconds, kernel start included, run two at a time)")
    for n, (title, secs, budget, attempts) in sorted(_TIMES.items()):
        again = f"   RETRIED: {attempts} attempts (a cell hit its limit)" if attempts > 1 else ""
        tr.write_line(f"  ch{n:02d} {title:<32} {secs:6.1f} s   budget {budget} s{again}")


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
    assert exe, "Chromium is not installed: run `make system-deps` (apt-get install -y chromium fonts-wqy-microhei bubblewrap)"
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
        self.response = self.page.goto(url, wait_until="networkidle", timeout=60000)
    def close(self): self.page.close()
