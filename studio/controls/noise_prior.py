"""Implements the 3D Gaussian noise prior of Magic-Me / VCD (arXiv 2402.09368, §3; METHODS.md §2.1).

For every channel and spatial position, the F-vector of initial noise is drawn from N(0, Σ) with
Σ_ij = γ^|i−j| (an AR(1) / Kac–Murdock–Szegő Toeplitz covariance, unit variance). It is sampled exactly,
without a Cholesky factor, by the AR(1) recursion

    ε_0 = z_0,   ε_f = γ·ε_{f−1} + sqrt(1 − γ²)·z_f,   z ~ N(0, I) i.i.d.

γ = 0 is plain i.i.d. noise (bit-identical to one `torch.randn` draw from the same generator), γ → 1 repeats
one noise frame. The prior only shapes x_T: it is passed to the pipeline as `latents=`.

γ is the shot's, per video frame. On a model whose latent frames each stand for several video frames (Wan: latent 0
is frame 0 alone, latent k >= 1 encodes frames 4k-3..4k) the prior is drawn over latent frames, each standing at
the time t_k of the frames it encodes (studio.families.latent_times: 0, 2.5, 6.5, 10.5, ...): Cov(latent i,
latent j) = γ^|t_i − t_j|, i.e. latents correlate as the video frames at their centres would. Drawn by the same
recursion with a per-step ρ_k = γ^(t_k − t_{k−1}): γ^2.5 between latents 0 and 1, γ⁴ after. With one latent per
frame (t_k = k) this is the plain prior above, bit for bit.
Shapes: B batch, C latent channels, F frames (F' latent frames), h×w latent size.
"""

from __future__ import annotations

import numpy as np
import torch


def covariance(frames: int, gamma: float, times=None) -> np.ndarray:
    """(F, F) covariance of the prior: gamma ** |i - j|, or gamma ** |t_i - t_j| for frames standing at `times`."""
    t = np.arange(frames, dtype=np.float64) if times is None else np.asarray(times, np.float64)
    return np.power(float(gamma), np.abs(t[:, None] - t[None, :])).astype(np.float64)


def step_gammas(gamma: float, times) -> list[float]:
    """ρ_k = gamma ** (t_k − t_{k−1}): the correlation of each frame with the one before (one per frame after the
    first)."""
    return [float(gamma) ** (b - a) for a, b in zip(times, times[1:])]


def sample(shape: tuple[int, ...], gamma: float, generator: torch.Generator,
           dtype: torch.dtype = torch.float32, times=None) -> torch.Tensor:
    """Unit-variance noise of shape (B, C, F, h, w) whose frames correlate as gamma ** |i - j| (frames standing at
    `times`: gamma ** |t_i - t_j|; None: t = 0, 1, 2, ...).

    The draw happens on the generator's device (use a CPU generator for results that match across devices).
    """
    if not 0.0 <= gamma < 1.0:
        raise ValueError(f"gamma must be in [0, 1), got {gamma!r}")
    if len(shape) != 5:
        raise ValueError(f"shape must be (B, C, F, h, w), got {tuple(shape)}")
    if times is not None and (len(times) != shape[2] or any(b <= a for a, b in zip(times, times[1:]))):
        raise ValueError(f"times must be {shape[2]} increasing values, got {list(times)}")
    z = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)  # (B, C, F, h, w)
    if gamma == 0.0:
        return z.to(dtype)
    rhos = [gamma] * (shape[2] - 1) if times is None else step_gammas(gamma, times)
    eps = torch.empty_like(z)
    eps[:, :, 0] = z[:, :, 0]
    for f in range(1, shape[2]):
        rho = rhos[f - 1]
        eps[:, :, f] = rho * eps[:, :, f - 1] + (1.0 - rho * rho) ** 0.5 * z[:, :, f]
    return eps.to(dtype)


def preview(gamma: float, frames: int = 8, size: int = 24, seed: int = 0,
            times=None) -> tuple[np.ndarray, np.ndarray]:
    """What the γ slider shows: the (F, F) covariance and F sampled noise frames (F, size, size) in 0..1 (latent
    frames standing at `times` when given).

    Pure and cheap (no model): one noise channel, mapped from ±3σ to 0..1 for display.
    """
    gen = torch.Generator().manual_seed(seed)
    noise = sample((1, 1, frames, size, size), gamma, gen, times=times)[0, 0]  # (F, size, size)
    return covariance(frames, gamma, times), ((noise.clamp(-3, 3) + 3) / 6).numpy()
