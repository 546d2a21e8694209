"""Teach a base model a subject from a few photos: a spatial LoRA (MotionBooth §1.1) and/or extended ID tokens
(Magic-Me §2.2), written to the subject library.

One step, for the LoRA: a batch of photos (one-frame videos) with the subject-region loss + λ2·STCA, and one
preservation clip with the plain ε-loss ×λ1 (clips the frozen model generated once, cached per base model, or the
user's own); the two halves are averaged (MotionBooth's grad-accumulation of 2). For the tokens alone: the photo
batch with Magic-Me's augmentations and the region loss; nothing but the new embedding rows moves.

Training runs on a pipeline of its own (never the one the renderer has cached), so a cancelled or failed run
leaves the studio exactly as it was; the subject is saved only when training finishes.

Symbols: B photos per step, C latent channels, F frames, H×W pixels, h×w latent, L text tokens, D text width.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
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
    checks = [("steps", s.steps, 1, 100_000), ("rank", s.rank, 1, 256), ("n_tokens", s.n_tokens, 1, 16),
              ("batch", s.batch, 1, 64)]
    for name, v, lo, hi in checks:
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise ValueError(f"{name}: must be an integer in {lo}..{hi} (got {v!r})")
    for name in ("lr", "token_lr", "stca_weight", "video_weight"):
        v = getattr(s, name)
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (name.endswith("lr") and v == 0):
            raise ValueError(f"{name}: must be a finite number > 0 (got {v!r})" if name.endswith("lr")
                             else f"{name}: must be a finite number >= 0 (got {v!r})")
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


def augment(x, m, generator, full: bool):
    """Magic-Me's augmentation of one photo: x (3, H, W) in -1..1, m (H, W) in 0..1 -> (x, m, caption prefix).

    Always a horizontal flip with p=0.5; with `full`, also rotation (p=0.7, N(0, 10°)) and scale: with p=2/3 shrink
    to U[1/3, 1] (below 0.6: "far away" on a black canvas, mask 0 outside), else zoom U[1.2, 1.4] ("close up").
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
            prefix = "far away" if u() < 0.5 else "small"
    else:
        s = 1.2 + 0.2 * u()
        prefix = "close up" if u() < 0.5 else ""
    # Inverse map output -> input: rotate by -angle and scale by 1/s, with a random shift that keeps a shrunk photo
    # inside the frame.
    room = max(0.0, 1 - s)
    tx, ty = (u() * 2 - 1) * room, (u() * 2 - 1) * room
    c, sn = math.cos(angle) / s, math.sin(angle) / s
    theta = torch.tensor([[c, -sn, -tx / s], [sn, c, -ty / s]], dtype=torch.float32)[None]
    both = torch.cat([x, m[None]], 0)[None]  # (1, 4, H, W)
    grid = F.affine_grid(theta, list(both.shape), align_corners=False)
    # Outside the photo: black pixels (-1) and no mask.
    out = F.grid_sample(both + torch.tensor([1.0, 1.0, 1.0, 0.0]).view(1, 4, 1, 1), grid, align_corners=False,
                        padding_mode="zeros")[0] - torch.tensor([1.0, 1.0, 1.0, 0.0]).view(4, 1, 1)
    return out[:3], out[3].clamp(0, 1), prefix


