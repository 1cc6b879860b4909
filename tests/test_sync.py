"""The repository agrees with itself: library exported from the notebooks, notebooks cleaned, README from index.ipynb,
site navigation from the chapter list, a card and manifest entry for every data set."""
import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from dlopt_labs.course import CATALOG, THEMES, render_readme, written_chapters

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _copy(tmp):
    for name in ("settings.ini", "setup.py"):
        shutil.copy(ROOT / name, tmp / name)
    shutil.copytree(ROOT / "nbs", tmp / "nbs", ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    shutil.copytree(ROOT / "dlopt_labs", tmp / "dlopt_labs", ignore=shutil.ignore_patterns("__pycache__"))


def _diff(a: Path, b: Path):
    cmp = filecmp.dircmp(a, b, ignore=["__pycache__", ".ipynb_checkpoints"])
    out = [f"only in {cmp.left}: {x}" for x in cmp.left_only] + [f"only in {cmp.right}: {x}" for x in cmp.right_only]
    out += [f"differs: {Path(cmp.left) / x}" for x in filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)[1]]
    for sub in cmp.common_dirs: out += _diff(a / sub, b / sub)
    return out


def _changes_made_by(tool, tree, tmp_path):
    """Run an nbdev tool on a copy of the repository; list what it changed in `tree`."""
    _copy(tmp_path)
    r = subprocess.run([str(BIN / tool)], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return _diff(ROOT / tree, tmp_path / tree)


def test_library_is_exported_from_the_notebooks(tmp_path):
    problems = _changes_made_by("nbdev_export", "dlopt_labs", tmp_path)
    assert not problems, "dlopt_labs/ is out of sync with nbs/: run `make export` (nbdev_export) and commit both\n" + "\n".join(problems)


def test_notebooks_are_clean(tmp_path):
    problems = _changes_made_by("nbdev_clean", "nbs", tmp_path)
    assert not problems, "notebooks are not cleaned: run `make export` (nbdev_clean) and commit\n" + "\n".join(problems)


def test_parameters_tag_survives_cleaning():
    import nbformat
    for m in written_chapters().values():
        nb = nbformat.read(m["path"], as_version=4)
        assert any("parameters" in c.metadata.get("tags", []) for c in nb.cells), m["path"]


def test_readme_is_generated_from_index():
    assert (ROOT / "README.md").read_text(encoding="utf-8") == render_readme(), "README.md is stale: run `make readme`"


def test_readme_has_the_two_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "make lab" in text and "make test" in text


def test_quarto_navigation_lists_every_written_chapter_under_its_theme():
    cfg = yaml.safe_load((ROOT / "_quarto.yml").read_text(encoding="utf-8"))
    sections = {s["section"]: s["contents"] for s in cfg["website"]["sidebar"]["contents"] if isinstance(s, dict)}
    listed = {}
    for title, items in sections.items():
        for item in items:
            listed[Path(item).resolve() if Path(item).is_absolute() else (ROOT / item).resolve()] = title
    for n, m in written_chapters().items():
        p = Path(m["path"]).resolve()
        assert p in listed, f"chapter {n} ({p}) is missing from _quarto.yml"
        assert listed[p] == THEMES[CATALOG[n - 1].theme], f"chapter {n} is listed under {listed[p]!r}"
    for p in listed: assert p.exists(), f"_quarto.yml lists {p}, which does not exist"
