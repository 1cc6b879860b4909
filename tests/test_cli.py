"""The dlopt-labs command: listing, bad input before any kernel starts, interrupted and failing runs."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
CLI = str(Path(sys.executable).parent / "dlopt-labs")


def run(*args, env=None, timeout=120):
    e = dict(os.environ, **(env or {}))
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=timeout, env=e)


def test_list_shows_all_thirty():
    r = run("list")
    assert r.returncode == 0
    rows = [l for l in r.stdout.splitlines() if " written " in l or " planned " in l]
    assert len(rows) == 30 and "如何提高深度学习模型的压缩效率？" in r.stdout
    from dlopt_labs.course.chapters import written_chapters
    assert sum(" written " in l for l in rows) == len(written_chapters()) >= 3


def test_a_planned_chapter_without_a_notebook_is_one_clear_error(monkeypatch):
    "With every chapter written, the course is made to miss one: `resolve` names it and says what exists."
    from dlopt_labs.course import chapters
    real = chapters.written_chapters()
    monkeypatch.setattr(chapters, "written_chapters", lambda nbs=None: {n: c for n, c in real.items() if n != 13})
    with pytest.raises(chapters.ChapterError, match=r"chapter 13 \(Security and privacy\) is planned but not written yet"):
        chapters.resolve(13)
    assert chapters.resolve(15).number == 15


@pytest.mark.parametrize("args,message", [
    (["run", "99"], "there is no chapter 99"),
    (["run", "abc"], "chapter must be a number"),
    (["run", "15", "-p", "no_such=1"], "chapter 15 has no parameter 'no_such'"),
    (["run", "15", "-p", "SEED=three"], "parameter SEED of chapter 15 takes a value of type int"),
    (["run", "15", "-p", "SEED"], "not of the form name=value"),
    (["run", "15", "-p", "MODE='fast'"], "MODE must be one of"),
])
def test_bad_input_is_one_clear_line(args, message, tmp_path):
    t0 = time.perf_counter()
    r = run(*args, "--out", str(tmp_path))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dlopt-labs: error:") and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr and not list(tmp_path.iterdir()), "nothing is written, no kernel starts"


def test_bad_mode_is_refused_by_argparse():
    r = run("run", "15", "--mode", "fast")
    assert r.returncode == 2 and "invalid choice: 'fast'" in r.stderr


def test_interrupted_run_leaves_no_partial_output(tmp_path):
    p = subprocess.Popen([CLI, "run", "29", "--mode", "full", "--out", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not list(tmp_path.glob(".*.part-*.ipynb")):   # papermill has started writing
        time.sleep(0.2)
    assert list(tmp_path.glob(".*.part-*.ipynb")), "the run never started"
    time.sleep(2)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, (p.returncode, err[-2000:])
    assert "interrupted" in err
    assert not list(tmp_path.iterdir()), f"left behind: {list(tmp_path.iterdir())}"


def _fake_chapter(path: Path, n: int, body: str):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_raw_cell(f"---\nchapter: {n}\ntheme: x\nclaims: []\nexercises: 0\nbudget_s: {{smoke: 20, full: 300}}\n---"),
                nbformat.v4.new_markdown_cell(f"# fake {n}\n\n> q"),
                nbformat.v4.new_code_cell('MODE = "full"\nSEED = 0\nRESULTS = None'),
                nbformat.v4.new_code_cell(body)]
    nb.cells[2].metadata["tags"] = ["parameters"]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


def test_run_all_reports_the_failing_chapter_and_runs_the_others(tmp_path):
    root = tmp_path / "course"; (root / "nbs").mkdir(parents=True)
    shutil.copytree(ROOT / "datasets", root / "datasets")
    ok = ("from dlopt_labs.lab import Record\nrec = Record(2, MODE, SEED, {}, path=RESULTS)\nrec.section('a'); rec.log(x=1)\n"
          "rec.claim('c', 's', dict(x=1), claim='c', holds='x > 0', fails='x < 0', would_hold={}, would_fail=dict(x=-1))\nrec.save()")
    _fake_chapter(root / "nbs" / "02_ok.ipynb", 2, ok)
    _fake_chapter(root / "nbs" / "04_bad.ipynb", 4, "x = 1\nraise ValueError('planted failure')")
    out = tmp_path / "out"
    r = run("run", "all", "--mode", "smoke", "--out", str(out), env=dict(DLOPT_ROOT=str(root)), timeout=300)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "chapter 02" in r.stdout and "chapter 04" in r.stdout
    assert "ValueError: planted failure" in r.stdout and "cell 4 (In [3])" in r.stdout     # the cell and the error
    assert (out / "ch02-smoke.json").exists() and (out / "ch02-smoke.ipynb").exists()
    assert (out / "ch04-smoke.failed.ipynb").exists() and not (out / "ch04-smoke.json").exists()
    assert not list(out.glob(".*part*"))
    summary = r.stdout.split("\n\n")[-1]
    assert "FAILED" in summary and " ok " in summary


def test_run_one_chapter_prints_verdicts_and_writes_record(notebook_runs):
    # the session fixture ran every chapter through the same runner; check what it wrote for chapter 15
    if 15 not in notebook_runs["chapters"]: pytest.skip("chapter 15 not selected (DLOPT_CHAPTERS)")
    res = notebook_runs["chapters"][15]
    rec = json.loads(Path(res.record).read_text())
    assert Path(res.notebook).name == "ch15-smoke.ipynb" and rec["seed"] == 0
    assert [c["verdict"] for c in res.claims] == [c["verdict"] for c in rec["claims"]]
