"""`make bench`: activation checkpointing (chapter 17) on a model deep enough to show it, side by side in one run.

A deep MLP (32 Linear layers of 256 units, batch 4096: activations far larger than the weights), trained one step at a
time plain, with the chapter's `checkpointed` over sqrt(layers) segments, and with `torch.utils.checkpoint`
(use_reentrant=False) over the same segments.
- memory: the forward pass's saved activations and the whole step's peak, each configuration in a process of its own
  forked from this one before any training ran here (`peak_memory(exact(...), warmup=1)`);
- time: one training step, interleaved rounds with an A/A noise band (`compare_speed`).
Goal: the activation memory cut by at least 40% for at most 40% more step time, the time judged only when its interval
clears the threshold widened by the noise band. Not collected by pytest.
"""
import math
import sys

import torch
import torch.nn.functional as F

from dlopt_labs.measure import compare_speed, peak_memory
from dlopt_labs.speed.memory import checkpoint_sequential, deep_mlp, exact


def main():
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    torch.manual_seed(0)
    depth, width, batch = 32, 256, 4096
    model = deep_mlp(depth, width)
    x, y = torch.randn(batch, width), torch.randint(10, (batch,))
    n = round(math.sqrt(len(model)))
    configs = {"plain": (0, False), f"ours, {n} segments": (n, False), f"torch.utils.checkpoint, {n} segments": (n, True)}

    def forward(segments, use_torch):
        def run():
            out = model(x) if not segments else checkpoint_sequential(model, x, segments, use_torch)
            return out.sum().detach().item()
        return run

    def step(segments, use_torch):
        def run():
            model.zero_grad(set_to_none=True)
            out = model(x) if not segments else checkpoint_sequential(model, x, segments, use_torch)
            F.cross_entropy(out, y).backward()
        return run

    memory = {name: (peak_memory(exact(forward(*c)), warmup=1, device="cpu"),
                     peak_memory(exact(step(*c)), warmup=1, device="cpu"))
              for name, c in configs.items()}
    timing = compare_speed({name: step(*c) for name, c in configs.items()}, rounds=7, repeats=1, warmup=1)
    print(f"activation checkpointing: {len(model)} layers, width {width}, batch {batch}, {torch.get_num_threads()} thread(s)")
    print(f"{'configuration':<36} {'activations MiB':>16} {'ratio':>6} {'step peak MiB':>14} {'ratio':>6} "
          f"{'step time ratio':>16} {'95% interval':>16}")
    plain_fwd, plain_step = memory["plain"]
    noise = timing.noise[1] - 1
    verdicts = []
    for name in configs:
        fwd, stp = memory[name]
        ev = timing.evidence(name) if name != "plain" else dict(speedup=1.0, speedup_lo=1.0, speedup_hi=1.0)
        t, t_lo, t_hi = 1 / ev["speedup"], 1 / ev["speedup_hi"], 1 / ev["speedup_lo"]
        print(f"{name:<36} {fwd:>16.1f} {fwd / plain_fwd:>6.2f} {stp:>14.1f} {stp / plain_step:>6.2f} "
              f"{t:>16.2f} [{t_lo:>5.2f}, {t_hi:>5.2f}]")
        if name != "plain":
            memory_met = fwd / plain_fwd <= 0.6
            time_met, time_missed = t_hi <= 1.4 - noise, t_lo > 1.4 + noise
            time = "met" if time_met else "NOT met" if time_missed else "inconclusive"
            verdicts.append(f"{name}: memory {'met' if memory_met else 'NOT met'}, time {time}")
    print(f"A/A noise band: ±{100 * noise:.1f}%")
    print("goal: activations cut by >= 40% for <= 40% more step time -> " + "; ".join(verdicts))


if __name__ == "__main__":
    main()
