"""Initial noise warped along the camera path (noise warping after Go-with-the-Flow, for a pan: a rigid shift).

A panning camera sees one static world through a moving window, so what frame k sees is mostly what frame k − 1 saw,
moved by the camera's step. The warp gives the initial noise that structure. From the noise prior's own draw ε (γ
keeps its meaning there), the warped noise n follows the camera path as an AR(1) process:

    n_0 = ε_0,    n_k = ρ·S_k(n_{k−1}) + sqrt(1 − ρ²)·ε_k        ρ = camera.noise_warp in [0, 1]
    ε'_k = L·ε_k + H·n_k

S_k moves a frame by the camera's step between latent frames k − 1 and k (whole latent pixels, the content moving
against the camera) and fills the strip it reveals with fresh noise from the shot's generator. So along the camera
path the noise of frames k and j correlates as ρ^|k−j|: γ's law, along the path instead of at fixed pixels.
L keeps the spatial frequencies of at most a = camera.warp_above cycles per frame on both axes (an ideal low-pass
by FFT), H = I − L the rest: the low band stays each frame's own noise, because noise shared across frames at the
scale of a subject or of the frame is read by the model as content (extra subjects, a sand background turned blue on
the toy-world model), while the fine band carries the texture that shows the camera moving. For white ε, n and ε'
are unit white noise again. ρ = 0 leaves ε untouched (and draws nothing); ρ = 1 makes each frame's fine noise the
previous frame's, moved by the camera.

Family-agnostic: the offsets are the video frames' camera offsets carried to latent frames through a frame map
(for each latent frame, the video frames it covers; its offset is their mean). UNet families (AnimateDiff,
Zeroscope) have one latent frame per video frame (`identity_map`); a causal video VAE that folds 4 frames into a
latent frame after the first (Wan: latent frame k covers video frames 4k−3..4k) is `grouped_map(frames, 4)`.

Shapes: B videos, C latent channels, F video frames, K latent frames, h×w latent size.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

FrameMap = Sequence[Sequence[int]]  # for each latent frame k, the video frames it covers


def identity_map(frames: int) -> list[list[int]]:
    """One latent frame per video frame (the UNet families)."""
    return [[f] for f in range(frames)]


def grouped_map(frames: int, group: int) -> list[list[int]]:
    """A causal video VAE's map: latent frame 0 covers video frame 0, each later one the next `group` frames
    (Wan, group 4: latent frame k covers video frames 4k−3..4k). frames must be 1 + a multiple of group."""
    if group < 1 or frames < 1 or (frames - 1) % group:
        raise ValueError(f"{frames} frames do not fold into latent frames of {group} (need 1 + a multiple of it)")
    return [[0]] + [list(range(1 + group * (k - 1), 1 + group * k)) for k in range(1, 1 + (frames - 1) // group)]


# The frame map of each model family whose latent frames the warp knows; a family not here cannot be warped.
FRAME_MAPS = {"animatediff": identity_map, "zeroscope": identity_map}

# The schedulers whose noise level per step the warp knows (`noise_level`): single-step ones whose next step depends
# on the current latents only. Others are refused: ancestral / SDE samplers add fresh, unwarped noise every step,
# and multistep ones (PNDM, DPM-Solver++, UniPC, ...) keep a history of unshifted model outputs.
NOISE_LEVELS = {"DDIMScheduler": "alphas", "EulerDiscreteScheduler": "sigmas", "FlowMatchEulerDiscreteScheduler": "sigmas"}


def unsupported(family: str, scheduler) -> str | None:
    """Why the warp cannot run on this family and scheduler (an instance, a class name, or None: the model's own,
    not known yet), or None if it can."""
    name = scheduler if isinstance(scheduler, str) or scheduler is None else type(scheduler).__name__
    shown = name or "(the model's own)"
    if family not in FRAME_MAPS:
        return (f"the noise warp does not support family '{family}' (scheduler {shown}): it does not know how its "
                f"video frames map to latent frames")
    if name is not None and name not in NOISE_LEVELS:
        return (f"the noise warp does not support scheduler {shown} (family '{family}'): it needs a single-step "
                f"scheduler whose noise level it knows ({', '.join(NOISE_LEVELS)})")
    return None


def noise_level(scheduler) -> Callable[[int], float]:
    """i -> the share s of the (unit) initial noise in the latents that step i + 1 takes in, after step i (i = −1:
    the initial noise itself, s = 1): sqrt(1 − ᾱ_t) on DDPM-type schedules (x_t = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·ε),
    σ on sigma schedules (Euler: x = x0 + σ·ε; flow matching: x = (1 − σ)·x0 + σ·ε). Read from the scheduler at
    call time (the pipeline sets its timesteps when it starts)."""
    kind = NOISE_LEVELS.get(type(scheduler).__name__)
    if kind is None:
        raise ValueError(f"no noise level for scheduler {type(scheduler).__name__}")

    def level(i: int) -> float:
        if i < 0:
            return 1.0
        if kind == "sigmas":
            return float(scheduler.sigmas[i + 1]) if i + 1 < len(scheduler.sigmas) else 0.0
        ts = scheduler.timesteps
        if i + 1 >= len(ts):
            return 0.0
        return float((1.0 - scheduler.alphas_cumprod[int(ts[i + 1])]) ** 0.5)

    return level


def latent_offsets(video_offsets: torch.Tensor, frame_map: FrameMap) -> torch.Tensor:
    """(K, 2) camera offset of each latent frame: the mean of its video frames' (F, 2) offsets."""
    rows = []
    for k, covered in enumerate(frame_map):
        if not covered or min(covered) < 0 or max(covered) >= len(video_offsets):
            raise ValueError(f"latent frame {k} covers video frames {list(covered)}, not in 0..{len(video_offsets) - 1}")
        rows.append(video_offsets[list(covered)].mean(0))
    return torch.stack(rows) if rows else video_offsets[:0]


