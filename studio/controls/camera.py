"""Camera pan by shifting the noisy latents (MotionBooth §1.3).

During a window of early-middle denoising steps, every frame's latent is shifted a little, frame f in
proportion to f, so the video's layout drifts as if the camera panned; the strip a shift vacates is filled with
latent tokens sampled from the same row (or column) outside the subject boxes, so no subject is cloned into it.
The subject boxes move with the content, so box control keeps tracking the subjects.

Convention (the shot file's): cx > 0 pans right, so content moves left; cy > 0 pans down, content moves up.
cx is the fraction of the frame width the camera travels over the clip: after the window, frame f has moved
f/(F−1)·cx·w latent pixels. (MotionBooth moves frame f by f/F·cx·W/8, so its last frame falls 1/F short of cx;
we use F−1 so the last frame travels exactly the requested fraction.)

Shapes: B videos, C channels, F frames, h×w latent size.
"""

from __future__ import annotations

import logging

import torch

from studio.controls.base import Context, Control
from studio.controls.boxes import box_masks

logger = logging.getLogger(__name__)


def frame_targets(frames: int, cx: float, cy: float, h: int, w: int) -> torch.Tensor:
    """(F, 2) total content shift (x, y) in latent pixels per frame at the end of the window (content moves
    against the camera, so the signs are those of cx, cy read as 'shift left/up by')."""
    if frames < 2:
        return torch.zeros(frames, 2)
    f = torch.arange(frames, dtype=torch.float64) / (frames - 1)
    return torch.stack([f * cx * w, f * cy * h], 1)


def _fill(z: torch.Tensor, n: int, keep: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(B, C, h, n): for every row of z (B, C, h, w), n tokens drawn from that row where keep (h, w) is True.

    Without replacement when the row has n allowed positions, with replacement otherwise; a row with none
    allowed (a box spanning the width) draws from the whole row.
    """
    h, w = keep.shape
    weights = keep.double()
    weights[weights.sum(1) == 0] = 1.0  # no position outside the boxes in this row: use the whole row
    replace = bool((weights > 0).sum(1).min() < n)
    idx = torch.multinomial(weights, n, replacement=replace, generator=generator)  # (h, n)
    return torch.gather(z, 3, idx.to(z.device)[None, None].expand(z.shape[0], z.shape[1], h, n))


def shift_frame(z: torch.Tensor, dx: int, dy: int, keep: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift one frame's latent z (B, C, h, w) so its content moves dx pixels left (right if dx < 0) and dy up
    (down if dy < 0); the vacated strip is filled from the same rows / columns at positions where keep is True."""
    _, _, h, w = z.shape
    if dx:
        n = min(abs(dx), w)
        fill = _fill(z, n, keep, generator)  # (B, C, h, n)
        z = torch.cat([z[..., n:], fill], 3) if dx > 0 else torch.cat([fill, z[..., :w - n]], 3)
        keep = torch.cat([keep[:, n:], keep[:, :n]], 1) if dx > 0 else torch.cat([keep[:, w - n:], keep[:, :w - n]], 1)
    if dy:
        n = min(abs(dy), h)
        fill = _fill(z.transpose(2, 3), n, keep.T, generator).transpose(2, 3)  # (B, C, n, w): same columns
        z = torch.cat([z[:, :, n:], fill], 2) if dy > 0 else torch.cat([fill, z[:, :, :h - n]], 2)
    return z


class CameraShift(Control):
    """Shift the latents between denoising steps start_step .. start_step + shift_steps − 1."""

    name = "camera"

    def __init__(self, cx: float, cy: float, start_step: int, shift_steps: int):
        self.cx, self.cy = cx, cy
        self.start, self.n = int(start_step), max(1, int(shift_steps))
        self.moved: torch.Tensor | None = None  # (F, 2) integer pixels already moved per frame

    def on_step_end(self, ctx: Context, i: int, latents: torch.Tensor) -> torch.Tensor | None:
        step = i + 1  # the step these latents go into
        if not self.start <= step < self.start + self.n:
            return None
        F_, h, w = ctx.frames, ctx.latent_h, ctx.latent_w
        if self.moved is None:
            self.moved = torch.zeros(F_, 2, dtype=torch.long)
        done = step - self.start + 1  # shifts completed after this one
        target = frame_targets(F_, self.cx, self.cy, h, w) * done / self.n  # (F, 2) where each frame should be
        delta = target.trunc().long() - self.moved  # integer part of the accumulated target, minus what moved
        if not delta.any():
            return None
        out = latents.clone()
        for f in delta.any(1).nonzero().flatten().tolist():
            keep = torch.ones(h, w, dtype=torch.bool)
            for boxes in ctx.boxes.values():  # never fill from a subject
                keep &= ~box_masks(boxes[f:f + 1].float(), h, w).view(h, w)
            dx, dy = int(delta[f, 0]), int(delta[f, 1])
            out[:, :, f] = shift_frame(latents[:, :, f], dx, dy, keep, ctx.generator)
            for k in ctx.boxes:  # the boxes travel with the content
                ctx.boxes[k][f, [0, 2]] -= dx / w
                ctx.boxes[k][f, [1, 3]] -= dy / h
        self.moved += delta
        return out

    def close(self) -> None:
        self.moved = None
