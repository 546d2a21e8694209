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
subjects and background, done by masking).

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


def load_image(path_or_array, width: int, height: int) -> np.ndarray:
    """RGB uint8 (height, width, 3): resized to cover width×height, then centre-cropped."""
    from PIL import Image

    if isinstance(path_or_array, np.ndarray):
        im = Image.fromarray(path_or_array)
    else:
        im = Image.open(path_or_array)
    im = im.convert("RGB")
    scale = max(width / im.width, height / im.height)
    size = (max(width, round(im.width * scale)), max(height, round(im.height * scale)))
    im = im.resize(size, Image.BICUBIC)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    return np.asarray(im.crop((left, top, left + width, top + height)))


@torch.no_grad()
def encode_reference(pipe, path_or_array, width: int, height: int) -> torch.Tensor:
    """The clean latent (1, C, h, w) of a reference image at the shot's size."""
    rgb = load_image(path_or_array, width, height).copy()
    x = torch.from_numpy(rgb).float().div(127.5).sub(1.0).permute(2, 0, 1)[None]  # (1, 3, H, W) in -1..1
    x = x.to(pipe.vae.device, pipe.vae.dtype)
    return pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor


def supports(unet) -> bool:
    return bool(spatial_self_attention_names(unet))


class ReferenceInjection(Control):
    """Inject reference latents into spatial self-attention. items: (latent (1, C, h, w), strength, region) with
    region ("box", k) for subject k, ("outside",) for the background, or ("all",)."""

    name = "reference"

    def __init__(self, ctx: Context, items: list[tuple[torch.Tensor, float, tuple]], temporal_attention: bool = False,
                 refresh_every: int = 1):
        if not items:
            raise ValueError("no references")
        self.ctx = ctx
        self.latents = torch.cat([z for z, _, _ in items])  # (R, C, h, w)
        self.strengths = [float(s) for _, s, _ in items]
        self.regions = [r for _, _, r in items]
        self.temporal = temporal_attention
        self.refresh_every = max(1, int(refresh_every))
        self.bank: dict[str, torch.Tensor] = {}  # layer name -> (R, N, D) reference tokens of the current step
        self.writing = False
        self.write_calls = 0
        self._bias: dict = {}
        self._rows: dict = {}

    # --- installation ------------------------------------------------------------------------------------

    def processors(self, unet) -> dict:
        return {n: RefSelfAttnProcessor(self, n) for n in spatial_self_attention_names(unet)}

    def hooks(self, unet) -> list:
        if self.temporal:
            return [unet.register_forward_pre_hook(self._append, with_kwargs=True),
                    unet.register_forward_hook(self._strip, with_kwargs=True)]
        return [unet.register_forward_pre_hook(self._write, with_kwargs=True)]

    def close(self) -> None:
        self.bank.clear()
        self._bias.clear()

    # --- exclude mode: a one-frame write pass before every main call ----------------------------------------

    def _write(self, unet, args, kwargs):
        if self.writing:
            return None
        if self.bank and self.ctx.step % self.refresh_every:
            return None  # reuse the tokens of the last refresh
        sample, timestep, text = _unet_inputs(args, kwargs)
        R = self.latents.shape[0]
        ref = self.latents.to(sample.device, sample.dtype)[:, :, None]  # (R, C, 1, h, w)
        cond = text[-1:].expand(R, *text.shape[1:])  # the conditional prompt: the last row is a cond frame
        t = timestep.flatten()[0] if torch.is_tensor(timestep) else timestep
        self.writing = self.ctx.side_pass = True
        try:
            with torch.no_grad():
                unet(ref, t, encoder_hidden_states=cond)
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

    # --- the attention bias ------------------------------------------------------------------------------

    def row_split(self, videos: int, per_video: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Row indices of a spatial-attention batch: (conditional generated frames, every other row)."""
        key = ("rows", videos, per_video, self.ctx.frames, self.ctx.do_cfg, device)
        if key not in self._rows:
            first = videos // 2 if self.ctx.do_cfg else 0
            is_cond = torch.zeros(videos, per_video, dtype=torch.bool)
            is_cond[first:, :self.ctx.frames] = True
            flat = is_cond.flatten()
            self._rows[key] = flat.nonzero().flatten().to(device), (~flat).nonzero().flatten().to(device)
        return self._rows[key]

    def cond_mask(self, videos: int, n: int, n_keys: int, group: int, dtype, device) -> torch.Tensor:
        """(videos·F, 1, N, N + R·n_keys) mask of the conditional rows: own keys free, reference keys biased."""
        key = ("mask", videos, n, n_keys, group, self.ctx.step, dtype, device)
        if key not in self._bias:
            bias = self.key_bias(n, self.ctx.frames, dtype, device, n_keys, group)  # (F, N, R·n_keys)
            mask = torch.cat([torch.zeros(self.ctx.frames, n, n, dtype=dtype, device=device), bias], 2)
            self._bias[key] = mask[None].expand(videos, -1, -1, -1).flatten(0, 1)[:, None].contiguous()
        return self._bias[key]

    def key_bias(self, n: int, frames: int, dtype, device, n_keys: int | None = None, group: int = 1) -> torch.Tensor:
        """(frames, N, R·n_keys) bias on the reference keys for conditional queries of each frame; each key
        stands for `group` reference tokens (pooling)."""
        ctx = self.ctx
        n_keys = n if n_keys is None else n_keys
        key = (n, n_keys, frames, ctx.step, dtype, device)
        if key not in self._bias:
            if any(k[-3] != ctx.step for k in self._bias):
                self._bias.clear()  # one step's masks at a time
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
                weight = math.log(strength * group) if strength > 0 else NEG
                b = torch.where(allowed, torch.tensor(weight), torch.tensor(NEG))  # (F, N) per query
                parts.append(b[:, :, None].expand(frames, n, n_keys))  # same for every key of this reference
            self._bias[key] = torch.cat(parts, 2).to(device=device, dtype=dtype)
        return self._bias[key]


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


class RefSelfAttnProcessor:
    """Spatial self-attention that stores its input on the write pass and reads the references on the main pass."""

    def __init__(self, control: ReferenceInjection, name: str):
        self.control, self.name = control, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        ctl = self.control
        plain = (encoder_hidden_states is not None or hidden_states.ndim != 3 or attn.spatial_norm is not None
                 or attn.group_norm is not None or attention_mask is not None)
        if plain:
            from diffusers.models.attention_processor import AttnProcessor2_0

            return AttnProcessor2_0()(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        ctx = ctl.ctx
        if ctl.writing:
            ctl.bank[self.name] = hidden_states  # (R, N, D): the references' tokens at this layer
            return _attend(attn, hidden_states, hidden_states)
        rows, n, d = hidden_states.shape
        F_, per_video = ctx.frames, ctx.frames + ctx.extra_frames  # rows: video-major, frame-minor
        videos = rows // per_video
        if not ctx.extra_frames and self.name not in ctl.bank:
            return _attend(attn, hidden_states, hidden_states)
        R, heads = ctl.latents.shape[0], attn.heads
        cond_videos = range(videos // 2, videos) if ctx.do_cfg else range(videos)
        vc = len(cond_videos)
        # The references' tokens at this layer: from this batch (temporal mode, per cond video) or the write pass.
        if ctx.extra_frames:
            refs = hidden_states.view(videos, per_video, n, d)[cond_videos.start:, F_:]  # (Vc, R, N, D)
        else:
            refs = ctl.bank[self.name][None]  # (1, R, N, D), shared by every video
        rows_grid, cols_grid = ctx.layer_size(n)
        pooled, group = pool_tokens(refs.flatten(0, 1), rows_grid, cols_grid)  # (·, N', D): fewer keys
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
        out = torch.empty_like(q)
        if len(rest):  # unconditional videos and appended reference frames: plain self-attention
            out[rest] = torch.nn.functional.scaled_dot_product_attention(q[rest], k[rest], v[rest])
        mask = ctl.cond_mask(vc, n, n_keys, group, q.dtype, q.device)  # (Vc·F, 1, N, N + R·N')
        out[cond] = torch.nn.functional.scaled_dot_product_attention(
            q[cond], torch.cat([k[cond], k_ref], 2), torch.cat([v[cond], v_ref], 2), attn_mask=mask)
        out = out.transpose(1, 2).reshape(rows, n, -1).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def _attend(attn, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    if x.ndim != 3 or attn.spatial_norm is not None or attn.group_norm is not None:
        from diffusers.models.attention_processor import AttnProcessor2_0

        return AttnProcessor2_0()(attn, x, None if context is x else context)
    return attend(attn, x, context, mask)
