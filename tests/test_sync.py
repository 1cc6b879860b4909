"""The repository agrees with itself: library exported from the notebooks, notebooks cleaned, README from index.ipynb,
site navigation from the chapter list, a card and manifest entry for every data set."""
import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from dlopt_labs.course.chapters import quarto_config, written_chapters
from dlopt_labs.course.site import render_readme

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
    r = subprocess.run([str(BIN / tool)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
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
        nb = nbformat.read(m.path, as_version=4)
        assert any("parameters" in c.metadata.get("tags", []) for c in nb.cells), m.path


def test_readme_is_generated_from_index():
    assert (ROOT / "README.md").read_text(encoding="utf-8") == render_readme(), "README.md is stale: run `make readme`"


def test_readme_has_the_two_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "make lab" in text and "make test" in text


def test_quarto_yml_is_generated_from_the_catalog():
    """The site navigation lists every written notebook (chapters under their theme, foundations, tooling): generated, never typed."""
    assert (ROOT / "_quarto.yml").read_text(encoding="utf-8") == quarto_config(), "_quarto.yml is stale: run `make export`"
    cfg = yaml.safe_load(quarto_config())
    listed = [p for s in cfg["website"]["sidebar"]["contents"] for p in ([s] if isinstance(s, str) else s["contents"])]
    on_disk = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "nbs").rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
    assert sorted(listed) == on_disk, set(listed) ^ set(on_disk)


def test_the_project_refers_to_no_file_outside_it():
    """Nothing a user of the repository gets points at the team's own planning documents, which they do not have."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, timeout=60).stdout.split()
    bad = []
    for name in tracked:
        if name.endswith((".txt", ".lock", ".png", ".json")) and not name.endswith(".ipynb"): continue
        text = (ROOT / name).read_text(encoding="utf-8", errors="ignore")
        for needle in ("DESIGN.md", "CHAPTERS.md", "../shared", "STYLE.md"):
            if needle in text and name != "tests/test_sync.py": bad.append(f"{name}: {needle}")
    assert not bad, bad
