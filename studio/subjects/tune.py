"""Teach a base model a subject from a few photos: a spatial LoRA (MotionBooth §1.1) and/or extended ID tokens
(Magic-Me §2.2), written to the subject library.

One step, for the LoRA: a batch of photos (one-frame videos) with the subject-region loss + λ2·STCA, and one
preservation clip with the plain ε-loss ×λ1 (clips the frozen model generated once, cached per base model, or the
user's own); the two halves are averaged (MotionBooth's grad-accumulation of 2). For the tokens alone: the photo
batch with Magic-Me's augmentations and the region loss; nothing but the new embedding rows moves.

Training runs on a pipeline of its own (never the one the renderer has cached), so a cancelled or failed run
leaves the studio exactly as it was; the subject is saved only when training finishes.

Where the studio departs from the methods (METHODS.md §1.1, §2.2), and why:
- LoRA instead of MotionBooth's full fine-tune (5e-6, 300 steps): a rank-r LoRA of the spatial attention needs a
  larger lr and more steps (DEFAULTS: 400 at 1e-4 for the real models), and leaves the base weights untouched.
- Extended ID tokens start from the mean of the class word's embeddings, not Magic-Me's fixed CLIP ids
  (42170, 47629, 43514, 43514): those are ids of SD 1.5's CLIP vocabulary and mean nothing to another tokenizer
  (the toy-world model's); the class word starts the tokens on the subject's kind on every model.
- Photos: Magic-Me's centre square crop on square models; on other sizes MotionBooth's layout (the whole photo in
  the middle of the frame, zero padding around it counted as mask 0), aspect kept instead of squashed to H×H.
- With method "both" the shared photo batch follows Magic-Me's recipe (augmentations, full-image rate, noise
  offset), as the tokens need it; MotionBooth's STCA still reads the true mask.

Symbols: B photos per step, C latent channels, F frames, H×W pixels, h×w latent, L text tokens, D text width.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np

from studio import faults
if TYPE_CHECKING:  # torch is imported where it is used (nothing heavy at import)
    import torch

logger = logging.getLogger(__name__)

METHODS = ("lora", "tokens", "both")
# Every spatial (per-frame) attention projection; the motion modules (AnimateDiff) and temp_attentions
# (Zeroscope's UNet3D) do not match: their names hold "motion_modules." / "temp_attentions.", never ".attentions.".
LORA_TARGETS = r"^(?!.*motion_modules).*(^|\.)attentions\.\d+\.transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$"
# TuneSettings.lora_targets: every spatial attention projection ("attention"), or the cross-attention only ("cross":
# attn2, where the text meets the image)
# ("conv": the attention projections and the spatial ResNet convolutions, where a UNet's colours are made; the
# motion modules and Zeroscope's temp_convs never match)
CONV_TARGETS = r"^(?!.*motion_modules).*(^|\.)resnets\.\d+\.conv[12]$"
TARGET_SETS = {"attention": LORA_TARGETS, "cross": LORA_TARGETS.replace("attn[12]", "attn2"),
               "conv": f"(?:{LORA_TARGETS})|(?:{CONV_TARGETS})"}
LR_SCHEDULES = ("constant", "cosine")  # TuneSettings.lr_schedule
SAMPLINGS = ("random", "balanced")  # TuneSettings.sampling
CAPTION = "a {phrase}"  # the training captions' form (TuneSettings.caption); {phrase}: e.g. "sks star"
ADAPTER = "subject"

# Preservation prompts: varied motion and scenes, generated once per base model by the frozen model itself.
PRESERVATION_PROMPTS = {
    "toyworld": ["a red circle moving right on grass", "a yellow star moving left on sand",
                 "a white square moving up on sky", "a purple triangle moving down on grass",
                 "a red star and a white circle on sand", "a yellow square still on sky",
                 "a purple circle moving left on sky", "a white triangle moving right on sand"],
    "default": ["a dog running on a beach", "a car driving down a city street at night",
                "a person walking through a forest", "waves crashing on rocks at sunset",
                "a cat jumping onto a sofa", "a bird flying over a lake", "a horse galloping in a field",
                "a boat sailing on the sea"],
}


class TuneCancelled(RuntimeError):
    """Training was cancelled; nothing was written."""


@dataclass
class TuneSettings:
    """How to teach a subject. None means the base model's default (see `defaults`)."""

    method: Optional[str] = None  # lora | tokens | both; None: the base model's default (DEFAULTS)
    class_word: str = "dog"  # what the subject is; the phrase shots use ("sks dog")
    trigger: str = "sks"  # the rare word that names the subject (LoRA)
    steps: Optional[int] = None
    lr: Optional[float] = None  # LoRA learning rate
    token_lr: Optional[float] = None  # extended ID tokens' learning rate (Magic-Me: 1e-3)
    rank: Optional[int] = None  # LoRA rank
    lora_targets: str = "attention"  # a TARGET_SETS key: which spatial attention projections the LoRA adapts
    caption: Optional[str] = None  # the training captions' form, "{phrase}" standing for the subject's words
    n_tokens: int = 4  # extended ID tokens (Magic-Me: 4)
    batch: int = 4  # photos per step
    region_loss: bool = True  # loss on subject pixels only (False: the whole photo)
    stca_weight: float = 0.01  # λ2 (MotionBooth)
    video_weight: float = 1.0  # λ1 (MotionBooth); 0 turns the preservation clips off
    preservation: Optional[str] = None  # a folder of the user's own clips (.mp4/.gif, optional same-name .txt)
    augment: Optional[bool] = None  # Magic-Me's rotate/scale (and flip, if `flip`); default on for tokens, off for LoRA
    # mirror each photo left-right with p = 0.5 (Magic-Me); None: the model's default (DEFAULTS). A mirrored photo
    # teaches the mirror image too: a look that is not left-right symmetric (a two-tone star, a logo, a parting)
    # is averaged with its mirror image
    flip: Optional[bool] = None
    # the learning rates over the steps: "constant" (MotionBooth, Magic-Me) or "cosine" (from the set rates down to 0
    # at the last step, so the last steps average the photos' noise instead of following it; on the toy-world model
    # no closer to the photos: README "Subjects"); None: the model's default (DEFAULTS)
    lr_schedule: Optional[str] = None
    # how the steps draw photos, timesteps and preservation clips: "random" (independent draws, as MotionBooth) or
    # "balanced" (every photo and clip in turn from a shuffled cycle, the photo batch's timesteps stratified over
    # the schedule, the clips' timesteps a golden-ratio sequence): the same expected loss, meant to narrow the
    # seed-to-seed spread of a short training (on the toy-world model it did not: README "Subjects"); None: the
    # model's default (DEFAULTS)
    sampling: Optional[str] = None
    seed: int = 0
    # Magic-Me's use_orig_img_rate: the share of photos trained on the whole photo (mask = 1) instead of the
    # subject's region; default 0.05 when tokens are trained, else 0 (MotionBooth always uses the region)
    full_image_rate: Optional[float] = None
    # Magic-Me's noise_offset: ε + offset·N(0, 1) per item and channel on the photo batch; default 0.1 when tokens
    # are trained, else 0
    noise_offset: Optional[float] = None
    # recompute the UNet's activations in the backward pass (less memory, ~30% more time); default on for the real
    # models, off for the small ones (tiny, toyworld)
    checkpointing: Optional[bool] = None


