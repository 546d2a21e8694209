"""Does a camera pan hold per render? Pans on the embedded toy-world model, each render measured on its own.

    python benchmarks/pan_hold.py [--set main|holdout] [--config NAME=KEY=V,KEY=V ...] [--seeds 4] [--threads 1]
                                  [--json out.json] [--frames DIR]

The main set is 4 prompts on textured backgrounds (grass, sand: the per-render pan measure needs texture; sky has
little) × 4 directions (cx or cy = ±0.5) × `--seeds` seeds (default 4: 64 renders); `--set holdout` is 8 other
pans (2 prompts × 4 directions; one seed per prompt and axis) kept aside from the tuning (the per-render test in
tests/test_controls_semantic.py renders the same 8). Every (prompt, seed) is also rendered
without a pan, for the blob count. Each configuration (`--config name=camera.noise_warp=0.6,camera.start_step=2`;
shot-field overrides as `studio render --set` takes them) renders the whole set. Per configuration it prints:

- took: share of renders whose background moved the right way by at least half the request (studio.measures:
  the content motion with subject-coloured pixels left out, its component along the requested motion / the
  requested speed >= 0.5); right way: that ratio > 0;
- ratio: mean of that per-render ratio (1 = as asked);
- frame took / ratio: the same measured on the whole frame, subjects included: what issue 22 quoted (62%, 0.68
  before), dominated by the subject's strong edges and any copies of it, which move on their own (the model makes
  subjects drift), so it is reported, not the criterion;
- subject: the subject's own centroid motion along the request (as a share of it), panned minus unpanned, mean
  over renders: whether the subject travels with the world;
- blobs: mean per frame of connected regions of the prompt's subject colour, panned vs the same shot without pan,
  and the share of renders with more regions in some frame than the unpanned render has in any;
- right background: share of frames whose median colour is the prompt's background (a warp too strong turns sand
  blue);
- measure cost: the seconds the engine spent on the render's measures (sidecar `measures`) over the seconds of the
  rest of that render, median over the renders.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MAIN_PROMPTS = ("a red circle on grass", "a white square on sand", "a yellow star on grass",
                "a purple triangle on sand")
HOLDOUT_PROMPTS = ("a yellow circle on sand", "a red square on grass")
DIRECTIONS = ((0.5, 0.0), (-0.5, 0.0), (0.0, 0.5), (0.0, -0.5))
# The configuration before issue 22: no warp, MotionBooth's window (from 20% of the steps, for 20%).
BEFORE = {"camera.noise_warp": 0.0, "camera.fill": "row", "camera.start_step": 4, "camera.shift_steps": 4}


def jobs(which: str, seeds: int) -> list[dict]:
    """[{prompt, seed, cx, cy}] of a set."""
    if which == "main":
        return [{"prompt": p, "seed": s, "cx": cx, "cy": cy} for p in MAIN_PROMPTS for s in range(seeds)
                for cx, cy in DIRECTIONS]
    return [{"prompt": p, "seed": 100 + 10 * i + d // 2, "cx": cx, "cy": cy} for i, p in enumerate(HOLDOUT_PROMPTS)
            for d, (cx, cy) in enumerate(DIRECTIONS)]


def parse_config(text: str) -> tuple[str, dict]:
    name, _, rest = text.partition("=")
    out = {}
    for item in filter(None, rest.split(",")):
        k, _, v = item.partition("=")
        out[k.strip()] = v.strip()
    return name, out


def render(manager, job: dict, overrides: dict, pan: bool = True) -> tuple:
    """(frames, resolved shot, render s without the measures, the render's measures, measure s)."""
    from studio import engine, shot as shotlib

    data = {"model": "toyworld", "prompt": job["prompt"], "seed": job["seed"],
            "camera": {"cx": job["cx"] if pan else 0.0, "cy": job["cy"] if pan else 0.0}}
    sets = [f"{k}={v}" for k, v in overrides.items()] if pan else []
    shot = shotlib.from_container(data, sets)
    r = engine.render(shot, manager)
    t = r.timings
    return r.frames, r.shot, t["total"] - t["measure"], r.measures, t["measure"]


def subject_velocity(frames: np.ndarray, colour: str) -> np.ndarray:
    """(2,) px/frame: the subject's centroid (found by its toy-world colour) from the first to the last frame it is
    seen in (zero when seen in fewer than 2 frames)."""
    from studio.toyworld import evaluate

    track = evaluate.subject_track(frames, colour)  # (F, 2), NaN where not found
    seen = np.nonzero(~np.isnan(track).any(1))[0]
    if len(seen) < 2:
        return np.zeros(2)
    return (track[seen[-1]] - track[seen[0]]) / (seen[-1] - seen[0])


def score(frames: np.ndarray, plain: np.ndarray, job: dict) -> dict:
    from studio import measures
    from studio.metrics import subject_colour
    from studio.toyworld import evaluate

    F, H, W, _ = frames.shape
    want = measures.requested_motion(job["cx"], job["cy"], F, H, W)
    reach = max(4, int(np.ceil(np.abs(want).max())) + 3)
    bg = measures.content_motion(frames, measures.subject_pixels(frames), reach).mean(0)
    whole = measures.content_motion(frames, None, reach).mean(0)
    colour = subject_colour(job["prompt"])
    blobs, blobs0 = measures.blobs(frames, colour), measures.blobs(plain, colour)
    background = job["prompt"].split()[-1]
    return {"background": float(np.mean([evaluate.classify_background(f[None]) == background for f in frames])),
            "subject_ratio": measures.pan_ratio(subject_velocity(frames, colour), want),
            "subject_ratio_plain": measures.pan_ratio(subject_velocity(plain, colour), want),
            "ratio": measures.pan_ratio(bg, want), "frame_ratio": measures.pan_ratio(whole, want),
            "achieved": bg.round(3).tolist(), "requested": want.round(3).tolist(),
            "blobs": float(blobs.mean()), "blobs_plain": float(blobs0.mean()),
            "more_blobs": bool(blobs.max() > blobs0.max())}


def summarise(rows: list[dict]) -> dict:
    r = np.array([x["ratio"] for x in rows])
    fr = np.array([x["frame_ratio"] for x in rows])
    return {"n": len(rows), "took": float((r >= 0.5).mean()), "right_way": float((r > 0).mean()),
            "ratio": float(r.mean()), "ratio_min": float(r.min()), "frame_took": float((fr >= 0.5).mean()),
            "frame_ratio": float(fr.mean()), "blobs": float(np.mean([x["blobs"] for x in rows])),
            "blobs_plain": float(np.mean([x["blobs_plain"] for x in rows])),
            "more_blobs": float(np.mean([x["more_blobs"] for x in rows])),
            "background": float(np.mean([x["background"] for x in rows])),
            "subject": float(np.mean([x["subject_ratio"] - x["subject_ratio_plain"] for x in rows])),
            "measure_cost": float(statistics.median(x["measure_s"] / x["render_s"] for x in rows))}


def table(results: dict) -> str:
    lines = ["| configuration | renders | took (>= half) | right way | mean ratio | min ratio | frame: took / ratio "
             "| subject | blobs/frame (no pan) | renders with more blobs | right background | measure cost |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in results.items():
        lines.append(f"| {name} | {s['n']} | {s['took']:.0%} | {s['right_way']:.0%} | {s['ratio']:.2f} | "
                     f"{s['ratio_min']:.2f} | {s['frame_took']:.0%} / {s['frame_ratio']:.2f} | {s['subject']:.2f} | {s['blobs']:.2f} "
                     f"({s['blobs_plain']:.2f}) | {s['more_blobs']:.0%} | {s['background']:.0%} | {s['measure_cost']:.1%} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--set", dest="which", choices=("main", "holdout"), default="main")
    ap.add_argument("--config", action="append", default=[],
                    help="NAME=KEY=V,KEY=V (shot overrides); default: before and after (the shot defaults)")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--frames", type=Path, help="save every render's frames here (.npy)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import torch

    torch.set_num_threads(args.threads)
    from studio.pipelines import PipelineManager

    manager = PipelineManager(max_pipelines=1, device="cpu")
    configs = dict(parse_config(c) for c in args.config) or {
        "before": {k: str(v) for k, v in BEFORE.items()}, "after (defaults)": {}}
    todo = jobs(args.which, args.seeds)
    plain = {}
    for job in todo:
        key = (job["prompt"], job["seed"])
        if key not in plain:
            plain[key] = render(manager, job, {}, pan=False)[0]
            if args.frames:
                args.frames.mkdir(parents=True, exist_ok=True)
                np.save(args.frames / f"plain-{job['seed']}-{job['prompt'].replace(' ', '_')}.npy", plain[key])
    results, per_render = {}, {}
    for name, overrides in configs.items():
        rows = []
        for job in todo:
            frames, _, render_s, _, measure_s = render(manager, job, overrides)
            row = {**job, **score(frames, plain[(job["prompt"], job["seed"])], job), "render_s": render_s,
                   "measure_s": measure_s}
            rows.append(row)
            if args.frames:
                np.save(args.frames / f"{name}-{job['seed']}-{job['cx']}-{job['cy']}-"
                                      f"{job['prompt'].replace(' ', '_')}.npy", frames)
        results[name] = summarise(rows)
        per_render[name] = rows
        print(f"{name}: {json.dumps({k: round(v, 3) for k, v in results[name].items()})}", flush=True)
    print(f"\n{args.which} set, toyworld model, 20 steps, {args.threads} torch thread(s)\n")
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps({"set": args.which, "configs": configs, "summary": results,
                                         "renders": per_render}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
