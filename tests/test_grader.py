"""The grader: full marks for a correct submission, partial for a partial one, the reason on every row, and nothing for
a submission that attacks the grading instead of solving the exercises (each attack below got full marks, or wrote
outside its folder, or could take the machine down, with the grader of Rails v1)."""
import copy
import subprocess
import sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from dlopt_labs.core import course_root
from dlopt_labs.course.chapters import written_chapters
from dlopt_labs.course.sandbox import sandbox_problem
from dlopt_labs.course.teach import exercises, grade, graded_notebook, student_notebook, tampering

CLI = str(Path(sys.executable).parent / "dlopt-labs")
pytestmark = pytest.mark.skipif(15 not in written_chapters(), reason="the grader is tested on chapter 15")
WALL_S = 150            # the wall-clock limit per submission in these tests
TIMEOUT = 20            # per cell and per call


def _new_cell(code):
    c = nbformat.v4.new_code_cell(code)
    c.id = f"added{abs(hash(code)) % 10**8:08d}"
    return c


def with_cell(nb, code):
    """A copy of `nb` with a cell added before its first exercise (the learner's own cell, outside every answer)."""
    nb = copy.deepcopy(nb)
    first = min(e.cell for e in exercises(15))
    nb.cells.insert(first, _new_cell(code))
    return nb


def with_answer(nb, function, answer):
    """A copy of `nb` whose exercise cell defining `function` has `answer` in place of its function."""
    nb = copy.deepcopy(nb)
    cell = next(c for c in nb.cells if c.cell_type == "code" and f"def {function}(" in c.source)
    lines = cell.source.split("\n")
    start = next(i for i, l in enumerate(lines) if l.startswith(f"def {function}("))
    end = next(i for i in range(start + 1, len(lines)) if lines[i].strip() and not lines[i][0].isspace())
    cell.source = "\n".join(lines[:start] + answer.strip("\n").split("\n") + ["", ""] + lines[end:])
    return nb


def _solution(nb, function):
    """The course's own answer for `function` (its function, solution markers removed)."""
    cell = next(c for c in nb.cells if c.cell_type == "code" and f"def {function}(" in c.source)
    body = [l for l in cell.source.split("\n") if l.strip() not in ("### BEGIN SOLUTION", "### END SOLUTION")]
    end = next(i for i in range(1, len(body)) if body[i].strip() and not body[i][0].isspace())
    return "\n".join(body[:end])


FORGED = 'print(\'DLOPT-GRADE {"n": %d, "title": "x", "status": "passed", "message": "", "points": 1}\')'


