"""Every chapter in nbs/ is discovered and executed end to end in smoke mode; its results record must be complete."""
import json
import re
from pathlib import Path

import nbformat
import pytest

from dlopt_labs.course.chapters import written_chapters
from dlopt_labs.lab import check_record, judge, VERDICTS
import conftest

CHAPTERS = conftest.selected_chapters()


def test_some_chapters_are_written():
    assert {1, 15, 29} <= set(written_chapters()), f"expected the exemplar chapters, found {sorted(written_chapters())}"


@pytest.mark.parametrize("n", sorted(CHAPTERS))
def test_chapter_runs_in_smoke_mode(notebook_runs, n):
    r = notebook_runs["chapters"][n]
    conftest._TIMES[n] = (r.title, r.seconds, CHAPTERS[n].budget_s.get("smoke"), r.attempts)
    assert r.ok, f"chapter {n} failed: {r.error} (executed notebook: {r.notebook})"
    nb = nbformat.read(r.notebook, as_version=4)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, f"error outputs in chapter {n}: {[e.ename for e in errors]}"


@pytest.mark.parametrize("n", sorted(CHAPTERS))
def test_results_record_complete(records, n):
    meta = CHAPTERS[n]
    rec = records[n]
    assert check_record(rec, meta.claims) == []
    assert rec["chapter"] == n and rec["title"] == meta.title and rec["mode"] == "smoke" and rec["params"]["MODE"] == "smoke"
    assert {c["key"] for c in rec["claims"]} == set(meta.claims), "every claim in the front matter, and only those, gets a verdict"
    assert all(c["verdict"] in VERDICTS and c["rule"] and c["source"] for c in rec["claims"])
    ex = rec["exercises"]
    assert len(ex) == meta.exercises and all(e["status"] == "passed" for e in ex), f"solved exercises must pass: {ex}"
    assert rec["env"]["versions"]["torch"] and rec["env"]["cpu"]["logical_cores"] >= 1
    assert [s["name"] for s in rec["sections"]][-1] == "end" and all(s["seconds"] >= 0 for s in rec["sections"])


@pytest.mark.parametrize("n", sorted(CHAPTERS))
def test_every_verdict_recomputes_from_its_record(records, n):
    """Anyone can recompute every verdict from the record alone: the stored rule on the stored evidence gives the stored
    verdict, and the rule gives "holds" and "fails" on the two measurements kept beside it (it can come out either way)."""
    for c in records[n]["claims"]:
        rule = (c["holds"], c["fails"], c["otherwise"])
        assert judge(c["evidence"], *rule) == c["verdict"], c["key"]
        assert judge({**c["evidence"], **c["would_hold"]}, *rule) == "holds", c["key"]
        assert judge({**c["evidence"], **c["would_fail"]}, *rule) == "fails", c["key"]
        assert c["rule"] == f"holds if {c['holds']}; fails if {c['fails']}; else {c['otherwise']}"


@pytest.mark.parametrize("n", sorted(CHAPTERS))
def test_chapter_code_lines_fit_the_page(n):
    """Chapter code a reader can follow: no code line longer than 100 characters in the chapter's notebook."""
    nb = nbformat.read(CHAPTERS[n].path, as_version=4)
    long = [(i, len(l)) for i, c in enumerate(nb.cells) if c.cell_type == "code" for l in c.source.splitlines() if len(l) > 100]
    assert not long, f"cells and line lengths over 100: {long}"


@pytest.mark.parametrize("name", [p.name for p in conftest.foundation_notebooks()])
def test_foundation_notebook_runs(notebook_runs, name):
    err, secs = notebook_runs["foundations"][name]
    assert err is None, f"{name}: {err}"


ANATOMY = ["## Claim checks", "## Try it", "## Exercises", "## Summary", "## References"]


@pytest.mark.parametrize("n", sorted(CHAPTERS))
def test_chapter_anatomy(n):
    """The parts CONTRIBUTING.md asks of every chapter, in order; the facts of the catalog, not restated."""
    check_anatomy(CHAPTERS[n])


def check_anatomy(ch, root=None):
    assert ch.problems(root) == [], f"chapter {ch.number} disagrees with the catalog: {ch.problems(root)}"
    assert ch.objectives and ch.prerequisites and ch.claims, "front matter lacks objectives, prerequisites or claims"
    nb = nbformat.read(ch.path, as_version=4)
    src = [c.source for c in nb.cells]
    text = "\n".join(src)
    params = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1 and all(f"{k} =" in params[0].source for k in ("MODE", "SEED", "RESULTS"))
    after = src[src.index(params[0].source) + 1:]
    assert any(re.search(rf"start\(\s*{ch.number}\s*,", s) for s in after), "the set-up call start(N, smoke=..., full=...) follows the parameters"
    assert not re.search(r"Record\(", text), "the record is opened by start(), with the catalog's title"
    positions = [text.find(h) for h in ANATOMY]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), f"sections missing or out of order: {dict(zip(ANATOMY, positions))}"
    assert "try_it(" in text and "#| export" in text
    sol = [i for i, s in enumerate(src) if "### BEGIN SOLUTION" in s]
    assert len(sol) == ch.exercises >= 2
    for i in sol:
        assert "### END SOLUTION" in src[i] and "check_" in src[i].split("### END SOLUTION")[1], "a check_ call follows each solution"
    quote = "".join(c.source for c in nb.cells[:4] if c.cell_type == "markdown")
    assert "> - " in quote or "> **" in quote, "the source's bullets are quoted"
    assert 'rec.save()' in src[-1] and 'rec.section("end")' in src[-1], "the last cell closes the record"