def preservation_clips(pipe, preset, frames: int, width: int, height: int, folder: str | None = None,
                       cache_root: Path | None = None, progress: Callable | None = None):
    """(latents (K, C, F, h, w), captions) of the preservation clips: the user's folder, or clips the frozen base
    model generates once from PRESERVATION_PROMPTS and caches under the studio home."""
    import torch
    from safetensors.torch import load_file, save_file

    from studio.pipelines import studio_home

    if folder:
        return _user_clips(pipe, Path(folder), frames, width, height)
    prompts = PRESERVATION_PROMPTS.get(preset.name, PRESERVATION_PROMPTS["default"])
    tag = hashlib.sha256(json.dumps([preset.name, preset.base, preset.motion_adapter, frames, width, height,
                                     prompts]).encode()).hexdigest()[:12]
    root = (cache_root or studio_home() / "preservation") / f"{preset.name}-{tag}"
    if (root / "clips.safetensors").exists():
        return load_file(str(root / "clips.safetensors"))["latents"], json.loads((root / "captions.json").read_text())
    logger.info("generating %d preservation clips with %s (once; cached in %s)", len(prompts), preset.name, root)
    lat = []
    for i, p in enumerate(prompts):
        if progress:
            progress(i, len(prompts), f"preservation clip {i + 1}/{len(prompts)}")
        g = torch.Generator("cpu").manual_seed(i)
        with torch.no_grad():
            out = pipe(prompt=p, num_frames=frames, width=width, height=height, num_inference_steps=20,
                       guidance_scale=7.5, generator=g, output_type="latent").frames
        lat.append(out.float().cpu())  # (1, C, F, h, w)
    lat = torch.cat(lat)
    tmp = root.with_name(root.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({"latents": lat.contiguous()}, str(tmp / "clips.safetensors"))
    (tmp / "captions.json").write_text(json.dumps(prompts))
    if not root.exists():
        tmp.rename(root)
    return lat, prompts


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


Progress = Callable[[int, int, float, float], None]  # (step, total, loss, seconds left)


def train(pipe, preset, photos: list[np.ndarray], masks: list[np.ndarray] | None, name: str,
          settings: TuneSettings, progress: Progress | None = None, cancel: threading.Event | None = None,
          cache_root: Path | None = None) -> TuneResult:
    """Train a subject on `pipe` (a pipeline of its own: its UNet gets an adapter, its tokenizer new tokens).

    photos: (H, W, 3) uint8; masks: (H, W) bool per photo, or None (the whole photo). Returns the weights; the
    caller saves them. Deterministic for a seed on one machine.
    """
    import torch
    import torch.nn.functional as F

    from studio.controls.boxes import phrase_token_indices
    from studio.controls.reference import cover_crop
    from studio.subjects import losses
    from studio.toyworld.train import capture_cross_attention

    s = resolve(settings, preset)
    t_start = time.perf_counter()
    d = preset.defaults
    W, H, Fr = d.width, d.height, d.frames
    gen = torch.Generator("cpu").manual_seed(s.seed)
    unet, te, tok, sched = pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler
    use_lora, use_tokens = s.method in ("lora", "both"), s.method in ("tokens", "both")
    motion = type(unet).__name__ == "UNetMotionModel"  # text repeated per frame; UNet3D takes it per video

    # 1. Photos and masks at the model's size, in -1..1.
    px = torch.stack([torch.from_numpy(cover_crop(p, W, H).copy()) for p in photos]).float().div(127.5).sub(1)
    px = px.permute(0, 3, 1, 2)  # (n, 3, H, W)
    if masks:
        mk = torch.stack([torch.from_numpy(cover_crop(m.astype(np.uint8) * 255, W, H, nearest=True) > 127)
                          for m in masks]).float()  # (n, H, W)
    else:
        mk = torch.ones(px.shape[0], H, W)
    # 2. Preservation clips before any weight changes (the frozen model makes them).
    clips = None
    if use_lora and s.video_weight > 0:
        clips = preservation_clips(pipe, preset, Fr, W, H, s.preservation, cache_root)
    # 3. Trainable parameters: LoRA on the spatial attention, new token rows.
    unet.requires_grad_(False)
    te.requires_grad_(False)
    pipe.vae.requires_grad_(False)
    params = []
    if use_lora:
        from peft import LoraConfig

        unet.add_adapter(LoraConfig(r=s.rank, lora_alpha=s.rank, init_lora_weights="gaussian",
                                    target_modules=LORA_TARGETS), adapter_name=ADAPTER)
        from peft.tuners.lora import LoraLayer

        for mod in unet.modules():  # peft draws its init from the global RNG: redraw it from ours
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
        added = tok.add_tokens(tokens)
        if added != len(tokens):
            raise ValueError(f"name: the tokenizer already holds tokens of a subject named {name!r}")
        te.resize_token_embeddings(len(tok))
        emb = te.get_input_embeddings().weight
        new_ids = torch.tensor(tok.convert_tokens_to_ids(tokens))
        init_ids = tok(s.class_word, add_special_tokens=False).input_ids
        with torch.no_grad():
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
    # 4. Captions: "a <tokens> sks dog" (+ Magic-Me's far away / close up prefixes).
    words = insertion(s.method, s.trigger, tokens)
    phrase = f"{words} {s.class_word}"
    store: list = []
    orig_procs = capture_cross_attention(unet, store) if use_lora and s.stca_weight > 0 else None
    alphas = sched.alphas_cumprod.float()
    T = sched.config.num_train_timesteps
    full_aug = s.augment if s.augment is not None else use_tokens
    out = TuneResult(None, None, tokens, s, 0.0)
    try:
        for step in range(s.steps):
            if cancel is not None and cancel.is_set():
                raise TuneCancelled(f"training of '{name}' cancelled at step {step}; nothing was saved")
            # 4a. Photo batch (one-frame videos): region loss + STCA.
            idx = torch.randint(0, px.shape[0], (s.batch,), generator=gen)
            xs, ms, caps = [], [], []
            for i in idx.tolist():
                x, m, pre = augment(px[i], mk[i], gen, full_aug)
                xs.append(x)
                ms.append(m)
                caps.append(f"a {pre + ' ' if pre else ''}{phrase}")
            x, m = torch.stack(xs), torch.stack(ms)  # (B, 3, H, W), (B, H, W)
            z0 = _encode_pixels(pipe, x, gen)[:, :, None]  # (B, C, 1, h, w)
            eps = torch.randn(z0.shape, generator=gen)
            t = torch.randint(0, T, (s.batch,), generator=gen)
            a = alphas[t].view(-1, 1, 1, 1, 1)
            zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
            ids = tok(caps, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
            text = te(ids.to(te.device))[0]  # (B, L, D)
            store.clear()
            dt = unet.dtype
            eps_hat = unet(zt.to(dt), t, encoder_hidden_states=text.to(dt)).sample.float()
            lm = losses.latent_mask(m, *z0.shape[-2:]) if s.region_loss else torch.ones_like(z0[:, :1], dtype=torch.bool)
            loss_img = losses.region_loss(eps_hat, eps, lm)
            l_stca = torch.zeros(())
            if store:
                pos = [phrase_token_indices(tok, c, phrase) for c in caps]
                l_stca = losses.stca_loss([p.float() for p in store], m, pos, *z0.shape[-2:], frames=1)
                loss_img = loss_img + s.stca_weight * l_stca
            loss = loss_img
            # 4b. Preservation clip: plain ε-loss on a generated (or the user's) captioned clip.
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
                loss = (loss + s.video_weight * losses.preservation_loss(v_hat, ve)) / 2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            if use_tokens:
                with torch.no_grad():
                    emb[frozen_rows] = keep[frozen_rows]  # only the new rows move
            out.losses.append(loss.item())
            if progress is not None:
                done = step + 1
                per = (time.perf_counter() - t_start) / done
                progress(done, s.steps, out.losses[-1], per * (s.steps - done))
            if (step + 1) % 25 == 0:
                logger.info("subject %s step %d/%d loss %.4f stca %.4f", name, step + 1, s.steps, out.losses[-1],
                            l_stca.item())
    finally:
        store.clear()
        if orig_procs is not None:
            unet.set_attn_processor(dict(orig_procs))
        unet.eval()
        te.eval()
    # 5. Weights in the files' formats.
    if use_lora:
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=ADAPTER))
        out.lora = {f"unet.{k}": v.detach().float().cpu().contiguous() for k, v in sd.items()}
    if use_tokens:
        w = te.get_input_embeddings().weight.detach().float().cpu()
        out.embeds = {tk: w[i].clone() for tk, i in zip(tokens, new_ids.tolist())}
    out.seconds = time.perf_counter() - t_start
    return out


