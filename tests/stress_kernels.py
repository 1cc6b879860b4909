"""Stress the kernels: run one chapter many times in parallel (smoke mode) and catch any kernel that stalls.

    python tests/stress_kernels.py [--chapter 15] [--runs 30] [--workers 3] [--stall 30]

A watcher samples every kernel's CPU time each second; a kernel whose run is not over and whose CPU time has not moved
for `--stall` seconds is dumped with py-spy (all threads, native frames included) into _artifacts/stall-<pid>.txt.
Prints, at the end: runs, failures, stalls seen, the lost wake-ups the course's kernel client recovered (each one a
stall averted, see `runner._polling_client`), and the wall time. Exit status 1 if any run failed or stalled."""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "_artifacts"


def watch(stop: threading.Event, stall_s: float, found: list):
    last = {}                                      # pid -> (cpu seconds, since when unchanged)
    while not stop.wait(1.0):
        for p in psutil.process_iter(["pid", "cmdline"]):
            if "ipykernel_launcher" not in " ".join(p.info["cmdline"] or []): continue
            try: cpu = sum(p.cpu_times()[:2])
            except psutil.Error: continue
            prev = last.get(p.pid)
            if prev is None or cpu != prev[0]: last[p.pid] = (cpu, time.monotonic()); continue
            if time.monotonic() - prev[1] >= stall_s and p.pid not in {f[0] for f in found}:
                ARTIFACTS.mkdir(exist_ok=True)
                out = ARTIFACTS / f"stall-{p.pid}.txt"
                r = subprocess.run([shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy"), "dump",
                                    "--native", "--pid", str(p.pid)], capture_output=True, text=True, timeout=60)
                out.write_text(r.stdout + r.stderr)
                found.append((p.pid, str(out)))
                print(f"stall: kernel {p.pid} used no CPU for {stall_s:.0f} s; threads dumped to {out}", flush=True)


def main():
    a = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a.add_argument("--chapter", type=int, default=15)
    a.add_argument("--runs", type=int, default=30)
    a.add_argument("--workers", type=int, default=3)
    a.add_argument("--stall", type=float, default=30.0)
    a.add_argument("--timeout", type=int, default=120, help="per-cell limit of each run")
    args = a.parse_args()
    from dlopt_labs.course.runner import RunResult, parallel, _run_job
    stop, found = threading.Event(), []
    wakeups = Path(tempfile.mkdtemp(prefix="wakeups-")) / "log"
    os.environ["DLOPT_WAKEUP_LOG"] = str(wakeups)          # the runs' kernel clients count the wake-ups they recovered
    t = threading.Thread(target=watch, args=(stop, args.stall, found), daemon=True); t.start()
    out = Path(tempfile.mkdtemp(prefix="stress-"))
    kw = dict(mode="smoke", params={}, timeout=args.timeout, retries=0, env=dict(OMP_NUM_THREADS="1"))
    t0 = time.perf_counter()
    jobs = [(args.chapter, dict(kw, out=out / f"run{i:02d}")) for i in range(args.runs)]
    results: list[RunResult] = parallel(_run_job, jobs, args.workers, progress=True, desc=f"chapter {args.chapter} x{args.runs}")
    wall = time.perf_counter() - t0
    stop.set()
    bad = [r for r in results if not r.ok]
    secs = sorted(r.seconds for r in results)
    recovered = len(wakeups.read_text().splitlines()) if wakeups.exists() else 0
    print(f"{args.runs} runs of chapter {args.chapter}, {args.workers} at a time: {len(bad)} failed, {len(found)} stalled, "
          f"{recovered} lost wake-ups recovered by the kernel client; "
          f"run time min {secs[0]:.1f} s, median {secs[len(secs) // 2]:.1f} s, max {secs[-1]:.1f} s; wall {wall:.0f} s")
    for r in bad: print(f"  failed: {r.error}")
    shutil.rmtree(out, ignore_errors=True)
    return 1 if bad or found else 0


if __name__ == "__main__": sys.exit(main())
