"""Cost of the refinement passes, per model: a thin caller of `studio bench` (studio/bench.py).

    python benchmarks/refine_overhead.py [--models toyworld tiny] [--repeats 3] [--threads 1]

The same as, per model: studio bench --model M --cases refine --rounds REPEATS --threads T --tune-steps 0. Face VCD
uses the subject's box track as its region (detector: boxes), Tiled VCD its defaults (x2, strength 0.2, tiles of
the model's size); each is a paired ratio to the boxed render it refines.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["toyworld", "tiny"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    from studio import bench

    for model in args.models:
        print(bench.table(bench.run(bench.BenchConfig(model=model, cases=bench.REFINE_CASES, rounds=args.repeats,
                                                      threads=args.threads, tune_steps=0))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