# Per base model, the one source of the training defaults (`studio subject add` and the page's training panel both
# read it): method, steps, LoRA lr, token lr, rank, and why that method, in one line. Real models follow the methods'
# settings scaled to a LoRA (MotionBooth fine-tunes the full UNet at 5e-6 for 300 steps; a rank-32 LoRA needs a
# larger lr). The toy-world model's come from benchmarks/likeness.py (the table in the README).
DEFAULTS = {
    "toyworld": dict(method="lora", steps=80, lr=6e-3, token_lr=5e-3, rank=8, checkpointing=False,
                     caption="a photo of a {phrase}", flip=False, lr_schedule="constant", sampling="random",
                     why="LoRA, 80 steps, captions 'a photo of a ...', photos not mirrored: the closest to the "
                         "photos measured per second of training; ID tokens alone left the colours as they were, "
                         "LoRA + tokens moved them away, mirrored photos blurred a look's layout "
                         "(benchmarks/likeness.py)"),
    "tiny": dict(method="lora", steps=20, lr=1e-3, token_lr=5e-3, rank=4, checkpointing=False, caption=CAPTION, flip=True,
                 lr_schedule="constant", sampling="random", why="LoRA: a random-weights test model; nothing measured"),
    "animatediff": dict(method="lora", steps=400, lr=1e-4, token_lr=1e-3, rank=32, checkpointing=True,
                        caption=CAPTION, flip=True, lr_schedule="constant", sampling="random",
                        why="LoRA: MotionBooth's spatial fine-tune as a LoRA; not measured on this model here"),
    "zeroscope": dict(method="lora", steps=400, lr=1e-4, token_lr=1e-3, rank=32, checkpointing=True,
                      caption=CAPTION, flip=True, lr_schedule="constant", sampling="random",
                      why="LoRA: MotionBooth's spatial fine-tune as a LoRA; not measured on this model here"),
}
NOTES = ("why",)  # DEFAULTS keys that are not TuneSettings fields


def _defaults_entry(preset) -> dict:
    return DEFAULTS.get(preset.name) or DEFAULTS.get(preset.family) or DEFAULTS["animatediff"]


def defaults(preset) -> dict:
    """The preset's default TuneSettings fields (method, steps, lr, token_lr, rank, checkpointing)."""
    return {k: v for k, v in _defaults_entry(preset).items() if k not in NOTES}


def method_note(preset) -> str:
    """One line: the preset's default method and why (the page's training panel shows it)."""
    return f"Default for {preset.name}: {_defaults_entry(preset)['why']}"


def check_method(method: str, preset, pipe=None) -> None:
    """ValueError naming the method and the preset when the preset cannot train it: tokens (and both) extend the
    text encoder's embedding table, which a model without a text encoder (or with one that has no input
    embeddings) does not have."""
    if method not in ("tokens", "both") or pipe is None:
        return
    te = getattr(pipe, "text_encoder", None)
    if te is None or not hasattr(te, "get_input_embeddings") or getattr(pipe, "tokenizer", None) is None:
        raise ValueError(f"method: {method} cannot be trained on {preset.name}: it has no text encoder whose "
                         f"tokens can be extended; use lora (got {method!r})")


def resolve(settings: TuneSettings, preset) -> TuneSettings:
    """Fill the base model's defaults in and check every field (ValueError naming the field and value)."""
    from studio import families

    families.get(preset.family).require("subject_tuning", "model", preset)  # LoRA / tokens on the UNets only (yet)
    d = defaults(preset)
    s = dataclasses.replace(settings, **{k: v for k, v in d.items() if getattr(settings, k) is None})
    if s.method not in METHODS:
        raise ValueError(f"method: must be one of {', '.join(METHODS)} (got {s.method!r})")
    magic_me = s.method in ("tokens", "both")  # Magic-Me's full-image rate and noise offset come with its tokens
    if s.full_image_rate is None:
        s = dataclasses.replace(s, full_image_rate=0.05 if magic_me else 0.0)
    if s.noise_offset is None:
        s = dataclasses.replace(s, noise_offset=0.1 if magic_me else 0.0)
    checks = [("steps", s.steps, 1, 100_000), ("rank", s.rank, 1, 256), ("n_tokens", s.n_tokens, 1, 16),
              ("batch", s.batch, 1, 64)]
    for name, v, lo, hi in checks:
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise ValueError(f"{name}: must be an integer in {lo}..{hi} (got {v!r})")
    for name in ("lr", "token_lr", "stca_weight", "video_weight", "noise_offset"):
        v = getattr(s, name)
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (name.endswith("lr") and v == 0):
            raise ValueError(f"{name}: must be a finite number > 0 (got {v!r})" if name.endswith("lr")
                             else f"{name}: must be a finite number >= 0 (got {v!r})")
    for name in ("checkpointing", "flip"):
        if not isinstance(getattr(s, name), bool):
            raise ValueError(f"{name}: must be true or false (got {getattr(s, name)!r})")
    v = s.full_image_rate
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v <= 1:
        raise ValueError(f"full_image_rate: must be a number in 0..1 (got {v!r})")
    if s.sampling not in SAMPLINGS:
        raise ValueError(f"sampling: must be one of {', '.join(SAMPLINGS)} (got {s.sampling!r})")
    if s.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule: must be one of {', '.join(LR_SCHEDULES)} (got {s.lr_schedule!r})")
    if s.lora_targets not in TARGET_SETS:
        raise ValueError(f"lora_targets: must be one of {', '.join(TARGET_SETS)} (got {s.lora_targets!r})")
    if not isinstance(s.caption, str) or s.caption.count("{phrase}") != 1 or len(s.caption) > 80 or \
            "{" in s.caption.replace("{phrase}", ""):
        raise ValueError(f"caption: must hold {{phrase}} once and no other braces, e.g. {CAPTION!r} "
                         f"(got {s.caption!r})")
    for name in ("class_word", "trigger"):
        v = getattr(s, name)
        if not isinstance(v, str) or not v.strip() or len(v) > 40:
            raise ValueError(f"{name}: must be a non-empty word or two (got {v!r})")
    if s.preservation is not None and not Path(s.preservation).is_dir():
        raise ValueError(f"preservation: not a folder (got {s.preservation!r})")
    return s


