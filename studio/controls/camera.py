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


def _shift_x(z: torch.Tensor, dx: int, keep: torch.Tensor, generator: torch.Generator):
    """Move z (B, C, h, w) dx pixels left (right if dx < 0); returns the new z and keep (h, w) moved along."""
    B, C, h, w = z.shape
    n = min(abs(dx), w)
    idx = _draw_positions(keep, n, generator).to(z.device)  # (h, n): columns of each row to copy
    fill = torch.gather(z, 3, idx[None, None].expand(B, C, h, n))  # (B, C, h, n): same-row tokens of the old z
    strip = torch.ones(h, n, dtype=torch.bool)  # the filled tokens came from outside the boxes
    if dx > 0:  # content moves left, the hole opens at the right
        return torch.cat([z[..., n:], fill], 3), torch.cat([keep[:, n:], strip], 1)
    return torch.cat([fill, z[..., :w - n]], 3), torch.cat([strip, keep[:, :w - n]], 1)


def shift_frame(z: torch.Tensor, dx: int, dy: int, keep: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One frame's latent z (B, C, h, w) with its content moved dx pixels left (right if dx < 0), then dy pixels up
    (down if dy < 0). The vacated strip is filled per row (x) / per column (y) with tokens of that same row /
    column taken where keep (h, w, bool, on the CPU) is True; the same positions are used for every video and
    channel. Random draws come from generator (a CPU torch.Generator) only.
    """
    if z.dim() != 4 or tuple(keep.shape) != tuple(z.shape[2:]):
        raise ValueError(f"need z (B, C, h, w) and keep (h, w), got {tuple(z.shape)} and {tuple(keep.shape)}")
    keep = keep.to("cpu", torch.bool)
    dx, dy = int(dx), int(dy)
    if dx:
        z, keep = _shift_x(z, dx, keep, generator)
    if dy:  # a y shift is an x shift of the transposed frame: rows become columns
        zt, _ = _shift_x(z.transpose(2, 3), dy, keep.T, generator)
        z = zt.transpose(2, 3)
    return z.contiguous()


class CameraShift(Control):
    """Pan the camera: shift the latents that denoising steps start_step .. start_step + shift_steps − 1 take in.

    The engine calls on_step_end(ctx, i, latents) after step i (and with i = −1 before step 0); the latents it
    returns are what step i + 1 denoises, so the shift "before step s" happens in the call with i = s − 1.
    """

    name = "camera"

    def __init__(self, cx: float, cy: float, start_step: int, shift_steps: int, scheduler=None):
        if int(start_step) < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step!r}")
        if int(shift_steps) < 1:
            raise ValueError(f"shift_steps must be >= 1, got {shift_steps!r}")
        self.cx, self.cy = float(cx), float(cy)
        self.start_step, self.shift_steps = int(start_step), int(shift_steps)
        self.accumulated: torch.Tensor | None = None  # (F, 2) float64 target shift so far, latent pixels
        self.moved: torch.Tensor | None = None  # (F, 2) long whole pixels actually moved so far
        # A multistep scheduler's stored history (UniPC's model_outputs and last_sample) moves with the latents, or its
        # next step would mix shifted and unshifted samples (studio.controls.history)
        self.scheduler = scheduler

    def on_step_end(self, ctx: Context, i: int, latents: torch.Tensor) -> torch.Tensor | None:
        step = i + 1  # the step these latents go into
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
        self.accumulated = frame_targets(F, self.cx, self.cy, h, w, ctx.latent_times(),
                                         ctx.frames - 1) * ((k + 1) / self.shift_steps)
        whole = (self.accumulated.abs() + _EPS).floor() * self.accumulated.sign()  # integer part, toward zero
        delta = whole.long() - self.moved  # (F, 2) pixels to move now
        if not delta.any():
            return None
        from studio.controls.history import SchedulerHistory

        history = SchedulerHistory(self.scheduler, latents)
        z = history.stack(latents)  # (B + stored, C, F, h, w): the history moves with the same draws
        out = z.clone()
        groups = ctx.frame_groups()  # the video frames of each latent frame (one each on the UNet families)
        for f in delta.any(1).nonzero().flatten().tolist():
            dx, dy = int(delta[f, 0]), int(delta[f, 1])
            keep = outside_boxes([b[g] for b in ctx.boxes.values() for g in groups[f]], h, w)  # boxes before the shift
            out[:, :, f] = shift_frame(z[:, :, f], dx, dy, keep, ctx.generator)
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

    def close(self) -> None:
        self.accumulated = None
        self.moved = None
