"""The layers show in the folders: foundations <- themes <- tooling, no import back up, no circle; every chapter where the
catalog puts it; a new chapter scaffolded from the catalog runs as written and reports its stubs as not done."""
import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dlopt_labs.catalog import CATALOG, THEMES
from dlopt_labs.course.chapters import read_chapter, written_chapters
from dlopt_labs.lab import check_record

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "dlopt_labs"
BIN = Path(sys.executable).parent
def _foundations():
    """The modules the foundation notebooks export (their `#| default_exp`), e.g. {"core", "data", ...}."""
    import re
    out = set()
    for nb in (ROOT / "nbs" / "foundations").glob("*.ipynb"):
        m = re.search(r"#\|\s*default_exp\s+(\w+)", nb.read_text(encoding="utf-8"))
        if m: out.add(m.group(1))
    return out


FOUNDATIONS = _foundations()


def _modules():
    out = {}
    for p in PKG.rglob("*.py"):
        if p.name in ("__init__.py", "_modidx.py"): continue
        out[".".join(p.relative_to(ROOT).with_suffix("").parts)] = p
    return out


def _layer(mod):
    parts = mod.split(".")
    if len(parts) == 2 and parts[1] in FOUNDATIONS: return 0
    if parts[1] in THEMES: return 1
    if parts[1] == "course": return 2
    raise AssertionError(f"{mod} belongs to no layer: foundations {sorted(FOUNDATIONS)}, a theme {sorted(THEMES)}, or course/")


def _imports(mod, path):
    """dlopt_labs modules imported by `mod`, at any depth of its code (function-level imports included)."""
    found = set()
    pkg = mod.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import): names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level: base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else: continue
        found |= {n for n in names if n.startswith("dlopt_labs.") and n in _modules()}
    return found


def test_foundations_are_the_ground_layer():
    assert {"core", "data", "models", "training", "measure", "lab", "catalog"} == FOUNDATIONS


def test_every_module_sits_in_a_layer_and_imports_only_downwards():
    mods = _modules()
    graph = {m: _imports(m, p) for m, p in mods.items()}
    bad = [f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})" for m, ds in graph.items() for d in ds if _layer(d) > _layer(m)]
    assert not bad, "imports running up the layers:\n" + "\n".join(bad)
    tooling_to_chapters = [f"{m} imports {d}" for m, ds in graph.items() if _layer(m) == 2 for d in ds if _layer(d) == 1]
    assert not tooling_to_chapters, f"the tooling imports chapters by name (importlib) only: {tooling_to_chapters}"
    seen, stack = set(), []
    def visit(m):                                                   # depth-first search for a circle
        if m in stack: raise AssertionError("import circle: " + " -> ".join(stack[stack.index(m):] + [m]))
        if m in seen: return
        stack.append(m); [visit(d) for d in graph[m]]; stack.pop(); seen.add(m)
    for m in graph: visit(m)


def test_notebook_folders_match_packages_and_every_chapter_module_is_a_leaf():
    for n, ch in written_chapters().items():
        e = ch.entry
        assert ch.path == ROOT / e.notebook, f"chapter {n} is at {ch.path}, the catalog says {e.notebook}"
        assert (PKG / e.theme / f"{e.slug}.py").is_file(), f"{e.module} is not exported: run make export"
        assert not (PKG / e.theme / e.slug).exists(), f"{e.module} must be a module (a leaf), not a package"
    written = {ch.module for ch in written_chapters().values()}
    for theme in THEMES:
        nbs, pkg = ROOT / "nbs" / theme, PKG / theme
        if pkg.exists(): assert nbs.exists(), f"dlopt_labs/{theme}/ exists without nbs/{theme}/"
        here = {f"dlopt_labs.{theme}.{p.stem}" for p in pkg.glob("*.py") if p.name != "__init__.py"} if pkg.exists() else set()
        assert here <= written, f"modules no written chapter exports (a renamed chapter's leftovers? delete them): {sorted(here - written)}"
    for p in PKG.iterdir():
        if p.is_dir() and p.name != "__pycache__":
            assert p.name in THEMES or p.name == "course", f"dlopt_labs/{p.name}/ is neither a theme nor the tooling"


def test_planned_modules_cannot_collide():
    mods = [e.module for e in CATALOG]
    assert len(set(mods)) == 30
    assert not [(a, b) for a in mods for b in mods if b.startswith(a + ".")], "a planned module would also have to be a package"


