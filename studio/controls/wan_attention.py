"""The directing controls on Wan's diffusion transformer (WanTransformer3DModel): where they differ from the UNets.

The controls' logic is shared with the UNet families (studio.controls.boxes, .reference, .camera): the box logit
bias, the reference key budget, strengths and regions, the pan offsets and fill. What differs is Wan's
architecture (../shared/design/WAN.md):

- processors are called as (attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb), and
  `attention_kwargs` never reach them: per-call state lives in the render's Context;
- classifier-free guidance is two transformer calls per step, the conditional one first: base.CallParity, a
  forward pre-hook on the transformer installed with the controls, says which call is running (Context.cond_call);
- tokens of one call are (B, F'·h2·w2, D), frame-major (token n: latent frame n // (h2·w2), row, column), h2×w2
  the latent grid over the 2×2 patch; the prompt is 512 UMT5 states, zero-padded and unmasked (after the text
  embedder the pads are non-zero keys: only the subjects' and words' own token columns are ever biased);
- queries and keys are RMS-normalised (norm_q, norm_k) and, in self-attention (attn1), rotated by 3D RoPE;
- the processors call attn.to_q / to_k / to_v / to_out and norm_q / norm_k, so peft LoRA layers still apply.

Box trajectories (WanBoxAttention): attn2 on the conditional call, the logit bias of boxes.BoxAttention per latent
frame, each latent frame's box the union of the boxes of the video frames it encodes (Context.box_masks).
References (WanReferenceInjection): key/value tokens in attn1, see its docstring for the positions (RoPE) chosen.
Capture (CaptureWanCrossAttnProcessor): attn2's softmax probabilities, for an attention loss (STCA) in training.

Shapes: B videos, C channels, F' latent frames, h×w latent size, h2×w2 = (h/2)×(w/2) tokens a frame,
N = F'·h2·w2 video tokens, L = 512 text tokens, D features, H heads, dh head size, R references.
"""

from __future__ import annotations

import logging
import math

import torch

from studio.controls.base import Context
from studio.controls.boxes import NEG, BoxAttention
from studio.controls.reference import MIN_REF_TOKENS, ReferenceInjection, extra_channels, pool_tokens

logger = logging.getLogger(__name__)


# --- prompt tokens by character offsets (UMT5: no BOS, pieces of several characters or none) ------------------


def wan_prompt(prompt: str) -> str:
    """The prompt as WanPipeline encodes it (its prompt_clean: HTML unescaped, ftfy when installed, whitespace
    collapsed): token positions refer to this text."""
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    return prompt_clean(prompt)


def _offsets(tokenizer, text: str, max_length: int) -> list[tuple[int, int]]:
    enc = tokenizer(text, max_length=max_length, truncation=True, add_special_tokens=True,
                    return_offsets_mapping=True)
    return [tuple(o) for o in enc["offset_mapping"]]


def phrase_tokens(tokenizer, prompt: str, phrases: dict[int, str], required=None,
                  max_length: int = 512) -> dict[int, list[int]]:
    """Token positions of each subject's own occurrence of its phrase {subject index: phrase} in the encoded prompt.

    The occurrence is chosen at the word level by studio.subjects.apply.phrase_spans (whole words, any case; shared
    phrases take their occurrences in order, longer phrases first), then every token whose character span overlaps
    it is the phrase's: all the pieces of multi-piece words, found by the tokenizer's offsets (UMT5 has no BOS and
    its pieces do not line up with words). ShotError naming subjects[k].phrase when a required phrase is missing
    or lies past the first max_length tokens.
    """
    from studio import shot as shotlib
    from studio.subjects.apply import phrase_spans

    text = wan_prompt(prompt)
    spans = phrase_spans(text, phrases, required)
    offsets = _offsets(tokenizer, text, max_length)
    out: dict[int, list[int]] = {}
    for k, (a, b) in spans.items():
        idx = [j for j, (s, e) in enumerate(offsets) if e > s and s < b and e > a]
        if not idx:
            if required is None or k in set(required):
                raise shotlib.ShotError(f"subjects[{k}].phrase", phrases[k],
                                        f"the phrase is not among the prompt's first {max_length} tokens")
            continue
        out[k] = idx
    return out


def word_tokens(tokenizer, prompt: str, max_length: int = 512) -> list[int]:
    """Positions of the prompt's word tokens: every token with characters of the prompt (not </s>, not the pads)."""
    return [j for j, (s, e) in enumerate(_offsets(tokenizer, wan_prompt(prompt), max_length)) if e > s]


