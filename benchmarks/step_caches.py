"""Speed-up of the step caches (studio.step_caches) on Wan layouts: uncached and cached renders in paired rounds.

    python benchmarks/step_caches.py [--layout tiny|wan2.1-1.3b] [--frames 9] [--size 64x64] [--steps 20]
                                     [--rounds 5] [--threads 2] [--device cpu|cuda] [--dtype float32|bfloat16]
                                     [--caches first_block pyramid_broadcast taylorseer sea mag] [--json out.json]

Layouts: `tiny` is the tiny-wan builtin (diffusers' tiny Wan test configs); `wan2.1-1.3b` is the published Wan 2.1
T2V 1.3B transformer and VAE at full size with random weights and the UMT5-xxl encoder cut to one layer
(studio.families.wan_build.reduced). Random weights: the speed of the caches with a fixed schedule (pyramid
broadcast, TaylorSeer, and MagCache once its ratios are calibrated) is the schedule's; the adaptive ones (first
block, SeaCache) decide from activations, which a trained model's differ from, so their skip rates here are not a
trained model's.

Each round renders the shot once uncached and once with each cache, in a rotating order, and divides each cached
render's time by the uncached render's of the same round; the speed-up printed is the median of those per-round
ratios (uncached / cached) with its quartiles. The denoising loop is timed (WanPipeline with output_type="latent":
prompt encoding included, the VAE decode excluded: it is the same for every case), in CPU seconds of this process
with a fixed number of torch threads on a CPU (other programs on a shared machine change it less than wall-clock
time), in wall-clock seconds after a synchronize on a GPU. Also printed per cache: the share of attention layer calls
it computed, and how far its final latents are from the uncached ones (relative L2). MagCache's calibration (one
uncached render, once per pipeline, steps and size) is done before the rounds and reported apart.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from studio.bench import quartiles  # noqa: E402 (after the path)

CACHES = ("first_block", "pyramid_broadcast", "taylorseer", "sea", "mag")


def build(layout: str, device: str, dtype: str):
    """A WanPipeline with random weights of the layout, on the device."""
    import torch

    from studio.families import wan_build

    spec = wan_build.TINY if layout == "tiny" else wan_build.reduced(wan_build.published("wan2.1-t2v-1.3b"), 1)
    with torch.device(device):  # initialise the weights where they run (1.4 B parameters build fast on a GPU)
        pipe = wan_build.build_pipeline(spec, seed=0)
    tr = pipe.transformer.to(getattr(torch, dtype))
    keep = tuple(getattr(tr, "_keep_in_fp32_modules", None) or ())  # as from_pretrained(torch_dtype=...) keeps them
    for name, param in list(tr.named_parameters()) + list(tr.named_buffers()):
        if set(name.split(".")) & set(keep):
            param.data = param.data.float()
    pipe.text_encoder.to(getattr(torch, dtype))
    return pipe.to(device)


def render(pipe, shot, setting, device: str) -> tuple[float, object, dict]:
    """(seconds, final latents, cache stats) of one render of `shot` with the step cache `setting`."""
    import torch

    from studio import step_caches

    stats: dict = {}
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.inference_mode(), step_caches.enabled(pipe, shot, setting, stats):
        out = pipe(prompt=shot.prompt, num_frames=shot.frames, height=shot.height, width=shot.width,
                   num_inference_steps=shot.steps, guidance_scale=shot.guidance_scale,
                   generator=torch.Generator("cpu").manual_seed(shot.seed), output_type="latent").frames
    sync()
    seconds = time.perf_counter() - t0 if device.startswith("cuda") else time.process_time() - c0
    return seconds, out.float().cpu(), stats


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layout", default="tiny", choices=["tiny", "wan2.1-1.3b"])
    p.add_argument("--frames", type=int, default=9)
    p.add_argument("--size", default="64x64", help="WIDTHxHEIGHT (multiples of 16)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--caches", nargs="+", default=list(CACHES),
                   help="step-cache settings (NAME or NAME:key=value,...), as --step-cache takes them")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    import torch

    from studio import shot as shotlib, step_caches

    torch.set_num_threads(args.threads)
    width, height = (int(v) for v in args.size.lower().split("x"))
    shot = shotlib.Shot(model=args.layout, prompt="a red circle moving right on grass", seed=3, frames=args.frames,
                        width=width, height=height, steps=args.steps, guidance_scale=args.guidance)
    settings = [step_caches.parse(c, "--caches") for c in args.caches]
    t0 = time.perf_counter()
    pipe = build(args.layout, args.device, args.dtype)
    print(f"{args.layout}: built in {time.perf_counter() - t0:.1f} s; {args.frames} frames {width}x{height}, "
          f"{args.steps} steps, guidance {args.guidance}, {args.device} {args.dtype}, {args.threads} CPU threads")
    calibration = None
    if any(s.name == "mag" for s in settings):
        t0 = time.perf_counter()
        step_caches.mag_ratios(pipe, shot)
        calibration = time.perf_counter() - t0
        print(f"MagCache ratios calibrated in {calibration:.1f} s (once per pipeline, steps and size)")
    none = step_caches.parse("none")
    render(pipe, shot, none, args.device)  # warm-up
    ratios: dict[str, list[float]] = {s.label: [] for s in settings}
    base_times: list[float] = []
    last: dict = {}
    for r in range(args.rounds):
        order = settings[r % len(settings):] + settings[:r % len(settings)]
        base, base_out, _ = render(pipe, shot, none, args.device)
        base_times.append(base)
        for s in order:
            seconds, out, stats = render(pipe, shot, s, args.device)
            ratios[s.label].append(base / seconds)
            rel = float((out - base_out).norm() / base_out.norm())
            last[s.label] = {"computed": stats["attention_computed"] / max(1, stats["attention_calls"]),
                             "relative_l2": rel}
        print(f"round {r + 1}/{args.rounds}: uncached {base:.2f} s; " + ", ".join(
            f"{s.name} x{ratios[s.label][-1]:.2f}" for s in settings), flush=True)
    print(f"\nuncached: median {statistics.median(base_times):.2f} s a render "
          f"({'wall' if args.device.startswith('cuda') else 'CPU'} seconds)")
    print(f"{'cache':58s} {'speed-up (q1 median q3)':26s} {'attention computed':19s} rel. L2 to uncached")
    result = {"layout": args.layout, "frames": args.frames, "size": [width, height], "steps": args.steps,
              "device": args.device, "dtype": args.dtype, "threads": args.threads, "rounds": args.rounds,
              "uncached_seconds": base_times, "mag_calibration_seconds": calibration, "caches": {}}
    for label, rs in ratios.items():
        q1, med, q3 = quartiles(rs)
        print(f"{label:58s} x{med:.2f} ({q1:.2f} {med:.2f} {q3:.2f})      {last[label]['computed']:6.0%}"
              f"             {last[label]['relative_l2']:.4f}")
        result["caches"][label] = {"speedup_per_round": rs, "median": med, "q1": q1, "q3": q3, **last[label]}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
