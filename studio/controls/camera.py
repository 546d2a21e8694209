"""Camera pan by shifting the noisy latents, after MotionBooth (METHODS.md §1.3).

During a window of early-middle denoising steps each frame's noisy latent is translated by whole latent pixels,
frame f in proportion to f, so the layout the model settles on drifts as if the camera panned. The strip a shift
vacates is filled with latent tokens drawn from the same row (x shift) or column (y shift) of that frame, outside
every subject box, so no subject gets cloned into it. The subject boxes in `ctx.boxes` travel with the content,
so box control (and anything else reading them later) keeps tracking the subjects.

Convention (the shot file's): cx > 0 pans right, so content moves left (x decreases); cy > 0 pans down, so
content moves up. cx is the fraction of the frame width the camera travels over the whole clip: once the window
is over, frame f has moved f/(F−1)·cx·w latent pixels; frame 0 never moves, nor does a one-frame clip.
Deviation from MotionBooth: it moves frame f by f/F·cx·W/8, so its last frame falls 1/F short of cx; dividing by
F−1 makes the last frame travel exactly the requested fraction.

Shapes: B videos, C latent channels, F frames, h×w latent size.
"""

from __future__ import annotations

import logging
import math
from typing import Callable

import torch

from studio.controls.base import Context, Control

logger = logging.getLogger(__name__)

_EPS = 1e-6  # float slack when turning accumulated targets and box edges into whole latent pixels


def frame_targets(frames: int, cx: float, cy: float, h: int, w: int, times=None, span: float | None = None
                  ) -> torch.Tensor:
    """(F, 2) float64: total content shift (x, y) of every frame in latent pixels once the window is over.

    Positive means content moves left / up (the camera pans right / down). Frame f: f/(F−1)·(cx·w, cy·h).
    times, span: latent frames standing for several video frames (Wan) move as the video time t_k they stand at
    (Context.latent_times) over the clip's span F−1 video frames: t_k/(F−1)·(cx·w, cy·h).
    """
    if times is not None:
        t = torch.tensor(list(times), dtype=torch.float64)[:frames]
        frac = t / span if span else torch.zeros(frames, dtype=torch.float64)
        return torch.stack([frac * (float(cx) * w), frac * (float(cy) * h)], dim=1)  # (F', 2)
    if frames < 2:
        return torch.zeros(frames, 2, dtype=torch.float64)
    frac = torch.arange(frames, dtype=torch.float64) / (frames - 1)  # (F,) 0 .. 1
    return torch.stack([frac * (float(cx) * w), frac * (float(cy) * h)], dim=1)  # (F, 2)


def outside_boxes(boxes: list[torch.Tensor], h: int, w: int) -> torch.Tensor:
    """(h, w) bool: True at latent pixels that no box touches. boxes: normalised (4,) x0, y0, x1, y1 each.

    A pixel counts as inside when the box overlaps it at all, so fill never draws half-subject tokens.
    Boxes partly or wholly outside the frame (the camera moved them) are clipped.
    """
    keep = torch.ones(h, w, dtype=torch.bool)
    for b in boxes:
        x0, y0, x1, y1 = (float(v) for v in b)
        x0, x1 = min(x0, x1), max(x0, x1)
        y0, y1 = min(y0, y1), max(y0, y1)
        c0 = max(0, math.floor(x0 * w + _EPS))
        c1 = min(w, math.ceil(x1 * w - _EPS))
        r0 = max(0, math.floor(y0 * h + _EPS))
        r1 = min(h, math.ceil(y1 * h - _EPS))
        if c1 > c0 and r1 > r0:
            keep[r0:r1, c0:c1] = False
    return keep


