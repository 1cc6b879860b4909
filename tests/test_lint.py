"""Rails on the generated package: pyflakes-clean modules, no exported name that nothing uses, plotting that works outside the notebook."""
import ast
import importlib
import re
from functools import lru_cache
from pathlib import Path

import nbformat
import torch

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "dlopt_labs"
_MARK = re.compile(r"^# %% (\S+\.ipynb) #(\S+)\s*$")   # nbdev's marker before each exported cell: notebook path and cell id


def _modules():
    "Every generated module of the package but the index `_modidx.py`."
    return sorted(p for p in PKG.rglob("*.py") if p.name != "_modidx.py")


# pyflakes ---------------------------------------------------------------------------------------

def pyflakes_messages(paths) -> list[str]:
    "All pyflakes messages (unused imports, undefined names, redefinitions, ...) and syntax errors of `paths`, as `path:line:col: message`."
    from pyflakes.api import checkPath

    class Collect:
        def __init__(self): self.lines = []
        def unexpectedError(self, filename, msg): self.lines.append(f"{filename}: {msg}")
        def syntaxError(self, filename, msg, lineno, offset, text): self.lines.append(f"{filename}:{lineno}:{offset}: {msg}")
        def flake(self, message): self.lines.append(str(message))

    r = Collect()
    for p in paths: checkPath(str(p), r)
    return r.lines


def test_package_is_pyflakes_clean():
    msgs = [m.replace(str(ROOT) + "/", "") for m in pyflakes_messages(_modules())]
    assert not msgs, f"{len(msgs)} pyflakes messages (fix the notebooks' #| export cells, then nbdev_export):\n" + "\n".join(msgs)


# every exported name is used somewhere -----------------------------------------------------------

def _module_name(p: Path) -> str:
    return ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def _defining_cells(p: Path) -> dict:
    "name -> (notebook path, cell id) of the exported cell that defines it at top level in module `p`."
    src = p.read_text()
    marks = [(i + 1, m) for i, line in enumerate(src.splitlines()) if (m := _MARK.match(line))]
    out = {}
    for node in ast.parse(src).body:
        names = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)): names = [node.name]
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                names += [n.id for n in ast.walk(t) if isinstance(n, ast.Name)]
        before = [m for line, m in marks if line < node.lineno]
        if not before: continue
        cell = ((p.parent / before[-1].group(1)).resolve(), before[-1].group(2))
        for n in names: out.setdefault(n, cell)
    return out


@lru_cache(maxsize=None)
def _code_cells() -> tuple:
    "(notebook path, cell id, source) of every code cell of every notebook under nbs/."
    cells = []
    for nb_path in sorted((ROOT / "nbs").rglob("*.ipynb")):
        if ".ipynb_checkpoints" in nb_path.parts: continue
        nb = nbformat.read(nb_path, as_version=4)
        cells += [(nb_path.resolve(), c.get("id"), c.source) for c in nb.cells if c.cell_type == "code"]
    return tuple(cells)


def unused_exports() -> list[str]:
    "`module.name` for each name of a module's `__all__` that no test file, no Makefile target and no notebook code cell but its own defining cell mentions."
    tests = [p.read_text() for p in sorted((ROOT / "tests").glob("*.py")) if p.name != "test_lint.py"]
    tests.append((ROOT / "Makefile").read_text())   # `make readme` / `make export` call write_readme and write_quarto
    unused = []
    for p in _modules():
        mod = importlib.import_module(_module_name(p))
        defs = _defining_cells(p)
        for name in getattr(mod, "__all__", []):
            pat = re.compile(rf"\b{re.escape(name)}\b")
            if any(pat.search(t) for t in tests): continue
            if any(pat.search(src) for nb, cid, src in _code_cells() if (nb, cid) != defs.get(name)): continue
            unused.append(f"{mod.__name__}.{name}")
    return unused




def test_every_exported_name_is_used():
    unused = unused_exports()
    print("unused exported names:", unused)
    assert not unused, (f"{len(unused)} exported names are used neither in tests/ nor in any notebook cell but their own: "
                        "use each in a demo cell (or a test), or remove it:\n" + "\n".join(unused))


# plotting outside the notebook -------------------------------------------------------------------

def test_calibration_plots_without_the_notebook():
    "The exported module imports matplotlib itself: plotting works from plain Python, with no `plt` left over from the notebook."
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.axes import Axes
    from dlopt_labs.data import load, tensors
    from dlopt_labs.models import SmallCNN
    from dlopt_labs.reliable.calibrate import reliability_plot, try_calibration
    plt.close("all")
    torch.manual_seed(0)
    ds = load("shapes", n=200, size=16)
    x, y = tensors(ds.X, ds.y, ds.image_shape)
    net = SmallCNN(1, 4, widths=(4, 8), dropout=0.2)
    try:
        df = try_calibration(net, x, y, 1.0, 0.0, 10, 0, plot=True)
        assert len(df) == 1 and plt.get_fignums(), "try_calibration(plot=True) drew no figure"
        with torch.no_grad(): p = net.eval()(x).softmax(1)
        ax = reliability_plot(p, y, 10)
        assert isinstance(ax, Axes) and ax.lines, "reliability_plot drew nothing"
        _, ax2 = plt.subplots()
        assert reliability_plot(p, y, 10, ax=ax2, label="untrained") is ax2
    finally:
        plt.close("all")
