"""What every control shares: the per-render context, the control protocol, and installing/restoring them.

A control is a small object with no UI imports. During one render it may
- replace attention processors on some of the UNet's layers (`processors(unet)` returns {name: processor}),
- register torch forward hooks on the UNet (`hooks(unet)` returns the handles),
- edit the latents after a denoising step (`on_step_end(ctx, i, latents)` returns new latents or None).
`applied(pipe, controls, ctx)` installs them all and restores the pipeline exactly afterwards, even on error, so
a cached pipeline renders a plain shot identically after a controlled one.

Shapes: B videos, F frames, C latent channels, h×w latent size, N = tokens of an attention layer, L text tokens.
"""

from __future__ import annotations

import contextlib
import logging
import math
import weakref
from dataclasses import dataclass, field

import torch

logger = logging.getLogger(__name__)

# Processor names in diffusers' UNets that are temporal (frame-to-frame) attention, not spatial.
TEMPORAL_MARKERS = ("motion_modules", "temp_attentions", "transformer_in")


_ATTENTION_MODULES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def attention_modules(unet) -> dict:
    """{processor name: attention module} of a UNet, found once per UNet (the layout never changes)."""
    if unet not in _ATTENTION_MODULES:
        _ATTENTION_MODULES[unet] = {f"{name}.processor": m for name, m in unet.named_modules()
                                    if hasattr(m, "set_processor") and hasattr(m, "processor")}
    return _ATTENTION_MODULES[unet]


def spatial_cross_attention_names(unet) -> list[str]:
    """Processor names of the spatial cross-attention (text) layers: attn2 outside the temporal modules."""
    return [n for n in attention_modules(unet)
            if n.endswith("attn2.processor") and not any(m in n for m in TEMPORAL_MARKERS)]


def spatial_self_attention_names(unet) -> list[str]:
    return [n for n in attention_modules(unet)
            if n.endswith("attn1.processor") and not any(m in n for m in TEMPORAL_MARKERS)]


def temporal_attention_names(unet) -> list[str]:
    return [n for n in attention_modules(unet) if any(m in n for m in TEMPORAL_MARKERS)]


