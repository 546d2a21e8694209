"""Zero-shot subject and background references through the model's own spatial self-attention.

VideoMaker (§3.1) shows that a video diffusion UNet's spatial self-attention can carry a subject's look: append
the reference's clean latent and let every frame's tokens attend to the reference's tokens (concatenated keys
and values). Used training-free here (METHODS.md §3.3), in the spirit of diffusers' reference-only:

1. write: the same UNet runs on the clean reference latents as one-frame videos (the step's timestep, the
   conditional prompt), and each spatial self-attention layer keeps the tokens it receives (pooled and projected
   to keys and values); every `refresh_every` steps, reused in between. The tokens depend on nothing the
   denoising changes, so when the schedule is known the passes of all the refresh steps run ahead as one batch
   (one UNet call of R·K one-frame videos, at most the main call's size) instead of K calls;
2. read: in the main pass, each spatial self-attention layer lets the conditional pass's tokens attend to
   [own tokens ‖ reference tokens]; the unconditional pass reads a blank reference (a zero latent's tokens, as
   VideoMaker's unconditional branch does; default), so guidance pushes from a blank toward the reference, or
   stays plain (as reference-only does), pushing from no reference toward it. On the toy-world model only the
   blank carries the reference's colour (purple pixels of "a circle on grass": 1.3% without a reference, 10.9%
   with blank, 2.4% with plain; 98% vs 18% of the subject's pixels).

Because the write pass is a one-frame video, the reference never enters the motion modules: it is excluded from
temporal attention (METHODS.md's advice). `temporal_attention=True` instead appends the reference to the main
pass as an extra frame, as VideoMaker's released code does (zeros for the unconditional videos), so it takes part
in temporal attention; frames then read its tokens from the same pass.

Each reference has a strength (a logit bias log(strength) on its keys: 0 = off, 1 = plain concatenation) and a
region: a subject's reference is read only by query tokens inside that subject's box (everywhere if it has no
boxes); the background reference only by tokens outside every subject box (Video Alchemist's separation of
subjects and background, done by masking). Strength 0 drops a reference (none left: nothing is installed).

Cost: on each layer a reference gets a key budget, `key_budget(N)`: at most 1/`token_ratio` of the layer's own N
tokens (default TOKEN_RATIO = 16, but never below MIN_REF_TOKENS), and never more than `max_tokens` (default
MAX_REF_TOKENS). A reference over budget is average-pooled k×k (each pooled key gets log(k·k) on its logit, so the
reference keeps its total attention weight). The budget bounds what the references add to each layer's attention
(at most R·N/16 keys on large layers) and keeps the 8×8 and 16×16 layers of small models from tripling their keys;
on the toy-world model pooling to 16 keys also carried the reference's colour better than 64 did (purple pixels
10.9% vs 6.0%). The references' keys and values are projected once, in the write pass, not at every layer call.
The per-query bias is never an N×N mask: queries and keys get R extra head channels, query i carrying its bias for
each reference and every key of reference r a one in channel r (own keys zeros), so q'·k' adds exactly the bias
(see `RefSelfAttnProcessor`); each layer stays one unmasked fused attention call (the unconditional videos read
the blank in the same call).

Works on diffusers' UNetMotionModel (AnimateDiff: text repeated per frame) and UNet3DConditionModel (zeroscope: text
per video); `supports(unet)` says whether a UNet is one of them.

Shapes: R references, B videos, F frames, C channels, h×w latent size, N tokens of a layer, D features.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from studio.controls.base import (BoxCache, Context, Control, attend, edits_unsupported, plain_processor,
                                  spatial_self_attention_names)
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


ENCODINGS_KEPT = 8  # per VAE: the latents of the last references encoded, so re-renders skip the encoder
_ENCODINGS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # vae -> OrderedDict(key -> latent)


@torch.no_grad()
def encode_reference(pipe, path_or_array, width: int, height: int) -> torch.Tensor:
    """The clean latent (1, C, h, w) of a reference image (a path or an RGB array) at the shot's size, in the
    pipe's dtype and device: the VAE posterior's mean (no random draw). The last ENCODINGS_KEPT encodings of each
    VAE are kept, keyed by the image's bytes (a file's content, not its name), the size, dtype and device."""
    vae = pipe.vae
    if isinstance(path_or_array, np.ndarray):
        data = repr((path_or_array.shape, path_or_array.dtype.str)).encode() + path_or_array.tobytes()
    else:
        data = Path(path_or_array).read_bytes()
    key = (hashlib.sha256(data).hexdigest(), width, height, str(vae.dtype), str(vae.device))
    kept = _ENCODINGS.setdefault(vae, OrderedDict())
    if key in kept:
        kept.move_to_end(key)
        return kept[key].clone()
    rgb = load_image(path_or_array, width, height).copy()
    x = torch.from_numpy(rgb).float().div(127.5).sub(1.0).permute(2, 0, 1)[None]  # (1, 3, H, W) in -1..1
    x = x.to(vae.device, vae.dtype)
    latent = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    kept[key] = latent
    while len(kept) > ENCODINGS_KEPT:
        kept.popitem(last=False)
    return latent.clone()


def supports(unet) -> bool:
    """Whether injection works on this UNet: a video UNet of diffusers whose spatial layers see (videos·frames,
    tokens, features) batches, video-major: UNetMotionModel (AnimateDiff) and UNet3DConditionModel (zeroscope)."""
    from diffusers import UNet3DConditionModel, UNetMotionModel

    return isinstance(unet, (UNetMotionModel, UNet3DConditionModel)) and bool(spatial_self_attention_names(unet))


REGIONS = ("box", "outside", "all")
UNCONDITIONAL = ("plain", "blank")  # what the unconditional videos read (see ReferenceInjection)
UNCONDITIONAL_DEFAULT = "blank"


class ReferenceInjection(Control):
    """Inject reference latents into spatial self-attention.

    items: (latent (1, C, h, w), strength >= 0, region) with region ("box", k) for subject k (read inside its box;
    everywhere if it has no boxes), ("outside",) for the background (outside every subject box; everywhere if there
    are no boxes) or ("all",). References of strength 0 are dropped: with none left the control installs nothing.
    refresh_every: read tokens written at every that many steps and reuse them in between (exclude mode only).
    max_tokens: keys per reference and layer at most; token_ratio: and at most 1/token_ratio of the layer's tokens
    (but not below MIN_REF_TOKENS): see `key_budget`. A reference over budget is average-pooled.
    schedule: a function giving the render's timesteps (one per step, e.g. `lambda: pipe.scheduler.timesteps`),
    read at the first write; with it the write passes of every refresh step run in one batch. Without it (or when
    it does not match the steps) each refresh step runs its own write pass.
    unconditional: what the unconditional videos read. "plain": nothing, plain self-attention (reference-only's
    convention: guidance pushes from no reference toward the reference). "blank": a blank reference in place of
    each reference, the tokens of a zero latent (under the unconditional prompt) in the same regions with the same
    strengths (VideoMaker's: its unconditional branch gets zeros_like(z_ref) as reference, so guidance pushes from
    a blank reference toward this one). In exclude mode the blank's tokens are projected once and sit in each of
    the R key blocks under that block's bias, so unconditional and conditional rows share one attention call.
    """

    name = "reference"

    def __init__(self, ctx: Context, items: list[tuple[torch.Tensor, float, tuple]], temporal_attention: bool = False,
                 refresh_every: int = 1, max_tokens: int | None = None, schedule=None,
                 unconditional: str = UNCONDITIONAL_DEFAULT, token_ratio: int | None = None):
        if not items:
            raise ValueError("no references")
        if unconditional not in UNCONDITIONAL:
            raise ValueError(f"unconditional must be one of {', '.join(UNCONDITIONAL)}, not {unconditional!r}")
        max_tokens = MAX_REF_TOKENS if max_tokens is None else max_tokens
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, not {max_tokens!r}")
        token_ratio = TOKEN_RATIO if token_ratio is None else token_ratio
        if isinstance(token_ratio, bool) or not isinstance(token_ratio, int) or token_ratio < 1:
            raise ValueError(f"token_ratio must be an integer >= 1, not {token_ratio!r}")
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
        self.max_tokens, self.token_ratio = max_tokens, token_ratio
        self.schedule = schedule
        self.blank = unconditional == "blank"
        self.bank: dict[str, RefKeys] = {}  # layer name -> the references' keys and values of the written timesteps
        self.refresh_t: float | None = None  # the timestep whose tokens the main pass reads now
        self.writing = False  # True during the write pass (guards the pre-hook against re-entry)
        self.write_calls = 0  # UNet calls of the write pass
        self.bank_hits = 0  # write passes answered from the kept banks of earlier renders (`_BANKS`)
        self._written: dict[str, list] = {}  # layer name -> [(keys, values, group)] of the current write's chunks
        self._unwritten: set[str] = set()  # layers the current write chunk has not reached yet
        self._cache = BoxCache(ctx)  # biases and row splits for the current boxes

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
        self._layers = frozenset(spatial_self_attention_names(unet))
        return [unet.register_forward_pre_hook(self._write, with_kwargs=True)]

    def close(self) -> None:
        self.bank.clear()
        self._written.clear()
        self.refresh_t = None
        self._cache.clear()
        self.writing = False
        if self.temporal:
            self.ctx.extra_frames = 0  # in case a render stopped between the two hooks

    # --- exclude mode: a one-frame write pass before every main call ----------------------------------------

    def _write(self, unet, args, kwargs):
        if self.writing:
            return None
        if self.refresh_t is not None and self.ctx.step % self.refresh_every:
            return None  # reuse the tokens of the last refresh
        sample, timestep, text = _unet_inputs(args, kwargs)
        t = float(timestep.flatten()[0] if torch.is_tensor(timestep) else timestep)
        written = next(iter(self.bank.values()), None)
        if written is None or t not in written.times:
            times = [t] + [u for u in self._future_refreshes() if u != t]
            rows = sample.shape[0] * sample.shape[2]  # the main call's one-frame rows (videos · frames)
            self._write_pass(unet, sample, times, text, kwargs.get("cross_attention_kwargs"), rows)
        self.refresh_t = t
        return None

    def _future_refreshes(self) -> list[float]:
        """Timesteps of the refresh steps after this one, from the schedule; [] when it does not fit the render."""
        ctx = self.ctx
        timesteps = [] if self.schedule is None else [float(u) for u in self.schedule()]
        if len(timesteps) != ctx.steps or not 0 <= ctx.step < ctx.steps:
            return []  # e.g. a second-order scheduler (two UNet calls a step): one write per refresh call
        first = (ctx.step // self.refresh_every + 1) * self.refresh_every
        return [timesteps[s] for s in range(first, ctx.steps, self.refresh_every)]

    def _write_pass(self, unet, sample, times: list[float], text, cross_attention_kwargs, rows: int) -> None:
        """Run the UNet on the R references at each timestep of `times` (batched, at most `rows` one-frame videos a
        call) and keep every spatial self-attention layer's keys and values in the bank. With a blank for the
        unconditional videos, each timestep's batch is [the blank (a zero latent, unconditional prompt), R
        references]."""
        ref = self.latents.to(sample.device, sample.dtype)[:, :, None]  # (R, C, 1, h, w): R one-frame videos
        checks = (ref, text[:1], text[-1:])  # the pass's inputs: the references, the two prompts (kept, compared)
        key = (tuple(times), rows, self.writes_blanks, self.max_tokens, self.token_ratio, str(sample.dtype),
               str(sample.device), repr(cross_attention_kwargs), frozenset(self._layers), unet_state(unet),
               _digest(checks))
        cached = _BANKS.get(unet, key, checks)
        if cached is not None:  # the same pass on the same weights ran before: its keys and values, bit for bit
            self.bank, self.bank_hits = dict(cached), self.bank_hits + 1
            return
        # The conditional prompt: the batch is [uncond, cond] (repeated per frame by AnimateDiff, not by zeroscope),
        # so its last row is always conditional, and its first unconditional when there is guidance.
        prompt = text[-1:].expand(ref.shape[0], *text.shape[1:])
        if self.writes_blanks:
            ref = torch.cat([torch.zeros_like(ref[:1]), ref])
            prompt = torch.cat([text[:1], prompt])
        R = ref.shape[0]  # one-frame videos per timestep
        per_call = max(1, rows // R)  # timesteps per UNet call
        self._written = {}
        self.writing = self.ctx.side_pass = True
        try:
            for i in range(0, len(times), per_call):
                chunk = times[i:i + per_call]
                ts = torch.tensor(chunk, device=sample.device).repeat_interleave(R)  # (K·R,): timestep-major
                self._unwritten = set(self._layers)
                try:
                    with torch.no_grad():
                        unet(ref.repeat(len(chunk), 1, 1, 1, 1), ts, encoder_hidden_states=prompt.repeat(
                            len(chunk), 1, 1), cross_attention_kwargs=cross_attention_kwargs)
                except _WriteDone:
                    pass  # every layer has its tokens: the rest of the pass would be thrown away
                self.write_calls += 1
        finally:
            self.writing = self.ctx.side_pass = False
        self.bank = {name: RefKeys(tuple(times), *(None if c[0] is None else torch.cat(c) for c in
                                                   zip(*[chunk[:4] for chunk in chunks])), chunks[0][4])
                     for name, chunks in self._written.items()}
        self._written = {}
        _BANKS.put(unet, key, checks, dict(self.bank))

    def stored(self, name: str, attn, tokens: torch.Tensor) -> None:
        """The write pass's processor at layer `name` got the write batch's tokens (K·B, N, D), timestep-major:
        keep their keys and values (pooled); after the last layer, stop the pass."""
        self._written.setdefault(name, []).append(self.project(attn, tokens))
        self._unwritten.discard(name)
        if not self._unwritten:
            raise _WriteDone

    def key_budget(self, n: int) -> int:
        """Keys a reference may have on a layer of n tokens: min(max_tokens, max(MIN_REF_TOKENS, n // token_ratio))."""
        return min(self.max_tokens, max(MIN_REF_TOKENS, n // self.token_ratio))

    @property
    def writes_blanks(self) -> bool:
        """Whether the write pass also runs blank references (for the unconditional videos)."""
        return self.blank and self.ctx.do_cfg

    def first_reader(self, videos: int) -> int:
        """Index of the first video of a batch whose generated frames read the references themselves (the earlier
        ones, the unconditional videos, get plain self-attention or, in exclude mode, the blank). In temporal mode
        with blanks every video reads its own appended frames: the unconditional videos' are zero latents."""
        return 0 if not self.ctx.do_cfg or (self.blank and self.temporal) else videos // 2

    def project(self, attn, tokens: torch.Tensor) -> tuple:
        """Write-pass tokens (K·B, N, D), K timesteps of B one-frame videos (the R references, after the blank when
        the write pass has it) -> (keys, values (K, heads, R·N', dh + E), the blank's keys and values laid out the
        same way (the blank in every block) or None, pooling group), RefKeys' fields after `times`: pooled to at
        most max_tokens keys each, projected by attn, with the bias channels."""
        R = self.latents.shape[0]
        blank = 1 if self.writes_blanks else 0
        m, n, d = tokens.shape
        pooled, group = pool_tokens(tokens, *self.ctx.layer_size(n), self.key_budget(n))  # (K·B, N', D)
        pooled = pooled.reshape(m // (R + blank), -1, d)  # (K, B·N', D): video b's keys in block b
        k, v = _split(attn.to_k(pooled), attn.heads), _split(attn.to_v(pooled), attn.heads)  # (K, heads, B·N', dh)
        extra = extra_channels(R, k.shape[-1], k.device)
        n_keys = k.shape[2] // (R + blank)
        keys, values = _reference_keys(k[:, :, blank * n_keys:], v[:, :, blank * n_keys:], R, R, extra)
        if not blank:
            return keys, values, None, None, group
        # The blank once in each of the R blocks, so that an unconditional row reads it under the same R biases as
        # a conditional row reads the references: both halves of the batch then share one attention call.
        blank_keys, blank_values = _reference_keys(k[:, :, :n_keys].repeat(1, 1, R, 1),
                                                   v[:, :, :n_keys].repeat(1, 1, R, 1), R, R, extra)
        return keys, values, blank_keys, blank_values, group

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

    # --- rows and biases (cached while the boxes stay where they are) -----------------------------------------

    def row_split(self, videos: int, per_video: int, device):
        """Rows of a spatial-attention batch (video-major, frame-minor): (generated frames that read references,
        every other row), as slices when they are contiguous (no appended frames), else index tensors."""

        def make():
            first = self.first_reader(videos)
            if per_video == self.ctx.frames:
                return slice(first * per_video, videos * per_video), slice(0, first * per_video)
            is_cond = torch.zeros(videos, per_video, dtype=torch.bool)
            is_cond[first:, :self.ctx.frames] = True
            flat = is_cond.flatten()
            return flat.nonzero().flatten().to(device), (~flat).nonzero().flatten().to(device)

        return self._cache.get(("rows", videos, per_video, self.first_reader(videos), str(device)), make)

    def region_bias(self, n: int, group: int = 1) -> torch.Tensor:
        """(F, N, R) float32 logit bias of each frame's queries on each reference's keys: log(strength) (+ log(group)
        when each key stands for `group` pooled tokens) inside the reference's region, NEG outside."""

        def make():
            ctx = self.ctx
            rows, cols = ctx.layer_size(n)
            frames = ctx.attention_frames  # F, or F' latent frames (Wan: boxes per latent frame, Context.box_masks)
            union = torch.zeros(frames, n, dtype=torch.bool)
            for k in ctx.boxes:
                union |= ctx.box_masks(k, rows, cols)
            parts = []
            for strength, region in zip(self.strengths, self.regions):
                if region[0] == "box" and region[1] in ctx.boxes:
                    allowed = ctx.box_masks(region[1], rows, cols)  # (F, N)
                elif region[0] == "outside" and ctx.boxes:
                    allowed = ~union
                else:
                    allowed = torch.ones(frames, n, dtype=torch.bool)
                parts.append(torch.full((frames, n), NEG).masked_fill(allowed, math.log(strength * group)))
            return torch.stack(parts, 2)

        return self._cache.get(("bias", n, group), make)

    def query_channels(self, videos: int, n: int, group: int, dh: int, extra: int, dtype, device) -> torch.Tensor:
        """(videos·F, 1, N, extra) extra query channels of the rows that read references: the region bias over
        the attention scale (so that the scaled q'·k' adds exactly the bias), zero-padded from R to `extra`
        channels. The "outside" value is kept above −6e4 so that it stays finite in half precision (for dh > 36
        that makes the logit NEG·√(36/dh) rather than NEG: still a weight of exp(−1e4·6/√dh) = 0)."""

        def make():
            bias = self.region_bias(n, group) * math.sqrt(dh)  # (F, N, R)
            ch = torch.zeros(self.ctx.frames, 1, n, extra)
            ch[:, 0, :, :bias.shape[2]] = bias.clamp(min=-6e4)
            return ch.repeat(videos, 1, 1, 1).to(device=device, dtype=dtype)

        return self._cache.get(("qch", videos, n, group, dh, extra, dtype, str(device)), make)


class RefKeys(NamedTuple):
    """One layer's reference keys and values, for each timestep the write pass ran at."""

    times: tuple  # (K,) timesteps, as floats
    keys: torch.Tensor  # (K, heads, R·N', dh + E): reference r's N' keys in block r, a one in channel dh + r
    values: torch.Tensor  # (K, heads, R·N', dh + E): zeros in the extra channels
    blank_keys: torch.Tensor | None = None  # (K, heads, R·N', dh + E): the blank's (unconditional videos), each block
    blank_values: torch.Tensor | None = None
    group: int = 1  # tokens each key stands for (k·k pooling)


def unet_state(unet) -> int:
    """A fingerprint of everything in a UNet that the write pass's result depends on besides its inputs: every
    parameter and buffer by identity (a stamp each tensor object gets the first time it is seen, so a new adapter's
    tensors differ from an old one's even at the same address), storage and version counter (which every in-place
    change bumps), every module's attention processor class and hook counts, and peft's LoRA switches (on/off,
    active adapters, scales). Valid within this process (Python's hash)."""
    global _STAMPS
    parts = []
    for m in unet.modules():
        for t in itertools.chain(m._parameters.values(), m._buffers.values()):
            if t is None:
                continue
            stamp = t.__dict__.get("_studio_stamp")
            if stamp is None:
                _STAMPS += 1
                stamp = t._studio_stamp = _STAMPS
            parts.append((stamp, t.data_ptr(), t._version))
        parts.append((len(m._forward_hooks), len(m._forward_pre_hooks), type(m.__dict__.get("processor")).__name__))
        if "lora_A" in m._modules and "scaling" in m.__dict__:  # peft's LoRA layer
            active = m.__dict__.get("_active_adapter")
            active = active if isinstance(active, str) else tuple(active or ())
            parts.append((m.__dict__.get("_disable_adapters"), active, tuple(sorted(m.scaling.items()))))
    return hash(tuple(parts))


_STAMPS = 0


def _digest(tensors) -> str:
    """SHA-256 of tensors' shapes, dtypes and bytes."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(repr((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
BANKS_KEPT = 4  # per UNet: the banks of the last write passes, reused by a render that makes the same pass
class _Banks:
    """The reference keys and values of recent write passes, per UNet (weakly held), keyed by everything the pass
    depends on (its timesteps, batch size, settings, the UNet's state) and checked by value against the pass's
    input tensors (the references, the prompts). A re-render of a shot with references then skips the pass; any
    change to the references, the prompt, the schedule, the weights or the adapters runs it anew."""

    def __init__(self):
        self._by_unet: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

    def get(self, unet, key, checks):
        kept = self._by_unet.get(unet)
        entry = None if kept is None else kept.get(key)
        if entry is None or len(entry[0]) != len(checks) or not all(
                a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(entry[0], checks)):
            return None
        kept.move_to_end(key)
        return entry[1]

    def put(self, unet, key, checks, bank) -> None:
        kept = self._by_unet.setdefault(unet, OrderedDict())
        kept[key] = (tuple(c.detach().clone() for c in checks), bank)
        kept.move_to_end(key)
        while len(kept) > BANKS_KEPT:
            kept.popitem(last=False)

    def clear(self) -> None:
        self._by_unet.clear()


_BANKS = _Banks()


class _WriteDone(Exception):
    """Raised by the last layer of a write pass: every layer has stored its tokens, the rest is skipped."""


MAX_REF_TOKENS = 64  # per reference and layer: larger layers see the reference average-pooled to this many keys
TOKEN_RATIO = 16  # and at most 1/16 of the layer's own tokens,
MIN_REF_TOKENS = 16  # but never fewer than this (a 4×4 grid)


def pool_tokens(tokens: torch.Tensor, rows: int, cols: int,
                max_tokens: int = MAX_REF_TOKENS) -> tuple[torch.Tensor, int]:
    """(M, N, D) tokens on a rows×cols grid -> (M, N', D) with N' <= max_tokens by k×k average pooling (k a power
    of two dividing rows and cols), and k·k (how many tokens each pooled key stands for: its logit gets log(k·k) so
    its total weight is kept)."""
    k = 1
    while (rows // k) * (cols // k) > max_tokens and rows % (2 * k) == 0 and cols % (2 * k) == 0:
        k *= 2
    if k == 1:
        return tokens, 1
    m, _, d = tokens.shape
    grid = tokens.transpose(1, 2).reshape(m, d, rows, cols)
    pooled = torch.nn.functional.avg_pool2d(grid, k)  # (M, D, rows/k, cols/k)
    return pooled.flatten(2).transpose(1, 2), k * k


def extra_channels(references: int, dh: int, device) -> int:
    """How many channels the bias adds to each head: at least R; off the CPU, enough to keep dh + E a multiple of 8
    (what fused GPU attention kernels take). On the CPU the widths its fused kernel runs fastest at (measured with
    torch 2.13 on an AVX-512 CPU, 8 heads, 64-1024 tokens): a narrow head is padded to 16 channels (head size 5 + 2:
    -32% time; then as fast as the plain 5-channel attention), a head under 64 channels to a multiple of 8 (20 + 2:
    -6%, 40 + 2: -2%), a wider one not at all (64 + 2 -> 72 was +3%). Zero channels change no logit."""
    if torch.device(device).type != "cpu":
        return -(-(dh + references) // 8) * 8 - dh
    if dh + references <= 16:
        return 16 - dh
    if dh < 64:
        return -(-(dh + references) // 8) * 8 - dh
    return references


def _unet_inputs(args, kwargs):
    names = ("sample", "timestep", "encoder_hidden_states")
    vals = [args[i] if i < len(args) else kwargs.get(n) for i, n in enumerate(names)]
    return vals[0], vals[1], vals[2]


def _split(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(M, tokens, heads·dh) -> (M, heads, tokens, dh)."""
    return t.view(t.shape[0], -1, heads, t.shape[-1] // heads).transpose(1, 2)


def _reference_keys(k: torch.Tensor, v: torch.Tensor, blocks: int, references: int, extra: int):
    """Per-head keys and values (M, heads, B·N', dh) in B = `blocks` blocks of N' (block b holds reference
    b mod R, or its blank) -> (M, heads, B·N', dh + extra): keys get a one in channel dh + (b mod R), values
    zeros."""
    m, heads, bk, dh = k.shape
    one_hot = torch.zeros(blocks, bk // blocks, extra, dtype=k.dtype, device=k.device)
    for b in range(blocks):
        one_hot[b, :, b % references] = 1
    k = torch.cat([k, one_hot.view(bk, extra).expand(m, heads, bk, extra)], 3)
    v = torch.cat([v, v.new_zeros(m, heads, bk, extra)], 3)
    return k, v


def _read(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_ch: torch.Tensor, k_refs: list, v_refs: list
          ) -> torch.Tensor:
    """Rows' queries, keys, values (M, heads, N, dh) over [own ‖ reference] keys, the bias in the extra channels:
    q_ch (M, 1, N, E); k_refs and v_refs: consecutive row blocks [(block (1 or M_b, heads, K, dh + E), M_b)],
    Σ M_b = M, each block's references read by its M_b rows -> (M, heads, N, dh)."""
    dh = q.shape[-1]
    qc = torch.cat([q, q_ch.expand(-1, q.shape[1], -1, -1)], 3)  # (M, heads, N, dh + E)
    kc, vc = _own_and_reference(k, k_refs), _own_and_reference(v, v_refs)  # (M, heads, N + K, dh + E)
    return torch.nn.functional.scaled_dot_product_attention(qc, kc, vc, scale=dh ** -0.5)[..., :dh]


def _own_and_reference(own: torch.Tensor, refs: list) -> torch.Tensor:
    """[own (M, heads, N, dh) zero-padded to dh + E ‖ the references' keys (K of dh + E)] along the tokens, in one
    buffer; refs: [(block (1 or M_b, heads, K, dh + E), M_b)], consecutive row blocks covering the M rows."""
    m, heads, n, dh = own.shape
    width = refs[0][0].shape[3]
    out = own.new_empty(m, heads, n + refs[0][0].shape[2], width)
    out[:, :, :n, :dh] = own
    out[:, :, :n, dh:] = 0
    start = 0
    for block, rows in refs:
        out[start:start + rows, :, n:] = block
        start += rows
    return out


class RefSelfAttnProcessor:
    """Spatial self-attention that stores its input on the write pass and reads the references on the main pass.

    Main pass, rows (videos·(F + extra), N, D): conditional generated frames attend to [own N tokens ‖ R references'
    N' tokens] with each reference's bias b_r(i) on its keys (log strength·group inside its region, NEG outside);
    unconditional ones likewise to the blank references' tokens when the control has them, else plainly, as every
    other row (appended reference frames) does.

    The bias rides in E >= R extra head channels instead of an (N, N + R·N') mask: q'_i = [q_i, b(i)·√dh],
    k'_j = [k_j, 0] for own keys and [k_j, e_r] for reference r's (v' zero-padded likewise, the extra output
    channels dropped), so with the scale 1/√dh of the true head size, q'_i·k'_j/√dh = q_i·k_j/√dh + b_r(i): the same
    logits in one unmasked fused call.
    """

    def __init__(self, control: ReferenceInjection, name: str):
        self.control, self.name = control, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        ctl = self.control
        if encoder_hidden_states is not None or edits_unsupported(attn, hidden_states, attention_mask):
            return plain_processor()(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        ctx = ctl.ctx
        if ctl.writing:
            ctl.stored(self.name, attn, hidden_states)  # (K·R, N, D): the references' tokens; raises after the last
            return attend(attn, hidden_states, hidden_states)
        if not ctx.extra_frames and self.name not in ctl.bank:
            return attend(attn, hidden_states, hidden_states)
        rows, n, d = hidden_states.shape
        F_, per_video = ctx.frames, ctx.frames + ctx.extra_frames  # rows: video-major, frame-minor
        videos = rows // per_video
        if videos * per_video != rows:
            raise RuntimeError(f"reference: {rows} rows are not whole videos of {per_video} frames at {self.name}")
        R, heads = ctl.latents.shape[0], attn.heads
        first = ctl.first_reader(videos)  # videos from here on read references (plain attention before)
        readers = videos - first
        q, k, v = (_split(f(hidden_states), heads) for f in (attn.to_q, attn.to_k, attn.to_v))  # (rows, heads, N, dh)
        dh = q.shape[-1]
        extra = extra_channels(R, dh, q.device)
        grid = ctx.layer_size(n)
        if ctx.extra_frames:  # temporal mode: each reading video's own reference frames, projected above
            def pooled(t):  # (rows, heads, N, dh) -> (readers, heads, R·N', dh); pooling commutes with the projection
                t = t.view(videos, per_video, heads, n, dh)[first:, F_:]  # (readers, R, heads, N, dh)
                t, g = pool_tokens(t.permute(0, 2, 1, 3, 4).reshape(-1, n, dh), *grid, ctl.key_budget(n))
                return t.reshape(readers, heads, R * t.shape[1], dh), g

            (k_ref, group), (v_ref, _) = pooled(k), pooled(v)
            k_ref, v_ref = _reference_keys(k_ref, v_ref, R, R, extra)
            k_ref, v_ref = k_ref.repeat_interleave(F_, 0), v_ref.repeat_interleave(F_, 0)  # (readers·F, heads, ·, ·)
            k_blocks, v_blocks = [(k_ref, readers * F_)], [(v_ref, readers * F_)]
        else:  # exclude mode: the keys and values the write pass made at the current refresh's timestep
            written = ctl.bank[self.name]
            i = written.times.index(ctl.refresh_t)
            group = written.group
            k_blocks, v_blocks = [(written.keys[i:i + 1], readers * F_)], [(written.values[i:i + 1], readers * F_)]
            if ctl.writes_blanks:  # the unconditional videos (before the readers) read the blank in each block
                k_blocks.insert(0, (written.blank_keys[i:i + 1], first * F_))
                v_blocks.insert(0, (written.blank_values[i:i + 1], first * F_))
        if sum(b for _, b in k_blocks) == rows:  # every row reads (the blank or the references): one fused call
            q_ch = ctl.query_channels(videos, n, group, dh, extra, q.dtype, q.device)  # (rows, 1, N, E)
            out = _read(q, k, v, q_ch, k_blocks, v_blocks)
        else:  # plain self-attention for the unconditional videos (or appended reference frames)
            cond, rest = ctl.row_split(videos, per_video, q.device)
            q_ch = ctl.query_channels(readers, n, group, dh, extra, q.dtype, q.device)  # (readers·F, 1, N, E)
            out = torch.empty_like(q)  # laid out like q's projection (rows, N, heads, dh): the reshape below is free
            out[rest] = torch.nn.functional.scaled_dot_product_attention(q[rest], k[rest], v[rest])
            out[cond] = _read(q[cond], k[cond], v[cond], q_ch, k_blocks, v_blocks)
        out = out.transpose(1, 2).reshape(rows, n, -1).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor
