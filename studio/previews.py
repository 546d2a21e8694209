"""Cheap pictures of what a shot's controls will do, without rendering: for the UI's live previews.

- trajectory(shot): every frame with each subject's interpolated box drawn over a backdrop;
- camera(shot): a grid and the boxes moving as the latent shift will move them;
- noise(gamma, frames, frames_per_latent): the noise prior as the model gets it, over its latent frames.
Pure functions of the shot (no model); uint8 RGB frames (F, H, W, 3).
"""

from __future__ import annotations

import numpy as np

from studio import shot as shotlib

COLOURS = [(255, 80, 80), (80, 200, 255), (255, 220, 60), (190, 110, 255)]  # one per subject


def _boxes(shot: shotlib.Shot) -> dict[int, np.ndarray]:
    from studio.controls.boxes import interpolate

    return {k: interpolate(s.boxes, shot.frames, shot.box_control.interpolation)
            for k, s in enumerate(shot.subjects) if s.boxes}


def _draw_boxes(frame: np.ndarray, boxes: dict[int, np.ndarray], f: int) -> None:
    import cv2

    h, w = frame.shape[:2]
    for k, b in boxes.items():
        x0, y0, x1, y1 = b[f]
        cv2.rectangle(frame, (round(x0 * (w - 1)), round(y0 * (h - 1))), (round(x1 * (w - 1)), round(y1 * (h - 1))),
                      COLOURS[k % len(COLOURS)], 2)


def _size(shot: shotlib.Shot, long_side: int) -> tuple[int, int]:
    scale = long_side / max(shot.width, shot.height)
    return max(8, round(shot.width * scale)), max(8, round(shot.height * scale))


def trajectory(shot: shotlib.Shot, backdrop: np.ndarray | None = None, long_side: int = 256) -> np.ndarray:
    """(F, H, W, 3): the subjects' boxes per frame over a backdrop (an image, e.g. the background reference)
    or a neutral grey. `shot` must be resolved (frames, width, height set)."""
    import cv2

    w, h = _size(shot, long_side)
    base = np.full((h, w, 3), 60, np.uint8) if backdrop is None else cv2.resize(backdrop, (w, h))
    boxes = _boxes(shot)
    frames = np.repeat(base[None], shot.frames, 0)
    for f in range(shot.frames):
        _draw_boxes(frames[f], boxes, f)
    return frames


def camera(shot: shotlib.Shot, long_side: int = 256, cells: int = 8) -> np.ndarray:
    """(F, H, W, 3): a grid (the scene) moving as the camera pan will move it, with the boxes travelling along.

    Frame f's content moves by f/(F−1)·(cx, cy) of the frame, against the camera, as the latent shift does.
    """
    import cv2

    from studio.controls.camera import frame_targets

    w, h = _size(shot, long_side)
    shift = frame_targets(shot.frames, shot.camera.cx, shot.camera.cy, h, w).numpy()  # (F, 2) pixels, left/up
    boxes = _boxes(shot)
    out = np.empty((shot.frames, h, w, 3), np.uint8)
    step = max(4, w // cells)
    for f in range(shot.frames):
        dx, dy = shift[f]
        frame = np.full((h, w, 3), 245, np.uint8)
        for x in np.arange(-dx % step, w, step):
            cv2.line(frame, (int(x), 0), (int(x), h - 1), (170, 170, 170), 1)
        for y in np.arange(-dy % step, h, step):
            cv2.line(frame, (0, int(y)), (w - 1, int(y)), (170, 170, 170), 1)
        # a landmark at the scene's centre shows the travel even when the grid's period hides it
        cv2.circle(frame, (round(w / 2 - dx), round(h / 2 - dy)), max(2, w // 24), (40, 40, 40), -1)
        moved = {k: b - np.array([dx / w, dy / h, dx / w, dy / h], np.float32) for k, b in boxes.items()}
        _draw_boxes(frame, moved, f)
        out[f] = frame
    return out


def noise(gamma: float, frames: int = 8, frames_per_latent: int = 1, size: int = 32,
          seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """What the noise prior hands the model: (F', F') covariance of its latent frames, F' sampled noise frames
    (F', size, size) in 0..1, and the video time each latent frame stands at.

    frames_per_latent: the model's temporal factor (1 on the UNet families: F' = F; 4 on Wan: latent 0 is frame 0,
    latent k >= 1 frames 4k-3..4k, so F' = (F − 1)/4 + 1). Pure and cheap (no model).
    """
    from studio.controls import noise_prior
    from studio.families import latent_times

    times = latent_times(frames, frames_per_latent)
    cov, noise_frames = noise_prior.preview(gamma, len(times), size, seed,
                                            times=None if frames_per_latent == 1 else times)
    return cov, noise_frames, times


def noise_caption(gamma: float, frames: int, frames_per_latent: int = 1) -> str:
    """One line saying how γ reaches the model's latent frames (the preview's caption)."""
    from studio.families import latent_times

    times = latent_times(frames, frames_per_latent)
    if frames_per_latent == 1:
        return (f"{frames} frames, one noise frame each: neighbours correlate γ = {gamma:.2f}, "
                f"frames i and j γ^|i−j|.")
    t = frames_per_latent
    text = (f"{frames} frames = {len(times)} latent frames (latent 0 is frame 0 alone, latent k covers frames "
            f"{t}k−{t - 1}..{t}k); each latent stands at the centre of its frames, so latents i and j correlate "
            f"γ^|t_i − t_j|")
    if len(times) > 1:
        text += f": latent 0↔1 γ^{times[1]:g} = {gamma ** times[1]:.2f}"
    if len(times) > 2:
        text += f", then γ^{t} = {gamma ** t:.2f} per latent"
    return text + "."