# --- shared pieces of the processors --------------------------------------------------------------------------


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, S, H·dh) -> (B, S, H, dh)."""
    return t.unflatten(2, (heads, -1))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on (B, S, H, dh) with interleaved pairs (channels 2i, 2i+1 rotate together), as WanAttnProcessor applies
    it; cos/sin (1 or B, S, 1, dh) with each angle repeated for its pair."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    out = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2)
    return out.type_as(x)


def rope_at(rope, t: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (1, S, 1, dh) of Wan's 3D RoPE (WanRotaryPosEmbed `rope`: head channels split into time, row and
    column parts, theta 10000) at S positions (t, y, x) given as float tensors, fractional positions allowed (the
    centre of a pooled k×k group of tokens). Equal to the transformer's own table at integer positions."""
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    cos, sin = [], []
    for dim, pos in ((rope.t_dim, t), (rope.h_dim, y), (rope.w_dim, x)):
        c, s = get_1d_rotary_pos_embed(dim, pos.to(torch.float64), 10000.0, use_real=True,
                                       repeat_interleave_real=True, freqs_dtype=torch.float64)
        cos.append(c)
        sin.append(s)
    return torch.cat(cos, 1)[None, :, None], torch.cat(sin, 1)[None, :, None]


def _qkv(attn, hidden_states: torch.Tensor, context: torch.Tensor):
    """q, k, v (B, S, H, dh) through the layer's own projections and q/k norms (peft LoRA applies)."""
    q = attn.norm_q(attn.to_q(hidden_states))
    k = attn.norm_k(attn.to_k(context))
    v = attn.to_v(context)
    return _heads(q, attn.heads), _heads(k, attn.heads), _heads(v, attn.heads)


def _out(attn, out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, H, S, dh) attention output -> the layer's output (B, S, D)."""
    out = out.transpose(1, 2).flatten(2, 3).type_as(like)
    return attn.to_out[1](attn.to_out[0](out))


def _unsupported(attn, attention_mask) -> bool:
    """Calls the studio's processors leave to the layer's own: image context (I2V's add_k_proj), fused projections,
    a caller's mask."""
    return (getattr(attn, "add_k_proj", None) is not None or getattr(attn, "fused_projections", False)
            or attention_mask is not None)


def grid(ctx: Context, patch) -> tuple[int, int]:
    """(h2, w2): a latent frame's tokens on the transformer's patch grid."""
    return ctx.latent_h // patch[1], ctx.latent_w // patch[2]


# --- boxes: attn2 -----------------------------------------------------------------------------------------------


class WanBoxAttention(BoxAttention):
    """Box trajectories on Wan: boxes.BoxAttention's bias (amplify inside, suppress outside, the step window) per
    latent frame in every attn2 layer, on the conditional call only."""

    def processors(self, transformer) -> dict:
        from studio.controls.base import attention_modules
        from studio.families.wan import WanFamily

        names = WanFamily().cross_attention_names(transformer)
        if not names:
            raise ValueError("this model has no cross-attention layers")
        self.patch = tuple(transformer.config.patch_size)
        modules = attention_modules(transformer)
        return {n: WanBoxAttnProcessor(self, modules[n].processor) for n in names}

    def call_mask(self, n_tokens: int, n_text: int, dtype, device) -> torch.Tensor:
        """(1, 1, S, L) float mask of one conditional call: the bias of each latent frame's tokens (frame-major),
        zero rows for the reference frames appended after the F' generated ones (ctx.extra_frames)."""
        ctx = self.ctx
        rows, cols = grid(ctx, self.patch)
        n2 = rows * cols
        key = ("call", n_tokens, n_text, self._key(n2, n_text, dtype, device))

        def make():
            bias = self.bias(n2, n_text, dtype, device).flatten(0, 1)  # (F'·h2·w2, L)
            extra = n_tokens - bias.shape[0]
            if extra:
                bias = torch.cat([bias, bias.new_zeros(extra, n_text)])
            return bias[None, None]

        return self._cache.get(key, make)


