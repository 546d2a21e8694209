"""Overhead of the shot controls: the same shot rendered plain and with every control on, in one run.

    python benchmarks/controls_overhead.py [--models tiny toyworld] [--repeats 7]

Plain = prompt only. All on = a subject with a box track and a reference image, a background reference, and a
camera pan. Renders alternate (plain, controlled, plain, ...) after a warm-up, so both see the same machine state;
the ratio is of median render times (set-up included: controls build their state per render).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def reference_images(folder: Path) -> tuple[str, str]:
    """A purple square on white (subject) and a sand background, as PNG files."""
    from PIL import Image

    from studio.toyworld import world

    rng = np.random.default_rng(0)
    subject = world.render_clip("sky", [world.SubjectSpec("purple", "square", 7.0, world.make_path("still", 7.0, rng),
                                                          None)], seed=1).frames[0]
    background = world.render_clip("sand", [], seed=2).frames[0]
    paths = folder / "subject.png", folder / "background.png"
    for img, p in zip((subject, background), paths):
        Image.fromarray(img).resize((128, 128), Image.NEAREST).save(p)
    return str(paths[0]), str(paths[1])


def shots(model: str, subject_ref: str, background_ref: str):
    from studio import shot as shotlib

    base = {"model": model, "prompt": "a red circle moving right on grass", "seed": 3}
    plain = shotlib.from_container(base)
    full = shotlib.from_container({
        **base, "camera": {"cx": 0.25, "cy": 0.0},
        "subjects": [{"phrase": "red circle", "reference": subject_ref,
                      "boxes": {0: [0.05, 0.3, 0.4, 0.7], 7: [0.6, 0.3, 0.95, 0.7]}}],
        "background": {"reference": background_ref}})
    return plain, full


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["tiny", "toyworld"])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = ap.parse_args(argv)
    import torch

    from studio import engine
    from studio.pipelines import PipelineManager

    if args.threads:
        torch.set_num_threads(args.threads)
    manager = PipelineManager(max_pipelines=2, device="cpu")
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        subject_ref, background_ref = reference_images(Path(tmp))
        for model in args.models:
            plain, full = shots(model, subject_ref, background_ref)
            for s in (plain, full, plain, full):  # warm-up: load, build the caches
                engine.render(s, manager)
            times = {"plain": [], "all controls": []}
            controls = None
            for _ in range(args.repeats):
                times["plain"].append(engine.render(plain, manager).timings["total"])
                r = engine.render(full, manager)
                controls = r.info["controls"]
                times["all controls"].append(r.timings["total"])
            med = {k: statistics.median(v) for k, v in times.items()}
            ratio = med["all controls"] / med["plain"]
            worst = max(worst, ratio)
            print(f"{model:10s} {r.shot.frames} frames {r.shot.width}x{r.shot.height} {r.shot.steps} steps  "
                  f"plain {med['plain']:.3f} s  all controls {med['all controls']:.3f} s  "
                  f"ratio {ratio:.3f}  (controls: {', '.join(controls)}; median of {args.repeats})")
    print(f"worst ratio {worst:.3f} (target <= 1.10)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