def token_strings(name: str, n: int) -> list[str]:
    return [f"<{name}-{i + 1}>" for i in range(n)]


def insertion(method: str, trigger: str, tokens: list[str]) -> str:
    """The words put before a subject's class word in prompts: the tokens, the trigger, or both."""
    parts = (tokens if method in ("tokens", "both") else []) + ([trigger] if method in ("lora", "both") else [])
    return " ".join(parts)


# --- data --------------------------------------------------------------------------------------------------


MIN_PHOTO_SIDE = 16  # px: below this (or a quarter of the model's frame) a photo is refused


def _fit_scale(photo_w: int, photo_h: int, width: int, height: int) -> float:
    """How much fit_photo scales a photo: to cover the frame on square models, to fit inside it on others."""
    if width == height:
        return max(width / photo_w, height / photo_h)
    return min(width / photo_w, height / photo_h)


def check_photos(photos: list[np.ndarray], masks: list[np.ndarray] | None, preset, names: list[str] | None = None,
                 warn: bool = True) -> None:
    """Refuse photos too small to teach the model anything (below MIN_PHOTO_SIDE or a quarter of the model's frame,
    on the short side) and masks of another size than their photo, naming the photo; warn about photos that will
    be scaled up (below the model's native size)."""
    from studio.subjects.masks import check_image, check_mask

    W, H = preset.defaults.width, preset.defaults.height
    floor = max(MIN_PHOTO_SIDE, math.ceil(min(W, H) / 4))
    for i, p in enumerate(photos):
        label = f"photos[{i}]" + (f" ({names[i]})" if names and i < len(names) else "")
        check_image(p, label)
        ph, pw = p.shape[:2]
        if min(ph, pw) < floor:
            raise ValueError(f"{label}: {pw}x{ph} is too small to teach {preset.name} a subject (its frames are "
                             f"{W}x{H}): need at least {floor} px on the short side")
        if warn and _fit_scale(pw, ph, W, H) > 1:
            logger.warning("%s: %dx%d is below %s's %dx%d and will be scaled up; the subject may come out blurred",
                           label, pw, ph, preset.name, W, H)
    if masks and len(masks) != len(photos):
        raise ValueError(f"masks: need one mask per photo or none (got {len(masks)} masks for {len(photos)} photos)")
    for i, (m, p) in enumerate(zip(masks or [], photos)):
        check_mask(m, p.shape[:2], f"masks[{i}]")


def fit_photo(photo: np.ndarray, mask: np.ndarray | None, width: int, height: int):
    """A photo and its mask at the model's frame size: (image (H, W, 3) uint8, mask (H, W) bool, valid (H, W) bool,
    True where the photo is).

    Square frames: Magic-Me's centre square crop (the framing references get too, reference.cover_crop). Other
    frames: MotionBooth's layout, the whole photo scaled to fit (a square photo fills the centre H×H) and zero
    (black) padding around it, which is mask 0 and not photo. MotionBooth squashes any photo to H×H; the aspect is
    kept here.
    """
    from PIL import Image

    from studio.controls.reference import cover_crop

    if mask is None:
        mask = np.ones(photo.shape[:2], bool)
    if width == height:
        img = cover_crop(photo, width, height)
        m = cover_crop(mask.astype(np.uint8) * 255, width, height, nearest=True) > 127
        return img, m, np.ones((height, width), bool)
    ph, pw = photo.shape[:2]
    scale = _fit_scale(pw, ph, width, height)
    w, h = min(width, max(1, round(pw * scale))), min(height, max(1, round(ph * scale)))
    left, top = (width - w) // 2, (height - h) // 2
    img = np.zeros((height, width, 3), np.uint8)
    img[top:top + h, left:left + w] = np.asarray(Image.fromarray(photo).resize((w, h), Image.BICUBIC))
    m = np.zeros((height, width), bool)
    m[top:top + h, left:left + w] = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(
        (w, h), Image.NEAREST)) > 127
    valid = np.zeros((height, width), bool)
    valid[top:top + h, left:left + w] = True
    return img, m, valid


def augment(x, m, generator, full: bool, flip: bool = True):
    """Magic-Me's augmentation of one photo: x (3, H, W) in -1..1, m (H, W) or (K, H, W) masks in 0..1 -> (x, m,
    caption prefix).

    With `flip`, a horizontal flip with p=0.5; with `full`, also rotation (p=0.7, N(0, 10°)) and scale: with p=2/3 shrink
    to U[1/3, 1] (below 0.6: "far away" or "very small", on a black canvas, mask 0 outside), else zoom U[1.2, 1.4]
    ("zoomed in" or "close up").
    """
    import torch
    import torch.nn.functional as F

    def u():
        return float(torch.rand((), generator=generator))

    prefix = ""
    if flip and u() < 0.5:
        x, m = x.flip(-1), m.flip(-1)
    if not full:
        return x, m, prefix
    angle = float(torch.randn((), generator=generator)) * math.radians(10.0) if u() < 0.7 else 0.0
    if u() < 2 / 3:
        s = 1 / 3 + u() * (2 / 3)
        if s < 0.6:
            prefix = "far away" if u() < 0.5 else "very small"
    else:
        s = 1.2 + 0.2 * u()
        prefix = "close up" if u() < 0.5 else "zoomed in"
    # Inverse map output -> input in normalised coordinates: rotate by -angle (in pixels: the off-diagonal terms
    # carry the aspect ratio) and scale by 1/s, with a random shift that keeps a shrunk photo inside the frame.
    H, W = x.shape[-2:]
    room = max(0.0, 1 - s)
    tx, ty = (u() * 2 - 1) * room, (u() * 2 - 1) * room
    c, sn = math.cos(angle) / s, math.sin(angle) / s
    theta = torch.tensor([[c, -sn * H / W, -tx / s], [sn * W / H, c, -ty / s]], dtype=torch.float32)[None]
    masks = m[None] if m.ndim == 2 else m  # (K, H, W)
    both = torch.cat([x, masks], 0)[None]  # (1, 3 + K, H, W)
    grid = F.affine_grid(theta, list(both.shape), align_corners=False)
    # Outside the photo: black pixels (-1) and no mask.
    shift = torch.tensor([1.0, 1.0, 1.0] + [0.0] * masks.shape[0]).view(1, -1, 1, 1)
    out = F.grid_sample(both + shift, grid, align_corners=False, padding_mode="zeros")[0] - shift[0]
    out_m = out[3:].clamp(0, 1)
    return out[:3], out_m[0] if m.ndim == 2 else out_m, prefix


