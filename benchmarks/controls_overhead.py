"""Overhead of the shot controls: the same shot rendered plain and with every control on, in one run.

    python benchmarks/controls_overhead.py [--models tiny toyworld] [--repeats 11] [--threads 1] [--target 1.10]
                                           [--each]

Plain = prompt only. All on = a subject with a box track and a reference image, a background reference, and a
camera pan. `--each` also times each control alone. Renders alternate (plain, controlled, plain, ...) after a
warm-up, so both see the same machine state. Each render is timed in CPU seconds of this process
(time.process_time, set-up included: controls build their state per render) with a fixed number of torch threads,
so other programs on a shared machine change the ratio less than they change wall-clock time. Single renders still
vary by ±4% on a virtual machine, so the ratio is paired: each round divides a case's time by the plain render's
of the same round, and the ratio printed is the median of those per-round ratios (with their quartiles), which a
slow spell of the machine shifts less than a ratio of medians. The exit status is 1 when any model's all-controls
ratio is above --target.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
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


def shots(model: str, subject_ref: str, background_ref: str, each: bool = False) -> dict:
    """{case name: shot}: "plain", "all controls" and, with each, every control alone."""
    from studio import shot as shotlib

    base = {"model": model, "prompt": "a red circle moving right on grass", "seed": 3}
    camera = {"camera": {"cx": 0.25, "cy": 0.0}}
    boxes = {"boxes": {0: [0.05, 0.3, 0.4, 0.7], 7: [0.6, 0.3, 0.95, 0.7]}}
    references = {"subjects": [{"phrase": "red circle", "reference": subject_ref}],
                  "background": {"reference": background_ref}}
    cases = {"plain": base,
             "all controls": {**base, **camera, "background": references["background"],
                              "subjects": [{"phrase": "red circle", "reference": subject_ref, **boxes}]}}
    if each:
        cases.update({"boxes": {**base, "subjects": [{"phrase": "red circle", **boxes}]},
                      "camera": {**base, **camera},
                      "references": {**base, **references}})
    return {name: shotlib.from_container(c) for name, c in cases.items()}


def cpu_seconds(render) -> tuple[float, object]:
    """(CPU seconds of this process spent in render(), its result)."""
    t0 = time.process_time()
    out = render()
    return time.process_time() - t0, out


def measure(model: str, manager, cases: dict, repeats: int) -> dict:
    """{case: per-round CPU seconds} plus "_result": the last all-controls render (for its size and controls)."""
    from studio import engine

    for shot in list(cases.values()) * 2:  # warm-up: load, build the caches
        engine.render(shot, manager)
    times: dict[str, list[float]] = {name: [] for name in cases}
    last = None
    for _ in range(repeats):
        for name, shot in cases.items():  # interleaved, so a slow spell of the machine hits every case
            seconds, result = cpu_seconds(lambda: engine.render(shot, manager))
            times[name].append(seconds)
            if name == "all controls":
                last = result
    return {**times, "_result": last}


def paired(times: list[float], plain: list[float]) -> tuple[float, float, float]:
    """(median, first quartile, third quartile) of the per-round ratios times[i] / plain[i]."""
    ratios = sorted(t / p for t, p in zip(times, plain))
    q1, q2, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return q2, q1, q3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["tiny", "toyworld"])
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--threads", type=int, default=1, help="torch threads, fixed for the whole run (default 1)")
    ap.add_argument("--target", type=float, default=1.10, help="highest all-controls ratio that passes (1.10)")
    ap.add_argument("--each", action="store_true", help="also time each control alone")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import torch

    from studio.pipelines import PipelineManager

    if args.threads < 1:
        ap.error("--threads must be >= 1")
    torch.set_num_threads(args.threads)
    manager = PipelineManager(max_pipelines=2, device="cpu")
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        subject_ref, background_ref = reference_images(Path(tmp))
        for model in args.models:
            times = measure(model, manager, shots(model, subject_ref, background_ref, args.each), args.repeats)
            r = times.pop("_result")
            plain = times.pop("plain")
            ratio, q1, q3 = paired(times["all controls"], plain)
            worst = max(worst, ratio)
            print(f"{model:10s} {r.shot.frames} frames {r.shot.width}x{r.shot.height} {r.shot.steps} steps, "
                  f"{args.threads} thread(s): plain {statistics.median(plain):.3f} CPU s  all controls "
                  f"{statistics.median(times['all controls']):.3f} CPU s  ratio {ratio:.3f} (quartiles {q1:.3f}-{q3:.3f})"
                  f"  (controls: {', '.join(r.info['controls'])}; {args.repeats} rounds)")
            for name, seconds in times.items():
                if name != "all controls":
                    print(f"{'':10s}   {name:12s} alone: ratio {paired(seconds, plain)[0]:.3f}")
    ok = worst <= args.target
    print(f"worst ratio {worst:.3f} (target <= {args.target:.2f}): {'ok' if ok else 'ABOVE TARGET'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
