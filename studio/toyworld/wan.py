"""The toy Wan: a Wan-layout text-to-video model small enough to train and run on a CPU, and the Wan side of its
training and evaluation (studio/toyworld/train.py runs the stages, studio/toyworld/evaluate.py the gates).

Components are the ones of the Wan 2.1 presets (AutoencoderKLWan, WanTransformer3DModel, a UMT5 encoder, a T5-kind
unigram tokenizer, UniPCMultistepScheduler with flow prediction) at a tiny size, so the folder loads with
`WanPipeline.from_pretrained(folder)` like any diffusers Wan model. Geometry (ToyWanArch):

- 32×32 pixels and 9 frames (4k + 1, k = 2), the toy world's own size: shapes of radius 4–7 px travelling ~2 px a
  frame, as on the UNet toy's 8 frames;
- a causal Wan VAE with 3 levels (dim_mult 1, 2, 2), so ×4 spatially and ×4 in time (its two downsampling stages are
  3D), 16 latent channels as Wan 2.1: latents (B, 16, F', 8, 8) with F' = (9 − 1)/4 + 1 = 3, latent frame 0 = frame
  0, latent k ≥ 1 = frames 4k−3 .. 4k;
- transformer patch (1, 1, 1): one token per latent pixel, 8×8 = 64 tokens per latent frame (Wan 2.1 has (1, 2, 2)
  on a ×8 VAE; here a 2×2 patch would leave 4×4 tokens, too coarse for boxes), N = 192 tokens a clip;
- text: UMT5 of width 64 over the local tokenizer (studio.families.wan_build: every world word is one piece), with the
  Wan layout's unmasked zero padding at a fixed length L = 32 tokens (Wan's 512 would cost 16× the cross-attention
  keys for nothing: the longest world caption is 14 tokens with `</s>`). The pipeline is called with
  max_sequence_length = L (studio.families.wan: the tokenizer's model_max_length, at most 512).

Why this size (measured on this 2-core machine, one torch thread, others' jobs running): a training step of the
transformer at batch 8 takes ~1.1 s and of the VAE at 4 clips ~1.6 s; one transformer call on one clip ~0.06 s, so a
20-step render with guidance (40 calls) plus the VAE decode stays near 3 s.

Shapes (fixed symbols): B clips, K subjects, F frames, F' latent frames, S×S pixels, h×w latent pixels,
N = F'·h·w tokens, L text tokens, D text width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from studio.toyworld import world

FRAMES = 9  # 4k + 1 frames per clip (k = 2): three latent frames


@dataclass(frozen=True)
class ToyWanArch:
    """Sizes of the toy Wan (see the module docstring for the choices)."""

    size: int = world.SIZE  # pixels
    frames: int = FRAMES
    vae_base: int = 16  # AutoencoderKLWan base_dim
    vae_mult: tuple[int, ...] = (1, 2, 2)  # three levels: two ×2 (and ×2 in time) downsamplings
    z_dim: int = 16  # latent channels, as Wan 2.1
    heads: int = 4
    head_dim: int = 32  # 3D RoPE splits it 12 (time) + 10 + 10 (rows, columns)
    layers: int = 6
    ffn_dim: int = 512
    freq_dim: int = 256  # sinusoidal timestep embedding, as Wan
    text_dim: int = 64  # UMT5 d_model = the transformer's text_dim
    text_layers: int = 2
    text_heads: int = 2
    text_ff: int = 128
    text_length: int = 32  # L: prompt tokens, zero-padded (Wan pads to 512)
    flow_shift: float = 3.0  # the inference scheduler's (Wan 2.1's 480p value)

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.vae_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        return 2 ** (len(self.vae_mult) - 1)


def spec(arch: ToyWanArch = ToyWanArch()) -> dict:
    """The component configs of a toy Wan, in studio.families.wan_build's spec layout."""
    levels = len(arch.vae_mult) - 1
    return {
        "transformer": dict(patch_size=[1, 1, 1], num_attention_heads=arch.heads, attention_head_dim=arch.head_dim,
                            in_channels=arch.z_dim, out_channels=arch.z_dim, text_dim=arch.text_dim,
                            freq_dim=arch.freq_dim, ffn_dim=arch.ffn_dim, num_layers=arch.layers,
                            cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32),
        "vae": dict(base_dim=arch.vae_base, z_dim=arch.z_dim, dim_mult=list(arch.vae_mult), num_res_blocks=1,
                    temperal_downsample=[True] * levels, scale_factor_spatial=arch.spatial_factor,
                    scale_factor_temporal=arch.temporal_factor,
                    latents_mean=[0.0] * arch.z_dim, latents_std=[1.0] * arch.z_dim),
        "text_encoder": dict(d_model=arch.text_dim, d_kv=arch.text_dim // arch.text_heads, d_ff=arch.text_ff,
                             num_layers=arch.text_layers, num_heads=arch.text_heads,
                             relative_attention_num_buckets=8, relative_attention_max_distance=arch.text_length,
                             dropout_rate=0.0, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
                             decoder_start_token_id=0),
        "scheduler": dict(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000,
                          flow_shift=arch.flow_shift),
        "model_index": dict(expand_timesteps=False),
    }


