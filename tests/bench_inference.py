"""`make bench`: int8 dynamic quantisation of Linear layers (chapter 06), side by side in one run.

The chapter's network (an MLP 64-1024-1024-10 trained 10 epochs on digits), served at batch 64 and at batch 1 by
float32 eager PyTorch (under `inference_mode`), the chapter's own int8 path (`quantize_dynamic_int8`: int8 weights per
output channel, activations per row, `torch._int_mm`), ONNX Runtime float32, and ONNX Runtime's dynamic quantiser.
Throughput ratios come from interleaved rounds (`compare_speed`) with an A/A noise band; accuracy on the test digits.
Goal (issue 14): an int8 path at least 2x the rows per second of float32 eager at batch 64, accuracy within 1 point;
a ratio is judged met only when its interval's lower end clears the goal. Not collected by pytest.
"""
import sys
import tempfile
from pathlib import Path

import torch

from dlopt_labs.data import load, loaders, split
from dlopt_labs.efficient.inference import OrtModel, accuracy_of, export_onnx, quantize_dynamic_int8, quantize_onnx
from dlopt_labs.measure import compare_speed
from dlopt_labs.models import MLP
from dlopt_labs.training import fit


def main():
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    torch.manual_seed(0)
    data = split(load("digits"), seed=0)
    dls = loaders(data, 64, seed=0)
    model = MLP(64, 10, hidden=(1024, 1024))
    fit(model, dls["train"], dls["val"], epochs=10, lr=1e-3, device="cpu", progress=False)
    model.eval()
    X, y = torch.as_tensor(data.X_test, dtype=torch.float32), torch.as_tensor(data.y_test)
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(model, X[:64], Path(tmp) / "mlp.onnx")
        runtimes = {
            "float32 eager": model,
            "int8, ours": quantize_dynamic_int8(model),
            "ONNX Runtime float32": OrtModel(path),
            "ONNX Runtime int8": OrtModel(quantize_onnx(path, Path(tmp) / "mlp-int8.onnx")),
        }
        acc = {name: accuracy_of(run, X, y) for name, run in runtimes.items()}
        print(f"int8 dynamic quantisation (chapter 06): MLP 64-1024-1024-10, {torch.get_num_threads()} thread(s)")
        print(f"{'runtime':<22} {'batch':>5} {'rows/s ratio':>13} {'95% interval':>16} {'accuracy':>9} {'goal':>6}")
        met = []
        for batch in (64, 1):
            x = X[:batch]
            with torch.inference_mode():
                cmp = compare_speed({n: (lambda r=r: r(x)) for n, r in runtimes.items()}, rounds=15,
                                    repeats=10 if batch == 64 else 50)
            for name in runtimes:
                ev = cmp.evidence(name)
                goal = ""
                if batch == 64 and "int8" in name:
                    ok = ev["speedup_lo"] >= 2 and acc["float32 eager"] - acc[name] <= 0.01
                    met.append(ok); goal = "met" if ok else "missed"
                print(f"{name:<22} {batch:>5} {ev['speedup']:>13.2f} [{ev['speedup_lo']:>6.2f}, {ev['speedup_hi']:>6.2f}]"
                      f" {acc[name]:>9.3f} {goal:>6}")
            print(f"{'A/A noise band':<22} {batch:>5} {'':>13} [{cmp.noise[0]:>6.2f}, {cmp.noise[1]:>6.2f}]")
    print(f"goal (an int8 path >= 2x float32 eager at batch 64, within 1 point): {'met' if any(met) else 'missed'}"
          f" ({sum(met)} of {len(met)} int8 paths)")


if __name__ == "__main__":
    main()
