"""Course tooling for instructors: the student bundle and the syllabus (the grader: test_grader.py)."""
import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from dlopt_labs.course.chapters import written_chapters
from dlopt_labs.course.teach import BEGIN, END, exercises, strip_solutions
import conftest

ROOT = Path(__file__).resolve().parent.parent
CLI = str(Path(sys.executable).parent / "dlopt-labs")
CHAPTERS = sorted(conftest.selected_chapters())


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("b") / "student"
    r = subprocess.run([CLI, "student", str(out), *map(str, CHAPTERS)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return out


def _solution_lines(nb):
    """Every non-blank line between the solution markers of the course's notebook, but for the lines that also occur
    outside them (a closing bracket, a loop header the chapter's own code has too): those are no leak."""
    lines, outside = [], set()
    for c in nb.cells:
        inside = False
        for line in c.source.split("\n"):
            s = line.strip()
            if s == BEGIN: inside = True
            elif s == END: inside = False
            elif inside and s: lines.append(s)
            elif s: outside.add(s)
    return [l for l in lines if l not in outside]


@pytest.mark.parametrize("n", CHAPTERS)
def test_nothing_of_a_solution_survives(bundle, n):
    course = nbformat.read(written_chapters()[n].path, as_version=4)
    student = nbformat.read(bundle / Path(written_chapters()[n].path).name, as_version=4)
    sol = _solution_lines(course)
    assert sol, "the chapter has solutions to strip"
    assert len(student.cells) == len(course.cells)
    for i, cell in enumerate(student.cells):                     # cell by cell
        lines = {l.strip() for l in cell.source.split("\n")}
        leaked = [l for l in sol if l in lines]
        assert not leaked, f"cell {i} of the student chapter {n} still holds solution lines: {leaked}"
        assert BEGIN not in cell.source and END not in cell.source
        if cell.cell_type == "code": assert cell.outputs == [] and cell.execution_count is None
    stubs = [c.source for c in student.cells if "replace this line with your solution" in c.source]
    assert len(stubs) == len(exercises(n))
    for e, s in zip(exercises(n), stubs): assert f"exercise {e.n} ({e.title})" in s
    # everything else is the course's notebook unchanged, the exported library code included
    same = [i for i, (a, b) in enumerate(zip(course.cells, student.cells)) if a.source != b.source]
    assert same == [e.cell for e in exercises(n)]


def test_bundle_has_data_and_readme_and_refuses_to_overwrite(bundle, tmp_path):
    assert (bundle / "datasets" / "manifest.json").exists() and (bundle / "README.md").read_text().count(".ipynb") == len(CHAPTERS)
    r = subprocess.run([CLI, "student", str(bundle)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "is not empty" in r.stderr
    r = subprocess.run([CLI, "student", str(tmp_path / "x"), "99"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "there is no chapter 99" in r.stderr and not (tmp_path / "x").exists()


def test_strip_keeps_indentation_and_rejects_unclosed_markers():
    src = "def f(x):\n    ### BEGIN SOLUTION\n    return 2 * x\n    ### END SOLUTION\n\ncheck_f(f)"
    out = strip_solutions(src, "exercise 1 (f)")
    assert out == 'def f(x):\n    raise NotImplementedError("exercise 1 (f): replace this line with your solution")\n\ncheck_f(f)'
    compile(out, "cell", "exec")
    with pytest.raises(ValueError, match="without"): strip_solutions("### BEGIN SOLUTION\nx = 1", "exercise 1")


@pytest.fixture(scope="module")
def student_runs(bundle, tmp_path_factory):
    """The student bundle of every written chapter, executed end to end by papermill in smoke mode."""
    from dlopt_labs.course.runner import parallel
    out = tmp_path_factory.mktemp("student_runs")
    nbs = sorted(bundle.glob("*.ipynb"))
    jobs = [("notebook", p, out, dict(MODE="smoke", RESULTS=str(out / f"{p.stem}.json")), bundle) for p in nbs]
    results = parallel(conftest._job, jobs, workers=conftest.WORKERS)
    return {p.stem: (err, json.loads((out / f"{p.stem}.json").read_text()) if err is None else None) for p, (err, _) in zip(nbs, results)}


@pytest.mark.parametrize("n", CHAPTERS)
def test_student_bundle_runs_end_to_end_and_reports_not_done(student_runs, n):
    err, rec = student_runs[Path(written_chapters()[n].path).stem]
    assert err is None, err
    assert rec["exercises"] and all(e["status"] == "not done" for e in rec["exercises"])
    assert len(rec["exercises"]) == len(exercises(n))
    assert {c["key"] for c in rec["claims"]} == set(written_chapters()[n].claims), "every cell before and between the exercises ran"


def test_syllabus_from_metadata_and_records(notebook_runs, tmp_path):
    out = tmp_path / "syllabus.md"
    r = subprocess.run([CLI, "syllabus", "--out", str(out), "--records", str(notebook_runs["out"])], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    assert text.count("### ") == 30 and text.count("— planned") == 30 - len(written_chapters())
    for n, res in notebook_runs["chapters"].items():
        block = text.split(f"### {n:02d} · ")[1].split("### ")[0]
        wall = json.loads(Path(res.record).read_text())["runner"]["wall_s"]
        assert f"smoke {wall:.0f} s" in block and "full not measured yet" in block
        assert written_chapters()[n].question in block and "Exercises**: 1." in block
        rec = json.loads(Path(res.record).read_text())
        assert block.count("\n  - **") == len(rec["claims"]), "every verdict of the run is listed"
        if n == 1: assert "A/A noise band [" in block and "speedup " in block, "speed verdicts come with their spread"
    assert "如何提高深度学习模型的压缩效率？" in text


def test_hidden_tests_are_stripped_from_the_bundle_and_kept_for_the_grader():
    from dlopt_labs.course.teach import HIDDEN_BEGIN, HIDDEN_END, strip_hidden, student_notebook
    src = f"x = 1\n{HIDDEN_BEGIN}\nassert f(2) == 4\n{HIDDEN_END}\ny = 2"
    assert strip_hidden(src) == "x = 1\ny = 2"
    hidden = {e.n: e.hidden for e in exercises(1)}
    assert "predict_step_time(2.0, 1.25, 4, 4)" in hidden[2], "chapter 1's hidden test is known to the grader"
    text = "\n".join(c.source for c in student_notebook(1).cells)
    assert HIDDEN_BEGIN not in text and "predict_step_time(2.0, 1.25, 4, 4)" not in text