def preservation_clips(pipe, preset, frames: int, width: int, height: int, folder: str | None = None,
                       cache_root: Path | None = None, progress: Callable | None = None,
                       cancel: threading.Event | None = None):
    """(latents (K, C, F, h, w), captions) of the preservation clips: the user's folder, or clips the frozen base
    model generates once from PRESERVATION_PROMPTS and caches under the studio home.

    progress(clip, clips, seconds_left) after each generated clip; `cancel` is checked before each (TuneCancelled,
    nothing cached). The cache folder is written under a temp name beside it and renamed into place."""
    import torch
    from safetensors.torch import load_file, save_file

    from studio.pipelines import studio_home

    if folder:
        return _user_clips(pipe, Path(folder), frames, width, height)
    prompts = PRESERVATION_PROMPTS.get(preset.name, PRESERVATION_PROMPTS["default"])
    random = [[preset.layout or preset.name, preset.width_factor]] if getattr(preset, "random_weights", False) else []
    tag = hashlib.sha256(json.dumps([preset.name, preset.base, preset.motion_adapter, frames, width, height,
                                     prompts] + random).encode()).hexdigest()[:12]  # random weights: other clips
    root = (cache_root or studio_home() / "preservation") / f"{preset.name}-{tag}"
    if (root / "clips.safetensors").exists():
        return load_file(str(root / "clips.safetensors"))["latents"], json.loads((root / "captions.json").read_text())
    logger.info("generating %d preservation clips with %s (once; cached in %s)", len(prompts), preset.name, root)
    lat, t0 = [], time.perf_counter()
    for i, p in enumerate(prompts):
        if cancel is not None and cancel.is_set():
            raise TuneCancelled(f"cancelled while making preservation clip {i + 1}/{len(prompts)}; nothing was saved")
        g = torch.Generator("cpu").manual_seed(i)
        with torch.no_grad():
            out = pipe(prompt=p, num_frames=frames, width=width, height=height, num_inference_steps=20,
                       guidance_scale=7.5, generator=g, output_type="latent").frames
        lat.append(out.float().cpu())  # (1, C, F, h, w)
        logger.info("preservation clip %d/%d done", i + 1, len(prompts))
        if progress is not None:
            per = (time.perf_counter() - t0) / (i + 1)
            progress(i + 1, len(prompts), per * (len(prompts) - i - 1))
    lat = torch.cat(lat)
    _write_cache(root, {"clips.safetensors": lambda path: save_file({"latents": lat.contiguous()}, str(path)),
                        "captions.json": lambda path: path.write_text(json.dumps(prompts))})
    return lat, prompts


def _write_cache(root: Path, files: dict) -> None:
    """Write a cache folder atomically: its files ({name: write(path)}) in a temp folder beside it, renamed into
    place; if another run got there first, its folder stays and ours is removed."""
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        for name, write in files.items():
            write(tmp / name)
        try:
            os.replace(tmp, root)  # onto an existing non-empty folder this fails rather than merges
        except OSError:
            if (root / next(iter(files))).exists():
                logger.info("preservation clips already cached in %s by another run", root)
                return
            shutil.rmtree(root, ignore_errors=True)  # an incomplete folder from elsewhere: ours replaces it
            os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _user_clips(pipe, folder: Path, frames: int, width: int, height: int):
    import imageio.v3 as iio
    import torch

    from studio.controls.reference import cover_crop

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".mp4", ".gif", ".webm", ".mov"))
    if not files:
        raise ValueError(f"preservation: no .mp4/.gif/.webm/.mov clips in {str(folder)!r}")
    lat, caps = [], []
    for p in files:
        try:
            video = np.asarray(iio.imread(p))  # (T, H, W, 3|4)
        except Exception as e:  # noqa: BLE001 - any decoder error is the user's file
            raise ValueError(f"preservation: cannot read {str(p)!r} ({e})") from None
        if video.ndim != 4 or len(video) < frames:
            raise ValueError(f"preservation: {str(p)!r} needs at least {frames} frames (got {len(video)})")
        clip = np.stack([cover_crop(f[..., :3], width, height) for f in video[:frames]])
        lat.append(encode(pipe, clip, None)[None].transpose(1, 2))  # (1, C, F, h, w)
        txt = p.with_suffix(".txt")
        caps.append(txt.read_text().strip() if txt.exists() else "a video")
    return torch.cat(lat), caps