@dataclass
class Context:
    """The state of one render that controls read (and the camera control writes: it moves the boxes)."""

    frames: int  # F
    latent_h: int  # h
    latent_w: int  # w
    steps: int
    do_cfg: bool  # the UNet batch is [uncond videos, cond videos] when True
    generator: torch.Generator  # explicit, seeded from the shot: controls' random draws come from here
    step: int = 0  # index of the denoising step about to run (advanced by the engine after each step)
    # subject index -> (F, 4) normalised x0, y0, x1, y1 per frame; the camera control shifts them with the latents
    boxes: dict[int, torch.Tensor] = field(default_factory=dict)
    # frames appended to each video of the current UNet call after the F generated ones (reference frames in
    # temporal mode); attention processors treat them as unedited
    extra_frames: int = 0
    side_pass: bool = False  # a UNet call that is not the render's own (a reference write pass): no edits
    latent_frames: int | None = None  # F': latent frames (None: one per video frame, as on the UNet families)
    # True: classifier-free guidance is one denoiser call on [uncond videos, cond videos] (UNets); False: two calls
    # per step, the conditional one first (Wan). From the model's family (studio.families).
    cfg_batched: bool = True
    temporal: int = 1  # video frames per latent frame after the first (Wan: 4; the UNet families: 1)
    # With two calls per step: whether the denoiser call running now is the conditional one (set before every call
    # by CallParity; True on the UNet families, whose calls hold both halves), and how many calls ran so far.
    cond_call: bool = True
    calls: int = 0

    def layer_size(self, n_tokens: int) -> tuple[int, int]:
        """(rows, cols) of an attention layer with n_tokens spatial tokens (the latent downsampled by 2^k)."""
        h, w = self.latent_h, self.latent_w
        for _ in range(8):
            if h * w == n_tokens:
                return h, w
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        raise ValueError(f"no latent downsampling of {self.latent_h}x{self.latent_w} has {n_tokens} tokens")

    @property
    def attention_frames(self) -> int:
        """T: the frames an attention layer sees (F' latent frames; F on the UNet families, one latent per frame)."""
        return self.latent_frames if self.latent_frames is not None else self.frames

    def frame_groups(self) -> list[list[int]]:
        """The video frames each latent frame encodes: [0] then T·k−T+1 .. T·k (a causal video VAE with temporal
        factor T; clipped to the F frames); one frame each when T = 1."""
        t = self.temporal
        return [[0]] + [list(range(t * k - t + 1, min(t * k, self.frames - 1) + 1))
                        for k in range(1, self.attention_frames)]

    def latent_of_frame(self) -> torch.Tensor:
        """(F,) long: the latent frame each video frame is encoded in."""
        owner = torch.zeros(self.frames, dtype=torch.long)
        for k, group in enumerate(self.frame_groups()):
            owner[group] = k
        return owner

    def latent_times(self) -> list[float] | None:
        """The video time of each latent frame (the centre of the frames it encodes); None when T = 1 (t_k = k)."""
        if self.temporal == 1:
            return None
        from studio.families import latent_times

        return latent_times(self.frames, self.temporal)[:self.attention_frames]

    def box_masks(self, subject: int, rows: int, cols: int) -> torch.Tensor:
        """(T, rows·cols) bool: where subject's box is in each latent frame on a rows×cols grid: the union of its
        boxes in the video frames that latent frame encodes (`frame_groups`; the box of frame f itself when T = 1).
        The union, not e.g. the middle frame's box: a latent frame holds all of its frames, so the subject is
        wherever any of them puts it."""
        from studio.controls.boxes import box_masks

        masks = box_masks(self.boxes[subject].float(), rows, cols)  # (F, rows·cols)
        if self.temporal == 1:
            return masks
        return torch.stack([masks[g].any(0) for g in self.frame_groups()])

    def cond_slice(self, batch: int) -> slice:
        """Which items of a spatial-attention batch (B·[2]·F rows) belong to the conditional pass (all of them when
        guidance runs the conditional pass as a call of its own, cfg_batched False)."""
        return slice(batch // 2, batch) if self.do_cfg and self.cfg_batched else slice(0, batch)


class CaptureCrossAttnProcessor:
    """Cross-attention that keeps its softmax probabilities (MotionBooth's store_attn) for an auxiliary loss: STCA in
    world and subject training, the binding measure of the toy-world eval. Plain attention otherwise."""

    def __init__(self, store: list):
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))  # (B·F·heads, N, d)
        k = attn.head_to_batch_dim(attn.to_k(ctx))  # (B·F·heads, L, d)
        v = attn.head_to_batch_dim(attn.to_v(ctx))
        probs = attn.get_attention_scores(q, k, attention_mask)  # (B·F·heads, N, L)
        self.store.append(probs.unflatten(0, (-1, attn.heads)).mean(1))  # (B·F, N, L)
        out = attn.batch_to_head_dim(torch.bmm(probs, v))
        return attn.to_out[1](attn.to_out[0](out))


def capture_cross_attention(unet, store: list) -> dict:
    """Install capturing processors on the spatial cross-attention layers; returns the original processors."""
    orig = dict(unet.attn_processors)
    procs = dict(orig)
    for n in spatial_cross_attention_names(unet):
        procs[n] = CaptureCrossAttnProcessor(store)
    unet.set_attn_processor(procs)  # diffusers pops from the dict it is given: procs is a copy
    return orig


