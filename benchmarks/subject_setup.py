"""Tuning speed and the set-up of a shot with a trained subject (shot in -> first denoising step), cold vs. warm:
a thin caller of `studio bench` (studio/bench.py), which trains each method a few steps and measures both.

    python benchmarks/subject_setup.py [--model toyworld] [--steps 4] [--threads 1]

The same as: studio bench --model M --cases plain --rounds 1 --tune-steps STEPS --threads T. Cold: a new pipeline
manager (the pipeline and the subject's LoRA read from disk); warm: the same manager again (switched on by weight).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="toyworld")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    from studio import bench

    res = bench.run(bench.BenchConfig(model=args.model, cases=("plain",), rounds=1, threads=args.threads,
                                      tune_steps=args.steps))
    print(bench.table(res))
    setup = res["tuning"]["setup"]
    print(f"subject set-up: cold {setup['cold_s'] * 1000:.1f} ms, warm {setup['warm_s'] * 1000:.1f} ms, "
          f"cold / warm = {setup['cold_s'] / setup['warm_s']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
