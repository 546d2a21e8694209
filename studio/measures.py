"""Per-render measures: how far each control of one render took, read from its frames (sidecar key `measures`).

A creator judges one render at a time, so every render on a toy-world model carries what its controls achieved:
- camera: the content motion in px/frame per axis (`content_motion`, the background only: subject-coloured
  pixels are left out), next to what the pan asked for, and their ratio along the requested direction;
- per subject: the box hit rate (share of frames whose subject centroid lies in its box, the boxes where the
  render put them, i.e. moved with the pan) and the subject's blobs (connected regions of its colour per frame:
  1 is one subject, 2 a clone).
Subjects are found by their toy-world colour, so the measures exist only on models trained on that world (a base
folder with the toy-world trainer's `training.json`); on other models the key says "not measured" and why (no
subject detector offline).

Shapes: F frames, H×W pixels.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

KEY = "measures"  # the sidecar key
PAN_TOOK = 0.5  # a pan took when the content moved at least this share of the requested speed, along it
BOX_TOOK = 0.5  # a box track took when the subject's centroid sat in its box in at least this share of frames
_MAX_SIDE = 64  # frames larger than this are measured at this size (the estimate is scaled back)
_MIN_OVERLAP = 0.25  # a shift is scored only where at least this share of the frame is comparable


def requested_motion(cx: float, cy: float, frames: int, height: int, width: int) -> np.ndarray:
    """(2,) content motion (dx, dy) in px/frame that a pan asks for: (−cx·W, −cy·H)/(F−1) (cx > 0 pans right, so
    the content moves left). Zero for a one-frame clip."""
    if frames < 2:
        return np.zeros(2)
    return np.array([-cx * width, -cy * height], np.float64) / (frames - 1)


def _texture(frames: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(F, H, W) float32 high-passed grey frames: the texture that moves with the camera, without the gradients
    (a sky's) and the overall brightness that do not. The local mean is taken over valid (F, H, W) pixels only
    (normalised convolution), so a subject left out leaves no halo of its own contrast around it."""
    import cv2

    sigma = max(1.0, min(frames.shape[1:3]) / 10)
    out = []
    for f, v in zip(frames, valid):
        g = cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2GRAY).astype(np.float32)
        mean = cv2.GaussianBlur(g * v, (0, 0), sigma) / np.maximum(cv2.GaussianBlur(v, (0, 0), sigma), 1e-3)
        out.append((g - mean) * v)
    return np.stack(out)


def _refine(em: float, e0: float, ep: float) -> float:
    """Sub-pixel offset of a minimum from its two neighbours on a parabola (0 when the three do not bend up)."""
    d = em - 2 * e0 + ep
    return 0.0 if not (np.isfinite(d) and d > 0) else float(np.clip(0.5 * (em - ep) / d, -0.5, 0.5))