def attend(attn, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """`attn`'s projections around one scaled-dot-product call: queries from x (M, N, D), keys and values from
    context (M, K, Dc), an optional additive float mask broadcastable to (M, heads, N, K)."""
    m = x.shape[0]
    q, k, v = attn.to_q(x), attn.to_k(context), attn.to_v(context)
    dh = k.shape[-1] // attn.heads
    q, k, v = (t.view(m, -1, attn.heads, dh).transpose(1, 2) for t in (q, k, v))  # (M, heads, ·, dh)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out = out.transpose(1, 2).reshape(m, -1, attn.heads * dh).to(q.dtype)
    out = attn.to_out[1](attn.to_out[0](out))
    if attn.residual_connection:
        out = out + x
    return out / attn.rescale_output_factor


def edits_unsupported(attn, hidden_states: torch.Tensor, attention_mask=None) -> bool:
    """Whether `attend` would not reproduce diffusers' AttnProcessor2_0 on this call (4-D inputs, spatial or group
    norm, q/k norms, a caller's mask): processors then hand the call to `plain_processor()` unedited."""
    return (hidden_states.ndim != 3 or attn.spatial_norm is not None or attn.group_norm is not None
            or attention_mask is not None
            or getattr(attn, "norm_q", None) is not None or getattr(attn, "norm_k", None) is not None)


_PLAIN = None


def plain_processor():
    """One shared diffusers AttnProcessor2_0 (stateless), for the calls a control leaves alone."""
    global _PLAIN
    if _PLAIN is None:
        from diffusers.models.attention_processor import AttnProcessor2_0

        _PLAIN = AttnProcessor2_0()
    return _PLAIN


class BoxCache:
    """Values built from ctx.boxes (masks, biases), kept from step to step and emptied when the boxes move (the
    camera moves them between steps; checked once per step)."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self._values: dict = {}
        self._step: int | None = None
        self._boxes: dict[int, torch.Tensor] | None = None  # a copy of ctx.boxes when the values were built

    def get(self, key, make):
        """The value for key (hashable), made by make() unless already built for the current boxes."""
        ctx = self.ctx
        if self._step != ctx.step:
            seen = self._boxes
            if (seen is None or seen.keys() != ctx.boxes.keys()
                    or any(not torch.equal(seen[k], b) for k, b in ctx.boxes.items())):
                self._values.clear()
                self._boxes = {k: b.clone() for k, b in ctx.boxes.items()}
            self._step = ctx.step
        if key not in self._values:
            self._values[key] = make()
        return self._values[key]

    def clear(self) -> None:
        self._values.clear()
        self._step = self._boxes = None


class Control:
    """Base class: a control that does nothing. Subclasses override what they need."""

    name = "control"

    def processors(self, unet) -> dict:
        return {}

    def hooks(self, unet) -> list:
        return []

    def on_step_end(self, ctx: Context, i: int, latents: torch.Tensor) -> torch.Tensor | None:
        return None

    def close(self) -> None:
        """Free per-render state (called after the pipeline is restored)."""


class CallParity(Control):
    """Counts the denoiser's calls of a render where guidance runs two calls per step, the conditional one first
    (Wan's pipelines): even calls are conditional, odd ones unconditional. Sets ctx.cond_call before every call;
    calls the studio makes itself (ctx.side_pass) are not counted. `applied` installs it first when
    ctx.cfg_batched is False."""

    name = "call_parity"

    def __init__(self, ctx: Context):
        self.ctx = ctx

    def hooks(self, denoiser) -> list:
        self.ctx.calls, self.ctx.cond_call = 0, True
        return [denoiser.register_forward_pre_hook(self._count)]

    def _count(self, module, args):
        ctx = self.ctx
        if ctx.side_pass:
            return None
        ctx.cond_call = not ctx.do_cfg or ctx.calls % 2 == 0
        ctx.calls += 1
        return None

    def close(self) -> None:
        self.ctx.cond_call, self.ctx.calls = True, 0


@contextlib.contextmanager
def applied(pipe, controls: list[Control], ctx: Context):
    """Install the controls' processors and hooks on the pipeline's denoiser (pipe.unet, or pipe.transformer on Wan);
    restore the original processors afterwards."""
    from studio import families

    unet = families.denoiser(pipe)
    if not controls:
        yield
        return
    modules = attention_modules(unet)
    original: dict = {}  # only the layers the controls replace: their processors before
    handles = []
    if not ctx.cfg_batched:  # which guidance half each call is, before any control's own hook runs
        controls = [CallParity(ctx)] + list(controls)
    try:
        for c in controls:
            for name, proc in c.processors(unet).items():
                if name in original:
                    raise RuntimeError(f"controls collide on {name}")
                original[name] = modules[name].processor
                modules[name].set_processor(proc)
        for c in controls:
            handles.extend(c.hooks(unet))
        yield
    finally:
        for h in handles:
            h.remove()
        for name, proc in original.items():
            modules[name].set_processor(proc)
        for c in controls:
            c.close()


def step_end_chain(ctx: Context, controls: list[Control]):
    """One function that runs every control's latent edit after step i and advances ctx.step."""

    def run(i: int, latents: torch.Tensor) -> torch.Tensor:
        for c in controls:
            out = c.on_step_end(ctx, i, latents)
            if out is not None:
                latents = out
        ctx.step = i + 1
        return latents

    return run