def build_tokenizer(arch: ToyWanArch = ToyWanArch()):
    """The T5-kind tokenizer of studio.families.wan_build (every world word one piece), padding to L tokens."""
    from studio.families import wan_build

    return wan_build.build_tokenizer(max_length=arch.text_length)


def build_components(arch: ToyWanArch = ToyWanArch(), seed: int = 0) -> dict:
    """Freshly initialised components (deterministic by seed, the global RNG left alone) for `WanPipeline(**c)`."""
    import torch

    from studio.families import wan_build

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        c = wan_build._init_components(spec(arch))
    c["tokenizer"] = build_tokenizer(arch)  # the same vocabulary, padded to L
    return c


# --- the cross-attention capture (STCA in training, the binding measure of the eval) ------------------------------


class CaptureWanCrossAttn:
    """Wan's text cross-attention (`attn2`: no RoPE, no mask, no image context on text-to-video) written out so that
    its softmax probabilities are kept: q = norm_q(to_q(x)), k = norm_k(to_k(ctx)), v = to_v(ctx), per head
    softmax(q·kᵀ/√d)·v. Equal to diffusers' WanAttnProcessor up to float rounding. Appends (B, N, L) probabilities,
    heads averaged, to `store` on every call."""

    def __init__(self, store: list):
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        import torch

        if attn.add_k_proj is not None or attention_mask is not None or rotary_emb is not None:
            raise ValueError("the toy Wan's cross-attention capture takes text-only attn2 calls")
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1)).transpose(1, 2)  # (B, H, N, d)
        k = attn.norm_k(attn.to_k(encoder_hidden_states)).unflatten(2, (attn.heads, -1)).transpose(1, 2)  # (B,H,L,d)
        v = attn.to_v(encoder_hidden_states).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        probs = torch.softmax((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1)  # (B, H, N, L)
        self.store.append(probs.mean(1))  # (B, N, L)
        out = (probs @ v).transpose(1, 2).flatten(2).type_as(q)  # (B, N, H·d)
        return attn.to_out[1](attn.to_out[0](out))


def capture_cross_attention(transformer, store: list) -> dict:
    """Install capturing processors on every block's `attn2`; returns the original processors (to restore with
    transformer.set_attn_processor(orig))."""
    from studio.families.wan import WanFamily

    orig = dict(transformer.attn_processors)
    procs = dict(orig)
    for name in WanFamily().cross_attention_names(transformer):
        procs[name] = CaptureWanCrossAttn(store)
    transformer.set_attn_processor(procs)
    return orig


# --- text ----------------------------------------------------------------------------------------------------------


def phrase_positions(tokenizer, caption: str, phrases: list[str], length: int):
    """Token ids (L,) and attention mask (L,) of the caption padded to `length`, and for each phrase (in caption
    order) the positions of its tokens, found by character offsets (umT5 has no BOS; a phrase's words may be several
    pieces). A phrase that is not in the caption, or is cut off by the length, gets []."""
    enc = tokenizer(caption, padding="max_length", max_length=length, truncation=True, return_offsets_mapping=True,
                    return_attention_mask=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    out, start = [], 0
    for phrase in phrases:
        at = caption.find(phrase, start)
        if at < 0:
            out.append([])
            continue
        end = at + len(phrase)
        out.append([i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > at])
        start = end
    return ids, list(enc["attention_mask"]), out


def encode_text(text_encoder, ids, mask):
    """(B, L, D) prompt states as WanPipeline makes them: the encoder's states over the real tokens, zeros after."""
    states = text_encoder(ids, attention_mask=mask).last_hidden_state
    return states * mask[..., None].to(states.dtype)


# --- latents -------------------------------------------------------------------------------------------------------


def latent_masks(masks, temporal: int, side: int):
    """(…, F, S, S) float masks -> (…, F'·side·side) soft masks in Wan's token order (latent frame, row, column):
    each latent frame's mean over the frames it encodes, area-averaged to side×side."""
    import torch
    import torch.nn.functional as F

    from studio.controls.noise_warp import grouped_map

    groups = grouped_map(masks.shape[-3], temporal)  # the video frames each latent frame encodes
    lead = masks.shape[:-3]
    per = torch.stack([masks[..., g, :, :].mean(-3) for g in groups], -3)  # (…, F', S, S)
    flat = per.reshape(-1, 1, *per.shape[-2:])
    pooled = F.interpolate(flat, size=(side, side), mode="area")  # (…·F', 1, side, side)
    return pooled.reshape(*lead, len(groups) * side * side)


def normalize_latents(vae, z):
    """VAE latents (B, C, F', h, w) -> the transformer's space, as WanPipeline undoes it: (z − mean) / std."""
    import torch

    mean = torch.tensor(vae.config.latents_mean, dtype=z.dtype).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, dtype=z.dtype).view(1, -1, 1, 1, 1)
    return (z - mean) / std


def calibrate(vae, clips: list) -> dict:
    """Per-channel mean and std of the latents of world clips (as Wan's latents_mean / latents_std), so normalised
    latents have zero mean and unit variance per channel."""
    import torch

    from studio.toyworld.train import to_pixels

    x = torch.stack([to_pixels(c.frames).transpose(0, 1) for c in clips])  # (B, 3, F, S, S)
    with torch.no_grad():
        z = torch.cat([vae.encode(x[i:i + 8]).latent_dist.mean for i in range(0, len(x), 8)])  # (B, C, F', h, w)
    dims = (0, 2, 3, 4)
    return {"latents_mean": [float(v) for v in z.mean(dims)], "latents_std": [float(v) for v in z.std(dims)]}


def stca_loss(store: list, soft, token_pos: list[list[list[int]]]):
    """BCE between each subject phrase's attention map (its tokens' mean probability per video token) and its soft
    mask, averaged over blocks. store: (B, N, L) per block; soft: (B, K, N); token_pos[b][k] ([] = skip)."""
    import torch
    import torch.nn.functional as F

    terms = []
    for probs in store:
        for b, subjects in enumerate(token_pos):
            for k, pos in enumerate(subjects):
                if pos:
                    a = probs[b, :, pos].mean(-1)  # (N,)
                    terms.append(F.binary_cross_entropy(a.clamp(1e-6, 1 - 1e-6), soft[b, k]))
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).mean()