@pytest.fixture(scope="module")
def submissions(tmp_path_factory):
    d = tmp_path_factory.mktemp("subs")
    course = nbformat.read(written_chapters()[15].path, as_version=4)
    stub = student_notebook(15)
    outside = [course_root() / "pwned-by-submission.txt", d / "pwned-by-submission.txt"]
    subs = {
        # the correct, the partial, the unsolved
        "correct": course,
        "partial": with_answer(stub, "capped_global_masks", _solution(course, "capped_global_masks")),
        "unsolved": stub,
        # 1-3: one cell outside the answers, replacing the checks, the result class, what the old grading cell reported with
        "attack_replace_checks": with_cell(stub, (
            "import dlopt_labs.efficient.prune as m\nfrom dlopt_labs.lab import ExerciseResult\n"
            "for name in ('check_capped_global_masks', 'check_csr_break_even'):\n"
            "    n = getattr(m, name).exercise[0]\n"
            "    setattr(m, name, lambda fn, n=n: ExerciseResult(n, 'x', 'passed', '', 1))")),
        "attack_patch_result_class": with_cell(stub, (
            "import dlopt_labs.lab as L\n_init = L.ExerciseResult.__init__\n"
            "L.ExerciseResult.__init__ = lambda self, n, title, status, message='', points=1: "
            "_init(self, n, title, 'passed', '', points)")),
        "attack_patch_report": with_cell(stub, (
            "import json\n_dumps = json.dumps\n"
            "json.dumps = lambda obj, *a, **k: _dumps({**obj, 'status': 'passed'} if isinstance(obj, dict) else obj, *a, **k)")),
        # 4: an answer that patches the check, then returns nothing useful
        "attack_patched_answer": with_answer(stub, "capped_global_masks", (
            "def capped_global_masks(weights, sparsity, cap):\n    import sys\n"
            "    m = sys.modules['dlopt_labs.efficient.prune']\n"
            "    m.check_capped_global_masks = lambda fn: None\n    return {}")),
        # 5: forged grade lines, from an answer and from a cell of its own
        "attack_forged_line": with_cell(with_answer(stub, "csr_break_even", (
            f"def csr_break_even(rows, cols, value_bytes=4, index_bytes=8):\n    {FORGED % 2}\n    return 0.5")), FORGED % 1),
        # 6: files written outside the submission's folder
        "attack_write_outside": with_answer(stub, "capped_global_masks", (
            "def capped_global_masks(weights, sparsity, cap):\n"
            + "".join(f"    open({str(p)!r}, 'w').write('pwned')\n" for p in outside) + "    return {}")),
        # 7: a fork bomb; 8: an allocation beyond the memory limit
        "attack_fork_bomb": with_answer(stub, "capped_global_masks", (
            "def capped_global_masks(weights, sparsity, cap):\n    import os\n    while True:\n        os.fork()")),
        "attack_memory": with_answer(stub, "csr_break_even", (
            "def csr_break_even(rows, cols, value_bytes=4, index_bytes=8):\n    hog = bytearray(64 * 2**30)\n    return 0.5")),
        # 9: a cell that never ends, deaf to the interrupt
        "attack_never_ends": with_answer(stub, "csr_break_even", (
            "def csr_break_even(rows, cols, value_bytes=4, index_bytes=8):\n    import signal\n"
            "    signal.signal(signal.SIGINT, signal.SIG_IGN)\n    while True:\n        pass")),
        # broken, not malicious
        "wrong_chapter": nbformat.read(written_chapters()[29].path, as_version=4) if 29 in written_chapters() else None,
        "infinite_loop": with_answer(course, "csr_break_even", (
            "def csr_break_even(rows, cols, value_bytes=4, index_bytes=8):\n    while True:\n        pass")),
        "deleted_check": nbformat.from_dict(copy.deepcopy(course)),
        "visible_cases_only": with_answer(course, "csr_break_even", (
            "def csr_break_even(rows, cols, value_bytes=4, index_bytes=8):\n"
            "    return {(8, 16, 4, 8): 0.71875, (3, 40, 4, 8): 83 / 120, (16, 2, 2, 8): None, (5, 7, 8, 4): 0.4,\n"
            "            (1, 1, 4, 8): None, (1, 10, 4, 8): 0.9}[rows, cols, value_bytes, index_bytes]")),
    }
    for c in subs["deleted_check"].cells:
        if "def capped_global_masks" in c.source: c.source = c.source.split("### END SOLUTION")[0] + "### END SOLUTION\n"
    for name, nb in subs.items():
        if nb is not None: nbformat.write(nb, d / f"{name}.ipynb")
    (d / "invalid_json.ipynb").write_text('{"cells": [ not json')
    (d / "a_script.ipynb").write_text("print('hello')\n")
    return d, outside


@pytest.fixture(scope="module")
def graded(submissions):
    if sandbox_problem(): pytest.fail(f"the grader's sandbox cannot run here: {sandbox_problem()}")
    d, outside = submissions
    csv = d / "scores.csv"
    r = subprocess.run([CLI, "grade", *sorted(map(str, d.glob("*.ipynb"))), "--chapter", "15", "--timeout", str(TIMEOUT),
                        "--limit", f"wall_s={WALL_S}", "--out", str(csv)], capture_output=True, text=True, timeout=1200)
    assert csv.exists(), r.stderr[-3000:]
    df = pd.read_csv(csv)
    df["message"] = df["message"].fillna("")
    return r, df, outside


def _rows(df, name): return df[df.submission.str.endswith(f"/{name}.ipynb")].set_index("exercise", drop=False)


def test_correct_gets_full_marks_partial_gets_partial_unsolved_nothing(graded):
    r, df, _ = graded
    correct, partial, unsolved = _rows(df, "correct"), _rows(df, "partial"), _rows(df, "unsolved")
    assert len(correct) == 2 and (correct.status == "passed").all() and correct.points.sum() == 2, correct.message.tolist()
    assert partial.loc[1, "status"] == "passed" and partial.loc[2, "status"] == "not done" and partial.points.sum() == 1
    assert (unsolved.status == "not done").all() and unsolved.points.sum() == 0


