"""Implements the 3D Gaussian noise prior of Magic-Me / VCD (arXiv 2402.09368, §3; METHODS.md §2.1).

For every channel and spatial position, the F-vector of initial noise is drawn from N(0, Σ) with
Σ_ij = γ^|i−j| (an AR(1) / Kac–Murdock–Szegő Toeplitz covariance, unit variance). It is sampled exactly,
without a Cholesky factor, by the AR(1) recursion

    ε_0 = z_0,   ε_f = γ·ε_{f−1} + sqrt(1 − γ²)·z_f,   z ~ N(0, I) i.i.d.

γ = 0 is plain i.i.d. noise (bit-identical to one `torch.randn` draw from the same generator), γ → 1 repeats
one noise frame. The prior only shapes x_T: it is passed to the pipeline as `latents=`.
Shapes: B batch, C latent channels, F frames, h×w latent size.
"""

from __future__ import annotations

import numpy as np
import torch


def covariance(frames: int, gamma: float) -> np.ndarray:
    """(F, F) covariance of the prior: gamma ** |i - j|."""
    idx = np.arange(frames)
    return np.power(float(gamma), np.abs(idx[:, None] - idx[None, :])).astype(np.float64)


def sample(shape: tuple[int, ...], gamma: float, generator: torch.Generator,
           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Unit-variance noise of shape (B, C, F, h, w) whose frames correlate as gamma ** |i - j|.

    The draw happens on the generator's device (use a CPU generator for results that match across devices).
    """
    if not 0.0 <= gamma < 1.0:
        raise ValueError(f"gamma must be in [0, 1), got {gamma!r}")
    if len(shape) != 5:
        raise ValueError(f"shape must be (B, C, F, h, w), got {tuple(shape)}")
    z = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)  # (B, C, F, h, w)
    if gamma == 0.0:
        return z.to(dtype)
    eps = torch.empty_like(z)
    eps[:, :, 0] = z[:, :, 0]
    keep = (1.0 - gamma * gamma) ** 0.5
    for f in range(1, shape[2]):
        eps[:, :, f] = gamma * eps[:, :, f - 1] + keep * z[:, :, f]
    return eps.to(dtype)


def preview(gamma: float, frames: int = 8, size: int = 24, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """What the γ slider shows: the (F, F) covariance and F sampled noise frames (F, size, size) in 0..1.

    Pure and cheap (no model): one noise channel, mapped from ±3σ to 0..1 for display.
    """
    gen = torch.Generator().manual_seed(seed)
    noise = sample((1, 1, frames, size, size), gamma, gen)[0, 0]  # (F, size, size)
    return covariance(frames, gamma), ((noise.clamp(-3, 3) + 3) / 6).numpy()
