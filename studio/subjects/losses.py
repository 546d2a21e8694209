"""The subject-tuning losses (METHODS.md §1.1 MotionBooth, §2.2 Magic-Me), each a plain function of tensors.

Symbols: B batch, C latent channels, F frames (1 for photos), h×w latent size, N = tokens of one attention layer
(a downsampled h×w grid), L text tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def latent_mask(masks: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, H, W) pixel masks in 0..1 -> (B, 1, 1, h, w) bool latent masks: any covered pixel counts (MotionBooth:
    bool(bilinear resize))."""
    m = F.interpolate(masks[:, None].float(), size=(h, w), mode="bilinear", align_corners=False)
    return (m > 0)[:, :, None]


def region_loss(eps_hat: torch.Tensor, eps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Subject region loss Σ M⊙(ε̂−ε)² / ΣM (mean over the batch of per-item ratios, as Magic-Me).

    eps_hat, eps: (B, C, F, h, w); mask: (B, 1, 1|F, h, w) bool or 0/1. Pixels outside the mask get no gradient.
    """
    m = mask.to(eps.dtype).expand_as(eps)
    per = ((eps_hat - eps) ** 2 * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1.0)
    return per.mean()


def grid_for(n: int, h: int, w: int) -> tuple[int, int]:
    """The (rows, cols) of an attention layer with n tokens over an h×w latent (downsampled by a power of 2)."""
    for k in range(8):
        r, c = math.ceil(h / 2**k), math.ceil(w / 2**k)
        if r * c == n:
            return r, c
    raise ValueError(f"no downsampled grid of the {h}x{w} latent has {n} tokens")


def stca_loss(maps: list[torch.Tensor], masks: torch.Tensor, positions: list[list[int]], h: int, w: int,
              frames: int = 1) -> torch.Tensor:
    """MotionBooth's subject-token cross-attention loss: BCE(mean attention of the phrase's tokens, soft mask).

    maps: per captured layer, (B·F, N, L) softmax probabilities (heads averaged); masks: (B, H, W) pixel masks;
    positions[b]: the phrase's token positions in item b's prompt ([] skips the item). Averaged over layers/items.
    """
    terms = []
    for probs in maps:
        rows, cols = grid_for(probs.shape[1], h, w)
        soft = F.interpolate(masks[:, None].float(), size=(rows, cols), mode="area").flatten(1)  # (B, N)
        for b, pos in enumerate(positions):
            if not pos:
                continue
            a = probs[b * frames:(b + 1) * frames][:, :, pos].mean(-1)  # (F, N)
            target = soft[b].expand_as(a)
            terms.append(F.binary_cross_entropy(a.clamp(1e-6, 1 - 1e-6), target))
    if not terms:
        return torch.zeros((), requires_grad=False)
    return torch.stack(terms).mean()


def preservation_loss(eps_hat: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Video preservation loss: plain ε-MSE on a caption-conditioned clip (weighted by λ1 by the caller)."""
    return F.mse_loss(eps_hat, eps)
