"""The UNet families: Stable Diffusion 1.5 + AnimateDiff (UNetMotionModel) and Zeroscope (UNet3DConditionModel).

One latent frame per video frame (F' = F), classifier-free guidance as one batched UNet call on [uncond, cond],
spatial attention layers separate from the temporal ones (motion modules / temp_attentions). Every setting of the
shot is supported. This is what the engine assumed before the family adapters; the adapters reproduce it exactly.
"""

from __future__ import annotations

from typing import Callable

from studio.families.base import Family


class UNetFamily(Family):
    denoiser_attr = "unet"
    cfg_batched = True

    def cross_attention_names(self, denoiser) -> list[str]:
        from studio.controls.base import spatial_cross_attention_names

        return spatial_cross_attention_names(denoiser)

    def self_attention_names(self, denoiser) -> list[str]:
        from studio.controls.base import spatial_self_attention_names

        return spatial_self_attention_names(denoiser)

    def temporal_attention_names(self, denoiser) -> list[str]:
        from studio.controls.base import temporal_attention_names

        return temporal_attention_names(denoiser)


class AnimateDiffFamily(UNetFamily):
    name = "animatediff"
    pipeline = "AnimateDiffPipeline"
    video_to_video = "AnimateDiffVideoToVideoPipeline"

    def weight_refs(self, preset) -> list[str]:
        return [preset.motion_adapter] if preset.motion_adapter else []

    def load(self, preset, base: str, kw: dict, note: Callable[[str], None]):
        import diffusers

        from studio.presets import resolve_local

        extra = {}
        if preset.motion_adapter:
            note(preset.motion_adapter)
            extra["motion_adapter"] = diffusers.MotionAdapter.from_pretrained(resolve_local(preset.motion_adapter),
                                                                              dtype=kw["dtype"])
        note(preset.base)
        return diffusers.AnimateDiffPipeline.from_pretrained(base, **kw, **extra)


class ZeroscopeFamily(UNetFamily):
    name = "zeroscope"
    pipeline = "TextToVideoSDPipeline"
    video_to_video = "VideoToVideoSDPipeline"

    def call_kwargs(self, pipe, on_step_end, check_cancel: Callable[[], None]) -> dict:
        """TextToVideoSDPipeline only has the legacy per-step callback: its latents are edited in place, and as it
        has no `_interrupt`, cancelling leaves its loop by the exception check_cancel raises."""
        def legacy(i, t, lat):
            new = on_step_end(pipe, i, t, {"latents": lat}).get("latents")
            if new is not None and new is not lat:
                lat.copy_(new)
            check_cancel()

        return dict(callback=legacy, callback_steps=1)
