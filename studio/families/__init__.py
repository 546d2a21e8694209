"""Base-model families: what differs between the UNet video models and the Wan diffusion transformers.

One small adapter object per family (studio.families.base.Family) answers everything the engine, the controls,
refinement and the UI used to assume about a UNet: which pipeline class loads it, where its denoiser is, the
latent layout and frame/size rules, the VAE's factors, how classifier-free guidance calls the denoiser, where
controls hook in, and which shot settings the family takes. Nothing heavy is imported here.

    get(name)   the adapter of a preset's `family` ("animatediff", "zeroscope", "wan")
    of(pipe)    the adapter of a loaded pipeline (by its class)
"""

from __future__ import annotations

from studio.families.base import Family, latent_times
from studio.families.unet import AnimateDiffFamily, ZeroscopeFamily
from studio.families.wan import WanFamily

_FAMILIES: dict[str, Family] = {f.name: f for f in (AnimateDiffFamily(), ZeroscopeFamily(), WanFamily())}
NAMES = tuple(_FAMILIES)


def get(name: str) -> Family:
    """The adapter of a family by name (KeyError naming the known ones)."""
    try:
        return _FAMILIES[name]
    except KeyError:
        raise KeyError(f"unknown model family {name!r} (known: {', '.join(NAMES)})") from None


def of(pipe) -> Family:
    """The adapter of a loaded pipeline: its text-to-video class or the video-to-video twin made from it."""
    names = {c.__name__ for c in type(pipe).__mro__}
    for family in _FAMILIES.values():
        if names & {family.pipeline, family.video_to_video}:
            return family
    raise TypeError(f"no model family runs a {type(pipe).__name__}")


def denoiser(pipe):
    """The pipeline's denoising network (a UNet or a diffusion transformer)."""
    return of(pipe).denoiser(pipe)


__all__ = ["Family", "NAMES", "denoiser", "get", "latent_times", "of"]