ATTACKS = {   # submission: what its row must say
    "attack_replace_checks": "1 added and 0 changed cells outside the exercises were not run",
    "attack_patch_result_class": "1 added and 0 changed cells outside the exercises were not run",
    "attack_patch_report": "1 added and 0 changed cells outside the exercises were not run",
    "attack_patched_answer": "tampering with the checks: the answer uses sys.modules",
    "attack_forged_line": "tampering with the checks: the answer refers to DLOPT-GRADE",
    "attack_write_outside": "Read-only file system",
    "attack_fork_bomb": "could not run: process limit (256)",
    "attack_memory": "could not run: memory limit (4096 MiB)",
    "attack_never_ends": f"could not run: a cell ran past its time limit ({TIMEOUT} s) and went on after the interrupt",
}


@pytest.mark.parametrize("name", ATTACKS)
def test_an_attack_earns_nothing_and_its_row_says_why(graded, name):
    r, df, _ = graded
    rows = _rows(df, name)
    assert len(rows), f"{name} has no row"
    assert rows.points.sum() == 0, f"{name} earned points: {rows[['status', 'message']].values.tolist()}"
    assert ATTACKS[name] in " ".join(rows.message), rows.message.tolist()


def test_nothing_was_written_outside_the_submissions_folders(graded):
    *_, outside = graded
    assert not [p for p in outside if p.exists()]


def test_broken_submissions_get_their_row_and_reason(graded):
    r, df, _ = graded
    assert _rows(df, "invalid_json").message.iloc[0].startswith("not a notebook (invalid JSON or nbformat)")
    assert _rows(df, "a_script").message.iloc[0].startswith("not a notebook (invalid JSON or nbformat)")
    if 29 in written_chapters():
        assert "wrong chapter: this is chapter 29, the assignment is chapter 15" in _rows(df, "wrong_chapter").message.iloc[0]
    loop = _rows(df, "infinite_loop")
    assert loop.loc[1, "status"] == "passed" and loop.loc[2, "status"] == "timed out", loop.message.tolist()
    deleted = _rows(df, "deleted_check")
    assert (deleted.status == "passed").all() and "its check call was deleted" in deleted.message.iloc[0]
    gamed = _rows(df, "visible_cases_only")
    assert gamed.loc[2, "status"] == "failed" and "a hidden test failed" in gamed.loc[2, "message"]


def test_summary_and_exit_status(graded):
    r, df, _ = graded
    n = df.submission.nunique()
    could_not = df[df.status == "could not run"].submission.nunique()
    assert r.returncode == 1 and f"{could_not} of {n} submissions could not be graded" in r.stderr
    assert "correct.ipynb" in r.stdout and "2/2" in r.stdout and "1/2" in r.stdout


def test_answers_are_the_only_part_of_a_submission_that_runs():
    course = nbformat.read(written_chapters()[15].path, as_version=4)
    sub = with_cell(course, "raise SystemExit('a cell of my own')")
    i = next(i for i, c in enumerate(sub.cells) if c.cell_type == "code" and c.source.startswith("#| export"))
    sub.cells[i].source += "\nprint('edited')"
    built, answers, notes = graded_notebook(sub, 15)
    assert "a cell of my own" not in "".join(c.source for c in built.cells)
    assert [c.source for c in built.cells] == [c.source for c in graded_notebook(course, 15)[0].cells]
    assert notes == ["1 added and 1 changed cells outside the exercises were not run (only the answers are graded)"]
    assert "def capped_global_masks" in answers[1] and "check_" not in answers[1]


@pytest.mark.parametrize("answer, reason", [
    ("def f(w):\n    import dlopt_labs.course.teach as t\n    return t", "imports dlopt_labs.course.teach (line 2)"),
    ("def f(w):\n    check_csr_break_even.__code__ = None", "refers to the course's check check_csr_break_even (line 2)"),
    ("def f(w):\n    import sys\n    return sys._getframe(1).f_locals", "refers to _getframe (line 3)"),
    ("def f(w):\n    return {k: v.abs() > 0 for k, v in w.items()}", None),
])
def test_tampering_is_named_and_a_plain_answer_is_not_flagged(answer, reason):
    assert tampering(answer, 15) == reason


def test_grade_refuses_bad_arguments_before_running_anything(tmp_path):
    with pytest.raises(ValueError, match="no submissions given"): grade([], 15)
    with pytest.raises(ValueError, match="mode must be one of"): grade([str(tmp_path / "x.ipynb")], 15, mode="fast")


def test_exit_status_zero_when_every_submission_was_graded(tmp_path):
    nbformat.write(student_notebook(15), tmp_path / "unsolved.ipynb")
    r = subprocess.run([CLI, "grade", str(tmp_path / "unsolved.ipynb"), "--timeout", str(TIMEOUT), "--workers", "1"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "0/2" in r.stdout, r.stderr[-2000:]
