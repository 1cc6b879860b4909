"""`make bench`: the overhead of `dlopt_labs.training.fit` over a plain PyTorch loop on the same model and data.

Both loops train a fresh model for the same epochs on the same batches. `measure.compare_speed` times them in
interleaved rounds (a new random order each round), computes the ratio within each round, and times the plain loop a
second time as an A/A comparison: the ratio's interval and the noise band say whether a difference is real.
Goal: at most 5% overhead, judged only when the interval clears the noise band.
Not collected by pytest (timings are noisy and belong here, not in tests).
"""
import contextlib
import io
import sys

import torch
import torch.nn.functional as F

from dlopt_labs.core import seed_everything
from dlopt_labs.data import load, split, loaders
from dlopt_labs.measure import compare_speed
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
    def run_plain():
        torch.manual_seed(0); plain_loop(make_model(), dl, epochs, 1e-3)
    def run_fit():
        torch.manual_seed(0)
        with contextlib.redirect_stdout(io.StringIO()):      # fit's one-line summary
            fit(make_model(), dl, epochs=epochs, lr=1e-3, opt="adam", progress=False, device="cpu")
    cmp = compare_speed(dict(plain=run_plain, fit=run_fit), rounds=rounds, repeats=1, warmup=1)
    ev = cmp.evidence("fit")                                  # speed of fit relative to plain: overhead = 1/speedup - 1
    return dict(case=name, steps=epochs * len(dl), plain_s=cmp.table.loc["plain", "median_ms"] / 1e3,
                overhead_pct=100 * (1 / ev["speedup"] - 1), lo_pct=100 * (1 / ev["speedup_hi"] - 1),
                hi_pct=100 * (1 / ev["speedup_lo"] - 1), noise_pct=100 * (ev["noise_hi"] - 1))


def main():
    seed_everything(0)
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else torch.get_num_threads())
    digits = loaders(split(load("digits")), 64)["train"]
    shapes = loaders(split(load("shapes", n=1000, size=16)), 64, images=True)["train"]
    rows = [case("MLP on digits (tiny steps: worst case)", lambda: MLP(64, 10, hidden=(128, 64)), digits, 30, 15),
            case("CNN on shapes 16x16", lambda: SmallCNN(1, 4, widths=(16, 32)), shapes, 10, 9)]
    print(f"fit() against a plain PyTorch loop: same model and batches, interleaved rounds, {torch.get_num_threads()} threads")
    print(f"{'case':<40} {'steps':>6} {'plain s':>8} {'overhead':>9} {'95% interval':>18} {'A/A noise':>10}")
    verdicts = []
    for r in rows:
        # the goal is judged only when the interval clears 5% widened by the noise band (as the chapters judge speed)
        met = r["hi_pct"] <= 5 - r["noise_pct"]
        missed = r["lo_pct"] > 5 + r["noise_pct"]
        verdicts.append("met" if met else "NOT met" if missed else "inconclusive")
        print(f"{r['case']:<40} {r['steps']:>6} {r['plain_s']:>8.3f} {r['overhead_pct']:>8.1f}% "
              f"[{r['lo_pct']:>6.1f}%, {r['hi_pct']:>5.1f}%] {'±':>3}{r['noise_pct']:>5.1f}%  {verdicts[-1]}")
    print("goal: at most 5% overhead -> " + ", ".join(verdicts))


if __name__ == "__main__":
    main()
