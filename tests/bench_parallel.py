"""`make bench`: dynamic batching against one-by-one serving (chapter 18), side by side in one run.

The chapter's served model (an MLP 64-2048-2048-10, one intra-op thread), behind `BatchingServer` with max_batch=1
(one by one) and with max_batch=64, max-wait 2 ms (dynamic batching). Both face the same open-loop Poisson load,
rates climbing by sqrt(2) from 250 requests/s, one second each, until p99 latency exceeds 25 ms or a request goes
unanswered; a server's capacity is the last rate it sustained. Repeated three times, servers alternating.
Goal (issue 14): dynamic batching sustains at least 3x the one-by-one capacity at the same p99 limit; met only when
the smallest of the three ratios clears it. Also: rows per second of worker processes x intra-op threads, with the
oversubscribed combinations (processes x threads > cores) beside the others (median of three interleaved rounds).
Not collected by pytest.
"""
import torch

from dlopt_labs.efficient.parallel import BatchingServer, WorkerPool, capacity, cores
from dlopt_labs.measure import threads
from dlopt_labs.models import MLP


def main():
    torch.manual_seed(0)
    model = MLP(64, 10, hidden=(2048, 2048)).eval()
    inputs = torch.randn(512, 64)
    ratios = []
    with threads(1):
        for rep in range(3):
            single, _ = capacity(lambda: BatchingServer(model, 1, 0.0), inputs, 25.0, duration=1.0, seed=rep)
            batched, _ = capacity(lambda: BatchingServer(model, 64, 2.0), inputs, 25.0, duration=1.0, seed=rep)
            ratios.append(batched / single if single else float("inf"))
            print(f"round {rep}: one by one {single:7.0f} req/s, dynamic batching {batched:7.0f} req/s, "
                  f"ratio {ratios[-1]:.2f}x")
    print(f"dynamic batching / one by one at p99 <= 25 ms: min {min(ratios):.2f}x, max {max(ratios):.2f}x; "
          f"goal >= 3x: {'met' if min(ratios) >= 3 else 'NOT met'}")
    n = cores()
    combos = sorted({(1, 1), (1, n), (n, 1), (n, n), (2 * n, 1)})
    import random
    runs = {c: [] for c in combos}
    with WorkerPool(model, max(p for p, _ in combos)) as pool:
        for rnd in range(3):                       # interleaved rounds in a random order; the median is kept
            for c in random.Random(rnd).sample(combos, len(combos)):
                runs[c].append(pool.throughput(*c, calls=50))
    rows = [sorted(rs, key=lambda r: r["rows_per_s"])[1] for rs in runs.values()]
    base = rows[0]["rows_per_s"]
    for r in rows:
        flag = "oversubscribed" if r["busy_threads"] > n else ""
        print(f"{r['processes']} processes x {r['threads']} threads: {r['rows_per_s']:9.0f} rows/s "
              f"({r['rows_per_s'] / base:.2f}x of 1 x 1) {flag}")


if __name__ == "__main__":
    main()
