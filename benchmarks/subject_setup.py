"""Set-up time of a shot with a trained subject (shot in -> first denoising step), cold vs. warm, in one run.

    python benchmarks/subject_setup.py [--model toyworld] [--repeats 5]

Cold: a new pipeline manager (the pipeline and the subject's LoRA + tokens are read from disk). Warm: the same
manager again (nothing is read: the adapter is switched on by weight). A subject is trained first (a few steps;
the quality does not matter here) into a temporary studio home. Set-up = the engine's `load` + `prepare` timings,
everything before the first UNet call. Prints medians and the cold/warm ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="toyworld")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    os.environ["SHOT_STUDIO_HOME"] = tempfile.mkdtemp(prefix="studio-bench-")

    from studio import engine, shot as shotlib
    from studio.pipelines import PipelineManager
    from studio.presets import load_model_preset
    from studio.subjects import tune
    from studio.subjects.library import SubjectLibrary
    from studio.toyworld import evaluate

    photos, masks = evaluate.subject_photos()
    d = load_model_preset(args.model).defaults
    tune.add_subject("bench", photos, masks, args.model,
                     tune.TuneSettings(method="both", class_word="star", steps=2, video_weight=0.0),
                     library=SubjectLibrary())
    shot = shotlib.from_container({"model": args.model, "prompt": "a star on sky", "steps": 2, "seed": 0,
                                   "width": d.width, "height": d.height,
                                   "subjects": [{"phrase": "star", "subject": "bench",
                                                 "boxes": {0: [0.0, 0.2, 0.5, 0.8], 7: [0.5, 0.2, 1.0, 0.8]}}]})

    def setup(r) -> float:
        return r.timings["load"] + r.timings["prepare"]

    cold, warm = [], []
    for _ in range(args.repeats):
        m = PipelineManager(max_pipelines=1, device="cpu")
        cold.append(setup(engine.render(shot, m)))
        warm.append(setup(engine.render(shot, m)))
    c, w = statistics.median(cold), statistics.median(warm)
    print(f"model {args.model}: set-up (shot in -> first denoising step), median of {args.repeats}")
    print(f"  cold (new manager: pipeline + subject weights from disk)  {c * 1000:8.1f} ms")
    print(f"  warm (same manager: adapter switched on, nothing read)    {w * 1000:8.1f} ms")
    print(f"  cold / warm = {c / w:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