class WanBoxAttnProcessor:
    """attn2 with the box bias on the conditional call; every other call goes to the layer's own processor."""

    def __init__(self, control: WanBoxAttention, plain):
        self.control, self.plain = control, plain

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        ctx = self.control.ctx
        if (encoder_hidden_states is None or ctx.side_pass or not ctx.cond_call
                or _unsupported(attn, attention_mask)):
            return self.plain(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        q, k, v = _qkv(attn, hidden_states, encoder_hidden_states)  # (B, S, H, dh), (B, L, H, dh)
        mask = self.control.call_mask(hidden_states.shape[1], encoder_hidden_states.shape[1], q.dtype, q.device)
        out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                               v.transpose(1, 2), attn_mask=mask)
        return _out(attn, out, q)


# --- capture: attn2's probabilities (training losses) -----------------------------------------------------------


class CaptureWanCrossAttnProcessor:
    """attn2 that keeps its softmax probabilities (B, S, L), averaged over heads, in `store` (MotionBooth's
    store_attn, for an STCA loss on Wan); the output is the layer's plain attention computed from them, so
    gradients flow through both. Self-attention calls (none on attn2) go to the plain path."""

    def __init__(self, store: list):
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is None or _unsupported(attn, attention_mask):
            from diffusers.models.transformers.transformer_wan import WanAttnProcessor

            return WanAttnProcessor()(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        q, k, v = (t.transpose(1, 2) for t in _qkv(attn, hidden_states, encoder_hidden_states))  # (B, H, ·, dh)
        probs = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)  # (B, H, S, L)
        self.store.append(probs.mean(1))
        return _out(attn, probs @ v, q)


def capture_cross_attention(transformer, store: list) -> dict:
    """Install capturing processors on every attn2 of a Wan transformer; returns {name: original processor} to
    restore with transformer.set_attn_processor (as studio.controls.base.capture_cross_attention does on UNets)."""
    from studio.families.wan import WanFamily

    orig = dict(transformer.attn_processors)
    procs = dict(orig)
    for n in WanFamily().cross_attention_names(transformer):
        procs[n] = CaptureWanCrossAttnProcessor(store)
    transformer.set_attn_processor(procs)  # diffusers pops from the dict it is given: procs is a copy
    return orig


# --- references: attn1 ------------------------------------------------------------------------------------------


