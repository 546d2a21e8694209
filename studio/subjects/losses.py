"""The subject-tuning losses (METHODS.md §1.1 MotionBooth, §2.2 Magic-Me), each a plain function of tensors, and the
choice of the cross-attention layers MotionBooth's STCA loss reads.

Symbols: B batch, C latent channels, F frames (1 for photos), h×w latent size, N = rows·cols tokens of one attention
layer (a downsampled h×w grid), L text tokens.
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


# MotionBooth reads the cross-attention layers whose query length is N = (H/32)·(W/32): a quarter of the latent's
# side for the factor-8 VAEs of SD 1.5 and Zeroscope (down_blocks.2 and up_blocks.1; 10×18 at 320×576). The studio
# asks for the same level, a quarter of the latent side, on every model: on the toy-world model (a factor-2 VAE,
# 16×16 latents at 32 px) that is its mid block's 4×4 layer, i.e. H/8 in pixels. Where no layer has that size (the
# tiny random test models stop at half the latent side) the nearest level is taken, the finer one on a tie.
STCA_LEVEL = 2  # the latent side halved twice


def stca_layers(tokens: dict[str, int], ctx) -> tuple[list[str], tuple[int, int]]:
    """The layers STCA averages: those at the level nearest STCA_LEVEL, and their (rows, cols).

    tokens: {layer name: query length N} of the spatial cross-attention layers; ctx: a
    studio.controls.base.Context of the latent size (its layer_size maps N to (rows, cols)). Layers whose N is no
    downsampled latent grid are left out.
    """
    grids = {}
    for name, n in tokens.items():
        try:
            grids[name] = ctx.layer_size(n)
        except ValueError:
            continue
    if not grids:
        raise ValueError("no spatial cross-attention layer has a downsampled latent grid of tokens")
    level = {name: round(math.log2(ctx.latent_h / rows)) for name, (rows, _) in grids.items()}
    best = min(level.values(), key=lambda k: (abs(k - STCA_LEVEL), k))
    names = sorted(n for n, k in level.items() if k == best)
    return names, grids[names[0]]


def stca_loss(maps: list[torch.Tensor], masks: torch.Tensor, positions: list[list[int]], grid: tuple[int, int],
              frames: int = 1) -> torch.Tensor:
    """MotionBooth's subject-token cross-attention loss: one BCE(Ā, M̃) over the batch.

    Ā = the phrase's raw softmax maps averaged over the layers, heads and the phrase's tokens (no renormalisation);
    M̃ = the soft mask, bilinearly resized to the layers' grid (padding and background count as 0).
    maps: per layer, (B·F, N, L) softmax probabilities with heads averaged, all at one grid (rows, cols), N =
    rows·cols; masks: (B, H, W) pixel masks in 0..1; positions[b]: the phrase's token positions in item b's prompt
    ([] leaves the item out).
    """
    keep = [b for b, pos in enumerate(positions) if pos]
    if not maps or not keep:
        return torch.zeros(())
    probs = torch.stack(maps).mean(0)  # (B·F, N, L)
    soft = F.interpolate(masks[:, None].float(), size=grid, mode="bilinear", align_corners=False)  # (B, 1, rows, cols)
    soft = soft.flatten(1)  # (B, N)
    a = torch.cat([probs[b * frames:(b + 1) * frames][:, :, positions[b]].mean(-1) for b in keep])  # (B'·F, N)
    target = torch.cat([soft[b].expand(frames, -1) for b in keep])  # (B'·F, N)
    return F.binary_cross_entropy(a.clamp(1e-6, 1 - 1e-6), target.to(a.dtype))


def preservation_loss(eps_hat: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Video preservation loss: plain ε-MSE on a caption-conditioned clip (weighted by λ1 by the caller)."""
    return F.mse_loss(eps_hat, eps)
