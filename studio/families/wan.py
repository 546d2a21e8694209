"""The Wan family: Wan 2.1 / 2.2 diffusion transformers (WanPipeline, WanTransformer3DModel, AutoencoderKLWan,
a UMT5 text encoder, flow matching with the UniPC scheduler the hub repos ship).

What differs from the UNets (../shared/design/WAN.md):
- latents (B, C, F', h, w) with F' = (F − 1)/4 + 1: the causal VAE encodes frame 0 alone, then 4 frames per latent
  frame; so F = 4k + 1 (the pipeline would round anything else silently: shot validation refuses it instead);
- the VAE downsamples ×8 (Wan 2.1, 16 channels) or ×16 (Wan 2.2 TI2V-5B, 48 channels), the transformer patches
  2×2 latent pixels: sizes are multiples of 16 (2.1) or 32 (2.2-5B);
- classifier-free guidance is two batch-1 transformer calls per step, the conditional one first;
- self-attention (`attn1`) is joint over all F'·h/2·w/2 tokens with 3D RoPE; `attn2` is text-only cross-attention
  over the 512 zero-padded UMT5 tokens;
- the VAE runs in float32 (diffusers' and the authors' advice), the rest in the preset's dtype (auto: bfloat16 on
  CUDA, float32 on a CPU); the pipeline keeps its latents in float32.
The directing controls run here too (studio.controls.wan_attention for what differs): box trajectories through
attn2 on the conditional call, each latent frame's box the union of its video frames' boxes; camera pan by latent
shift with UniPC's stored history shifted alike; subject and background references as key/value tokens in attn1;
Face VCD and Tiled VCD through WanVideoToVideoPipeline; the noise prior over latent frames. Trained subjects and
subject tuning are not ported: check_shot refuses them by field.
"""

from __future__ import annotations

from typing import Callable

from studio.families.base import Family


