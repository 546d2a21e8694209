"""Render time with the machine idle and with one core busy, for 1 thread, 2 threads and the studio's choice.

    python benchmarks/threads.py [--rounds 7] [--steps 20] [--extra 2:PASSIVE] [--target 1.5]

Each setting renders in a worker process of its own (libgomp reads OMP_WAIT_POLICY once, when torch loads):
- "1 thread", "2 threads": torch imported before the studio, so libgomp's default wait policy (spin ~3 ms, then
  sleep), and torch.set_num_threads(n): what the studio did before it chose;
- "chosen": a normal studio start-up (`import studio` sets the wait policy, studio.threads.apply() the count);
- `--extra N:POLICY` adds other settings (e.g. 2:PASSIVE, 1:ACTIVE) for comparison.
Each worker loads the embedded toy-world model and renders its opening shot (presets/shots/toyworld-star.yaml,
20 steps) once to warm up. Then, per round, every setting (in an order that rotates by round) renders once idle
and once with one core busy: a child process spinning in a Python loop, started 0.3 s before the render and
killed after it. Times are wall-clock seconds of the render in the worker; the table gives per setting the median
and quartiles over the rounds, and busy/idle is the median of the per-round ratios.

The target (exit 1 if missed): the chosen setting's busy median within --target (1.5) x the better busy median of
1 and 2 threads. On a machine that other jobs also load, "idle" is not idle: the script prints the load average
before and after, and pairs each idle render with a busy one of the same round.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHOT = ROOT / "presets" / "shots" / "toyworld-star.yaml"


def worker(threads: int | None, policy: str | None, steps: int) -> None:
    """A render server on stdin/stdout: one line in ("render"), one JSON line out ({"seconds": ...})."""
    sys.path.insert(0, str(ROOT))
    if threads is None:  # the studio's own start-up: the wait policy from `import studio`, the count from apply()
        import studio  # noqa: F401
        from studio import threads as threadlib

        choice = threadlib.apply()
        label = {"threads": choice.threads, "policy": threadlib.wait_policy(), "how": choice.describe()}
    else:  # a fixed setting: the policy (or libgomp's default) in the environment before torch loads
        if policy:
            os.environ["OMP_WAIT_POLICY"] = policy
        else:
            os.environ.pop("OMP_WAIT_POLICY", None)
        import torch

        torch.set_num_threads(threads)
        from studio import threads as threadlib

        label = {"threads": threads, "policy": threadlib.wait_policy(), "how": "fixed"}
    from studio import engine, shot as shotlib
    from studio.pipelines import PipelineManager

    manager = PipelineManager(device="cpu")
    shot = shotlib.load(SHOT, [f"steps={steps}"])
    engine.render(shot, manager)  # warm-up: load, caches
    print(json.dumps({"ready": label}), flush=True)
    for line in sys.stdin:
        if line.strip() != "render":
            break
        t0 = time.perf_counter()
        engine.render(shot, manager)
        print(json.dumps({"seconds": time.perf_counter() - t0}), flush=True)


class Worker:
    def __init__(self, name: str, threads: int | None, policy: str | None, steps: int):
        args = [sys.executable, __file__, "--worker", "--steps", str(steps)]
        if threads is not None:
            args += ["--threads", str(threads)] + (["--policy", policy] if policy else [])
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS",
                                                                 "SHOT_STUDIO_THREADS")}
        self.name = name
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                     cwd=ROOT)
        self.label = json.loads(self.proc.stdout.readline())["ready"]

    def render(self) -> float:
        self.proc.stdin.write("render\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["seconds"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


def busy_core():
    """A child process keeping one core busy (a Python loop)."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def main(argv=None) -> int:
    sys.path.insert(0, str(ROOT))
    from studio.bench import quartiles  # light: no torch (the workers get their own environment)

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--extra", action="append", default=[], metavar="N:POLICY",
                   help="another setting to time, e.g. 2:PASSIVE (policy ACTIVE, PASSIVE or default)")
    p.add_argument("--target", type=float, default=1.5)
    p.add_argument("--json", help="also write the times here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    p.add_argument("--policy", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.threads, args.policy, args.steps)
        return 0

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # killed: still stop the spinner and the workers
    settings = [("1 thread", 1, None), ("2 threads", 2, None), ("chosen", None, None)]
    for e in args.extra:
        n, _, policy = e.partition(":")
        policy = None if policy.lower() in ("", "default") else policy.upper()
        settings.append((f"{n} threads {policy or 'default'}", int(n), policy))
    load0 = os.getloadavg()
    print(f"cores {os.cpu_count()}, affinity {len(os.sched_getaffinity(0))}, load average {load0[0]:.2f} "
          f"{load0[1]:.2f} {load0[2]:.2f}; {args.rounds} rounds, {args.steps} steps", flush=True)
    workers = [Worker(name, n, policy, args.steps) for name, n, policy in settings]
    for w in workers:
        print(f"  {w.name:22s} {w.label}", flush=True)
    times = {w.name: {"idle": [], "busy": []} for w in workers}
    try:
        for r in range(args.rounds):
            order = workers[r % len(workers):] + workers[:r % len(workers)]
            for w in order:
                times[w.name]["idle"].append(w.render())
                spinner = busy_core()
                try:
                    time.sleep(0.3)
                    times[w.name]["busy"].append(w.render())
                finally:
                    spinner.kill()
                    spinner.wait()
            print(f"round {r + 1}: " + ", ".join(f"{w.name} {times[w.name]['idle'][-1]:.2f}/"
                                                  f"{times[w.name]['busy'][-1]:.2f}" for w in workers), flush=True)
    finally:
        for w in workers:
            w.close()
    load1 = os.getloadavg()
    print(f"\nload average after: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    print(f"\n{'setting':24s} {'threads':>7s} {'policy':>8s} | {'idle s (q1 med q3)':>20s} | "
          f"{'one core busy s (q1 med q3)':>27s} | busy/idle")
    summary = {}
    for w in workers:
        idle, busy = times[w.name]["idle"], times[w.name]["busy"]
        ratio = statistics.median(b / i for i, b in zip(idle, busy))
        qi, qb = quartiles(idle), quartiles(busy)
        summary[w.name] = {"label": w.label, "idle": idle, "busy": busy, "idle_median": qi[1], "busy_median": qb[1],
                           "busy_over_idle": ratio}
        print(f"{w.name:24s} {w.label['threads']:>7d} {str(w.label['policy'])[:8]:>8s} | "
              f"{qi[0]:6.2f} {qi[1]:6.2f} {qi[2]:6.2f} | {qb[0]:8.2f} {qb[1]:8.2f} {qb[2]:8.2f}  | {ratio:5.2f}")
    best = min(summary["1 thread"]["busy_median"], summary["2 threads"]["busy_median"])
    chosen = summary["chosen"]["busy_median"]
    ok = chosen <= args.target * best
    print(f"\nchosen ({workers[2].label['how']}, wait policy {workers[2].label['policy']}) with one core busy: "
          f"{chosen:.2f} s = {chosen / best:.2f} x the better of 1 and 2 threads ({best:.2f} s); target "
          f"{args.target}: {'met' if ok else 'NOT met'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"load_before": load0, "load_after": load1, "settings": summary},
                                              indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
