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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

logger = logging.getLogger(__name__)

METHODS = ("lora", "tokens", "both")
# Every spatial (per-frame) attention projection; the motion modules (AnimateDiff) and temp_attentions
# (Zeroscope's UNet3D) do not match: their names hold "motion_modules." / "temp_attentions.", never ".attentions.".
LORA_TARGETS = r"^(?!.*motion_modules).*(^|\.)attentions\.\d+\.transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$"
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

    method: str = "lora"  # lora | tokens | both
    class_word: str = "dog"  # what the subject is; the phrase shots use ("sks dog")
    trigger: str = "sks"  # the rare word that names the subject (LoRA)
    steps: Optional[int] = None
    lr: Optional[float] = None  # LoRA learning rate
    token_lr: Optional[float] = None  # extended ID tokens' learning rate (Magic-Me: 1e-3)
    rank: Optional[int] = None  # LoRA rank
    n_tokens: int = 4  # extended ID tokens (Magic-Me: 4)
    batch: int = 4  # photos per step
    region_loss: bool = True  # loss on subject pixels only (False: the whole photo)
    stca_weight: float = 0.01  # λ2 (MotionBooth)
    video_weight: float = 1.0  # λ1 (MotionBooth); 0 turns the preservation clips off
    preservation: Optional[str] = None  # a folder of the user's own clips (.mp4/.gif, optional same-name .txt)
    augment: Optional[bool] = None  # Magic-Me's flip/rotate/scale; default on for tokens, flip only for LoRA
    seed: int = 0
    # Magic-Me's use_orig_img_rate: the share of photos trained on the whole photo (mask = 1) instead of the
    # subject's region; default 0.05 when tokens are trained, else 0 (MotionBooth always uses the region)
    full_image_rate: Optional[float] = None
    # Magic-Me's noise_offset: ε + offset·N(0, 1) per item and channel on the photo batch; default 0.1 when tokens
    # are trained, else 0
    noise_offset: Optional[float] = None


# Per base model: steps, LoRA lr, token lr, rank. Real models follow the methods' settings scaled to a LoRA
# (MotionBooth fine-tunes the full UNet at 5e-6 for 300 steps; a rank-32 LoRA needs a larger lr).
DEFAULTS = {
    "toyworld": dict(steps=80, lr=6e-3, token_lr=5e-3, rank=8),  # ~65 s on 2 CPU cores
    "tiny": dict(steps=20, lr=1e-3, token_lr=5e-3, rank=4),
    "animatediff": dict(steps=400, lr=1e-4, token_lr=1e-3, rank=32),
    "zeroscope": dict(steps=400, lr=1e-4, token_lr=1e-3, rank=32),
}


def defaults(preset) -> dict:
    return dict(DEFAULTS.get(preset.name) or DEFAULTS.get(preset.family) or DEFAULTS["animatediff"])


def resolve(settings: TuneSettings, preset) -> TuneSettings:
    """Fill the base model's defaults in and check every field (ValueError naming the field and value)."""
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
    v = s.full_image_rate
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v <= 1:
        raise ValueError(f"full_image_rate: must be a number in 0..1 (got {v!r})")
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


def augment(x, m, generator, full: bool):
    """Magic-Me's augmentation of one photo: x (3, H, W) in -1..1, m (H, W) or (K, H, W) masks in 0..1 -> (x, m,
    caption prefix).

    Always a horizontal flip with p=0.5; with `full`, also rotation (p=0.7, N(0, 10°)) and scale: with p=2/3 shrink
    to U[1/3, 1] (below 0.6: "far away" or "very small", on a black canvas, mask 0 outside), else zoom U[1.2, 1.4]
    ("zoomed in" or "close up").
    """
    import torch
    import torch.nn.functional as F

    def u():
        return float(torch.rand((), generator=generator))

    prefix = ""
    if u() < 0.5:
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