def test_drift_between_notebook_and_catalog_is_caught(tmp_path):
    src = ROOT / "nbs" / "efficient" / "15_prune.ipynb"
    nb = json.loads(src.read_text(encoding="utf-8"))
    nb["cells"][1]["source"] = ["# 15 · Pruning networks\n", "\n", "> 如何提高深度学习模型的压缩效率？"]
    (tmp_path / "nbs" / "efficient").mkdir(parents=True)
    bad = tmp_path / "nbs" / "efficient" / "15_prune.ipynb"
    bad.write_text(json.dumps(nb), encoding="utf-8")
    problems = read_chapter(bad).problems(tmp_path)
    assert problems == ["heading is '15 · Pruning networks', the catalog says '15 · Pruning'"], problems
    (tmp_path / "nbs" / "speed").mkdir()
    moved = tmp_path / "nbs" / "speed" / "15_prune.ipynb"; shutil.move(bad, moved)
    assert any("the catalog puts chapter 15 at nbs/efficient/15_prune.ipynb" in p for p in read_chapter(moved).problems(tmp_path))


def _scratch_clone(tmp_path):
    root = tmp_path / "course"
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(ROOT), str(root)], check=True, timeout=60)
    for rel in ("nbs", "dlopt_labs", "datasets", "settings.ini", "setup.py"):        # the working tree as it is now
        src, dst = ROOT / rel, root / rel
        if src.is_dir(): shutil.rmtree(dst, ignore_errors=True); shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints"))
        else: shutil.copy(src, dst)
    return root


def _unwritten(root):
    """A chapter for the scaffold test to write in the scratch clone `root`: the first one not yet written, or, with
    all thirty written, chapter 13 (no other notebook imports its module), whose notebook and module are removed
    from the clone first."""
    from dlopt_labs.catalog import CATALOG, entry
    from dlopt_labs.course.chapters import written_chapters
    done = set(written_chapters())
    todo = [e for e in sorted(CATALOG, key=lambda e: e.number) if e.number not in done and e.claims]
    if todo:
        return todo[0]
    e = entry(13)
    (root / "nbs" / e.theme / f"{e.number:02d}_{e.slug}.ipynb").unlink()
    (root / "dlopt_labs" / e.theme / f"{e.slug}.py").unlink()
    return e


def test_new_writes_a_chapter_that_exports_runs_and_reports_its_stubs(tmp_path):
    from test_chapters import check_anatomy
    root = _scratch_clone(tmp_path)
    entry = _unwritten(root)
    n, theme, slug = entry.number, entry.theme, entry.slug
    env = dict(os.environ, DLOPT_ROOT=str(root), PYTHONPATH=str(root))
    r = subprocess.run([str(BIN / "dlopt-labs"), "new", str(n)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    path = root / "nbs" / theme / f"{n:02d}_{slug}.ipynb"
    assert path.exists() and str(path) in r.stdout
    again = subprocess.run([str(BIN / "dlopt-labs"), "new", "15"], env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "chapter 15 (Pruning) is already written" in again.stderr and again.stderr.count("\n") == 1
    ex = subprocess.run([str(BIN / "nbdev_export")], cwd=root, capture_output=True, text=True, timeout=120)
    assert ex.returncode == 0, ex.stderr
    assert f"def try_{slug}" in (root / "dlopt_labs" / theme / f"{slug}.py").read_text()
    ch = read_chapter(path)
    check_anatomy(ch, root)
    assert entry.claims[0][1] in path.read_text(encoding="utf-8")     # the catalog's planned claim
    from dlopt_labs.course.scaffold import source_section
    bullets = [b for _, bs in source_section(n)["groups"] for b in bs]
    assert len(bullets) >= 6 and all(f"> - {b}" in "".join(json.loads(path.read_text())["cells"][2]["source"]) for b in bullets)
    run = subprocess.run([str(BIN / "dlopt-labs"), "run", str(n), "--mode", "smoke", "--out", str(tmp_path / "out")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    rec = json.loads((tmp_path / "out" / f"ch{n:02d}-smoke.json").read_text())
    assert [e["status"] for e in rec["exercises"]] == ["not done", "not done"]
    assert {c["verdict"] for c in rec["claims"]} == {"not judged"}
    assert any("not judged yet" in p for p in check_record(rec, ch.claims)), "a scaffold's record is reported incomplete"
