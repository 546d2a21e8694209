"""Does a taught subject look like its photos? Subject-training settings on the embedded model, measured.

For three looks the toy world never shows (two-tone: a star yellow on its right half and purple on its left;
striped: yellow and purple stripes; checkered: red and white checks; photos drawn by the world's own renderer,
studio.toyworld.evaluate.subject_photos), first the VAE's ceiling (its reconstruction of the photos), then, per
training configuration and training seed, a subject trained with `tune.add_subject` and rendered by name in
"a star on sky" with a left-to-right box track:

- distance: the sliced Wasserstein distance (RGB, 0..1) of the subject's pixels inside its box to the photos'
  subject colours (evaluate.sliced_distance / subject_pixels), mean over the render seeds, divided by the untuned
  model's distance on the same renders (ratio < 1: closer to the photos than the untuned model);
- hit: the box hit rate of the look's colours (frames whose centroid is in the requested box);
- train s: the training's wall-clock seconds on the given threads.

    python benchmarks/likeness.py [--configs default,both-80] [--looks striped] [--seeds 0,1] [--render-seeds 0,1,2]
                                  [--threads 1] [--json out.json] [--log runs.jsonl]

A configuration is a named set of tune.TuneSettings fields (CONFIGS; "default" is the preset's defaults as
tune.defaults gives them). Rows are printed as they finish and appended to --log (JSON lines), so a long sweep
that is stopped keeps what it measured; --from-log prints the table of such a log without training anything.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Named settings (fields of tune.TuneSettings; unset fields are the preset's defaults; each names its caption form,
# so a name means the same settings whatever the defaults are).
PHOTO = "a photo of a {phrase}"  # the caption form the second round chose


def lora(steps: int = 80, lr: float = 6e-3, caption: str = PHOTO, rank: int = 8, **fields) -> dict:
    """A LoRA configuration (more TuneSettings fields in `fields`)."""
    return dict(method="lora", steps=steps, lr=lr, rank=rank, caption=caption, **fields)


CONFIGS = {
    "default": {},
    # first round: method, steps, lr, rank, targets, λ1, caption form (photos mirrored: the default then)
    "lora-80": lora(caption="a {phrase}"),
    "lora-160": lora(160, caption="a {phrase}"),
    "lora-80-lr1.2e-2": lora(lr=1.2e-2, caption="a {phrase}"),
    "lora-80-r16": lora(caption="a {phrase}", rank=16),
    "lora-80-cross": lora(caption="a {phrase}", lora_targets="cross"),
    "lora-80-nopres": lora(caption="a {phrase}", video_weight=0.0),
    "lora-80-pres0.5": lora(caption="a {phrase}", video_weight=0.5),
    "lora-80-photo": lora(),
    "lora-120-lr1.2e-2": lora(120, 1.2e-2, caption="a {phrase}"),
    "lora-80-conv": lora(lora_targets="conv"),
    "lora-160-conv": lora(160, lora_targets="conv"),
    "lora-80-conv-lr3e-3": lora(lr=3e-3, lora_targets="conv"),
    "lora-160-photo": lora(160),
    "lora-120-photo": lora(120),
    "tokens-200": dict(method="tokens", steps=200, token_lr=5e-3, caption="a {phrase}"),
    "tokens-200-lr2e-2": dict(method="tokens", steps=200, token_lr=2e-2, caption="a {phrase}"),
    "both-80": dict(method="both", steps=80, lr=6e-3, token_lr=5e-3, rank=8, caption="a {phrase}"),
    "both-120": dict(method="both", steps=120, lr=6e-3, token_lr=5e-3, rank=8, caption="a {phrase}"),
    "both-160": dict(method="both", steps=160, lr=6e-3, token_lr=5e-3, rank=8, caption="a {phrase}"),
    "both-80-tlr2e-2": dict(method="both", steps=80, lr=6e-3, token_lr=2e-2, rank=8, caption="a {phrase}"),
    "both-80-photo": dict(method="both", steps=80, lr=6e-3, token_lr=5e-3, rank=8, caption=PHOTO),
    # second round: photos not mirrored
    "lora-80-noflip": lora(flip=False),
    "lora-120-noflip": lora(120, flip=False),
    "lora-80-conv-noflip": lora(lora_targets="conv", flip=False),
    # third round: why seeds differ (augmentations, batch, λ1, learning-rate schedule, draws, slower rate)
    "lora-80-aug-noflip": lora(flip=False, augment=True),
    "lora-160-aug-noflip": lora(160, flip=False, augment=True),
    "lora-80-pres0.5-noflip": lora(flip=False, video_weight=0.5),
    "lora-80-b8-noflip": lora(flip=False, batch=8),
    "lora-80-cos": lora(flip=False, lr_schedule="cosine"),
    "lora-80-cos-lr1.2e-2": lora(lr=1.2e-2, flip=False, lr_schedule="cosine"),
    "lora-160-cos": lora(160, flip=False, lr_schedule="cosine"),
    "lora-160-lr3e-3-noflip": lora(160, 3e-3, flip=False),
    "lora-80-bal": lora(flip=False, sampling="balanced"),
    "lora-80-conv-r32-noflip": lora(rank=32, lora_targets="conv", flip=False),
    "lora-80-r4-noflip": lora(rank=4, flip=False),
    "lora-80-stca0.1-noflip": lora(flip=False, stca_weight=0.1),
}


def untuned(manager, look: str, render_seeds) -> dict:
    from studio.toyworld import evaluate

    return evaluate.measure_likeness(manager, None, look, seeds=render_seeds)


def run_one(manager, library, look: str, config: str, seed: int, render_seeds, base: dict) -> dict:
    """Train one subject (config, seed) on the look's photos, render it, and compare with the untuned `base`."""
    from studio.subjects import tune
    from studio.toyworld import evaluate

    photos, masks = evaluate.subject_photos(evaluate.LOOKS[look], evaluate.LIKENESS_SHAPE)
    name = f"lk-{look}-{config}-{seed}".replace(".", "_")
    settings = tune.TuneSettings(class_word=evaluate.LIKENESS_SHAPE, seed=seed, **CONFIGS[config])
    subject, result = tune.add_subject(name, photos, masks, "toyworld", settings, library=library, manager=manager,
                                       overwrite=True)
    m = evaluate.measure_likeness(manager, subject.name, look, seeds=render_seeds)
    library.delete(subject.name)
    manager.forget_subject(subject.name)
    s = result.settings
    return {"look": look, "config": config, "seed": seed, "method": s.method, "steps": s.steps, "lr": s.lr,
            "token_lr": s.token_lr, "rank": s.rank, "lora_targets": s.lora_targets, "video_weight": s.video_weight,
            "caption": s.caption, "ratio": m["distance"] / base["distance"], "distance": m["distance"],
            "ratio_per_render_seed": [r["distance"] / base["distance"] for r in m["per_seed"]],
            "untuned": base["distance"], "balance": m["balance"], "hit_rate": m["hit_rate"], "iou": m["iou"],
            "train_s": round(result.seconds, 1), "render_seeds": list(render_seeds)}


