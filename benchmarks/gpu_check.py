"""The GPU check's table: seconds per training step, per denoising step and per render, and peak GPU memory, for
SD 1.5 + AnimateDiff v1-5-3 at 512×512×16 and Zeroscope v2 576w at 576×320×24, on random weights of their real
architectures, in float16 and bfloat16, the render under each offload mode. It writes no video.

    python benchmarks/gpu_check.py          # CUDA (benchmarks/gpu_check.sh runs it after the gpu-marked tests)
    python benchmarks/gpu_check.py --cpu    # the same code path on the CPU at a tiny size (CI runs this)

The architectures are built here, inline, from the published configs (diffusers' config.json of each repo):
- SD 1.5 UNet2DConditionModel: blocks 320/640/1280/1280, 2 layers per block, 8 heads, cross-attention 768;
  AutoencoderKL 128/256/512/512, 2 layers per block; CLIP ViT-L/14 text encoder (768 wide, 12 layers, 12 heads).
- AnimateDiff motion adapter v1-5-3: blocks 320/640/1280/1280, 2 motion layers per block, 8 heads, 32 frames of
  positions, no motion mid block.
- Zeroscope v2 576w UNet3DConditionModel: blocks 320/640/1280/1280, 2 layers per block, 64-dim heads,
  cross-attention 1024; SD's AutoencoderKL; OpenCLIP ViT-H text encoder (1024 wide, 23 layers, 16 heads).
Until the real-architecture presets with --random-weights (issue 16) land, when `studio bench` should replace this.

Each (model, dtype) builds its pipeline once on the device, renders a controlled shot (boxes + camera pan +
reference image, through studio.engine) resident, then with model and with sequential offload, then trains a
subject on it for a few steps (studio.subjects.tune.train with the real defaults: LoRA rank 32, token rows, STCA,
one preservation clip, gradient checkpointing; the preservation clips are random latents of the clip size rather
than generated: generating them is a render, timed above). Timings: the mean over the timed steps after one warm-up
render (per model and dtype) and the first training step. On the CPU, peak memory is not measured and the offload
modes do not exist (rows say so).
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GIB = 2**30


@dataclass(frozen=True)
class Layout:
    family: str  # animatediff | zeroscope
    width: int
    height: int
    frames: int
    unet: dict  # UNet config
    text: dict  # CLIPTextConfig
    vae: tuple  # block_out_channels (2 layers per block, 32 groups as SD's)
    adapter: dict | None = None  # MotionAdapter config (animatediff)
    norm_groups: int = 32


SD_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
               projection_dim=768, hidden_act="quick_gelu", vocab_size=49408)
REAL = {
    "sd15-animatediff": Layout(
        "animatediff", 512, 512, 16,
        unet=dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_head_dim=8,
                  cross_attention_dim=768, sample_size=64),
        text=SD_TEXT, vae=(128, 256, 512, 512),
        adapter=dict(block_out_channels=(320, 640, 1280, 1280), motion_layers_per_block=2,
                     motion_num_attention_heads=8, motion_norm_num_groups=32, motion_max_seq_length=32,
                     use_motion_mid_block=False)),
    "zeroscope": Layout(
        "zeroscope", 576, 320, 24,
        unet=dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_head_dim=64,
                  cross_attention_dim=1024, sample_size=32),
        text=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                  projection_dim=512, hidden_act="gelu", vocab_size=49408),
        vae=(128, 256, 512, 512)),
}
# --cpu: the same classes and code path at a size a CPU runs in seconds
TINY_TEXT = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, projection_dim=16,
                 hidden_act="quick_gelu")
TINY = {
    "sd15-animatediff": Layout(
        "animatediff", 64, 64, 4,
        unet=dict(block_out_channels=(16, 32), layers_per_block=1, attention_head_dim=2, cross_attention_dim=16,
                  sample_size=8),
        text=TINY_TEXT, vae=(8, 16), norm_groups=4,
        adapter=dict(block_out_channels=(16, 32), motion_layers_per_block=1, motion_num_attention_heads=2,
                     motion_norm_num_groups=4, motion_max_seq_length=32, use_motion_mid_block=False)),
    "zeroscope": Layout(
        "zeroscope", 96, 64, 4,
        unet=dict(block_out_channels=(16, 32), layers_per_block=1, attention_head_dim=4, cross_attention_dim=16,
                  sample_size=8),
        text=TINY_TEXT, vae=(8, 16), norm_groups=4),
}


def build(layout: Layout, device: str, dtype, seed: int = 0):
    """A diffusers pipeline of the layout with random weights, initialised on `device` (fast on a GPU)."""
    import torch
    from diffusers import (AnimateDiffPipeline, AutoencoderKL, DDIMScheduler, MotionAdapter, TextToVideoSDPipeline,
                           UNet2DConditionModel, UNet3DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel

    from studio.machine import park
    from studio.toyworld.model import build_tokenizer

    tok = build_tokenizer()
    n = len(layout.unet["block_out_channels"])
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        vae = AutoencoderKL(block_out_channels=layout.vae, down_block_types=["DownEncoderBlock2D"] * len(layout.vae),
                            up_block_types=["UpDecoderBlock2D"] * len(layout.vae), layers_per_block=2,
                            latent_channels=4, norm_num_groups=layout.norm_groups,
                            sample_size=max(layout.width, layout.height))
        text = CLIPTextModel(CLIPTextConfig(**{**layout.text, "vocab_size": max(layout.text.get("vocab_size", 0),
                                                                                 len(tok))},
                                            max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
        scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear", clip_sample=False,
                                  timestep_spacing="linspace", steps_offset=1, set_alpha_to_one=False)
        if layout.family == "animatediff":
            unet = UNet2DConditionModel(
                in_channels=4, out_channels=4, norm_num_groups=layout.norm_groups,
                down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1), **layout.unet)
            pipe = AnimateDiffPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                       motion_adapter=MotionAdapter(**layout.adapter), scheduler=scheduler)
        else:
            unet = UNet3DConditionModel(
                in_channels=4, out_channels=4, norm_num_groups=layout.norm_groups,
                down_block_types=("CrossAttnDownBlock3D",) * (n - 1) + ("DownBlock3D",),
                up_block_types=("UpBlock3D",) + ("CrossAttnUpBlock3D",) * (n - 1), **layout.unet)
            pipe = TextToVideoSDPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device, dtype)
    park(pipe)  # as the studio places pipelines: AnimateDiff's copied motion adapter stays on the CPU
    pipe._studio_identity = {}  # random weights: nothing to identify (hashing GBs of weights is not what is timed)
    return pipe


def write_preset(folder: Path, name: str, layout: Layout) -> Path:
    """A model preset file for the engine (its `base` is never loaded: PreparedManager hands out the pipeline)."""
    path = folder / f"{name}.yaml"
    path.write_text(f"name: bench-{name}\nfamily: {layout.family}\nbase: {folder / 'unused'}\n"
                    f"defaults: {{frames: {layout.frames}, width: {layout.width}, height: {layout.height}, fps: 8, "
                    f"steps: 25, guidance_scale: 7.5}}\nmax_size: 1024\nmax_frames: 64\n")
    return path


def prepared_manager(pipe, settings):
    """A PipelineManager that hands out this pipeline for every preset."""
    from studio.pipelines import PipelineManager

    class Prepared(PipelineManager):
        def get(self, preset):
            return pipe

    pipe._studio_hold = threading.RLock()
    return Prepared(max_pipelines=1, settings=settings)


def controlled_shot(preset: Path, layout: Layout, steps: int, reference: Path):
    from studio import shot as shotlib

    return shotlib.from_container({
        "model": str(preset), "prompt": "a red circle and a white square on grass", "seed": 0, "steps": steps,
        "frames": layout.frames, "width": layout.width, "height": layout.height,
        "camera": {"cx": 0.2},
        "subjects": [{"phrase": "red circle", "reference": str(reference),
                      "boxes": {0: [0.1, 0.2, 0.5, 0.8], layout.frames - 1: [0.5, 0.2, 0.9, 0.8]}},
                     {"phrase": "white square", "boxes": {0: [0.6, 0.1, 0.9, 0.5]}}]})


class Peak:
    """Peak GPU memory of a block (None on the CPU)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.gib = None

    def __enter__(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            self.gib = torch.cuda.max_memory_allocated() / GIB


def time_render(pipe, layout, preset, steps, reference, settings):
    """(seconds per denoising step, seconds for the render, peak GiB) of one controlled render."""
    from studio import engine

    marks = []
    manager = prepared_manager(pipe, settings)
    shot = controlled_shot(preset, layout, steps, reference)
    with Peak(settings.device) as peak:
        r = engine.render(shot, manager, progress=lambda i, n: marks.append(time.perf_counter()))
    per_step = (marks[-1] - marks[0]) / (len(marks) - 1) if len(marks) > 1 else float("nan")
    assert r.frames.shape == (layout.frames, layout.height, layout.width, 3) and r.settings["offload"] in (
        settings.offload, "none")
    return per_step, r.timings["total"], peak.gib


def time_training(pipe, layout, preset_path, steps):
    """(seconds per training step after the first, peak GiB) of subject training on the pipeline."""
    import torch

    from studio.presets import load_model_preset
    from studio.subjects import tune

    preset = load_model_preset(str(preset_path))
    h, w = layout.height // pipe.vae_scale_factor, layout.width // pipe.vae_scale_factor
    clips = torch.randn((2, 4, layout.frames, h, w), generator=torch.Generator().manual_seed(0))
    real = tune.preservation_clips
    tune.preservation_clips = lambda *a, **k: (clips, ["a red circle moving right", "a white square on sand"])
    rng = np.random.default_rng(0)
    photos = [rng.integers(0, 255, (layout.height, layout.width, 3), dtype=np.uint8) for _ in range(4)]
    masks = [np.zeros((layout.height, layout.width), bool) for _ in photos]
    for m in masks:
        m[layout.height // 4:-layout.height // 4, layout.width // 4:-layout.width // 4] = True
    marks = []
    try:
        with Peak(str(pipe.device)) as peak:
            r = tune.train(pipe, preset, photos, masks, "bench", tune.TuneSettings(method="both", steps=steps),
                           progress=lambda *a: marks.append(time.perf_counter()))
    finally:
        tune.preservation_clips = real
    assert np.isfinite(r.losses).all() and r.precision["trainable"] == "float32"
    return (marks[-1] - marks[0]) / (len(marks) - 1), peak.gib, r.precision


def fmt(x, unit=""):
    return "not measured" if x is None else ("nan" if x != x else f"{x:.2f}{unit}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU (the same code path; CI)")
    ap.add_argument("--models", default="sd15-animatediff,zeroscope")
    ap.add_argument("--dtypes", default=None, help="default: float16,bfloat16 (GPU); float32,bfloat16 (--cpu)")
    ap.add_argument("--render-steps", type=int, default=None, help="default 4 (GPU), 2 (--cpu)")
    ap.add_argument("--train-steps", type=int, default=3)
    args = ap.parse_args(argv)

    import torch

    from studio.machine import MachineSettings, park

    device = "cpu" if args.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA GPU; run with --cpu for the CPU path", file=sys.stderr)
        return 2
    if args.cpu:  # one thread: a shared CI machine; the CPU numbers check the path, they are no benchmark
        torch.set_num_threads(1)
    layouts = TINY if args.cpu else REAL
    dtypes = (args.dtypes or ("float32,bfloat16" if args.cpu else "float16,bfloat16")).split(",")
    render_steps = args.render_steps or (2 if args.cpu else 4)
    offloads = ["none"] if args.cpu else ["none", "model", "sequential"]
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU (tiny layouts)"
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        folder = Path(tmp)
        from PIL import Image

        reference = folder / "reference.png"
        Image.fromarray(np.full((64, 64, 3), (150, 50, 215), np.uint8)).save(reference)
        for name in args.models.split(","):
            layout = layouts[name]
            preset = write_preset(folder, name, layout)
            for dtype in dtypes:
                if device == "cuda" and dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
                    rows.append((name, dtype, "-", "no bfloat16 on this GPU", "", "", "", "", ""))
                    continue
                t0 = time.perf_counter()
                pipe = build(layout, device, getattr(torch, dtype))
                built = time.perf_counter() - t0
                base = MachineSettings(device=device, dtype=dtype)
                time_render(pipe, layout, preset, 1, reference, base)  # warm-up: kernels, allocator, caches
                for offload in offloads:
                    settings = base.replace(offload=offload).checked()
                    pipe.remove_all_hooks()
                    if offload == "none":
                        pipe.to(device)
                        park(pipe)
                    else:
                        pipe.to("cpu")
                        (pipe.enable_model_cpu_offload if offload == "model" else
                         pipe.enable_sequential_cpu_offload)(device=device)
                    step, render, peak = time_render(pipe, layout, preset, render_steps, reference, settings)
                    rows.append((name, dtype, offload, fmt(step), fmt(render), fmt(peak, " GiB"), "", "",
                                 f"built in {built:.1f} s"))
                pipe.remove_all_hooks()
                pipe.to(device)
                park(pipe)
                train_step, train_peak, precision = time_training(pipe, layout, preset, args.train_steps)
                rows.append((name, dtype, "training", "", "", "", fmt(train_step), fmt(train_peak, " GiB"),
                             "autocast" + (" + grad scaler" if precision["grad_scaler"] else "")
                             if precision["autocast"] else "float32"))
                del pipe
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()
    names = args.models.split(",")
    sizes = ", ".join(f"{n} {layouts[n].width}x{layouts[n].height}x{layouts[n].frames}" for n in names)
    print(f"\nGPU check on {where}: {sizes}; controlled render (boxes + camera + reference), {render_steps} steps; "
          f"training: method both, {args.train_steps} steps (first excluded)\n")
    head = ("model", "dtype", "offload", "s/denoise step", "s/render", "peak render", "s/train step", "peak train",
            "note")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
