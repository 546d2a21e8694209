"""Overhead of the shot controls, per model: a thin caller of `studio bench` (studio/bench.py), which does the
measuring (paired per-round ratios of CPU seconds on fixed threads, median and quartiles).

    python benchmarks/controls_overhead.py [--models tiny toyworld] [--repeats 11] [--threads 1] [--target 1.05]
                                           [--each]

The same as, per model: studio bench --model M --cases "plain,all controls" (--each: --cases controls)
--rounds REPEATS --threads T --tune-steps 0. Exits 1 when a model's all-controls ratio is above --target.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["tiny", "toyworld"])
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--target", type=float, default=1.05)
    ap.add_argument("--each", action="store_true", help="also time each control alone")
    args = ap.parse_args(argv)
    from studio import bench

    cases = bench.CONTROL_CASES if args.each else ("plain", "all controls")
    worst = 0.0
    for model in args.models:
        res = bench.run(bench.BenchConfig(model=model, cases=cases, rounds=args.repeats, threads=args.threads,
                                          tune_steps=0))
        print(bench.table(res))
        worst = max(worst, res["cases"]["all controls"]["ratio"]["median"])
    ok = worst <= args.target
    print(f"worst all-controls ratio {worst:.3f} (target <= {args.target:.2f}): {'ok' if ok else 'ABOVE TARGET'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
