"""`make bench`: chapter 13's DP-SGD against Opacus, and per-sample gradients by vmap against a loop, side by side.

One DP-SGD step (Poisson batch of the expected size, per-sample gradients, clipping to C = 1, Gaussian noise with
sigma = 1, division by the expected batch, an SGD step) of the chapter's classifier (64 -> 64 -> tanh -> 10) on
the digits' training rows: the chapter's `per_sample_grads` + `clip_and_noise` against Opacus's `PrivacyEngine`
(GradSampleModule hooks and DPOptimizer) on the same Poisson batches, indexed the same way, interleaved rounds with an A/A band
(`compare_speed`), at expected batches of 64 and 256, one intra-op thread.
Goals (issue 16): a DP-SGD step at most 1.0x Opacus's time (met when the speed-up's interval lies above 1, not
met when below, inconclusive otherwise); per-sample gradients by vmap at least 10x faster than a
Python loop over the rows (met when the speed-up's lower bound clears 10). Not collected by pytest.
"""
import copy
import warnings

import torch
import torch.nn.functional as F

from dlopt_labs.debug.privacy import (clip_and_noise, digits, make_classifier, per_sample_grads,
                                      per_sample_grads_loop, poisson_batch)
from dlopt_labs.measure import compare_speed, threads


def main():
    warnings.simplefilter("ignore")
    from opacus import PrivacyEngine
    X, y = digits(0)["train"]
    with threads(1):
        for batch in (64, 256):
            q = batch / len(X)
            ours = make_classifier(64, seed=0)
            opt = torch.optim.SGD(ours.parameters(), lr=0.1)
            g = torch.Generator().manual_seed(0)

            def our_step():
                idx = poisson_batch(len(X), q, g)
                noisy = clip_and_noise(per_sample_grads(ours, X[idx], y[idx]), 1.0, 1.0, q * len(X), g)
                for n, p in ours.named_parameters():
                    p.grad = noisy[n]
                opt.step()

            theirs = copy.deepcopy(ours)
            engine = PrivacyEngine()
            loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=batch)
            model, optimizer, loader = engine.make_private(module=theirs, optimizer=torch.optim.SGD(theirs.parameters(), lr=0.1),
                                                           data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
                                                           poisson_sampling=True)
            g2 = torch.Generator().manual_seed(0)

            def opacus_step():                     # the same Poisson batches, indexed the same way
                idx = poisson_batch(len(X), q, g2)
                optimizer.zero_grad()
                F.cross_entropy(model(X[idx]), y[idx]).backward()
                optimizer.step()

            cmp = compare_speed({"Opacus": opacus_step, "chapter 13": our_step}, rounds=9, repeats=5)
            ev = cmp.evidence("chapter 13")
            print(f"expected batch {batch}: DP-SGD step, chapter 13 / Opacus speed-up {ev['speedup']:.2f} "
                  f"[{ev['speedup_lo']:.2f}, {ev['speedup_hi']:.2f}] (A/A {ev['noise_lo']:.2f}-{ev['noise_hi']:.2f}); "
                  f"median {cmp.table.loc['chapter 13', 'median_ms']:.2f} ms vs {cmp.table.loc['Opacus', 'median_ms']:.2f} ms; "
                  f"goal at most 1.0x Opacus's time: {'met' if ev['speedup_lo'] >= 1 else 'NOT met' if ev['speedup_hi'] < 1 else 'inconclusive'}")
            xb, yb = X[:batch], y[:batch]
            cmp = compare_speed({"loop": lambda: per_sample_grads_loop(ours, xb, yb),
                                 "vmap": lambda: per_sample_grads(ours, xb, yb)}, rounds=7, repeats=3)
            ev = cmp.evidence("vmap")
            print(f"batch {batch}: per-sample gradients, vmap / loop speed-up {ev['speedup']:.1f} "
                  f"[{ev['speedup_lo']:.1f}, {ev['speedup_hi']:.1f}]; goal >= 10x: "
                  f"{'met' if ev['speedup_lo'] >= 10 else 'NOT met'}")


if __name__ == "__main__":
    main()