def train(pipe, preset, photos: list[np.ndarray], masks: list[np.ndarray] | None, name: str,
          settings: TuneSettings, progress: Progress | None = None, cancel: threading.Event | None = None,
          cache_root: Path | None = None) -> TuneResult:
    """Train a subject on `pipe` (a pipeline of its own: its UNet gets an adapter, its tokenizer new tokens).

    photos: (H, W, 3) uint8; masks: (H, W) bool per photo, or None (the whole photo). Returns the weights; the
    caller saves them. Deterministic for a seed on one machine; torch's global RNG is left as it was.
    """
    import torch

    from studio.controls.base import Context, attention_modules, spatial_cross_attention_names
    from studio.controls.boxes import phrase_token_indices
    from studio.subjects import losses
    from studio.subjects.apply import add_token_rows, keep_global_rng
    from studio.controls.base import CaptureCrossAttnProcessor

    # 1. Check inputs before any work.
    s = resolve(settings, preset)
    kind = check_prediction_type(pipe.scheduler)
    check_photos(photos, masks, preset, warn=False)
    t_start = time.perf_counter()
    report = _reporter(progress)
    d = preset.defaults
    W, H, Fr = d.width, d.height, d.frames
    gen = torch.Generator("cpu").manual_seed(s.seed)
    unet, te, tok, sched = pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler
    use_lora, use_tokens = s.method in ("lora", "both"), s.method in ("tokens", "both")
    motion = type(unet).__name__ == "UNetMotionModel"  # text repeated per frame; UNet3D takes it per video

    # 2. Photos and masks at the model's size, in -1..1; `valid` is where the photo is (not padding).
    fitted = [fit_photo(p, masks[i] if masks else None, W, H) for i, p in enumerate(photos)]
    px = torch.stack([torch.from_numpy(f[0].copy()) for f in fitted]).float().div(127.5).sub(1)
    px = px.permute(0, 3, 1, 2)  # (n, 3, H, W)
    mk = torch.stack([torch.from_numpy(np.stack([f[1], f[2]])) for f in fitted]).float()  # (n, 2, H, W)
    # 3. Preservation clips before any weight changes (the frozen model makes them).
    clips = None
    if use_lora and s.video_weight > 0:
        clip_progress = None if report is None else (
            lambda i, n, left: report(i, n, float("nan"), left, "preservation"))
        clips = preservation_clips(pipe, preset, Fr, W, H, s.preservation, cache_root, clip_progress, cancel)
    h, w = H // pipe.vae_scale_factor, W // pipe.vae_scale_factor
    # 4. STCA reads the spatial cross-attention layers at a quarter of the latent side (losses.STCA_LEVEL).
    stca_names, grid = [], None
    if use_lora and s.stca_weight > 0:
        ctx = Context(frames=1, latent_h=h, latent_w=w, steps=s.steps, do_cfg=False, generator=gen)
        tokens_at = _layer_tokens(unet, spatial_cross_attention_names(unet), h, w, tok.model_max_length)
        stca_names, grid = losses.stca_layers(tokens_at, ctx)
        logger.info("STCA on %d layer(s) at %dx%d: %s", len(stca_names), *grid, ", ".join(stca_names))
    # 5. Trainable parameters: LoRA on the spatial attention, new token rows.
    unet.requires_grad_(False)
    te.requires_grad_(False)
    pipe.vae.requires_grad_(False)
    params = []
    if use_lora:
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.lora import LoraLayer

        # peft directly (diffusers' add_adapter is missing on Zeroscope's UNet3DConditionModel); its init draws
        # from the global RNG: kept out of it, and redrawn from ours
        with keep_global_rng(unet):
            inject_adapter_in_model(LoraConfig(r=s.rank, lora_alpha=s.rank, init_lora_weights="gaussian",
                                               target_modules=LORA_TARGETS), unet, adapter_name=ADAPTER)
        for mod in unet.modules():
            if isinstance(mod, LoraLayer) and ADAPTER in mod.lora_A:
                a = mod.lora_A[ADAPTER].weight
                a.data.copy_(torch.randn(a.shape, generator=gen) / s.rank)  # peft's "gaussian": N(0, 1/r)
                mod.lora_B[ADAPTER].weight.data.zero_()
        lora_params = [p for p in unet.parameters() if p.requires_grad]
        for p in lora_params:
            p.data = p.data.float()
        params.append({"params": lora_params, "lr": s.lr, "weight_decay": 1e-2})
    tokens = token_strings(name, s.n_tokens) if use_tokens else []
    if use_tokens:
        if add_token_rows(tok, te, tokens) != len(tokens):
            raise ValueError(f"name: the tokenizer already holds tokens of a subject named {name!r}")
        emb = te.get_input_embeddings().weight
        new_ids = torch.tensor(tok.convert_tokens_to_ids(tokens))
        init_ids = tok(s.class_word, add_special_tokens=False).input_ids
        with torch.no_grad():  # the class word's mean (Magic-Me copies fixed CLIP ids; see the module docstring)
            emb[new_ids] = emb[init_ids].mean(0, keepdim=True).expand(len(tokens), -1).clone()
        emb.requires_grad_(True)
        keep = emb.detach().clone()
        frozen_rows = torch.ones(emb.shape[0], dtype=torch.bool)
        frozen_rows[new_ids] = False
        params.append({"params": [emb], "lr": s.token_lr, "weight_decay": 0.0})
    opt = torch.optim.AdamW(params, betas=(0.9, 0.999), eps=1e-8)
    trainable = [p for g in params for p in g["params"]]
    if use_lora:
        unet.train()
    if use_tokens:
        te.train()
    # 6. Captions: "a <tokens> sks dog" (+ Magic-Me's far away / very small / close up / zoomed in prefixes).
    words = insertion(s.method, s.trigger, tokens)
    phrase = f"{words} {s.class_word}"
    store: list = []
    modules = attention_modules(unet)
    orig_procs = {n: modules[n].processor for n in stca_names}
    for n in stca_names:
        modules[n].set_processor(CaptureCrossAttnProcessor(store))
    alphas = sched.alphas_cumprod.float()
    T = sched.config.num_train_timesteps
    full_aug = s.augment if s.augment is not None else use_tokens
    out = TuneResult(None, None, tokens, s, 0.0)
    try:
        t_loop = time.perf_counter()
        for step in range(s.steps):
            if cancel is not None and cancel.is_set():
                raise TuneCancelled(f"training of '{name}' cancelled at step {step}; nothing was saved")
            # 6a. Photo batch (one-frame videos): region loss + STCA.
            idx = torch.randint(0, px.shape[0], (s.batch,), generator=gen)
            xs, ms, areas, region, caps = [], [], [], [], []
            for i in idx.tolist():
                x, m2, pre = augment(px[i], mk[i], gen, full_aug)  # m2: (2, H, W) subject mask, photo area
                whole = s.full_image_rate > 0 and float(torch.rand((), generator=gen)) < s.full_image_rate
                xs.append(x)
                ms.append(m2[0])
                areas.append(m2[1])
                region.append(m2[1] if whole else m2[0])  # Magic-Me's use_orig_img_rate: the whole photo
                caps.append(f"a {pre + ' ' if pre else ''}{phrase}")
            x, m = torch.stack(xs), torch.stack(ms)  # (B, 3, H, W), (B, H, W)
            z0 = _encode_pixels(pipe, x, gen)[:, :, None]  # (B, C, 1, h, w)
            eps = torch.randn(z0.shape, generator=gen)
            if s.noise_offset > 0:  # Magic-Me's offset noise: a constant per item and channel
                eps = eps + s.noise_offset * torch.randn((*z0.shape[:2], 1, 1, 1), generator=gen)
            t = torch.randint(0, T, (s.batch,), generator=gen)
            a = alphas[t].view(-1, 1, 1, 1, 1)
            zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
            ids = tok(caps, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
            text = te(ids.to(te.device))[0]  # (B, L, D)
            store.clear()
            dt = unet.dtype
            pred = unet(zt.to(dt), t, encoder_hidden_states=text.to(dt)).sample.float()
            target = diffusion_target(kind, z0, eps, a)
            # the subject's region (or, without region_loss, the whole photo: never the padding)
            lm = losses.latent_mask(torch.stack(region if s.region_loss else areas), *z0.shape[-2:])
            loss_img = losses.region_loss(pred, target, lm)
            l_stca = torch.zeros(())
            if store:
                pos = [phrase_token_indices(tok, c, phrase) for c in caps]
                l_stca = losses.stca_loss([p.float() for p in store], m, pos, grid, frames=1)
                loss_img = loss_img + s.stca_weight * l_stca
            loss = loss_img
            # 6b. Preservation clip: plain diffusion loss on a generated (or the user's) captioned clip.
            if clips is not None:
                k = int(torch.randint(0, clips[0].shape[0], (1,), generator=gen))
                v0 = clips[0][k:k + 1]  # (1, C, F, h, w)
                ve = torch.randn(v0.shape, generator=gen)
                vt = torch.randint(0, T, (1,), generator=gen)
                va = alphas[vt].view(-1, 1, 1, 1, 1)
                vids = tok([clips[1][k]], padding="max_length", max_length=tok.model_max_length, truncation=True,
                           return_tensors="pt").input_ids
                vtext = te(vids.to(te.device))[0]
                if motion:
                    vtext = vtext.repeat_interleave(v0.shape[2], 0)  # (F, L, D)
                store.clear()
                v_hat = unet((va.sqrt() * v0 + (1 - va).sqrt() * ve).to(dt), vt,
                             encoder_hidden_states=vtext.to(dt)).sample.float()
                store.clear()
                v_target = diffusion_target(kind, v0, ve, va)
                loss = (loss + s.video_weight * losses.preservation_loss(v_hat, v_target)) / 2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            if use_tokens:
                with torch.no_grad():
                    emb[frozen_rows] = keep[frozen_rows]  # only the new rows move
            out.losses.append(loss.item())
            if report is not None:
                done = step + 1
                per = (time.perf_counter() - t_loop) / done  # from the first step: set-up and clips excluded
                report(done, s.steps, out.losses[-1], per * (s.steps - done), "training")
            if (step + 1) % 25 == 0:
                logger.info("subject %s step %d/%d loss %.4f stca %.4f", name, step + 1, s.steps, out.losses[-1],
                            l_stca.item())
    finally:
        store.clear()
        for n, proc in orig_procs.items():
            modules[n].set_processor(proc)
        unet.eval()
        te.eval()
    # 7. Weights in the files' formats.
    if use_lora:
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=ADAPTER))
        out.lora = {f"unet.{k}": v.detach().float().cpu().contiguous() for k, v in sd.items()}
    if use_tokens:
        w_emb = te.get_input_embeddings().weight.detach().float().cpu()
        out.embeds = {tk: w_emb[i].clone() for tk, i in zip(tokens, new_ids.tolist())}
    out.seconds = time.perf_counter() - t_start
    return out


