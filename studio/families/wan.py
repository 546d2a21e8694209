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
Box trajectories, camera pan, references, trained subjects and refinement are not ported yet: check_shot refuses
them by field. The noise prior works (on latent frames, see studio.controls.noise_prior).
"""

from __future__ import annotations

from typing import Callable

from studio.families.base import Family


class WanFamily(Family):
    name = "wan"
    pipeline = "WanPipeline"
    video_to_video = None  # WanVideoToVideoPipeline exists; refinement on Wan comes with the controls' port
    denoiser_attr = "transformer"
    cfg_batched = False
    supports = frozenset()  # of the UNet families' controls only the noise prior, which every family takes

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