def _draw_positions(allowed: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """(R, n) long: for each of R lines, n positions along it drawn where allowed (R, L) is True.

    Without replacement in lines with at least n allowed positions, with replacement in the others; a line with
    no allowed position draws from the whole line. One multinomial call per case, no loop over lines.
    """
    weights = allowed.to(torch.float64)  # (R, L)
    weights[weights.sum(1) == 0] = 1.0  # the boxes cover the whole line: fall back to all of it
    enough = (weights > 0).sum(1) >= n  # (R,)
    idx = torch.empty(allowed.shape[0], n, dtype=torch.long)
    if enough.any():
        idx[enough] = torch.multinomial(weights[enough], n, replacement=False, generator=generator)
    if (~enough).any():
        idx[~enough] = torch.multinomial(weights[~enough], n, replacement=True, generator=generator)
    return idx


def _level_fill(z: torch.Tensor, n: int, keep: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """(B, C, h, n) new tokens for a row's vacated strip, copying none: per row and channel the median of the row's
    tokens where keep is True, plus (with a generator) fresh Gaussian noise at their spread (1.4826 × the median
    absolute deviation). A subject outside every box cannot be cloned into the strip this way."""
    B, C, h, w = z.shape
    allowed = keep.clone()
    allowed[allowed.sum(1) == 0] = True  # the boxes cover the whole row: use all of it
    vals = z.float().masked_fill(~allowed.to(z.device)[None, None], float("nan"))  # (B, C, h, w)
    med = vals.nanmedian(3, keepdim=True).values  # (B, C, h, 1)
    if generator is None:
        return med.expand(B, C, h, n).to(z.dtype)
    spread = (vals - med).abs().nanmedian(3, keepdim=True).values * 1.4826  # (B, C, h, 1)
    noise = torch.randn((B, C, h, n), generator=generator, dtype=torch.float32).to(z.device)
    return (med + spread * noise).to(z.dtype)


# row: MotionBooth's, tokens copied from the same row outside the boxes; fresh: the row's level and fresh noise
# (`_level_fill`); level: the row's level only (what `fresh` fills the signal with when the noise stays in place).
FILLS = ("row", "fresh")


def _shift_x(z: torch.Tensor, dx: int, keep: torch.Tensor, generator: torch.Generator, fill_mode: str = "row"):
    """Move z (B, C, h, w) dx pixels left (right if dx < 0); returns the new z and keep (h, w) moved along."""
    B, C, h, w = z.shape
    n = min(abs(dx), w)
    if fill_mode in ("fresh", "level"):
        fill = _level_fill(z, n, keep, generator if fill_mode == "fresh" else None)  # (B, C, h, n)
    else:
        idx = _draw_positions(keep, n, generator).to(z.device)  # (h, n): columns of each row to copy
        fill = torch.gather(z, 3, idx[None, None].expand(B, C, h, n))  # (B, C, h, n): same-row tokens of the old z
    strip = torch.ones(h, n, dtype=torch.bool)  # the filled tokens came from outside the boxes
    if dx > 0:  # content moves left, the hole opens at the right
        return torch.cat([z[..., n:], fill], 3), torch.cat([keep[:, n:], strip], 1)
    return torch.cat([fill, z[..., :w - n]], 3), torch.cat([strip, keep[:, :w - n]], 1)


def shift_frame(z: torch.Tensor, dx: int, dy: int, keep: torch.Tensor, generator: torch.Generator,
                fill: str = "row") -> torch.Tensor:
    """One frame's latent z (B, C, h, w) with its content moved dx pixels left (right if dx < 0), then dy pixels up
    (down if dy < 0). The vacated strip is filled per row (x) / per column (y) with tokens of that same row /
    column taken where keep (h, w, bool, on the CPU) is True; the same positions are used for every video and
    channel. fill "fresh" fills it with the row's / column's level plus fresh noise instead, "level" with the level
    only (`_level_fill`). Random draws come from generator (a CPU torch.Generator) only.
    """
    if z.dim() != 4 or tuple(keep.shape) != tuple(z.shape[2:]):
        raise ValueError(f"need z (B, C, h, w) and keep (h, w), got {tuple(z.shape)} and {tuple(keep.shape)}")
    keep = keep.to("cpu", torch.bool)
    dx, dy = int(dx), int(dy)
    if dx:
        z, keep = _shift_x(z, dx, keep, generator, fill)
    if dy:  # a y shift is an x shift of the transposed frame: rows become columns
        zt, _ = _shift_x(z.transpose(2, 3), dy, keep.T, generator, fill)
        z = zt.transpose(2, 3)
    return z.contiguous()


class CameraShift(Control):
    """Pan the camera: shift the latents that denoising steps start_step .. start_step + shift_steps − 1 take in.

    The engine calls on_step_end(ctx, i, latents) after step i (and with i = −1 before step 0); the latents it
    returns are what step i + 1 denoises, so the shift "before step s" happens in the call with i = s − 1.
    """

    name = "camera"

    def __init__(self, cx: float, cy: float, start_step: int, shift_steps: int, scheduler=None, fill: str = "row",
                 noise_level: Callable[[int], float] | None = None, frame_map=None):
        """noise_level: with a warped initial noise (studio.controls.noise_warp), the noise's share s of the latents
        that step i + 1 takes in (noise_level(i)); the shift then moves latents − s·ε and puts s·ε back where it
        was (ε: the latents of the i = −1 call, the initial noise), so the noise stays on the camera path the
        warp laid it on and only the content moves. frame_map: for each latent frame, the video frames it covers
        (default: the context's latent frames, ctx.latent_times); a latent frame moves by the mean of its video
        frames' targets. scheduler: a multistep scheduler whose stored history moves with the latents."""
        if int(start_step) < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step!r}")
        if int(shift_steps) < 1:
            raise ValueError(f"shift_steps must be >= 1, got {shift_steps!r}")
        if fill not in FILLS:
            raise ValueError(f"fill must be one of {FILLS}, got {fill!r}")
        self.cx, self.cy, self.fill = float(cx), float(cy), fill
        self.start_step, self.shift_steps = int(start_step), int(shift_steps)
        self.noise_level, self.frame_map = noise_level, frame_map
        self.initial: torch.Tensor | None = None  # (B, C, F, h, w) the initial noise, with noise_level
        self.accumulated: torch.Tensor | None = None  # (F, 2) float64 target shift so far, latent pixels
        self.moved: torch.Tensor | None = None  # (F, 2) long whole pixels actually moved so far
        # A multistep scheduler's stored history (UniPC's model_outputs and last_sample) moves with the latents, or its
        # next step would mix shifted and unshifted samples (studio.controls.history)
        self.scheduler = scheduler

    def on_step_end(self, ctx: Context, i: int, latents: torch.Tensor) -> torch.Tensor | None:
        step = i + 1  # the step these latents go into
        if self.noise_level is not None and i == -1:
            self.initial = latents.detach().clone()
        k = step - self.start_step  # 0-based index inside the window
        if not 0 <= k < self.shift_steps:
            return None
        _, _, F, h, w = latents.shape  # (B, C, F, h, w)
        if k == 0 or self.moved is None:  # a new window (or a new render reusing this control)
            self.accumulated = torch.zeros(F, 2, dtype=torch.float64)
            self.moved = torch.zeros(F, 2, dtype=torch.long)
            if self.start_step + self.shift_steps > ctx.steps:
                logger.warning("camera window %d..%d runs past the %d steps: the pan will fall short",
                               self.start_step, self.start_step + self.shift_steps - 1, ctx.steps)
        # Spread the total evenly over the window: after k+1 of the shift_steps shifts, (k+1)/shift_steps of it.
        self.accumulated = self._targets(ctx, F, h, w) * ((k + 1) / self.shift_steps)
        whole = (self.accumulated.abs() + _EPS).floor() * self.accumulated.sign()  # integer part, toward zero
        delta = whole.long() - self.moved  # (F, 2) pixels to move now
        if not delta.any():
            return None
        noise = None  # (B, C, F, h, w) the noise part that stays in place, or None: the whole latents move
        fill = self.fill
        if self.noise_level is not None:  # move the content only: the (warped) initial noise stays where it is
            if self.initial is None or self.initial.shape != latents.shape:
                raise RuntimeError("the camera control with a noise level needs the i = -1 call (the initial noise)")
            noise = float(self.noise_level(i)) * self.initial.to(latents.device, latents.dtype)
            fill = "level" if fill == "fresh" else fill  # the strip's fresh noise is the initial noise there
        from studio.controls.history import SchedulerHistory

        history = SchedulerHistory(self.scheduler, latents)
        z = history.stack(latents)  # (B + stored, C, F, h, w): the history moves with the same draws
        if noise is not None and z.shape[0] != latents.shape[0]:  # noise_warp.check refuses multistep schedulers
            raise RuntimeError("the noise warp's content-only shift cannot move a multistep scheduler's history")
        out = z.clone()
        groups = ctx.frame_groups()  # the video frames of each latent frame (one each on the UNet families)
        for f in delta.any(1).nonzero().flatten().tolist():
            dx, dy = int(delta[f, 0]), int(delta[f, 1])
            keep = outside_boxes([b[g] for b in ctx.boxes.values() for g in groups[f]], h, w)  # boxes before the shift
            if noise is None:
                out[:, :, f] = shift_frame(z[:, :, f], dx, dy, keep, ctx.generator, fill)
            else:
                content = shift_frame(z[:, :, f] - noise[:, :, f], dx, dy, keep, ctx.generator, fill)
                out[:, :, f] = content + noise[:, :, f]
        out = history.unstack(out)
        self.moved += delta
        # The boxes travel with the content: x edges by −dx/w, y edges by −dy/h (new tensors, never in place,
        # so nothing the caller shares with ctx.boxes is edited).
        offset = delta.to(torch.float64) / torch.tensor([w, h], dtype=torch.float64)  # (F, 2) normalised
        offset = offset[:, [0, 1, 0, 1]][ctx.latent_of_frame()]  # (F, 4) matching x0, y0, x1, y1, per video frame
        for s, b in list(ctx.boxes.items()):
            b = b if b.is_floating_point() else b.float()
            ctx.boxes[s] = b - offset.to(b.device, b.dtype)
        logger.debug("camera step %d: moved %d frames, max |shift| %s px", step, int(delta.any(1).sum()),
                     delta.abs().amax(0).tolist())
        return out

    def _targets(self, ctx: Context, frames: int, h: int, w: int) -> torch.Tensor:
        """(F, 2) total shift of each latent frame (frame_targets at the latent frames' video times, or through the
        frame map when there is one)."""
        if self.frame_map is None:
            return frame_targets(frames, self.cx, self.cy, h, w, ctx.latent_times(), ctx.frames - 1)
        from studio.controls.noise_warp import latent_offsets

        video = frame_targets(1 + max(max(c) for c in self.frame_map), self.cx, self.cy, h, w)
        return latent_offsets(video, self.frame_map)

    def close(self) -> None:
        self.accumulated = None
        self.moved = None
        self.initial = None