def encode(pipe, images: np.ndarray, generator):
    """(n, H, W, 3) uint8 -> (n, C, h, w) scaled latents (a posterior sample, or its mean without a generator)."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images)).float().div(127.5).sub(1).permute(0, 3, 1, 2)
    return _encode_pixels(pipe, x, generator)


def _encode_pixels(pipe, x, generator):
    import torch

    with torch.no_grad():
        post = pipe.vae.encode(x.to(pipe.vae.device, pipe.vae.dtype)).latent_dist
        z = post.mean if generator is None else post.mean + post.std * torch.randn(
            post.mean.shape, generator=generator).to(post.mean)
    return z.float() * pipe.vae.config.scaling_factor


# --- training ----------------------------------------------------------------------------------------------


@dataclass
class TuneResult:
    lora: Optional[dict]  # diffusers-format LoRA state dict ("unet." keys), or None
    embeds: Optional[dict]  # token -> (D,) vector, or None
    tokens: list[str]
    settings: TuneSettings
    seconds: float
    losses: list[float] = field(default_factory=list)  # per step
    precision: dict = field(default_factory=dict)  # device, dtypes, autocast, grad scaler (trainable.Precision)


Progress = Callable[..., None]
"""progress(step, total, loss, seconds_left) after each training step, seconds_left timed from the first step. A
callback that also takes a `stage` keyword hears about the preparation as well: stage="preservation" with (clip,
clips, nan, seconds left for the clips) while the preservation clips are generated (minutes on a real model), and
stage="training" for the steps."""


def _reporter(progress: Progress | None):
    """A report(i, n, loss, left, stage) that calls `progress` as it can take it (None: nothing to report)."""
    if progress is None:
        return None
    try:
        params = inspect.signature(progress).parameters.values()
        staged = any(p.name == "stage" or p.kind is p.VAR_KEYWORD for p in params)
    except (TypeError, ValueError):  # a builtin without a signature: the plain form
        staged = False

    def report(i: int, n: int, loss: float, left: float, stage: str) -> None:
        if staged:
            progress(i, n, loss, left, stage=stage)
        elif stage == "training":
            progress(i, n, loss, left)

    return report


def check_prediction_type(scheduler) -> str:
    """The scheduler's prediction type, if training can target it: epsilon (all the studio's models) or
    v_prediction; ValueError otherwise."""
    kind = getattr(scheduler.config, "prediction_type", "epsilon") or "epsilon"
    if kind not in ("epsilon", "v_prediction"):
        raise ValueError(f"model: its scheduler predicts {kind!r}; subject training supports epsilon and "
                         f"v_prediction models")
    return kind


def diffusion_target(kind: str, z0, eps, alpha_bar):
    """What the UNet is trained to predict at x_t = √ᾱ·z0 + √(1−ᾱ)·ε: ε, or v = √ᾱ·ε − √(1−ᾱ)·z0."""
    if kind == "epsilon":
        return eps
    return alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * z0


def _layer_tokens(unet, names: list[str], h: int, w: int, text_len: int) -> dict[str, int]:
    """{layer name: query length N} of attention layers, seen in one no-grad UNet call on a blank one-frame latent."""
    import torch

    from studio.controls.base import attention_modules

    modules, seen, handles = attention_modules(unet), {}, []

    def watch(name):
        def pre(mod, args, kwargs):
            hs = args[0] if args else kwargs["hidden_states"]
            seen.setdefault(name, hs.shape[1])
        return pre

    try:
        for n in names:
            handles.append(modules[n].register_forward_pre_hook(watch(n), with_kwargs=True))
        z = torch.zeros(1, unet.config.in_channels, 1, h, w, device=unet.device, dtype=unet.dtype)
        text = torch.zeros(1, text_len, unet.config.cross_attention_dim, device=unet.device, dtype=unet.dtype)
        with torch.no_grad():
            unet(z, torch.zeros(1, dtype=torch.long, device=unet.device), encoder_hidden_states=text)
    finally:
        for hd in handles:
            hd.remove()
    return seen


@dataclass
class PhotoSet:
    """The subject's photos at the model's size, on the CPU (augmented there per step, then encoded on the device)."""

    pixels: "torch.Tensor"  # (n, 3, H, W) in -1..1
    masks: "torch.Tensor"  # (n, 2, H, W) in 0..1: the subject's mask and where the photo is (not padding)


def prepare_photos(photos: list[np.ndarray], masks: list[np.ndarray] | None, preset) -> PhotoSet:
    """Step 2: photos and masks fitted to the model's frame (fit_photo)."""
    import torch

    d = preset.defaults
    fitted = [fit_photo(p, masks[i] if masks else None, d.width, d.height) for i, p in enumerate(photos)]
    px = torch.stack([torch.from_numpy(f[0].copy()) for f in fitted]).float().div(127.5).sub(1)
    mk = torch.stack([torch.from_numpy(np.stack([f[1], f[2]])) for f in fitted]).float()
    return PhotoSet(px.permute(0, 3, 1, 2), mk)


@dataclass
class StcaSetup:
    """Step 4: the spatial cross-attention layers MotionBooth's STCA loss reads, and their processors."""

    names: list[str] = field(default_factory=list)
    grid: Optional[tuple] = None  # (rows, cols) of those layers
    store: list = field(default_factory=list)  # their softmax maps, filled by each UNet call


def stca_setup(pipe, s: TuneSettings, h: int, w: int, generator) -> StcaSetup:
    """The STCA layers at a quarter of the latent side (losses.STCA_LEVEL); none without a LoRA or with λ2 = 0."""
    from studio.controls.base import Context, spatial_cross_attention_names
    from studio.subjects import losses

    if s.method not in ("lora", "both") or s.stca_weight <= 0:
        return StcaSetup()
    ctx = Context(frames=1, latent_h=h, latent_w=w, steps=s.steps, do_cfg=False, generator=generator)
    unet = pipe.unet
    tokens_at = _layer_tokens(unet, spatial_cross_attention_names(unet), h, w, pipe.tokenizer.model_max_length)
    names, grid = losses.stca_layers(tokens_at, ctx)
    logger.info("STCA on %d layer(s) at %dx%d: %s", len(names), *grid, ", ".join(names))
    return StcaSetup(names, grid)


@contextmanager
def capturing(unet, stca: StcaSetup):
    """The STCA layers' processors keep their attention maps in stca.store while the block runs."""
    from studio.controls.base import CaptureCrossAttnProcessor, attention_modules

    modules = attention_modules(unet)
    original = {n: modules[n].processor for n in stca.names}
    for n in stca.names:
        modules[n].set_processor(CaptureCrossAttnProcessor(stca.store))
    try:
        yield
    finally:
        stca.store.clear()
        for n, proc in original.items():
            modules[n].set_processor(proc)


@dataclass
class Trainables:
    """Step 5: what training moves (float32, on the model's device) and its optimizer."""

    lora: list = field(default_factory=list)  # the LoRA's parameters
    tokens: list[str] = field(default_factory=list)  # the new token strings
    token_ids: list[int] = field(default_factory=list)
    token_init: Optional["torch.Tensor"] = None  # (n, D): the class word's mean embedding, their starting value

    def groups(self, s: TuneSettings, rows) -> list[dict]:
        out = [{"params": self.lora, "lr": s.lr, "weight_decay": 1e-2}] if self.lora else []
        if rows is not None:
            out.append({"params": [rows.rows], "lr": s.token_lr, "weight_decay": 0.0})
        return out


