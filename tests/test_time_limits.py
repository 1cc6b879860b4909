"""Nothing in the suite can hang: every test has a time limit (pytest-timeout), and so does every call in the tests
that waits on something else (a subprocess, a browser, a server)."""
import ast
import math
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
# calls that block until another process or a browser answers, and the keyword that bounds them
BLOCKING = {"run": "timeout", "check_output": "timeout", "communicate": "timeout", "wait": "timeout",
            "urlopen": "timeout", "wait_for_selector": "timeout", "wait_for_function": "timeout",
            "wait_for": "timeout", "goto": "timeout", "screenshot": "timeout", "execute_notebook": "execution_timeout"}
EXEMPT = {("stress_kernels.py", "wait")}       # threading.Event.wait(1.0): a timeout given positionally


def _effective_timeout(item):
    m = item.get_closest_marker("timeout")
    if m is not None: return m.kwargs.get("timeout", m.args[0] if m.args else None)
    return item.config.getini("timeout")


def test_every_test_has_a_time_limit(request):
    items = request.session.items
    assert request.node in items                    # every test of this run, the whole suite under `make test`
    missing = [i.nodeid for i in items if not _effective_timeout(i) or not math.isfinite(float(_effective_timeout(i)))
               or float(_effective_timeout(i)) <= 0]
    assert not missing, f"tests without a time limit: {missing[:10]}"
    assert request.config.getoption("timeout", None) is None or float(request.config.getoption("timeout")) > 0


def _calls_without_limit(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call): continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        if name not in BLOCKING or (path.name, name) in EXEMPT: continue
        if name == "run" and not (isinstance(node.func, ast.Attribute) and getattr(node.func.value, "id", "") == "subprocess"):
            continue                                    # only subprocess.run
        if any(k.arg == BLOCKING[name] for k in node.keywords): continue
        yield f"{path.name}:{node.lineno} {name}(...) without {BLOCKING[name]}="


def test_every_blocking_call_in_the_tests_has_a_limit():
    found = [msg for p in sorted(TESTS.glob("*.py")) for msg in _calls_without_limit(p)]
    assert not found, "\n".join(found)


def test_the_scan_would_catch_a_call_without_a_limit(tmp_path):
    p = tmp_path / "x.py"
    p.write_text("import subprocess\nsubprocess.run(['true'])\npage.wait_for_selector('.a', timeout=5)\n")
    assert list(_calls_without_limit(p)) == ["x.py:2 run(...) without timeout="]


def test_chapter_runs_are_limited_by_their_budgets():
    import conftest
    from dlopt_labs.course.chapters import written_chapters
    for n, ch in written_chapters().items():
        assert conftest.cell_limit(n) == 5 * ch.budget_s["smoke"]
    assert conftest.RETRIES <= 1, "at most one rerun, reported as the run's attempts"
    assert conftest.session_limit() >= sum(conftest.cell_limit(n) for n in written_chapters()) / conftest.WORKERS


@pytest.mark.timeout(5)
def test_a_marker_sets_a_shorter_limit(request):
    assert _effective_timeout(request.node) == 5
