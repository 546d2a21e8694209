"""The Trajectory tab's events: boxes drawn on a canvas (pixels) <-> the shot file's keyframes (0..1).

The canvas is the image_annotator component (gradio_image_annotation) over the first frame of the last render,
or the background reference, or a neutral grid. It shows the keyframe boxes of the frame the slider picks, one
label per subject ("1: yellow star"); what the user draws there becomes that frame's keyframes. A box with no
known label belongs to the subject picked in the tab. Canvas values are
    {"image": (H, W, 3) uint8, "boxes": [{"xmin", "ymin", "xmax", "ymax" (pixels), "label", "color"}, ...]}.
"""

from __future__ import annotations

import math
import re

import numpy as np

from studio import shot as shotlib
from studio.ui.events import UserError, preview_gif, read_image, resolved, strip, user_errors

CANVAS_LONG_SIDE = 384  # the canvas's longest side in pixels
PATH_PRESETS = ("left to right", "right to left", "approach", "circle")
PRESET_SIZE = 0.35  # box side (fraction of the frame) of the path presets


def subject_labels(shot: shotlib.Shot) -> list[str]:
    return [f"{i + 1}: {s.phrase}" for i, s in enumerate(shot.subjects)]


def label_index(label: str | None, n: int) -> int | None:
    """The subject index a canvas label names ("2: red circle" -> 1), or None."""
    m = re.match(r"\s*(\d+)\s*:", label or "")
    if m and 1 <= int(m.group(1)) <= n:
        return int(m.group(1)) - 1
    return None


def canvas_size(shot: shotlib.Shot) -> tuple[int, int]:
    """(W, H) of the canvas: the shot's aspect, CANVAS_LONG_SIDE on the long side. `shot` must be resolved."""
    scale = CANVAS_LONG_SIDE / max(shot.width, shot.height)
    return round(shot.width * scale), round(shot.height * scale)


def to_pixels(box, width: int, height: int) -> dict:
    x0, y0, x1, y1 = box
    return {"xmin": round(x0 * width), "ymin": round(y0 * height), "xmax": round(x1 * width),
            "ymax": round(y1 * height)}


def to_normalized(box: dict, width: int, height: int) -> list[float]:
    """A canvas box (pixels, any corner order) -> [x0, y0, x1, y1] in 0..1, rounded to 4 decimals, clipped."""
    xs = sorted(min(max(float(box[k]) / width, 0.0), 1.0) for k in ("xmin", "xmax"))
    ys = sorted(min(max(float(box[k]) / height, 0.0), 1.0) for k in ("ymin", "ymax"))
    return [round(xs[0], 4), round(ys[0], 4), round(xs[1], 4), round(ys[1], 4)]


def backdrop(shot: shotlib.Shot, first_frame: str | None = None) -> np.ndarray:
    """(H, W, 3) uint8 canvas image: the background reference, else the last render's first frame, else a grid."""
    import cv2

    w, h = canvas_size(shot)
    for path in (shot.background.reference, first_frame):
        if path:
            try:
                return cv2.resize(read_image(path), (w, h), interpolation=cv2.INTER_LINEAR)
            except OSError:
                continue
    img = np.full((h, w, 3), 232, np.uint8)
    for i in range(1, 8):  # a light grid in eighths helps place boxes
        cv2.line(img, (round(i * w / 8), 0), (round(i * w / 8), h - 1), (205, 205, 205), 1)
        cv2.line(img, (0, round(i * h / 8)), (w - 1, round(i * h / 8)), (205, 205, 205), 1)
    return img


def colours(indices) -> list[tuple[int, int, int]]:
    """The box colour (RGB) of each subject index, as the previews draw them."""
    from studio.previews import COLOURS

    return [COLOURS[k % len(COLOURS)] for k in indices]


