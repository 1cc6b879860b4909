"""`make bench`: the overhead of `dlopt_labs.training.fit` over a plain PyTorch loop on the same model and data.

Both loops run the same epochs on the same batches, alternating (plain, fit, plain, fit, ...) so that drift of the
machine hits both alike; the overhead is the ratio of the two medians. Goal: at most 5%.
Not collected by pytest (timings are noisy and belong here, not in tests).
"""
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from dlopt_labs.core import seed_everything
from dlopt_labs.data import load, split, loaders
from dlopt_labs.models import MLP, SmallCNN
from dlopt_labs.training import fit


def plain_loop(model, dl, epochs, lr):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for xb, yb in dl:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()


def case(name, make_model, dl, epochs, rounds):
    plain, ours = [], []
    for r in range(rounds + 1):                     # round 0 warms up caches and allocator, and is dropped
        for runner, times in ((lambda m: plain_loop(m, dl, epochs, 1e-3), plain),
                              (lambda m: fit(m, dl, epochs=epochs, lr=1e-3, opt="adam", progress=False, device="cpu", verbose=False), ours)):
            torch.manual_seed(0); m = make_model()
            t0 = time.perf_counter(); runner(m)
            if r: times.append(time.perf_counter() - t0)
    p, f = statistics.median(plain), statistics.median(ours)
    return dict(case=name, steps=epochs * len(dl), plain_s=p, fit_s=f, overhead_pct=100 * (f / p - 1))


def main():
    seed_everything(0)
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else torch.get_num_threads())
    digits = loaders(split(load("digits")), 64)["train"]
    shapes = loaders(split(load("shapes", n=1000, size=16)), 64, images=True)["train"]
    import contextlib, io
    rows = []
    with contextlib.redirect_stdout(io.StringIO()):         # fit's one-line summaries
        rows.append(case("MLP on digits (tiny steps: worst case)", lambda: MLP(64, 10, hidden=(128, 64)), digits, 10, 21))
        rows.append(case("CNN on shapes 16x16", lambda: SmallCNN(1, 4, widths=(16, 32)), shapes, 10, 9))
    print(f"fit() against a plain PyTorch loop, same model and batches, alternating runs, {torch.get_num_threads()} threads")
    print(f"{'case':<42} {'steps':>6} {'plain s':>9} {'fit s':>9} {'overhead':>9}")
    for r in rows:
        print(f"{r['case']:<42} {r['steps']:>6} {r['plain_s']:>9.3f} {r['fit_s']:>9.3f} {r['overhead_pct']:>8.1f}%")
    worst = max(r["overhead_pct"] for r in rows)
    print(f"goal: at most 5% overhead; worst case measured {worst:.1f}% -> {'met' if worst <= 5 else 'NOT met'}")


if __name__ == "__main__":
    main()