def add_subject(name: str, photos: list[np.ndarray], masks: list[np.ndarray] | None, model,
                settings: TuneSettings, library=None, manager=None, progress: Progress | None = None,
                cancel: threading.Event | None = None, overwrite: bool = False, photo_names: list[str] | None = None):
    """Train a subject for a model preset and save it in the library (atomically, only when training finished).

    model: a preset name or path, or a ModelPreset (e.g. with random weights).
    Trains on a freshly loaded pipeline (not the manager's cached one), so rendering is untouched meanwhile.
    Settings and photos are checked before any weights load; photo_names (e.g. the files') go into those messages.
    """
    from studio.pipelines import load_pipeline, pick_device
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
    device = manager.device if manager is not None else pick_device()
    pipe = load_pipeline(preset, device)
    result = train(pipe, preset, photos, masks, name, s, progress, cancel)
    # 3. Save; the manager's pipelines drop an older version of the subject.
    methods = ["lora"] * (result.lora is not None) + ["tokens"] * (result.embeds is not None)
    meta = {"trigger": insertion(s.method, s.trigger, result.tokens), "class_word": s.class_word,
            "base_model": preset.name, "base_weights": base_weights(preset), "methods": methods,
            "tokens": result.tokens, "lora_rank": s.rank if result.lora is not None else None,
            "training": {**dataclasses.asdict(s), "seconds": round(result.seconds, 1),
                         "final_loss": float(np.mean(result.losses[-10:])) if result.losses else None}}
    subject = library.save(name, photos, masks, meta, lora=result.lora, embeds=result.embeds, overwrite=overwrite)
    if manager is not None:
        manager.forget_subject(name)
    logger.info("subject %s trained in %.1f s (%s)", name, result.seconds, ", ".join(methods))
    return subject, result