def canvas_value(shot: shotlib.Shot, frame: int, first_frame: str | None = None) -> dict:
    """The canvas for keyframe `frame`: the backdrop and each subject's box keyed at that frame."""
    w, h = canvas_size(shot)
    boxes = []
    for label, s, colour in zip(subject_labels(shot), shot.subjects, colours(range(len(shot.subjects)))):
        if frame in s.boxes:
            boxes.append({**to_pixels(s.boxes[frame], w, h), "label": label, "color": colour})
    return {"image": backdrop(shot, first_frame), "boxes": boxes}


def _frame(frame, shot: shotlib.Shot) -> int:
    f = int(frame or 0)
    if not 0 <= f < shot.frames:
        raise UserError(f"keyframe: frame must be in 0..{shot.frames - 1} (got {f})")
    return f


def _subject(index, shot: shotlib.Shot) -> int:
    if not shot.subjects:
        raise UserError("subjects: the shot has no subject to place; add one in the Subjects tab (a phrase of the "
                        "prompt)")
    i = int(index or 1) - 1
    if not 0 <= i < len(shot.subjects):
        raise UserError(f"subject: pick 1..{len(shot.subjects)} (got {i + 1})")
    return i


def _dump(shot: shotlib.Shot) -> str:
    shotlib.from_container(shotlib.to_dict(shot))  # re-check the edited shot (types, subjects)
    return shotlib.dumps(shot)


@user_errors
def canvas_event(shot_yaml: str, frame, subject, first_frame: str | None = None, **form) -> dict:
    """The canvas for the keyframe the slider picks: {"value", "label_list", "label_colors"} (the component's
    properties). The picked subject's label comes first in the list, so a new box drawn takes it."""
    shot = resolved(shot_yaml, **form)
    labels = subject_labels(shot)
    order = list(range(len(labels)))
    k = int(subject or 1) - 1
    if 0 <= k < len(order):
        order.insert(0, order.pop(k))
    frame = min(max(int(frame or 0), 0), shot.frames - 1)  # the slider may still have the old, longer range
    return {"value": canvas_value(shot, frame, first_frame), "label_list": [labels[i] for i in order] or ["subject"],
            "label_colors": colours(order or [0])}


@user_errors
def boxes_event(shot_yaml: str, value: dict | None, frame, subject, **form) -> str:
    """The canvas's boxes become frame `frame`'s keyframes; returns the shot file.

    Each subject with a box on the canvas gets that keyframe (its last box when it has several); a subject whose
    box was removed loses the keyframe. A box stored already is kept as stored when it lands on the same pixels,
    so showing a keyframe on the canvas never changes it.
    """
    base = shotlib.loads(shot_yaml, where="shot file")
    shot = resolved(shot_yaml, **form)
    f = _frame(frame, shot)
    if value is None:
        return shot_yaml
    drawn = value.get("boxes") or []
    if drawn and not shot.subjects:
        _subject(subject, shot)  # the error that says to add a subject first
    img = value.get("image")
    h, w = (img.shape[:2] if isinstance(img, np.ndarray) else canvas_size(shot)[::-1])
    if value.get("orientation"):
        raise UserError("canvas: a rotated canvas cannot be mapped to the frame; rotate it back")
    picked = _subject(subject, shot) if shot.subjects else 0
    placed: dict[int, list[float] | None] = {}
    for box in drawn:
        k = label_index(box.get("label"), len(shot.subjects))
        new = to_normalized(box, w, h)
        # a box still being drawn (no area yet) holds that subject's keyframe as it is
        placed[picked if k is None else k] = new if new[2] > new[0] and new[3] > new[1] else None
    for k, s in enumerate(base.subjects):
        old = s.boxes.get(f)
        if k not in placed:
            s.boxes.pop(f, None)
        elif placed[k] is not None and (old is None or to_pixels(old, w, h) != to_pixels(placed[k], w, h)):
            s.boxes[f] = placed[k]
    return _dump(base)


@user_errors
def clear_keyframe_event(shot_yaml: str, frame, subject, every_frame: bool = False, **form) -> str:
    """Remove the picked subject's keyframe at `frame` (or all of its keyframes)."""
    base = shotlib.loads(shot_yaml, where="shot file")
    shot = resolved(shot_yaml, **form)
    s = base.subjects[_subject(subject, shot)]
    if every_frame:
        s.boxes.clear()
    else:
        s.boxes.pop(_frame(frame, shot), None)
    return _dump(base)


