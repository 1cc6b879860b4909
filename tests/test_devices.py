"""Device placement by construction: chapter code builds no layer on a hard-coded device and feeds no `.cpu()` data to a
model; the foundations move inputs to the model's device. No GPU here, so the `meta` device stands in for one: a
tensor on it cannot be mixed with CPU tensors, just as a CUDA tensor cannot."""
import ast
from pathlib import Path

import torch
from torch import nn

from dlopt_labs.catalog import THEMES

PKG = Path(__file__).resolve().parent.parent / "dlopt_labs"
LAYERS = {"Linear", "Conv1d", "Conv2d", "Conv3d", "BatchNorm1d", "BatchNorm2d", "LayerNorm", "Embedding"}


def _chapter_modules():
    return [p for theme in THEMES for p in (PKG / theme).glob("*.py") if p.name != "__init__.py"]


def _problems(path: Path) -> list[str]:
    out = []
    for fn in (n for n in ast.walk(ast.parse(path.read_text(encoding="utf-8"))) if isinstance(n, ast.FunctionDef)):
        for call in (n for n in ast.walk(fn) if isinstance(n, ast.Call)):
            f = call.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if name in LAYERS and not any(k.arg == "device" for k in call.keywords):
                out.append(f"{path.name}:{call.lineno} {fn.name} builds nn.{name} without device=")
            for arg in call.args:                       # model(x.cpu()): data sent to the CPU, then to a model
                if isinstance(arg, ast.Call) and isinstance(arg.func, ast.Attribute) and arg.func.attr == "cpu" \
                        and name not in ("float", "numpy", "tolist", "item", "cat", "stack"):
                    out.append(f"{path.name}:{call.lineno} {fn.name} passes .cpu() data to {name}()")
    return out


def test_scan_finds_the_patterns_that_broke_on_cuda(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from torch import nn\ndef shrink(m, x):\n    layer = nn.Linear(4, 2)\n    return m(x.cpu())\n")
    assert len(_problems(bad)) == 2


def test_chapter_code_places_tensors_by_construction():
    assert _chapter_modules(), "no chapter module found"
    problems = [p for path in _chapter_modules() for p in _problems(path)]
    assert problems == [], problems


def test_structured_pruning_builds_its_layers_where_the_model_is():
    from dlopt_labs.efficient.prune import prune_neurons, structured_params
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).to("meta")
    small = prune_neurons(model, 0.5)          # building these layers on the CPU and copying meta weights in would raise
    assert all(p.device.type == "meta" for p in small.parameters())
    assert sum(p.numel() for p in small.parameters()) == structured_params(model, 0.5) == 8 * 8 + 8 + 8 * 4 + 4


def test_foundations_move_inputs_to_the_models_device():
    from dlopt_labs.training import predict
    from torch.utils.data import DataLoader, TensorDataset
    seen = []
    class Probe(nn.Module):
        def __init__(self):
            super().__init__(); self.w = nn.Parameter(torch.zeros(1, device="meta"))
        def forward(self, x):
            seen.append(x.device.type); return torch.zeros(len(x), 2, device="meta")
    try: predict(Probe(), DataLoader(TensorDataset(torch.randn(4, 3), torch.zeros(4, dtype=torch.long)), 2))
    except (RuntimeError, NotImplementedError): pass       # copying meta logits back to the CPU is not possible
    assert seen and set(seen) == {"meta"}, "predict feeds the model on the model's device"