class WanFamily(Family):
    name = "wan"
    pipeline = "WanPipeline"
    video_to_video = "WanVideoToVideoPipeline"
    denoiser_attr = "transformer"
    cfg_batched = False
    supports = frozenset({"boxes", "camera", "references", "refine"})  # not yet: trained subjects, subject tuning

    def auto_dtype(self, device: str) -> str:
        return "bfloat16" if device == "cuda" else "float32"

    def load(self, preset, base: str, kw: dict, note: Callable[[str], None]):
        import diffusers
        import torch

        note(preset.base)
        # one call, the VAE in float32 and the rest in the preset's dtype (diffusers takes a dtype per component)
        return diffusers.WanPipeline.from_pretrained(base, **{**kw, "dtype": {"vae": torch.float32,
                                                                             "default": kw["dtype"]}})

    def check_pipeline(self, pipe, preset) -> None:
        """The preset's frame and size rules must be the model's: F = T·k + 1 and sizes a multiple of the VAE's
        factor times the transformer's patch (else WanPipeline would round the shot's values without a word)."""
        from studio.shot import ShotError

        t = pipe.vae_scale_factor_temporal
        if (preset.frame_step, preset.frame_offset) != (t, 1):
            raise ShotError("model", preset.name, f"a {self.name} preset needs frame_step: {t} and frame_offset: 1 "
                                                  f"(this model's frames are {t}k+1), not {preset.frame_step} and "
                                                  f"{preset.frame_offset}")
        patch = pipe.transformer.config.patch_size[1]
        grid = self.spatial_factor(pipe) * patch
        if preset.size_multiple % grid:
            raise ShotError("model", preset.name, f"size_multiple must be a multiple of {grid} for this model "
                                                  f"(VAE ×{self.spatial_factor(pipe)}, patch {patch}), not "
                                                  f"{preset.size_multiple}")

    def text_length(self, pipe) -> int:
        """WanPipeline's max_sequence_length as the studio calls it: the prompt's UMT5 states, zero-padded, unmasked,
        to 512 tokens (Wan's), or to the tokenizer's model_max_length when that is shorter (the toy Wan: 32)."""
        tok = getattr(pipe, "tokenizer", None)
        return 512 if tok is None else min(512, int(tok.model_max_length))

    def call_kwargs(self, pipe, on_step_end, check_cancel: Callable[[], None]) -> dict:
        return {**super().call_kwargs(pipe, on_step_end, check_cancel), "max_sequence_length": self.text_length(pipe)}

    def spatial_factor(self, pipe) -> int:
        return pipe.vae_scale_factor_spatial

    def temporal_factor(self, pipe_or_preset) -> int:
        if hasattr(pipe_or_preset, "vae_scale_factor_temporal"):
            return pipe_or_preset.vae_scale_factor_temporal
        return pipe_or_preset.frame_step  # a preset: its frame rule is the VAE's (check_pipeline)

    def latent_dtype(self, pipe):
        import torch

        return torch.float32  # WanPipeline.prepare_latents makes them float32 whatever the transformer's dtype

    def cross_attention_names(self, denoiser) -> list[str]:
        return [f"{n}.processor" for n, m in denoiser.named_modules() if n.endswith(".attn2") and
                hasattr(m, "processor")]

    def self_attention_names(self, denoiser) -> list[str]:
        return [f"{n}.processor" for n, m in denoiser.named_modules() if n.endswith(".attn1") and
                hasattr(m, "processor")]

    def check_shot(self, shot, preset) -> None:
        super().check_shot(shot, preset)
        from studio.shot import ShotError

        if shot.reference_control.temporal_attention:
            raise ShotError("reference_control.temporal_attention", True,
                            f"the {self.name} family (model '{preset.name}') has no separate temporal attention: its "
                            "attn1 is joint over frames and pixels, so every frame reads the references already; "
                            "valid here: false")

    # --- the controls' Wan parts (studio.controls.wan_attention) ---------------------------------------------

    def phrase_tokens(self, pipe, prompt: str, phrases: dict[int, str], required=None) -> dict[int, list[int]]:
        from studio.controls import wan_attention

        return wan_attention.phrase_tokens(pipe.tokenizer, prompt, phrases, required, self.text_length(pipe))

    def word_tokens(self, pipe, prompt: str) -> list[int]:
        from studio.controls import wan_attention

        return wan_attention.word_tokens(pipe.tokenizer, prompt, self.text_length(pipe))

    def box_control(self, ctx, tracks, words, strength, amplify_steps, suppress):
        from studio.controls.wan_attention import WanBoxAttention

        return WanBoxAttention(ctx, tracks, words, strength, amplify_steps, suppress)

    def reference_problem(self, pipe, shot, ctx, references: int, model: str):
        from studio.controls.wan_attention import check_reference_positions

        why = check_reference_positions(self.denoiser(pipe), ctx.attention_frames, references)
        return None if why is None else ("frames", shot.frames, f"{why}; use fewer frames or references")

    def encode_reference(self, pipe, path, width: int, height: int):
        """The clean latent (1, C, h, w) of a reference image: encoded by the Wan VAE as a one-frame video (the
        posterior's mode, no random draw), normalised as WanPipeline normalises latents."""
        import torch

        from studio.controls.reference import load_image

        vae = pipe.vae
        rgb = load_image(path, width, height).copy()
        x = torch.from_numpy(rgb).float().div(127.5).sub(1.0).permute(2, 0, 1)[None, :, None]  # (1, 3, 1, H, W)
        with torch.no_grad():
            z = vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mode()  # (1, C, 1, h, w)
        c = vae.config
        mean = torch.tensor(c.latents_mean).view(1, c.z_dim, 1, 1, 1).to(z.device, z.dtype)
        std = torch.tensor(c.latents_std).view(1, c.z_dim, 1, 1, 1).to(z.device, z.dtype)
        return ((z - mean) / std)[:, :, 0].to(self.latent_dtype(pipe))

    def reference_control(self, pipe, ctx, items, rc):
        from studio.controls.wan_attention import WanReferenceInjection

        transformer = self.denoiser(pipe)
        return WanReferenceInjection(ctx, items, transformer.rope, transformer.config.patch_size, rc.max_tokens,
                                     unconditional=rc.unconditional, token_ratio=rc.token_ratio)