@user_errors
def duplicate_keyframe_event(shot_yaml: str, frame, to_frame, subject, **form) -> str:
    """Copy the picked subject's box at `frame` (interpolated when it is not a keyframe) to keyframe `to_frame`."""
    from studio.controls.boxes import interpolate

    base = shotlib.loads(shot_yaml, where="shot file")
    shot = resolved(shot_yaml, **form)
    k = _subject(subject, shot)
    src, dst = _frame(frame, shot), _frame(to_frame, shot)
    if not shot.subjects[k].boxes:
        raise UserError(f"subjects[{k}].boxes: no keyframe to copy; draw a box first")
    box = interpolate(shot.subjects[k].boxes, shot.frames, shot.box_control.interpolation)[src]
    base.subjects[k].boxes[dst] = [round(float(v), 4) for v in box]
    return _dump(base)


def path_preset(name: str, frames: int, size: float = PRESET_SIZE) -> dict[int, list[float]]:
    """Keyframes of a common path over `frames` frames: left to right, right to left, approach, circle."""
    last = max(frames - 1, 0)

    def box(cx, cy, side):
        half = side / 2
        return [round(min(max(v, 0.0), 1.0), 4) for v in (cx - half, cy - half, cx + half, cy + half)]

    lo, hi = size / 2 + 0.02, 1 - size / 2 - 0.02
    if name == "left to right":
        return {0: box(lo, 0.5, size), last: box(hi, 0.5, size)} if last else {0: box(0.5, 0.5, size)}
    if name == "right to left":
        return {0: box(hi, 0.5, size), last: box(lo, 0.5, size)} if last else {0: box(0.5, 0.5, size)}
    if name == "approach":  # far away and small at the horizon, then close and large
        return {0: box(0.5, 0.45, size * 0.45), last: box(0.5, 0.55, min(0.9, size * 2.2))}
    if name == "circle":  # a loop around the centre, a keyframe every quarter-ish turn
        n = min(frames, 9)
        keys = sorted({round(i * last / max(n - 1, 1)) for i in range(n)})
        r = 0.5 - size / 2 - 0.03
        return {f: box(0.5 + r * math.cos(2 * math.pi * f / max(last, 1)),
                       0.5 + r * math.sin(2 * math.pi * f / max(last, 1)), size) for f in keys}
    raise UserError(f"path preset: must be one of {', '.join(PATH_PRESETS)} (got {name!r})")


@user_errors
def path_preset_event(shot_yaml: str, preset: str, subject, **form) -> str:
    """Replace the picked subject's keyframes with a preset path."""
    base = shotlib.loads(shot_yaml, where="shot file")
    shot = resolved(shot_yaml, **form)
    base.subjects[_subject(subject, shot)].boxes = path_preset(preset, shot.frames)
    return _dump(base)


@user_errors
def keyframes_text(shot_yaml: str, **form) -> str:
    """One line per subject: its phrase and keyframe indices."""
    shot = resolved(shot_yaml, **form)
    if not shot.subjects:
        return "No subjects yet: add one in the Subjects tab."
    return "\n".join(f"- **{label}**: keyframes {', '.join(map(str, sorted(s.boxes))) or 'none (no box control)'}"
                     for label, s in zip(subject_labels(shot), shot.subjects))


@user_errors
def trajectory_preview_event(shot_yaml: str, first_frame: str | None = None, **form):
    """(animated GIF path, strip): the interpolated boxes over every frame, over the canvas's backdrop."""
    from studio import previews

    shot = resolved(shot_yaml, **form)
    frames = previews.trajectory(shot, backdrop(shot, first_frame), long_side=192)
    small = previews.trajectory(shot, backdrop(shot, first_frame), long_side=96)
    return preview_gif(frames), strip(small)