def add_trainables(pipe, s: TuneSettings, name: str, generator) -> Trainables:
    """A LoRA on the spatial attention and/or new tokens (added to the tokenizer and the embedding table)."""
    import torch

    from studio.subjects.apply import add_token_rows
    from studio.subjects.trainable import add_lora

    unet, te, tok = pipe.unet, pipe.text_encoder, pipe.tokenizer
    for m in (unet, te, pipe.vae):
        m.requires_grad_(False)
    out = Trainables()
    if s.method in ("lora", "both"):
        out.lora = add_lora(unet, TARGET_SETS[s.lora_targets], s.rank, ADAPTER, generator)
    if s.method in ("tokens", "both"):
        out.tokens = token_strings(name, s.n_tokens)
        if add_token_rows(tok, te, out.tokens) != len(out.tokens):
            raise ValueError(f"name: the tokenizer already holds tokens of a subject named {name!r}")
        out.token_ids = tok.convert_tokens_to_ids(out.tokens)
        emb = te.get_input_embeddings().weight
        init_ids = torch.tensor(tok(s.class_word, add_special_tokens=False).input_ids, device=emb.device)
        with torch.no_grad():  # the class word's mean (Magic-Me copies fixed CLIP ids; see the module docstring)
            out.token_init = emb[init_ids].float().mean(0, keepdim=True).expand(len(out.tokens), -1).clone()
    return out


GOLDEN = (math.sqrt(5) - 1) / 2  # the additive recurrence frac(u + k·GOLDEN) covers 0..1 evenly for any k


@dataclass
class Draws:
    """The steps' draws of photos, timesteps and preservation clips, from the training's generator: independent
    ("random") or "balanced" (see TuneSettings.sampling). In "random" every draw is the one the trainer always made,
    in the same order, so a seed trains as before."""

    generator: "torch.Generator"
    balanced: bool
    n_photos: int
    n_timesteps: int
    n_clips: int = 0
    _photo_queue: list = field(default_factory=list)
    _clip_queue: list = field(default_factory=list)
    _clip_step: int = 0
    _clip_offset: Optional[float] = None

    def photos(self, batch: int) -> list[int]:
        import torch

        if not self.balanced:
            return torch.randint(0, self.n_photos, (batch,), generator=self.generator).tolist()
        out = []
        while len(out) < batch:
            if not self._photo_queue:
                self._photo_queue = torch.randperm(self.n_photos, generator=self.generator).tolist()
            out.append(self._photo_queue.pop())
        return out

    def photo_timesteps(self, batch: int):
        """(batch,) long: uniform draws, or one in each of `batch` equal strata of the schedule (in shuffled order)."""
        import torch

        if not self.balanced:
            return torch.randint(0, self.n_timesteps, (batch,), generator=self.generator)
        u = torch.rand(batch, generator=self.generator)
        strata = torch.randperm(batch, generator=self.generator)
        return ((strata + u) / batch * self.n_timesteps).long().clamp_max(self.n_timesteps - 1)

    def clip(self) -> int:
        import torch

        if not self.balanced:
            return int(torch.randint(0, self.n_clips, (1,), generator=self.generator))
        if not self._clip_queue:
            self._clip_queue = torch.randperm(self.n_clips, generator=self.generator).tolist()
        return self._clip_queue.pop()

    def clip_timestep(self):
        """(1,) long: a uniform draw, or the next of a golden-ratio sequence from a random start."""
        import torch

        if not self.balanced:
            return torch.randint(0, self.n_timesteps, (1,), generator=self.generator)
        if self._clip_offset is None:
            self._clip_offset = float(torch.rand((), generator=self.generator))
        x = (self._clip_offset + self._clip_step * GOLDEN) % 1.0
        self._clip_step += 1
        return torch.tensor([min(int(x * self.n_timesteps), self.n_timesteps - 1)])


@dataclass
class StepContext:
    """What every step reads: the model, the data and how it computes."""

    pipe: object
    s: TuneSettings
    kind: str  # epsilon | v_prediction
    generator: "torch.Generator"  # on the CPU: the same draws on any device
    precision: object  # trainable.Precision
    photos: PhotoSet
    clips: Optional[tuple]  # (latents (K, C, F, h, w) on the CPU, captions) or None
    stca: StcaSetup
    alphas: "torch.Tensor"  # (T,) ᾱ on the device, float32
    phrase: str  # "<tokens> sks dog"
    full_augment: bool
    flip: bool = True
    draws: Optional[Draws] = None  # None: made from `generator` and s.sampling

    def __post_init__(self):
        if self.draws is None:
            self.draws = Draws(self.generator, self.s.sampling == "balanced", self.photos.pixels.shape[0],
                               self.alphas.shape[0], 0 if self.clips is None else self.clips[0].shape[0])

    @property
    def device(self):
        return self.precision.device


def uses_clips(s: TuneSettings) -> bool:
    """Whether training takes preservation clips: a LoRA with λ1 > 0 (tokens alone train on the photos only)."""
    return s.method in ("lora", "both") and s.video_weight > 0


def step_context(pipe, s: TuneSettings, kind: str, generator, precision, photos: PhotoSet, clips, stca: StcaSetup,
                 tokens: list[str]) -> StepContext:
    """The StepContext of a training on `pipe`: its ᾱ, the phrase with the subject's new `tokens` (if any), and
    Magic-Me's augmentations when tokens are trained (unless s.augment says otherwise)."""
    import torch

    return StepContext(pipe, s, kind, generator, precision, photos, clips, stca,
                       pipe.scheduler.alphas_cumprod.to(precision.device, torch.float32),
                       f"{insertion(s.method, s.trigger, tokens)} {s.class_word}",
                       s.augment if s.augment is not None else bool(tokens), s.flip)


def _encode_text(pipe, captions: list[str], device):
    tok = pipe.tokenizer
    ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    return pipe.text_encoder(ids.to(device))[0]  # (B, L, D)


def _noised(c: StepContext, z0, eps, t):
    """x_t = √ᾱ·z0 + √(1−ᾱ)·ε at timesteps t (B,) on the device; returns (x_t, ᾱ (B, 1, 1, 1, 1))."""
    a = c.alphas[t].view(-1, 1, 1, 1, 1)
    return a.sqrt() * z0 + (1 - a).sqrt() * eps, a