def side_of(n_tokens: int, latent_frames: int) -> int:
    """The token grid's side for N tokens over F' latent frames (square frames)."""
    side = math.isqrt(n_tokens // latent_frames)
    if side * side * latent_frames != n_tokens:
        raise ValueError(f"{n_tokens} tokens are not {latent_frames} square latent frames")
    return side


# --- training (the stages and the loop are studio/toyworld/train.py's; this is what differs on Wan) ----------------


class WanRecipe:
    """The Wan side of `studio toyworld train --family wan`: components, batches, calibration and losses.

    The text-to-video loss is flow matching as Wan is trained: x_σ = (1 − σ)·z0 + σ·ε with σ uniform in (0, 1), the
    transformer called at timestep 1000·σ predicts the velocity ε − z0 (the UniPC scheduler's flow prediction), plus
    the STCA loss on every block's attn2.
    """

    family = "wan"
    pipeline_class = "WanPipeline"
    denoiser_key = "transformer"
    components = ("vae", "transformer", "text_encoder", "tokenizer", "scheduler")

    def __init__(self, arch: ToyWanArch | None = None):
        self.arch = arch or ToyWanArch()

    def build(self, seed: int) -> dict:
        return build_components(self.arch, seed)

    def frames(self, c: dict) -> int:
        return self.arch.frames

    # stage 1 ------------------------------------------------------------------------------------------------------

    def vae_batch(self, cfg, step: int):
        """(n, 3, F, S, S) pixels of n = vae_batch // F whole clips (personal looks included, see world.sample_clip)
        and their (n, 1, F, S, S) loss weights."""
        import torch

        from studio.toyworld.train import _subject_weight, clip_seed, to_pixels

        n = max(1, cfg.vae_batch // self.arch.frames)
        clips = [world.sample_clip(clip_seed(cfg.seed + 1, step, i, n), frames=self.arch.frames, personal=True)
                 for i in range(n)]
        x = torch.stack([to_pixels(c.frames).transpose(0, 1) for c in clips])  # (n, 3, F, S, S)
        w = torch.stack([_subject_weight(c.masks.any(0), cfg.vae_subject_weight).transpose(0, 1) for c in clips])
        return x, w  # w: (n, 1, F, S, S)

    def calibration(self, vae) -> dict:
        return {"latents_mean": list(vae.config.latents_mean), "latents_std": list(vae.config.latents_std)}

    def calibrate(self, vae, cfg) -> dict:
        clips = [world.sample_clip(world.EVAL_SEED_OFFSET // 2 + i, frames=self.arch.frames) for i in range(64)]
        vae.eval()
        stats = calibrate(vae, clips)
        vae.register_to_config(**stats)
        return stats

    # stage 2 ------------------------------------------------------------------------------------------------------

    def capture(self, denoiser, store: list) -> dict:
        return capture_cross_attention(denoiser, store)

    def plain_processors(self, denoiser) -> None:
        from diffusers.models.transformers.transformer_wan import WanAttnProcessor

        denoiser.set_attn_processor(WanAttnProcessor())

    def t2v_batch(self, cfg, tokenizer, step: int):
        """Pixels (B, 3, F, S, S), masks (B, K, F, S, S), token ids and attention mask (B, L), STCA token positions."""
        import torch

        from studio.toyworld.train import clip_seed, to_pixels

        clips = [world.sample_clip(clip_seed(cfg.seed, step, i, cfg.batch), frames=self.arch.frames)
                 for i in range(cfg.batch)]
        rng = np.random.default_rng([cfg.seed, step, 11])
        captions = ["" if rng.random() < cfg.p_uncond else c.caption for c in clips]
        k_max = max(len(c.subjects) for c in clips)
        masks = np.zeros((cfg.batch, k_max, self.arch.frames, self.arch.size, self.arch.size), np.float32)
        ids, att, token_pos = [], [], []
        for b, (c, caption) in enumerate(zip(clips, captions)):
            masks[b, :len(c.subjects)] = c.masks
            i, m, pos = phrase_positions(tokenizer, caption, c.phrases if caption else [],
                                         tokenizer.model_max_length)
            ids.append(i)
            att.append(m)
            token_pos.append(pos)
        pixels = torch.stack([to_pixels(c.frames).transpose(0, 1) for c in clips])
        return pixels, torch.from_numpy(masks), torch.tensor(ids), torch.tensor(att), token_pos

    def losses(self, c: dict, cfg, step: int, store: list):
        import torch
        import torch.nn.functional as F

        vae, den, te, tok = c["vae"], c["transformer"], c["text_encoder"], c["tokenizer"]
        pixels, masks, ids, att, token_pos = self.t2v_batch(cfg, tok, step)
        B = pixels.shape[0]
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        with torch.no_grad():
            post = vae.encode(pixels).latent_dist
            z0 = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)  # (B, C, F', h, w)
            z0 = normalize_latents(vae, z0)
        noise = torch.randn(z0.shape, generator=gen)
        sigma = torch.rand(B, generator=gen)
        s = sigma.view(B, 1, 1, 1, 1)
        zt = (1 - s) * z0 + s * noise
        text = encode_text(te, ids, att)  # (B, L, D)
        store.clear()
        v = den(zt, sigma * 1000, encoder_hidden_states=text).sample
        l_mse = F.mse_loss(v, noise - z0)
        side = z0.shape[-1] // den.config.patch_size[2]
        soft = latent_masks(masks, vae.config.scale_factor_temporal, side)  # (B, K, N)
        return l_mse, stca_loss(store, soft, token_pos)