def add_subject(name: str, photos: list[np.ndarray], masks: list[np.ndarray] | None, model: str,
                settings: TuneSettings, library=None, manager=None, progress: Progress | None = None,
                cancel: threading.Event | None = None, overwrite: bool = False):
    """Train a subject for a model preset and save it in the library (atomically, only when training finished).

    Trains on a freshly loaded pipeline (not the manager's cached one), so rendering is untouched meanwhile.
    """
    from studio.pipelines import load_pipeline, pick_device
    from studio.presets import load_model_preset
    from studio.subjects.library import SubjectLibrary, sanitize_name

    name = sanitize_name(name)
    library = library or SubjectLibrary()
    if library.exists(name) and not overwrite:
        raise ValueError(f"name: subject '{name}' already exists; remove it first or pass overwrite")
    preset = load_model_preset(model)
    s = resolve(settings, preset)
    if len(photos) == 1:
        logger.warning("subject %s: one photo only; more photos (3-10, varied) give a subject that generalises", name)
    device = manager.device if manager is not None else pick_device()
    pipe = load_pipeline(preset, device)
    result = train(pipe, preset, photos, masks, name, s, progress, cancel)
    methods = ["lora"] * (result.lora is not None) + ["tokens"] * (result.embeds is not None)
    meta = {"trigger": insertion(s.method, s.trigger, result.tokens), "class_word": s.class_word,
            "base_model": preset.name, "methods": methods, "tokens": result.tokens,
            "lora_rank": s.rank if result.lora is not None else None,
            "training": {**dataclasses.asdict(s), "seconds": round(result.seconds, 1),
                         "final_loss": float(np.mean(result.losses[-10:])) if result.losses else None}}
    subject = library.save(name, photos, masks, meta, lora=result.lora, embeds=result.embeds, overwrite=overwrite)
    if manager is not None:
        manager.forget_subject(name)
    logger.info("subject %s trained in %.1f s (%s)", name, result.seconds, ", ".join(methods))
    return subject, result
