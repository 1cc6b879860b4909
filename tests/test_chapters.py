"""Every chapter in nbs/ is discovered and executed end to end in smoke mode; its results record must be complete."""
import json
from pathlib import Path

import nbformat
import pytest

from dlopt_labs.course import CATALOG, written_chapters
from dlopt_labs.lab import check_record, VERDICTS
import conftest

CHAPTERS = conftest.selected_chapters()


def test_some_chapters_are_written():
    assert {1, 15, 29} <= set(written_chapters()), f"expected the exemplar chapters, found {sorted(written_chapters())}"


@pytest.mark.parametrize("n", sorted(CHAPTERS))
def test_chapter_runs_in_smoke_mode(notebook_runs, n):
    r = notebook_runs["chapters"][n]
    conftest._TIMES[n] = (r.title, r.seconds, CHAPTERS[n].get("budget_s", {}).get("smoke"))
    assert r.ok, f"chapter {n} failed: {r.error} (executed notebook: {r.notebook})"
    nb = nbformat.read(r.notebook, as_version=4)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, f"error outputs in chapter {n}: {[e.ename for e in errors]}"


@pytest.mark.parametrize("n", sorted(CHAPTERS))
def test_results_record_complete(records, n):
    meta = CHAPTERS[n]
    rec = records[n]
    assert check_record(rec, meta["claims"]) == []
    assert rec["chapter"] == n and rec["mode"] == "smoke" and rec["params"]["MODE"] == "smoke"
    assert {c["key"] for c in rec["claims"]} == set(meta["claims"]), "every claim in the front matter, and only those, gets a verdict"
    assert all(c["verdict"] in VERDICTS and c["rule"] and c["source"] for c in rec["claims"])
    ex = rec["exercises"]
    assert len(ex) == meta["exercises"] and all(e["status"] == "passed" for e in ex), f"solved exercises must pass: {ex}"
    assert rec["env"]["versions"]["torch"] and rec["env"]["cpu"]["logical_cores"] >= 1
    assert [s["name"] for s in rec["sections"]][-1] == "end" and all(s["seconds"] >= 0 for s in rec["sections"])


@pytest.mark.parametrize("name", [p.name for p in conftest.foundation_notebooks()])
def test_foundation_notebook_runs(notebook_runs, name):
    err, secs = notebook_runs["foundations"][name]
    assert err is None, f"{name}: {err}"


ANATOMY = ["## Claim checks", "## Try it", "## Exercises", "## Summary", "## References"]


@pytest.mark.parametrize("n", sorted(CHAPTERS))
def test_chapter_anatomy(n):
    """The parts DESIGN.md asks of every chapter, in order."""
    meta = CHAPTERS[n]
    entry = CATALOG[n - 1]
    nb = nbformat.read(meta["path"], as_version=4)
    assert meta["subtitle"] == entry.question, "the subtitle is the source's question, as written"
    assert meta["module"] == entry.module and meta["theme"] == entry.theme
    for key in ("objectives", "prerequisites", "budget_s", "claims", "exercises", "source_section"):
        assert meta.get(key) is not None, f"front matter lacks {key}"
    assert set(meta["budget_s"]) == {"smoke", "full"}
    src = [c.source for c in nb.cells]
    text = "\n".join(src)
    assert f"#| default_exp {entry.module.removeprefix('dlopt_labs.')}" in text
    params = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1 and all(f"{k} =" in params[0].source for k in ("MODE", "SEED", "RESULTS"))
    positions = [text.find(h) for h in ANATOMY]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), f"sections missing or out of order: {dict(zip(ANATOMY, positions))}"
    assert "try_it(" in text and "#| export" in text
    # exercises: a solution between markers, then a check_ call, one per exercise
    sol = [i for i, s in enumerate(src) if "### BEGIN SOLUTION" in s]
    assert len(sol) == meta["exercises"] >= 2
    for i in sol:
        assert "### END SOLUTION" in src[i] and "check_" in src[i].split("### END SOLUTION")[1], "a check_ call follows each solution"
    quote = "".join(c.source for c in nb.cells[:4] if c.cell_type == "markdown")
    assert "> - " in quote or "> **" in quote, "the source's bullets are quoted"