def content_motion(frames: np.ndarray, exclude: np.ndarray | None = None, max_shift: int = 4) -> np.ndarray:
    """(F−1, 2) content motion (dx, dy) in px between consecutive frames: frame f+1 ≈ frame f moved by (dx, dy).

    Per pair, the whole-pixel shift in ±max_shift minimising the mean squared difference of the high-passed grey
    frames over their overlap, leaving out pixels where `exclude` (F, H, W) bool is True in either frame (the
    subjects, which may move on their own), refined to sub-pixel on a parabola through its neighbours. On the toy
    world's own panning clips (a subject moving independently, pans up to 3 px/frame) its mean is within 0.25
    px/frame on grass and sand (sky: 0.8 worst). Frames over 64 px are measured at 64 px (and scaled back).
    """
    import cv2

    F, H, W, _ = frames.shape
    scale = 1.0
    if max(H, W) > _MAX_SIDE:
        scale = max(H, W) / _MAX_SIDE
        size = (max(8, round(W / scale)), max(8, round(H / scale)))
        frames = np.stack([cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in frames])
        if exclude is not None:
            exclude = np.stack([cv2.resize(e.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0
                                for e in exclude])
        max_shift = max(1, math.ceil(max_shift / scale))
        H, W = frames.shape[1:3]
    R = int(min(max_shift, H // 3, W // 3))
    valid = np.ones((F, H, W), np.float32) if exclude is None else (~exclude).astype(np.float32)
    g = _texture(frames, valid)  # (F, H, W)
    out = np.zeros((F - 1, 2), np.float64)
    for i in range(F - 1):
        a, b, va, vb = g[i], g[i + 1], valid[i], valid[i + 1]
        err = np.full((2 * R + 1, 2 * R + 1), np.inf)
        for dy in range(-R, R + 1):
            y0, y1 = max(0, dy), H + min(0, dy)
            for dx in range(-R, R + 1):
                x0, x1 = max(0, dx), W + min(0, dx)
                # content moved by (dx, dy): b[y, x] == a[y − dy, x − dx]
                w = vb[y0:y1, x0:x1] * va[y0 - dy:y1 - dy, x0 - dx:x1 - dx]
                n = float(w.sum())
                if n >= _MIN_OVERLAP * H * W:
                    d = b[y0:y1, x0:x1] - a[y0 - dy:y1 - dy, x0 - dx:x1 - dx]
                    err[dy + R, dx + R] = float((d * d * w).sum()) / n
        if not np.isfinite(err).any():
            continue  # nothing comparable (subjects everywhere): count as no motion
        iy, ix = np.unravel_index(np.argmin(err), err.shape)
        sx = ix - R + (_refine(err[iy, ix - 1], err[iy, ix], err[iy, ix + 1]) if 0 < ix < 2 * R else 0.0)
        sy = iy - R + (_refine(err[iy - 1, ix], err[iy, ix], err[iy + 1, ix]) if 0 < iy < 2 * R else 0.0)
        out[i] = sx, sy
    return out * scale


def pan_ratio(achieved: np.ndarray, requested: np.ndarray) -> float | None:
    """The achieved motion along the requested one, as a share of it: 1 = as asked, 0 = none, < 0 = the wrong way
    (None when nothing was asked)."""
    speed2 = float(np.dot(requested, requested))
    return float(np.dot(achieved, requested) / speed2) if speed2 > 0 else None


def subject_pixels(frames: np.ndarray) -> np.ndarray:
    """(F, H, W) bool: pixels of any toy-world subject colour, grown by a pixel (their anti-aliased edges)."""
    import cv2

    from studio.toyworld import evaluate

    m = np.any(list(evaluate.colour_masks(frames).values()), axis=0)
    kernel = np.ones((3, 3), np.uint8)
    return np.stack([cv2.dilate(x.astype(np.uint8), kernel) > 0 for x in m])


def blobs(frames: np.ndarray, colour: str | tuple) -> np.ndarray:
    """(F,) int: per frame, the connected regions (8-connected) of a toy-world subject colour of at least
    max(3, H·W/64) pixels: 1 for one subject, 2 when a second copy appeared, 0 when it is not drawn. The floor
    (16 px at 32×32; a toy subject is 80..160 px, a quarter of one still counts) leaves out the specks of a
    textured background that classify as a subject colour (sand's grains as yellow: 1..7 px each)."""
    import cv2

    from studio.toyworld import evaluate

    m = evaluate._pixels_of(frames, colour)  # (F, H, W) bool
    min_area = max(3, m.shape[1] * m.shape[2] // 64)
    out = []
    for x in m:
        n, _, stats, _ = cv2.connectedComponentsWithStats(x.astype(np.uint8), connectivity=8)
        out.append(int((stats[1:, cv2.CC_STAT_AREA] >= min_area).sum()))
    return np.array(out, np.int64)


def toy_world_model(preset) -> bool:
    """Whether a model preset is a model trained on the toy world (its subjects can be found by colour): its base is
    a local folder holding the toy-world trainer's training.json."""
    from studio.presets import resolve_local

    base = resolve_local(preset.base)
    if base.startswith("builtin:"):
        return False
    folder = Path(base)
    return (folder / "training.json").is_file() and (folder / "model_index.json").is_file()


def measure(frames: np.ndarray, shot, preset, boxes: dict | None = None) -> dict:
    """The sidecar's `measures` of one render: its uint8 frames (F, H, W, 3), its resolved shot, its model preset,
    and the subject boxes where the render put them ({subject index: (F, 4) normalised}; None: the shot's own)."""
    from studio.controls.boxes import interpolate
    from studio.metrics import subject_colour
    from studio.toyworld import evaluate

    if not toy_world_model(preset):
        return {"status": "not measured",
                "reason": f"no subject detector for model '{preset.name}' offline: measures exist on toy-world "
                          f"models only"}
    t0 = time.perf_counter()
    F, H, W, _ = frames.shape
    out: dict = {"status": "measured", "camera": None, "subjects": []}
    c = shot.camera
    if (c.cx or c.cy) and F >= 2 and preset.family == "wan":
        out["camera"] = {"status": "not measured",
                         "reason": "the toy Wan draws its backgrounds without the fine texture this measure follows "
                                   "(its pans are measured by a still subject against an unpanned render: "
                                   "studio toyworld eval --controls)"}
    elif (c.cx or c.cy) and F >= 2:
        want = requested_motion(c.cx, c.cy, F, H, W)
        got = content_motion(frames, subject_pixels(frames),
                             max_shift=max(4, math.ceil(float(np.abs(want).max())) + 3)).mean(0)
        ratio = pan_ratio(got, want)
        out["camera"] = {"requested": [round(float(v), 3) for v in want],
                         "achieved": [round(float(v), 3) for v in got],
                         "ratio": round(ratio, 3), "took": bool(ratio >= PAN_TOOK)}
    for k, s in enumerate(shot.subjects):
        colour = subject_colour(s.phrase)
        row: dict = {"phrase": s.phrase}
        if colour is None:
            row["status"] = "not measured: no toy-world colour in the phrase"
        else:
            row["blobs"] = blobs(frames, colour).tolist()
            if s.boxes:
                b = boxes.get(k) if boxes else None
                b = np.asarray(b, np.float64) if b is not None else interpolate(s.boxes, F,
                                                                                 shot.box_control.interpolation)
                hit = evaluate.box_adherence(frames, colour, b)["hit_rate"]
                row["box_hit_rate"] = round(hit, 3)
                row["took"] = bool(hit >= BOX_TOOK)
        out["subjects"].append(row)
    out["seconds"] = round(time.perf_counter() - t0, 4)
    return out


def warnings(measures: dict | None) -> list[str]:
    """One short line per control that did not take (pan below half the request, a subject mostly outside its
    box), for the page's status line."""
    if not measures or measures.get("status") != "measured":
        return []
    out = []
    cam = measures.get("camera")
    if cam and cam.get("took") is False:
        req, got = np.array(cam["requested"]), np.array(cam["achieved"])
        out.append(f"camera pan did not take: {float(np.dot(got, req) / np.linalg.norm(req)):.1f} of "
                   f"{float(np.linalg.norm(req)):.1f} px/frame requested")
    for k, s in enumerate(measures.get("subjects", [])):
        if "box_hit_rate" in s and not s["took"]:
            out.append(f"subjects[{k}] ({s['phrase']}) in its box on only {s['box_hit_rate']:.0%} of frames")
    return out