def photo_loss(c: StepContext):
    """Step 6a: the photo batch (one-frame videos) with the region loss + λ2·STCA; returns (loss, stca loss)."""
    import torch

    from studio.controls.boxes import phrase_token_indices
    from studio.subjects import losses

    s, gen, dev, pipe = c.s, c.generator, c.device, c.pipe
    xs, ms, areas, region, caps = [], [], [], [], []
    for i in c.draws.photos(s.batch):
        x, m2, pre = augment(c.photos.pixels[i], c.photos.masks[i], gen, c.full_augment, c.flip)  # m2: (2, H, W)
        whole = s.full_image_rate > 0 and float(torch.rand((), generator=gen)) < s.full_image_rate
        xs.append(x)
        ms.append(m2[0])
        areas.append(m2[1])
        region.append(m2[1] if whole else m2[0])  # Magic-Me's use_orig_img_rate: the whole photo
        caps.append(s.caption.replace("{phrase}", f"{pre + ' ' if pre else ''}{c.phrase}"))
    z0 = _encode_pixels(pipe, torch.stack(xs), gen)[:, :, None]  # (B, C, 1, h, w) on the device, float32
    eps = torch.randn(z0.shape, generator=gen)  # drawn on the CPU from the seed, then moved
    if s.noise_offset > 0:  # Magic-Me's offset noise: a constant per item and channel
        eps = eps + s.noise_offset * torch.randn((*z0.shape[:2], 1, 1, 1), generator=gen)
    eps = eps.to(dev)
    t = c.draws.photo_timesteps(s.batch).to(dev)
    zt, a = _noised(c, z0, eps, t)
    dt = pipe.unet.dtype
    c.stca.store.clear()
    with c.precision.forward():
        text = _encode_text(pipe, caps, dev)
        pred = pipe.unet(zt.to(dt), t, encoder_hidden_states=text.to(dt)).sample.float()
    target = diffusion_target(c.kind, z0, eps, a)
    # the subject's region (or, without region_loss, the whole photo: never the padding)
    lm = losses.latent_mask(torch.stack(region if s.region_loss else areas).to(dev), *z0.shape[-2:])
    loss = losses.region_loss(pred, target, lm)
    l_stca = torch.zeros((), device=dev)
    if c.stca.store:
        pos = [phrase_token_indices(pipe.tokenizer, cap, c.phrase) for cap in caps]
        l_stca = losses.stca_loss([p.float() for p in c.stca.store], torch.stack(ms).to(dev), pos, c.stca.grid,
                                  frames=1)
        loss = loss + s.stca_weight * l_stca
    c.stca.store.clear()
    return loss, l_stca


def preservation_loss(c: StepContext):
    """Step 6b: one preservation clip, the plain diffusion loss on a generated (or the user's) captioned clip."""
    import torch

    from studio.subjects import losses

    gen, dev, pipe = c.generator, c.device, c.pipe
    latents, captions = c.clips
    k = c.draws.clip()
    v0 = latents[k:k + 1].to(dev, torch.float32)  # (1, C, F, h, w)
    ve = torch.randn(v0.shape, generator=gen).to(dev)
    vt = c.draws.clip_timestep().to(dev)
    vt_noisy, va = _noised(c, v0, ve, vt)
    dt = pipe.unet.dtype
    c.stca.store.clear()
    with c.precision.forward():
        vtext = _encode_text(pipe, [captions[k]], dev)
        if type(pipe.unet).__name__ == "UNetMotionModel":  # text repeated per frame; UNet3D takes it per video
            vtext = vtext.repeat_interleave(v0.shape[2], 0)  # (F, L, D)
        v_hat = pipe.unet(vt_noisy.to(dt), vt, encoder_hidden_states=vtext.to(dt)).sample.float()
    c.stca.store.clear()
    return losses.preservation_loss(v_hat, diffusion_target(c.kind, v0, ve, va))


def lr_factor(schedule: str, step: int, steps: int) -> float:
    """The learning rates' factor at a step (0-based) of `steps`: 1 (constant) or a cosine from 1 at the first step
    to 0 after the last."""
    if schedule == "constant":
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * step / steps))


def train_step(c: StepContext, optimizer, params: list) -> tuple[float, float]:
    """Step 6: one optimizer step on the photo batch and (with a LoRA and λ1 > 0) one preservation clip, the two
    halves averaged (MotionBooth's grad-accumulation of 2). Returns (loss, stca loss)."""
    loss, l_stca = photo_loss(c)
    if c.clips is not None:
        loss = (loss + c.s.video_weight * preservation_loss(c)) / 2
    optimizer.zero_grad(set_to_none=True)
    c.precision.step(loss, optimizer, params)
    c.stca.store.clear()  # checkpointing's recomputation captured again
    return loss.item(), l_stca.item()


def collect_weights(pipe, trainables: Trainables, rows) -> tuple[Optional[dict], Optional[dict]]:
    """Step 7: the LoRA in diffusers' file format and the token vectors, float32 on the CPU."""
    lora = embeds = None
    if trainables.lora:
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet, adapter_name=ADAPTER))
        lora = {f"unet.{k}": v.detach().float().cpu().contiguous() for k, v in sd.items()}
    if rows is not None:
        vectors = rows.rows.detach().float().cpu()
        embeds = {tk: vectors[i].clone() for i, tk in enumerate(trainables.tokens)}
    return lora, embeds


def train(pipe, preset, photos: list[np.ndarray], masks: list[np.ndarray] | None, name: str,
          settings: TuneSettings, progress: Progress | None = None, cancel: threading.Event | None = None,
          cache_root: Path | None = None) -> TuneResult:
    """Train a subject on `pipe` (a pipeline of its own: its UNet gets an adapter, its tokenizer new tokens).

    photos: (H, W, 3) uint8; masks: (H, W) bool per photo, or None (the whole photo). Returns the weights; the
    caller saves them. Runs on the pipeline's device in its dtype (trainable.Precision: float32 trainable weights,
    autocast for half-precision models); every random draw comes from one CPU generator seeded from the settings,
    so a seed draws the same noise on any device. Deterministic for a seed on one machine; torch's global RNG is
    left as it was.
    """
    import torch

    from studio.subjects.trainable import Precision, gradient_checkpointing, token_rows

    # 1. Check inputs before any work.
    s = resolve(settings, preset)
    check_method(s.method, preset, pipe)
    kind = check_prediction_type(pipe.scheduler)
    check_photos(photos, masks, preset, warn=False)
    t_start = time.perf_counter()
    report = _reporter(progress)
    d = preset.defaults
    gen = torch.Generator("cpu").manual_seed(s.seed)
    precision = Precision.of(pipe.unet)
    h, w = d.height // pipe.vae_scale_factor, d.width // pipe.vae_scale_factor
    # 2. Photos and masks at the model's size.
    photo_set = prepare_photos(photos, masks, preset)
    # 3. Preservation clips before any weight changes (the frozen model makes them).
    clips = None
    if uses_clips(s):
        clip_progress = None if report is None else (
            lambda i, n, left: report(i, n, float("nan"), left, "preservation"))
        clips = preservation_clips(pipe, preset, d.frames, d.width, d.height, s.preservation, cache_root,
                                   clip_progress, cancel)
    # 4. The layers STCA reads.
    stca = stca_setup(pipe, s, h, w, gen)
    # 5. Trainable weights: LoRA on the spatial attention, new token rows.
    trainables = add_trainables(pipe, s, name, gen)
    out = TuneResult(None, None, trainables.tokens, s, 0.0, precision=precision.record(s.checkpointing))
    c = step_context(pipe, s, kind, gen, precision, photo_set, clips, stca, trainables.tokens)
    # 6. Steps: captions "a <tokens> sks dog" (+ Magic-Me's far away / very small / close up / zoomed in prefixes).
    rows_ctx = (token_rows(pipe.text_encoder, trainables.token_ids, trainables.token_init) if trainables.tokens
                else contextlib.nullcontext())
    with rows_ctx as rows, capturing(pipe.unet, stca), gradient_checkpointing(pipe.unet, s.checkpointing):
        params = [p for g in trainables.groups(s, rows) for p in g["params"]]
        opt = torch.optim.AdamW(trainables.groups(s, rows), betas=(0.9, 0.999), eps=1e-8)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(s.lr_schedule, i, s.steps))
        if trainables.lora:
            pipe.unet.train()  # the text encoder stays in eval mode: CLIP has no dropout to switch
        try:
            t_loop = time.perf_counter()
            for step in range(s.steps):
                if cancel is not None and cancel.is_set():
                    raise TuneCancelled(f"training of '{name}' cancelled at step {step}; nothing was saved")
                loss, l_stca = train_step(c, opt, params)
                sched.step()
                out.losses.append(loss)
                if report is not None:
                    done = step + 1
                    per = (time.perf_counter() - t_loop) / done  # from the first step: set-up and clips excluded
                    report(done, s.steps, loss, per * (s.steps - done), "training")
                if (step + 1) % 25 == 0:
                    logger.info("subject %s step %d/%d loss %.4f stca %.4f", name, step + 1, s.steps, loss, l_stca)
        finally:
            pipe.unet.eval()
        # 7. Weights in the files' formats.
        out.lora, out.embeds = collect_weights(pipe, trainables, rows)
    out.seconds = time.perf_counter() - t_start
    return out