class WanReferenceInjection(ReferenceInjection):
    """Subject and background references as key/value tokens in every attn1 layer of a Wan transformer.

    The references ride in the render's own transformer calls as R extra latent frames after the F' generated ones
    (a forward pre-hook appends them to the input, a forward hook drops them from the output), so no separate
    write pass exists: the step caches (studio.step_caches) see one call per guidance half as usual, and each
    layer gets the references' tokens at the current timestep for free (`refresh_every` has no effect here).
    In every attn1 layer one fused attention call does both:
    - the generated tokens read [their own keys ‖ each reference's keys, average-pooled to the key budget
      (ReferenceInjection.key_budget, of one latent frame's h2·w2 tokens)] with reference r's bias
      (log strength·group inside its region: a subject's box in that latent frame, or outside every box for the
      background; NEG elsewhere), as on the UNets;
    - each reference's own tokens attend only to themselves (keys of the other references and of the video masked
      out), so a reference evolves exactly as it would in a pass of its own (a "write pass"), under the same
      prompt and timestep; attn2, the FFN and the modulation act per token anyway.
    The per-query biases ride in extra head channels, never in an S×S mask (as in reference.RefSelfAttnProcessor):
    keys carry a one-hot group channel (video, pooled reference r, reference r's own tokens), queries their bias
    for each group times √dh.
    Unconditional call: a blank reference (a zero latent, under the negative prompt) in each reference's place with
    the same regions and strengths (unconditional "blank", default), or no reference frames at all ("plain").

    RoPE positions of the references: reference r sits at latent time F' + r, on the video's own row/column grid.
    Why: (1) a time index of its own, one no generated latent frame has, so no frame shares the reference tokens'
    exact positions (at index 0 the first latent frame would, and RoPE's strong same-position affinity would invite
    copying the reference into it); (2) after the clip, as appended reference frames are placed by VideoMaker
    (frame 17 of 16) and by Wan subject-to-video models that append reference latents after the video's; (3) the
    same spatial grid, so a generated token relates to reference tokens by the spatial offsets it relates to a
    neighbouring frame's tokens, a relation the model's self-attention was trained on. Within a reference's own
    attention only relative positions count, so its tokens are those of a one-frame pass at index 0. Pooled keys
    sit at the centre of the k×k tokens they average (fractional RoPE positions, `rope_at`). F' + R must stay
    below the transformer's rope_max_seq_len (checked when the control is built).
    """

    name = "reference"

    def __init__(self, ctx: Context, items, rope, patch, max_tokens: int | None = None,
                 unconditional: str = "blank", token_ratio: int | None = None):
        super().__init__(ctx, items, temporal_attention=False, refresh_every=1, max_tokens=max_tokens,
                         unconditional=unconditional, token_ratio=token_ratio)
        self.rope, self.patch = rope, tuple(patch)
        self.appended = 0  # reference frames in the running call (0: none)

    def processors(self, transformer) -> dict:
        if not self.active:
            return {}
        from studio.controls.base import attention_modules
        from studio.families.wan import WanFamily

        modules = attention_modules(transformer)
        return {n: WanRefAttnProcessor(self, modules[n].processor)
                for n in WanFamily().self_attention_names(transformer)}

    def hooks(self, transformer) -> list:
        if not self.active:
            return []
        return [transformer.register_forward_pre_hook(self._append, with_kwargs=True),
                transformer.register_forward_hook(self._strip, with_kwargs=True)]

    def close(self) -> None:
        super().close()
        self.appended = self.ctx.extra_frames = 0

    def _append(self, module, args, kwargs):
        ctx = self.ctx
        self.appended = ctx.extra_frames = 0
        if ctx.side_pass:
            return None
        if ctx.cond_call:
            refs = self.latents
        elif self.blank:
            refs = torch.zeros_like(self.latents)
        else:
            return None  # "plain": the unconditional call reads no reference
        args = list(args)
        sample = args[0] if args else kwargs["hidden_states"]  # (B, C, F', h, w)
        B, R = sample.shape[0], refs.shape[0]
        ref = refs.to(sample.device, sample.dtype).transpose(0, 1)[None].expand(B, -1, -1, -1, -1)  # (B, C, R, h, w)
        sample = torch.cat([sample, ref], 2)
        if args:
            args[0] = sample
        else:
            kwargs["hidden_states"] = sample
        t = kwargs.get("timestep") if "timestep" in kwargs else (args[1] if len(args) > 1 else None)
        if t is not None and t.ndim == 2:  # per-token timesteps (Wan 2.2 TI2V): the references' at the call's t
            t = torch.cat([t, t[:, :1].expand(-1, R * self._tokens())], 1)
            if "timestep" in kwargs:
                kwargs["timestep"] = t
            else:
                args[1] = t
        self.appended = ctx.extra_frames = R
        return tuple(args), kwargs

    def _tokens(self) -> int:
        rows, cols = grid(self.ctx, self.patch)
        return rows * cols

    def _strip(self, module, args, kwargs, output):
        R, self.appended, self.ctx.extra_frames = self.appended, 0, 0
        if not R:
            return output
        if isinstance(output, tuple):
            return (output[0][:, :, :-R], *output[1:])
        output.sample = output.sample[:, :, :-R]
        return output

    # --- what a layer reads (cached while the boxes stay where they are) -------------------------------------

    def pooled_rope(self, frames: int, rows: int, cols: int, k: int, device):
        """cos, sin (1, R·N', 1, dh) of the pooled keys of each reference r: time F' + r, the centres of k×k
        groups of the rows×cols grid, reference-major then row-major (pool_tokens' order)."""

        def make():
            R = self.latents.shape[0]
            ys = torch.arange(rows // k, dtype=torch.float64) * k + (k - 1) / 2
            xs = torch.arange(cols // k, dtype=torch.float64) * k + (k - 1) / 2
            yy, xx = torch.meshgrid(ys, xs, indexing="ij")
            t = torch.arange(R, dtype=torch.float64) + frames
            n = yy.numel()
            cos, sin = rope_at(self.rope, t.repeat_interleave(n), yy.flatten().repeat(R), xx.flatten().repeat(R))
            return cos.to(device), sin.to(device)

        return self._cache.get(("rope", frames, rows, cols, k, str(device)), make)

    def channels(self, frames: int, n2: int, n_keys: int, group: int, dh: int, extra: int, dtype, device):
        """(1, 1, S, E) query channels and (Sk, E) key channels of one call with R appended references.

        Groups: 0 the video's keys, 1 + r reference r's pooled keys (n_keys each), 1 + R + r reference r's own
        tokens (n2 each). A generated token's query carries, per group: 0 (own video), its bias for reference r
        (region_bias: log strength·group inside the region, NEG outside), NEG for the references' own tokens;
        a reference token's: 0 for its own reference's tokens, NEG for everything else. Scaled by √dh (the
        attention divides by it), kept above −6e4 so half precision stays finite."""

        def make():
            R = self.latents.shape[0]
            n_video = frames * n2
            q = torch.full((n_video + R * n2, extra), NEG)
            q[:, 2 * R + 1:] = 0  # padding channels (off the CPU) carry nothing
            q[:n_video, 0] = 0
            q[:n_video, 1:R + 1] = self.region_bias(n2, group).reshape(n_video, R)  # (F'·n2, R)
            for r in range(R):
                q[n_video + r * n2:n_video + (r + 1) * n2, 1 + R + r] = 0
            q = (q * math.sqrt(dh)).clamp(min=-6e4)
            groups = torch.cat([torch.zeros(n_video, dtype=torch.long),
                                torch.arange(1, R + 1).repeat_interleave(n_keys),
                                torch.arange(R + 1, 2 * R + 1).repeat_interleave(n2)])
            k = torch.nn.functional.one_hot(groups, extra).to(torch.float32)
            return q[None, None].to(device=device, dtype=dtype), k.to(device=device, dtype=dtype)

        return self._cache.get(("channels", frames, n2, n_keys, group, dh, extra, dtype, str(device)), make)


class WanRefAttnProcessor:
    """attn1 reading the appended references (see WanReferenceInjection); calls without appended references go to
    the layer's own processor."""

    def __init__(self, control: WanReferenceInjection, plain):
        self.control, self.plain = control, plain

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        ctl = self.control
        R = ctl.appended
        if encoder_hidden_states is not None or not R or rotary_emb is None or _unsupported(attn, attention_mask):
            return self.plain(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        B, S, D = hidden_states.shape
        rows, cols = grid(ctl.ctx, ctl.patch)
        n2 = rows * cols
        frames = S // n2 - R  # F'
        q, k, v = _qkv(attn, hidden_states, hidden_states)  # (B, S, H, dh)
        q, k = rotate(q, *rotary_emb), rotate(k, *rotary_emb)
        # the references' keys for the generated tokens: inputs average-pooled to the key budget, then projected,
        # normalised and rotated at the pooled positions (pooling after RoPE would average positions' phases away)
        ref_in = hidden_states[:, frames * n2:].reshape(B * R, n2, D)
        pooled, group = pool_tokens(ref_in, rows, cols, ctl.key_budget(n2))  # (B·R, N', D)
        n_keys = pooled.shape[1]
        pooled = pooled.reshape(B, R * n_keys, D)
        kp = _heads(attn.norm_k(attn.to_k(pooled)), attn.heads)
        vp = _heads(attn.to_v(pooled), attn.heads)
        kp = rotate(kp, *ctl.pooled_rope(frames, rows, cols, math.isqrt(group), q.device))
        dh = q.shape[-1]
        extra = extra_channels(2 * R + 1, dh, q.device)
        q_ch, k_ch = ctl.channels(frames, n2, n_keys, group, dh, extra, q.dtype, q.device)
        keys = torch.cat([k[:, :frames * n2], kp, k[:, frames * n2:]], 1).transpose(1, 2)  # (B, H, Sk, dh)
        values = torch.cat([v[:, :frames * n2], vp, v[:, frames * n2:]], 1).transpose(1, 2)
        H = attn.heads
        qc = torch.cat([q.transpose(1, 2), q_ch.expand(B, H, -1, -1)], 3)  # (B, H, S, dh + E)
        kc = torch.cat([keys, k_ch[None, None].expand(B, H, -1, -1)], 3)
        vc = torch.cat([values, values.new_zeros(*values.shape[:3], extra)], 3)
        out = torch.nn.functional.scaled_dot_product_attention(qc, kc, vc, scale=dh ** -0.5)[..., :dh]
        return _out(attn, out, q)


def check_reference_positions(transformer, latent_frames: int, references: int) -> str | None:
    """Why the references cannot get time indices of their own (F' + R past the RoPE table), or None."""
    limit = transformer.config.rope_max_seq_len
    if latent_frames + references > limit:
        return (f"{latent_frames} latent frames + {references} reference(s) exceed the {limit} time positions of "
                f"this model's RoPE (each reference takes the time index after the clip)")
    return None


__all__ = ["CaptureWanCrossAttnProcessor", "MIN_REF_TOKENS", "WanBoxAttention",
           "WanReferenceInjection", "capture_cross_attention", "check_reference_positions", "phrase_tokens",
           "rope_at", "rotate", "word_tokens"]
