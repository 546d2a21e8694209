"""Cost of the refinement passes: the same shot rendered plain, with Face VCD, with Tiled VCD, and with both.

    python benchmarks/refine_overhead.py [--models toyworld tiny] [--repeats 3]

Face VCD uses the subject's box track as its region (detector: boxes; the toy models draw no faces), Tiled VCD the
defaults (×2, strength 0.2, tiles of the model's size). Renders rotate (plain, face, tiled, both, plain, ...) after
a warm-up, so all see the same machine state; ratios are of median render times (refinement included).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def shots(model: str) -> dict:
    from studio import shot as shotlib

    base = {"model": model, "prompt": "a red circle moving right on grass", "seed": 3,
            "subjects": [{"phrase": "red circle", "boxes": {0: [0.05, 0.3, 0.4, 0.7], 7: [0.6, 0.3, 0.95, 0.7]}}]}
    face = {"enabled": True, "detector": "boxes"}
    return {"plain": shotlib.from_container(base),
            "face": shotlib.from_container({**base, "refine": {"face": face}}),
            "tiled": shotlib.from_container({**base, "refine": {"tiled": {"enabled": True}}}),
            "both": shotlib.from_container({**base, "refine": {"face": face, "tiled": {"enabled": True}}})}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["toyworld", "tiny"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = ap.parse_args(argv)
    import torch

    from studio import engine
    from studio.pipelines import PipelineManager

    if args.threads:
        torch.set_num_threads(args.threads)
    manager = PipelineManager(max_pipelines=2, device="cpu")
    for model in args.models:
        cases = shots(model)
        for s in cases.values():  # warm-up: load, and the v2v pipeline built once
            engine.render(s, manager)
        times: dict[str, list[float]] = {k: [] for k in cases}
        info = {}
        for _ in range(args.repeats):
            for k, s in cases.items():
                t = time.perf_counter()
                r = engine.render(s, manager)
                times[k].append(time.perf_counter() - t)
                info[k] = r.frames.shape
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"{model}: {args.repeats} repeats, torch threads {torch.get_num_threads()}")
        for k in cases:
            print(f"  {k:6s} {med[k]:7.2f} s  (min {min(times[k]):.2f})  ratio to plain {med[k] / med['plain']:5.2f}  "
                  f"frames {tuple(info[k])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