def _with_fault_points(progress: Progress | None) -> Progress | None:
    """`progress` with the fault point "train-step" after each training step (studio.faults; tests only)."""
    if not os.environ.get(faults.ENV):
        return progress
    report = _reporter(progress)

    def on_step(i, n, loss, left, stage="training"):
        if report is not None:
            report(i, n, loss, left, stage)
        if stage == "training":
            faults.point("train-step")

    return on_step


def add_subject(name: str, photos: list[np.ndarray], masks: list[np.ndarray] | None, model,
                settings: TuneSettings, library=None, manager=None, progress: Progress | None = None,
                cancel: threading.Event | None = None, overwrite: bool = False, photo_names: list[str] | None = None):
    """Train a subject for a model preset and save it in the library (atomically, only when training finished).

    model: a preset name or path, or a ModelPreset (e.g. with random weights).
    Trains on a freshly loaded pipeline (not the manager's cached one), so rendering is untouched meanwhile, on the
    manager's machine settings (device, dtype; without a manager, the environment's: studio.machine).
    Settings and photos are checked before any weights load; photo_names (e.g. the files') go into those messages.
    """
    from studio import machine
    from studio.presets import ModelPreset, load_model_preset
    from studio.subjects.library import SubjectLibrary, base_weights, sanitize_name

    # 1. Check inputs: name, model, settings, photos.
    name = sanitize_name(name)
    library = library or SubjectLibrary()
    if library.exists(name) and not overwrite:
        raise ValueError(f"name: subject '{name}' already exists; remove it first or pass overwrite")
    preset = model if isinstance(model, ModelPreset) else load_model_preset(model)  # a preset changed by the caller
    s = resolve(settings, preset)
    check_photos(photos, masks, preset, photo_names)
    if len(photos) == 1:
        logger.warning("subject %s: one photo only; more photos (3-10, varied) give a subject that generalises", name)
    # 2. Train on a pipeline of its own.
    machine_settings = manager.settings if manager is not None else machine.from_env().checked()
    pipe = load_training_pipeline(preset, machine_settings, manager)
    result = train(pipe, preset, photos, masks, name, s, _with_fault_points(progress), cancel)
    faults.point("trained")
    # 3. Save; the manager's pipelines drop an older version of the subject.
    methods = ["lora"] * (result.lora is not None) + ["tokens"] * (result.embeds is not None)
    meta = {"trigger": insertion(s.method, s.trigger, result.tokens), "class_word": s.class_word,
            "base_model": preset.name, "base_weights": base_weights(preset), "methods": methods,
            "tokens": result.tokens, "lora_rank": s.rank if result.lora is not None else None,
            "training": {**dataclasses.asdict(s), "seconds": round(result.seconds, 1),
                         "final_loss": float(np.mean(result.losses[-10:])) if result.losses else None,
                         "precision": result.precision}}
    subject = library.save(name, photos, masks, meta, lora=result.lora, embeds=result.embeds, overwrite=overwrite)
    if manager is not None:
        manager.forget_subject(name)
    logger.info("subject %s trained in %.1f s (%s)", name, result.seconds, ", ".join(methods))
    return subject, result


def load_training_pipeline(preset, settings, manager=None):
    """The preset's pipeline for training, on the settings' device in the training dtype (machine.training_dtype),
    whole (training needs every weight on the device at once: never offloaded, no VAE tiling).

    It is a second copy beside the renderer's cached pipelines (the price of a cancel that leaves rendering exactly
    as it was: about 3 GB for SD 1.5 + AnimateDiff or Zeroscope in 16-bit). On a GPU without room for it and
    machine.AUTO_HEADROOM of activations, the manager's cached pipelines are dropped first (the next render reloads
    them)."""
    import torch

    from studio import machine
    from studio.pipelines import load_pipeline

    device = settings.device
    dtype = machine.training_dtype(preset.dtype, settings, device)
    own = machine.MachineSettings(device=device, dtype=str(dtype).removeprefix("torch."), origin=settings.origin)
    pipe = load_pipeline(preset, "cpu", own)
    if device.startswith("cuda"):
        need = sum(machine.weight_bytes(m) for m in pipe.components.values() if isinstance(m, torch.nn.Module))
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        if free < need + machine.AUTO_HEADROOM and manager is not None and manager.loaded():
            logger.info("training %s needs %.1f GiB with %.1f GiB free: dropping the cached pipelines", preset.name,
                        (need + machine.AUTO_HEADROOM) / machine.GiB, free / machine.GiB)
            manager.clear()
            torch.cuda.empty_cache()
    return machine.place(pipe, device, own)