def table(rows: list[dict], ceilings: dict | None = None) -> str:
    """One line per (look, config): ratio per training seed, its max, mean hit rate and min, training seconds."""
    import numpy as np

    out = []
    if ceilings:
        out += ["| look | VAE reconstruction | untuned | VAE / untuned |", "|---|---|---|---|"]
        for look, c in ceilings.items():
            out.append(f"| {look} | {c['vae']:.3f} | {c['untuned']:.3f} | {c['vae'] / c['untuned']:.2f} |")
        out.append("")
    out += ["| look | config | method | steps | training seeds | tuned / untuned distance per seed | max | hit rate (min) "
            "| train s |", "|---|---|---|---|---|---|---|---|---|"]
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["look"], r["config"]), []).append(r)
    for (look, config), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        ratios = [r["ratio"] for r in rs]
        hits = [r["hit_rate"] for r in rs]
        out.append(f"| {look} | {config} | {rs[0]['method']} | {rs[0]['steps']} | "
                   f"{','.join(str(r['seed']) for r in rs)} | "
                   f"{' '.join(f'{x:.2f}' for x in ratios)} | {max(ratios):.2f} | {np.mean(hits):.2f} "
                   f"({min(hits):.2f}) | {np.mean([r['train_s'] for r in rs]):.0f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="default", help=f"comma-separated, of: {', '.join(CONFIGS)}")
    ap.add_argument("--looks", default="two-tone,striped,checkered")
    ap.add_argument("--seeds", default="0,1,2,3,4,5", help="training seeds")
    ap.add_argument("--render-seeds", default="0,1,2")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="write the rows and ceilings here")
    ap.add_argument("--log", help="append each row here as a JSON line as it finishes")
    ap.add_argument("--from-log", help="print the table of a --log file (no training)")
    args = ap.parse_args(argv)
    if args.from_log:
        lines = [json.loads(x) for x in Path(args.from_log).read_text().splitlines() if x.strip()]
        ceilings = {r["look"]: r for r in lines if r.get("kind") == "ceiling"}
        print(table([r for r in lines if r.get("kind") != "ceiling"], ceilings))
        return 0
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    from studio import machine
    from studio.pipelines import PipelineManager
    from studio.presets import load_model_preset
    from studio.subjects import tune
    from studio.subjects.library import SubjectLibrary
    from studio.toyworld import evaluate

    configs = [c for c in args.configs.split(",") if c]
    looks = [x for x in args.looks.split(",") if x]
    for c in configs:
        if c not in CONFIGS:
            ap.error(f"--configs: unknown {c!r} (known: {', '.join(CONFIGS)})")
    for x in looks:
        if x not in evaluate.LOOKS:
            ap.error(f"--looks: unknown {x!r} (known: {', '.join(evaluate.LOOKS)})")
    seeds = [int(s) for s in args.seeds.split(",")]
    render_seeds = [int(s) for s in args.render_seeds.split(",")]
    manager = PipelineManager(1, "cpu")
    pipe = tune.load_training_pipeline(load_model_preset("toyworld"), machine.from_env().checked())
    log = open(args.log, "a") if args.log else None
    rows, ceilings = [], {}
    t0 = time.perf_counter()
    library = SubjectLibrary()  # the studio home's (renders look subjects up there); each subject deleted after use
    if True:
        for look in looks:
            base = untuned(manager, look, render_seeds)
            ceilings[look] = {"kind": "ceiling", "look": look, "vae": evaluate.vae_likeness(pipe, look),
                              "untuned": base["distance"], "untuned_hit_rate": base["hit_rate"]}
            print(f"{look}: VAE {ceilings[look]['vae']:.3f}, untuned {base['distance']:.3f}", flush=True)
            if log:
                log.write(json.dumps(ceilings[look]) + "\n")
                log.flush()
            for config in configs:
                for seed in seeds:
                    r = run_one(manager, library, look, config, seed, render_seeds, base)
                    rows.append(r)
                    per = " ".join(f"{x:.2f}" for x in r["ratio_per_render_seed"])
                    print(f"{look} {config} seed {seed}: ratio {r['ratio']:.2f} (per render seed {per}) "
                          f"hit {r['hit_rate']:.2f} "
                          f"train {r['train_s']:.0f} s ({time.perf_counter() - t0:.0f} s so far)", flush=True)
                    if log:
                        log.write(json.dumps(r) + "\n")
                        log.flush()
    print(f"\n{args.threads} torch thread(s), render seeds {render_seeds}, {time.perf_counter() - t0:.0f} s in all\n")
    print(table(rows, ceilings))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "ceilings": ceilings, "threads": args.threads}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
