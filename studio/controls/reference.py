"""Zero-shot subject and background references through the model's own spatial self-attention.

VideoMaker (§3.1) shows that a video diffusion UNet's spatial self-attention can carry a subject's look: append
the reference's clean latent and let every frame's tokens attend to the reference's tokens (concatenated keys
and values). Used training-free here (METHODS.md §3.3), in the spirit of diffusers' reference-only:

1. write: at every UNet call, the same UNet runs once on the clean reference latents as a one-frame video (same
   timestep, the conditional prompt), and each spatial self-attention layer keeps the tokens it receives;
2. read: in the main pass, each spatial self-attention layer lets the conditional pass's tokens attend to
   [own tokens ‖ reference tokens]; the unconditional pass stays plain (as reference-only does), so guidance
   pushes toward the reference.

Because the write pass is a one-frame video, the reference never enters the motion modules: it is excluded from
temporal attention (METHODS.md's advice). `temporal_attention=True` instead appends the reference to the main
pass as an extra frame, as VideoMaker's released code does (zeros for the unconditional videos), so it takes part
in temporal attention; frames then read its tokens from the same pass.

Each reference has a strength (a logit bias log(strength) on its keys: 0 = off, 1 = plain concatenation) and a
region: a subject's reference is read only by query tokens inside that subject's box (everywhere if it has no
boxes); the background reference only by tokens outside every subject box (Video Alchemist's separation of
subjects and background, done by masking). Strength 0 drops a reference (none left: nothing is installed).

Cost: on layers with more than MAX_REF_TOKENS tokens the reference's tokens are average-pooled to at most that many
keys (each with log(k·k) added to its logit, so the reference keeps its total attention weight); the masks are
built once per step and layer size, so each layer stays one fused attention call for each half of the batch.

Works on diffusers' UNetMotionModel (AnimateDiff: text repeated per frame) and UNet3DConditionModel (zeroscope: text
per video); `supports(unet)` says whether a UNet is one of them.

Shapes: R references, B videos, F frames, C channels, h×w latent size, N tokens of a layer, D features.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from studio.controls.base import Context, Control, attend, spatial_self_attention_names
from studio.controls.boxes import NEG, box_masks

logger = logging.getLogger(__name__)


def cover_crop(image: np.ndarray, width: int, height: int, nearest: bool = False) -> np.ndarray:
    """An image (H, W[, 3]) resized to cover width×height, then centre-cropped to it (bicubic, or nearest for
    masks). Shared by references and subject photos/masks, so both meet the model at the same framing."""
    from PIL import Image

    im = Image.fromarray(image)
    scale = max(width / im.width, height / im.height)
    size = (max(width, round(im.width * scale)), max(height, round(im.height * scale)))
    im = im.resize(size, Image.NEAREST if nearest else Image.BICUBIC)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    return np.asarray(im.crop((left, top, left + width, top + height)))


def load_image(path_or_array, width: int, height: int) -> np.ndarray:
    """RGB uint8 (height, width, 3): resized to cover width×height, then centre-cropped."""
    from PIL import Image

    if isinstance(path_or_array, np.ndarray):
        im = Image.fromarray(path_or_array)
    else:
        im = Image.open(path_or_array)
    return cover_crop(np.asarray(im.convert("RGB")), width, height)


@torch.no_grad()
def encode_reference(pipe, path_or_array, width: int, height: int, generator=None) -> torch.Tensor:
    """The clean latent (1, C, h, w) of a reference image (a path or an RGB array) at the shot's size, in the
    pipe's dtype and device. The VAE posterior's mean is used, so `generator` draws nothing (accepted for callers
    that pass one to every encoder)."""
    rgb = load_image(path_or_array, width, height).copy()
    x = torch.from_numpy(rgb).float().div(127.5).sub(1.0).permute(2, 0, 1)[None]  # (1, 3, H, W) in -1..1
    x = x.to(pipe.vae.device, pipe.vae.dtype)
    return pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor


def supports(unet) -> bool:
    """Whether injection works on this UNet: a video UNet of diffusers whose spatial layers see (videos·frames,
    tokens, features) batches, video-major: UNetMotionModel (AnimateDiff) and UNet3DConditionModel (zeroscope)."""
    from diffusers import UNet3DConditionModel, UNetMotionModel

    return isinstance(unet, (UNetMotionModel, UNet3DConditionModel)) and bool(spatial_self_attention_names(unet))


REGIONS = ("box", "outside", "all")


class ReferenceInjection(Control):
    """Inject reference latents into spatial self-attention.

    items: (latent (1, C, h, w), strength >= 0, region) with region ("box", k) for subject k (read inside its box;
    everywhere if it has no boxes), ("outside",) for the background (outside every subject box; everywhere if there
    are no boxes) or ("all",). References of strength 0 are dropped: with none left the control installs nothing.
    refresh_every: run the write pass every that many steps and reuse its tokens in between (exclude mode only).
    """

    name = "reference"

    def __init__(self, ctx: Context, items: list[tuple[torch.Tensor, float, tuple]], temporal_attention: bool = False,
                 refresh_every: int = 1):
        if not items:
            raise ValueError("no references")
        for z, strength, region in items:
            if not (math.isfinite(float(strength)) and float(strength) >= 0):
                raise ValueError(f"reference strength must be a finite number >= 0, not {strength}")
            if not region or region[0] not in REGIONS or (region[0] == "box") != (len(region) == 2):
                raise ValueError(f"reference region must be ('box', k), ('outside',) or ('all',), not {region!r}")
            if z.ndim != 4 or z.shape[0] != 1 or tuple(z.shape[2:]) != (ctx.latent_h, ctx.latent_w):
                raise ValueError(f"reference latent must be (1, C, {ctx.latent_h}, {ctx.latent_w}) like the render's, "
                                 f"not {tuple(z.shape)}")
        items = [it for it in items if float(it[1]) > 0]  # strength 0: that reference is off
        self.ctx = ctx
        self.latents = torch.cat([z for z, _, _ in items]) if items else None  # (R, C, h, w)
        self.strengths = [float(s) for _, s, _ in items]
        self.regions = [tuple(r) for _, _, r in items]
        self.temporal = bool(temporal_attention)
        self.refresh_every = max(1, int(refresh_every))
        self.bank: dict[str, torch.Tensor] = {}  # layer name -> (R, N, D) reference tokens of the last write pass
        self.writing = False  # True during the write pass (guards the pre-hook against re-entry)
        self.write_calls = 0
        self._cache: dict = {}  # masks and row splits for the current boxes
        self._cache_step = None
        self._cache_boxes = None  # a copy of ctx.boxes when the cache was filled

    @property
    def active(self) -> bool:
        return self.latents is not None

    # --- installation ------------------------------------------------------------------------------------

    def processors(self, unet) -> dict:
        if not self.active:
            return {}
        return {n: RefSelfAttnProcessor(self, n) for n in spatial_self_attention_names(unet)}

    def hooks(self, unet) -> list:
        if not self.active:
            return []
        if self.temporal:
            return [unet.register_forward_pre_hook(self._append, with_kwargs=True),
                    unet.register_forward_hook(self._strip, with_kwargs=True)]
        return [unet.register_forward_pre_hook(self._write, with_kwargs=True)]

    def close(self) -> None:
        self.bank.clear()
        self._cache.clear()
        self._cache_step = self._cache_boxes = None
        self.writing = False
        if self.temporal:
            self.ctx.extra_frames = 0  # in case a render stopped between the two hooks

    # --- exclude mode: a one-frame write pass before every main call ----------------------------------------

    def _write(self, unet, args, kwargs):
        if self.writing:
            return None
        if self.bank and self.ctx.step % self.refresh_every:
            return None  # reuse the tokens of the last refresh
        sample, timestep, text = _unet_inputs(args, kwargs)
        R = self.latents.shape[0]
        ref = self.latents.to(sample.device, sample.dtype)[:, :, None]  # (R, C, 1, h, w): R one-frame videos
        # The conditional prompt: the batch is [uncond, cond] (repeated per frame by AnimateDiff, not by zeroscope),
        # so its last row is always conditional.
        cond = text[-1:].expand(R, *text.shape[1:])
        t = timestep.flatten()[0] if torch.is_tensor(timestep) else timestep
        self.writing = self.ctx.side_pass = True
        try:
            with torch.no_grad():
                unet(ref, t, encoder_hidden_states=cond, cross_attention_kwargs=kwargs.get("cross_attention_kwargs"))
        finally:
            self.writing = self.ctx.side_pass = False
        self.write_calls += 1
        return None

    # --- temporal mode: references appended as frames of the main pass --------------------------------------

    def _append(self, unet, args, kwargs):
        sample, timestep, text = _unet_inputs(args, kwargs)
        B2, C, F_, h, w = sample.shape
        R = self.latents.shape[0]
        ref = self.latents.to(sample.device, sample.dtype)[None].transpose(1, 2)  # (1, C, R, h, w)
        ref = ref.expand(B2, -1, -1, -1, -1).clone()
        if self.ctx.do_cfg:
            ref[: B2 // 2] = 0  # unconditional videos get a blank reference (VideoMaker)
        sample = torch.cat([sample, ref], 2)  # (B2, C, F + R, h, w)
        if text.shape[0] == B2 * F_:  # AnimateDiff: text repeated per frame; repeat the last frame's for the refs
            text = text.view(B2, F_, *text.shape[1:])
            text = torch.cat([text, text[:, -1:].expand(-1, R, -1, -1)], 1).flatten(0, 1)
        self.ctx.extra_frames = R  # other controls see F + R frames per video in this call
        args = list(args)
        for i, (name, value) in enumerate((("sample", sample), ("timestep", timestep),
                                           ("encoder_hidden_states", text))):
            if i < len(args):
                args[i] = value
            else:
                kwargs[name] = value
        return tuple(args), kwargs

    def _strip(self, unet, args, kwargs, output):
        R, self.ctx.extra_frames = self.ctx.extra_frames, 0
        if isinstance(output, tuple):
            return (output[0][:, :, :-R], *output[1:])
        output.sample = output.sample[:, :, :-R]
        return output

    # --- rows and masks (cached while the boxes stay where they are) -----------------------------------------------

    def _cached(self, key, make):
        ctx = self.ctx
        if self._cache_step != ctx.step:  # a new step: keep the masks unless the boxes moved (camera)
            seen = self._cache_boxes
            if (seen is None or seen.keys() != ctx.boxes.keys()
                    or any(not torch.equal(seen[k], b) for k, b in ctx.boxes.items())):
                self._cache.clear()
                self._cache_boxes = {k: b.clone() for k, b in ctx.boxes.items()}
            self._cache_step = ctx.step
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def row_split(self, videos: int, per_video: int, device):
        """Rows of a spatial-attention batch (video-major, frame-minor): (conditional generated frames, every other
        row), as slices when they are contiguous (no appended frames), else index tensors."""

        def make():
            first = videos // 2 if self.ctx.do_cfg else 0
            if per_video == self.ctx.frames:
                return slice(first * per_video, videos * per_video), slice(0, first * per_video)
            is_cond = torch.zeros(videos, per_video, dtype=torch.bool)
            is_cond[first:, :self.ctx.frames] = True
            flat = is_cond.flatten()
            return flat.nonzero().flatten().to(device), (~flat).nonzero().flatten().to(device)

        return self._cached(("rows", videos, per_video, self.ctx.frames, self.ctx.do_cfg, str(device)), make)

    def cond_mask(self, videos: int, n: int, n_keys: int, group: int, dtype, device) -> torch.Tensor:
        """(videos·F, 1, N, N + R·n_keys) float mask of the conditional rows: own keys free, references biased."""

        def make():
            bias = self.key_bias(n, self.ctx.frames, dtype, device, n_keys, group)  # (F, N, R·n_keys)
            mask = torch.cat([torch.zeros(self.ctx.frames, n, n, dtype=dtype, device=device), bias], 2)
            return mask[None].expand(videos, -1, -1, -1).flatten(0, 1)[:, None].contiguous()

        return self._cached(("mask", videos, n, n_keys, group, dtype, str(device)), make)

    def key_bias(self, n: int, frames: int, dtype, device, n_keys: int | None = None, group: int = 1) -> torch.Tensor:
        """(frames, N, R·n_keys) additive logit bias on the reference keys for each frame's queries: log(strength)
        (+ log(group) when each key stands for `group` pooled tokens) inside the reference's region, NEG outside."""
        n_keys = n if n_keys is None else n_keys

        def make():
            ctx = self.ctx
            rows, cols = ctx.layer_size(n)
            union = torch.zeros(frames, n, dtype=torch.bool)
            for boxes in ctx.boxes.values():
                union |= box_masks(boxes.float(), rows, cols)
            parts = []
            for strength, region in zip(self.strengths, self.regions):
                if region[0] == "box" and region[1] in ctx.boxes:
                    allowed = box_masks(ctx.boxes[region[1]].float(), rows, cols)  # (F, N)
                elif region[0] == "outside" and ctx.boxes:
                    allowed = ~union
                else:
                    allowed = torch.ones(frames, n, dtype=torch.bool)
                b = torch.full((frames, n), NEG).masked_fill(allowed, math.log(strength * group))  # per query
                parts.append(b[:, :, None].expand(frames, n, n_keys))  # the same for every key of this reference
            return torch.cat(parts, 2).to(device=device, dtype=dtype)

        return self._cached(("bias", n, n_keys, frames, group, dtype, str(device)), make)


