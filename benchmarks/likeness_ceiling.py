"""Can any tuning of the embedded model draw a look? The model's ceiling for a taught subject, beside the VAE's.

benchmarks/likeness.py measures LoRA and token settings against the VAE's ceiling (its reconstruction of the photos).
This probe asks the stronger question for one look: with every spatial weight of the toy UNet trained (a full
fine-tune, MotionBooth's own method, far more capacity than any LoRA; the motion modules frozen as MotionBooth does),
on the same photos, losses (subject region + STCA, preservation clips) and random draws as `studio subject add`,
does the model then draw the look? It renders the training caption's subject on sky (no box; render seeds 0-2,
8 frames and 1 frame) and prints the share of each world colour among the subject's pixels beside the photos'
shares, and the balance of the look's two colours (evaluate.colour_balance: 1 = both in equal shares, 0 = one only).

    python benchmarks/likeness_ceiling.py --look two-tone [--steps 400] [--lr 3e-4] [--threads 1] [--png out.png]

Measured on this project's 2-core machine: README "Subjects" (the paragraph after the likeness table).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def full_finetune(pipe, preset, photos, masks, steps: int, lr: float, seed: int, video_weight: float = 1.0) -> float:
    """Train every UNet weight outside the motion modules on the photos (tune's photo and preservation losses, its
    step function and generator; video_weight 0: no preservation clips); returns the mean loss of the last 10
    steps."""
    import numpy as np
    import torch

    from studio.subjects import tune
    from studio.subjects.trainable import Precision

    s = tune.resolve(tune.TuneSettings(method="lora", class_word="star", steps=steps, lr=lr, seed=seed,
                                       video_weight=video_weight), preset)
    # ^ the model's defaults (caption form, flip, batch, λ2) with this lr, steps and λ1
    gen = torch.Generator("cpu").manual_seed(seed)
    d = preset.defaults
    h, w = d.height // pipe.vae_scale_factor, d.width // pipe.vae_scale_factor
    clips = tune.preservation_clips(pipe, preset, d.frames, d.width, d.height) if tune.uses_clips(s) else None
    stca = tune.stca_setup(pipe, s, h, w, gen)
    for m in (pipe.unet, pipe.text_encoder, pipe.vae):
        m.requires_grad_(False)
    params = [p for n, p in pipe.unet.named_parameters() if "motion_modules" not in n]
    for p in params:
        p.requires_grad_(True)
    precision = Precision.of(pipe.unet)
    c = tune.step_context(pipe, s, tune.check_prediction_type(pipe.scheduler), gen, precision,
                          tune.prepare_photos(photos, masks, preset), clips, stca, tokens=[])
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    pipe.unet.train()
    with tune.capturing(pipe.unet, stca):
        for _ in range(steps):
            losses.append(tune.train_step(c, opt, params)[0])
    pipe.unet.eval()
    pipe.unet.requires_grad_(False)
    return float(np.mean(losses[-10:]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--look", default="two-tone")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--png", help="write the photos and the renders' first frames here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from studio import machine
    from studio.presets import load_model_preset
    from studio.subjects import tune
    from studio.toyworld import evaluate, world

    if args.look not in evaluate.LOOKS:
        ap.error(f"--look: unknown {args.look!r} (known: {', '.join(evaluate.LOOKS)})")
    preset = load_model_preset("toyworld")
    pipe = tune.load_training_pipeline(preset, machine.from_env().checked())
    photos, masks = evaluate.subject_photos(evaluate.LOOKS[args.look], evaluate.LIKENESS_SHAPE)
    target = np.mean([evaluate.colour_histogram(p[None]) for p in photos], 0)
    colours = tuple(c for c, v in zip(world.COLORS, target) if v > 0.1)
    caption = tune.defaults(preset)["caption"].replace("{phrase}", f"sks {evaluate.LIKENESS_SHAPE}")

    def renders(frames: int) -> list[np.ndarray]:
        out = []
        for seed in range(3):
            g = torch.Generator("cpu").manual_seed(seed)
            with torch.no_grad():
                video = pipe(prompt=f"{caption} on sky", num_frames=frames, width=preset.defaults.width,
                             height=preset.defaults.height, num_inference_steps=20, guidance_scale=7.5,
                             generator=g, output_type="np").frames[0]
            out.append((np.asarray(video) * 255).round().astype(np.uint8))  # (F, S, S, 3)
        return out

    def report(label: str, videos: list[np.ndarray]) -> None:
        hist = np.mean([evaluate.colour_histogram(v) for v in videos], 0)
        balance = [evaluate.colour_balance(v, colours) for v in videos]
        print(f"{label}: colour shares {dict(zip(world.COLORS, np.round(hist, 2)))}, balance of "
              f"{'+'.join(colours)} per render seed {np.round(balance, 2).tolist()}", flush=True)

    print(f"photos of {args.look}: colour shares {dict(zip(world.COLORS, np.round(target, 2)))}", flush=True)
    report("untuned, 8 frames", renders(preset.defaults.frames))
    loss = full_finetune(pipe, preset, photos, masks, args.steps, args.lr, args.seed)
    print(f"full fine-tune: {args.steps} steps at lr {args.lr}, last loss {loss:.4f}", flush=True)
    eight, one = renders(preset.defaults.frames), renders(1)
    report("full fine-tune, 8 frames", eight)
    report("full fine-tune, 1 frame", one)
    if args.png:
        from PIL import Image

        rows = [np.concatenate(photos, 1)] + [np.concatenate(list(v[:4]), 1) for v in eight] + \
               [np.concatenate([v[0] for v in one] + [np.zeros_like(photos[0])], 1)]
        Image.fromarray(np.concatenate(rows, 0)).save(args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