def whole_offsets(offsets: torch.Tensor) -> torch.Tensor:
    """(K, 2) long: offsets rounded to whole latent pixels (half away from zero, so ±0.5 move alike)."""
    return (offsets.abs() + 0.5).floor().copysign(offsets).long()


def shift_fresh(x: torch.Tensor, dx: int, dy: int, generator: torch.Generator) -> torch.Tensor:
    """x (B, C, h, w) with its content moved dx pixels left (right if dx < 0) and dy up (down if dy < 0): the camera
    moved right / down by (dx, dy). The strip it reveals is fresh unit noise from generator (one full-size draw)."""
    B, C, h, w = x.shape
    out = torch.randn((B, C, h, w), generator=generator, device=generator.device, dtype=torch.float32).to(x.device)
    dx, dy = max(-w, min(w, int(dx))), max(-h, min(h, int(dy)))
    if abs(dx) < w and abs(dy) < h:
        out[:, :, max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)] = \
            x[:, :, max(0, dy):h + min(0, dy), max(0, dx):w + min(0, dx)].float()
    return out


def low_pass(x: torch.Tensor, cycles: float) -> torch.Tensor:
    """The orthogonal projection of x (..., h, w) onto spatial frequencies of at most `cycles` cycles per frame on
    both axes (an ideal low-pass by FFT; `x - low_pass(x)` is the rest). For white noise the two parts are
    independent and their variances add up to the noise's."""
    h, w = x.shape[-2:]
    fy = torch.fft.fftfreq(h, d=1.0 / h).abs()  # (h,) cycles per frame
    fx = torch.fft.rfftfreq(w, d=1.0 / w)  # (w // 2 + 1,)
    keep = ((fy[:, None] <= cycles) & (fx[None, :] <= cycles)).to(x.device)  # (h, w // 2 + 1)
    return torch.fft.irfft2(torch.fft.rfft2(x.float()) * keep, s=(h, w)).to(x.dtype)


def warp(noise: torch.Tensor, video_offsets: torch.Tensor, rho: float, generator: torch.Generator,
         frame_map: FrameMap | None = None, above: float | None = None) -> torch.Tensor:
    """ε'_k = L·ε_k + H·n_k with n the AR(1) along the camera path (module docstring), for noise ε (B, C, K, h, w) and
    the video frames' camera offsets (F, 2) in latent pixels (studio.controls.camera.frame_targets); `above` is the
    low band's edge in cycles per frame (None: every frequency warped); frame_map defaults to one latent frame per
    video frame. ρ = 0 returns noise itself and draws nothing."""
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"noise warp must be in 0..1, got {rho!r}")
    if rho == 0.0:
        return noise
    K = noise.shape[2]
    frame_map = identity_map(len(video_offsets)) if frame_map is None else frame_map
    if len(frame_map) != K:
        raise ValueError(f"the frame map has {len(frame_map)} latent frames, the noise {K}")
    offsets = whole_offsets(latent_offsets(video_offsets.to(torch.float64), frame_map))  # (K, 2)
    eps = noise.float()
    n = torch.empty_like(eps)  # (B, C, K, h, w)
    n[:, :, 0] = eps[:, :, 0]
    keep = (1.0 - rho * rho) ** 0.5
    for k in range(1, K):
        dx, dy = (int(v) for v in offsets[k] - offsets[k - 1])
        n[:, :, k] = rho * shift_fresh(n[:, :, k - 1], dx, dy, generator) + keep * eps[:, :, k]
    if above is not None:  # the low band stays ε's own
        n = n - low_pass(n, above) + low_pass(eps, above)
    return n.to(noise.dtype)


def for_shot(shot, family: str, scheduler, noise: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The shot's initial noise (B, C, K, h, w) warped along its pan by camera.noise_warp (unchanged when there is
    no pan or no warp). ShotError naming camera.noise_warp on a family or scheduler the warp cannot support."""
    from studio import shot as shotlib
    from studio.controls.camera import frame_targets

    c = shot.camera
    rho = float(c.noise_warp or 0.0)
    if rho == 0.0 or not (c.cx or c.cy):
        return noise
    why = unsupported(family, scheduler)
    if why:
        raise shotlib.ShotError("camera.noise_warp", c.noise_warp, why)
    _, _, _, h, w = noise.shape
    video = frame_targets(shot.frames, c.cx, c.cy, h, w)  # (F, 2) camera offsets in latent pixels
    return warp(noise, video, rho, generator, FRAME_MAPS[family](shot.frames), c.warp_above)