MAX_REF_TOKENS = 64  # per reference and layer: larger layers see the reference average-pooled to this many keys


def pool_tokens(tokens: torch.Tensor, rows: int, cols: int) -> tuple[torch.Tensor, int]:
    """(M, N, D) tokens on a rows×cols grid -> (M, N', D) with N' <= MAX_REF_TOKENS by k×k average pooling, and
    k·k (how many tokens each pooled key stands for: its logit gets log(k·k) so its total weight is kept)."""
    k = 1
    while (rows // k) * (cols // k) > MAX_REF_TOKENS and rows % (2 * k) == 0 and cols % (2 * k) == 0:
        k *= 2
    if k == 1:
        return tokens, 1
    m, _, d = tokens.shape
    grid = tokens.transpose(1, 2).reshape(m, d, rows, cols)
    pooled = torch.nn.functional.avg_pool2d(grid, k)  # (M, D, rows/k, cols/k)
    return pooled.flatten(2).transpose(1, 2), k * k


def _unet_inputs(args, kwargs):
    names = ("sample", "timestep", "encoder_hidden_states")
    vals = [args[i] if i < len(args) else kwargs.get(n) for i, n in enumerate(names)]
    return vals[0], vals[1], vals[2]


def _empty(rows) -> bool:
    return rows.start == rows.stop if isinstance(rows, slice) else rows.numel() == 0


_PLAIN = None


def _plain(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
    """diffusers' own processor, for the inputs this one does not edit (4-D inputs, norms, masks, cross-attention)."""
    global _PLAIN
    if _PLAIN is None:
        from diffusers.models.attention_processor import AttnProcessor2_0

        _PLAIN = AttnProcessor2_0()
    return _PLAIN(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


class RefSelfAttnProcessor:
    """Spatial self-attention that stores its input on the write pass and reads the references on the main pass.

    Main pass, rows (videos·(F + extra), N, D): conditional generated frames attend to [own N tokens ‖ R references'
    tokens] with the references' bias (one fused scaled-dot-product call); every other row (unconditional videos,
    appended reference frames) gets plain self-attention.
    """

    def __init__(self, control: ReferenceInjection, name: str):
        self.control, self.name = control, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        ctl = self.control
        if (encoder_hidden_states is not None or hidden_states.ndim != 3 or attn.spatial_norm is not None
                or attn.group_norm is not None or attention_mask is not None
                or getattr(attn, "norm_q", None) is not None or getattr(attn, "norm_k", None) is not None):
            return _plain(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        ctx = ctl.ctx
        if ctl.writing:
            ctl.bank[self.name] = hidden_states  # (R, N, D): the references' tokens at this layer
            return attend(attn, hidden_states, hidden_states)
        if not ctx.extra_frames and self.name not in ctl.bank:
            return attend(attn, hidden_states, hidden_states)
        rows, n, d = hidden_states.shape
        F_, per_video = ctx.frames, ctx.frames + ctx.extra_frames  # rows: video-major, frame-minor
        videos = rows // per_video
        if videos * per_video != rows:
            raise RuntimeError(f"reference: {rows} rows are not whole videos of {per_video} frames at {self.name}")
        R, heads = ctl.latents.shape[0], attn.heads
        first = videos // 2 if ctx.do_cfg else 0
        vc = videos - first  # conditional videos
        # The references' tokens at this layer: from this batch (temporal mode, per cond video) or the write pass.
        if ctx.extra_frames:
            refs = hidden_states.view(videos, per_video, n, d)[first:, F_:]  # (Vc, R, N, D)
        else:
            refs = ctl.bank[self.name][None]  # (1, R, N, D), shared by every video
        pooled, group = pool_tokens(refs.flatten(0, 1), *ctx.layer_size(n))  # (·, N', D): fewer keys on big layers
        n_keys = pooled.shape[1]
        pooled = pooled.reshape(refs.shape[0], R * n_keys, d)  # (1 or Vc, R·N', D)

        def split(t):  # (M, tokens, heads·dh) -> (M, heads, tokens, dh)
            return t.view(t.shape[0], -1, heads, t.shape[-1] // heads).transpose(1, 2)

        q, k, v = (split(f(hidden_states)) for f in (attn.to_q, attn.to_k, attn.to_v))  # (rows, heads, N, dh)
        k_ref, v_ref = split(attn.to_k(pooled)), split(attn.to_v(pooled))  # projected once, not per frame
        if k_ref.shape[0] > 1:
            k_ref, v_ref = k_ref.repeat_interleave(F_, 0), v_ref.repeat_interleave(F_, 0)
        else:
            k_ref, v_ref = k_ref.expand(vc * F_, -1, -1, -1), v_ref.expand(vc * F_, -1, -1, -1)
        cond, rest = ctl.row_split(videos, per_video, q.device)
        mask = ctl.cond_mask(vc, n, n_keys, group, q.dtype, q.device)  # (Vc·F, 1, N, N + R·N')
        out = torch.empty_like(q)
        if not _empty(rest):  # unconditional videos and appended reference frames: plain self-attention
            out[rest] = torch.nn.functional.scaled_dot_product_attention(q[rest], k[rest], v[rest])
        out[cond] = torch.nn.functional.scaled_dot_product_attention(
            q[cond], torch.cat([k[cond], k_ref], 2), torch.cat([v[cond], v_ref], 2), attn_mask=mask)
        out = out.transpose(1, 2).reshape(rows, n, -1).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor
