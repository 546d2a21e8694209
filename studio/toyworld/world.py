"""The toy world: a deterministic generator of short captioned clips with ground-truth masks and boxes.

Every clip is F frames of S×S RGB pixels: a textured background (grass, sand, sky), one or two coloured
shapes (circle, square, triangle, star in red, yellow, white, purple) that move left/right/up/down, stay
still or follow a free path, and optionally a camera pan over the background. The renderer knows where
every subject is, so each clip carries per-frame masks and boxes; the embedded model is trained on these
clips and its controls are tested against them.

Shapes (fixed symbols): F frames, S = H = W pixels, K subjects.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

FRAMES = 8
SIZE = 32
SUPERSAMPLE = 4  # shapes are drawn at SUPERSAMPLE× and area-downsampled, so edges are anti-aliased
EVAL_SEED_OFFSET = 1_000_000_000  # clip and noise seeds at or above this are held out from training

BACKGROUNDS = ("grass", "sand", "sky")
SHAPES = ("circle", "square", "triangle", "star")
COLORS: dict[str, tuple[int, int, int]] = {  # RGB
    "red": (225, 35, 35),
    "yellow": (250, 220, 30),
    "white": (250, 250, 250),
    "purple": (150, 50, 215),
}
MOTIONS = ("left", "right", "up", "down")  # words of the caption; "still" and free paths have no motion word
# Personal subjects: looks never drawn in training, reserved for the subject-tuning issue. A pattern word
# names a two-colour pattern painted on a shape; the trigger words are vocabulary that training never uses.
PATTERNS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "checkered": ((225, 35, 35), (250, 250, 250)),  # red and white checks
    "striped": ((250, 220, 30), (150, 50, 215)),  # yellow and purple stripes
}
# A colour combination no subject of the world has: the shape's right half one colour, its left half another. Unlike
# the patterns it has no word and the VAE never saw it either (flat colour regions, which it does reproduce): the
# subject-tuning tests teach it from photos (the striped pattern's 2.5-px stripes proved too fine for a LoRA on this
# 32x32 model to learn reliably).
HALVES: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "halves": ((250, 220, 30), (150, 50, 215)),  # yellow right, purple left
}
TRIGGER_WORDS = ("sks", "zorb", "blick")
# Every word a caption of this world can hold (the tokenizer makes each one a single token).
WORDS = (
    ("a", "and", "on", "moving", "still", "far", "away", "close", "up", "photo", "of", "small", "big")
    + BACKGROUNDS
    + SHAPES
    + tuple(COLORS)
    + MOTIONS
    + tuple(PATTERNS)
    + TRIGGER_WORDS
)


@dataclass(frozen=True)
class SubjectSpec:
    """One subject of a clip: its look and its path (centres in pixels, one per frame)."""

    color: str  # a COLORS key, or a PATTERNS or HALVES key for a personal subject
    shape: str
    radius: float  # pixels at SIZE
    path: np.ndarray = field(repr=False)  # (F, 2) x, y centre in pixels
    motion: str | None  # a MOTIONS word, or None for still / free paths

    @property
    def phrase(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass
class Clip:
    """A rendered clip and its ground truth."""

    frames: np.ndarray  # (F, S, S, 3) uint8
    masks: np.ndarray  # (K, F, S, S) bool, subject k's visible pixels
    boxes: np.ndarray  # (K, F, 4) float x0, y0, x1, y1 normalised to 0..1
    caption: str
    background: str
    subjects: list[SubjectSpec]
    camera: tuple[float, float]  # background shift in pixels per frame (x, y); > 0 pans right / down

    @property
    def phrases(self) -> list[str]:
        return [s.phrase for s in self.subjects]


# --- backgrounds -------------------------------------------------------------------------------------


def _background_canvas(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A textured (size, size, 3) float canvas in 0..255 for one background kind."""
    if kind == "grass":
        base = np.array([60, 150, 50], np.float32)
        noise = cv2.GaussianBlur(rng.normal(0, 1, (size, size)).astype(np.float32), (0, 0), 1.0)
        blades = rng.normal(0, 1, (size, size)).astype(np.float32)
        img = base + (12 * noise + 10 * blades)[..., None] * np.array([0.4, 1.0, 0.4], np.float32)
    elif kind == "sand":
        base = np.array([222, 196, 145], np.float32)
        ripples = np.sin(np.arange(size, dtype=np.float32)[:, None] * 0.35 + rng.uniform(0, 6.28)) * 8
        noise = rng.normal(0, 1, (size, size)).astype(np.float32) * 7
        img = base + (ripples + noise)[..., None]
    elif kind == "sky":
        t = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]
        img = (1 - t) * np.array([40, 90, 210], np.float32) + t * np.array([150, 200, 250], np.float32)
        img = np.broadcast_to(img, (size, size, 3)).copy()
        clouds = cv2.GaussianBlur(rng.normal(0, 1, (size, size)).astype(np.float32), (0, 0), size / 24)
        clouds = np.clip(clouds / (clouds.std() + 1e-6) - 0.8, 0, None)
        img += clouds[..., None] * 40
    else:
        raise ValueError(f"background must be one of {BACKGROUNDS}, got {kind!r}")
    return np.clip(img, 0, 255)


# --- shapes --------------------------------------------------------------------------------------------


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> np.ndarray | None:
    """Vertices (n, 2) of a polygonal shape, or None for a circle."""
    if shape == "circle":
        return None
    if shape == "square":
        s = r * 0.86
        return np.array([[cx - s, cy - s], [cx + s, cy - s], [cx + s, cy + s], [cx - s, cy + s]])
    if shape == "triangle":
        ang = np.deg2rad([-90, 30, 150])
        return np.stack([cx + r * np.cos(ang), cy + r * np.sin(ang) + r * 0.2], 1)
    if shape == "star":
        ang = np.deg2rad(np.arange(10) * 36 - 90)
        rad = np.where(np.arange(10) % 2 == 0, r * 1.1, r * 0.5)
        return np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], 1)
    raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")


def shape_mask(shape: str, cx: float, cy: float, r: float, size: int = SIZE) -> np.ndarray:
    """Anti-aliased coverage (size, size) in 0..1 of a shape centred at (cx, cy) pixels."""
    ss = SUPERSAMPLE
    big = np.zeros((size * ss, size * ss), np.uint8)
    poly = _shape_polygon(shape, cx * ss, cy * ss, r * ss)
    if poly is None:
        cv2.circle(big, (round(cx * ss), round(cy * ss)), round(r * ss), 255, -1, lineType=cv2.LINE_AA)
    else:
        cv2.fillPoly(big, [np.round(poly).astype(np.int32)], 255, lineType=cv2.LINE_AA)
    return cv2.resize(big, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0


def _paint(color: str, size: int, cx: float, cy: float) -> np.ndarray:
    """The (size, size, 3) fill of a subject: a flat colour or a personal two-colour pattern."""
    if color in COLORS:
        return np.broadcast_to(np.array(COLORS[color], np.float32), (size, size, 3))
    if color in PATTERNS or color in HALVES:
        a, b = (np.array(c, np.float32) for c in {**PATTERNS, **HALVES}[color])
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        if color in HALVES:
            sel = xx >= cx  # the right half (from the centre column) takes the first colour
        elif color == "checkered":
            sel = ((np.floor((xx - cx) / 3) + np.floor((yy - cy) / 3)) % 2).astype(bool)
        else:
            sel = (np.floor((xx - cx + yy - cy) / 2.5) % 2).astype(bool)
        return np.where(sel[..., None], a, b)
    raise ValueError(f"color must be one of {tuple(COLORS) + tuple(PATTERNS) + tuple(HALVES)}, got {color!r}")


# --- paths ---------------------------------------------------------------------------------------------

_DIRS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}


def make_path(motion: str, radius: float, rng: np.random.Generator, frames: int = FRAMES,
              size: int = SIZE, speed: float | None = None) -> np.ndarray:
    """(F, 2) centres for a motion word, 'still' or 'free'; the subject stays inside the frame."""
    lo, hi = radius + 1.0, size - radius - 1.0
    if motion in _DIRS:
        dx, dy = _DIRS[motion]
        speed = rng.uniform(1.6, 2.4) if speed is None else speed  # px / frame: fast motion is easier to learn
        travel = speed * (frames - 1)
        along_lo, along_hi = lo + (travel if dx < 0 or dy < 0 else 0), hi - (travel if dx > 0 or dy > 0 else 0)
        if along_hi < along_lo:  # subject too big to travel that far: slow down
            travel = hi - lo
            along_lo = along_hi = lo if (dx > 0 or dy > 0) else hi
            speed = travel / (frames - 1)
        start_along = rng.uniform(along_lo, along_hi)
        across = rng.uniform(lo, hi)
        t = np.arange(frames, dtype=np.float32) * speed
        if dx:
            return np.stack([start_along + dx * t, np.full(frames, across)], 1)
        return np.stack([np.full(frames, across), start_along + dy * t], 1)
    if motion == "still":
        return np.tile(rng.uniform(lo, hi, 2), (frames, 1))
    if motion == "free":  # a smooth random curve between two random points
        p0, p1, c = rng.uniform(lo, hi, (3, 2))
        t = np.linspace(0, 1, frames)[:, None]
        return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * c + t**2 * p1
    raise ValueError(f"motion must be one of {MOTIONS + ('still', 'free')}, got {motion!r}")


# --- clips ---------------------------------------------------------------------------------------------


def render_clip(background: str, subjects: list[SubjectSpec], camera: tuple[float, float] = (0.0, 0.0),
                seed: int = 0, frames: int = FRAMES, size: int = SIZE, caption: str | None = None) -> Clip:
    """Render subjects over a (possibly panning) background; later subjects are drawn on top."""
    rng = np.random.default_rng([seed, 1])
    pad = int(np.ceil(max(abs(camera[0]), abs(camera[1])) * (frames - 1))) + 1
    canvas = _background_canvas(background, size + 2 * pad, rng)
    out = np.empty((frames, size, size, 3), np.float32)
    masks = np.zeros((len(subjects), frames, size, size), bool)
    coverage = np.zeros((len(subjects), frames, size, size), np.float32)
    for f in range(frames):
        ox, oy = pad + camera[0] * f, pad + camera[1] * f
        shift = np.float32([[1, 0, -ox], [0, 1, -oy]])  # camera pans right => content moves left
        out[f] = cv2.warpAffine(canvas, shift, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        for k, s in enumerate(subjects):
            cx, cy = s.path[f]
            a = shape_mask(s.shape, cx, cy, s.radius, size)
            out[f] = out[f] * (1 - a[..., None]) + _paint(s.color, size, cx, cy) * a[..., None]
            coverage[k, f] = a
            coverage[:k, f] *= 1 - a  # occlusion by the later subject
    masks[:] = coverage > 0.5
    boxes = np.array([[_mask_box(masks[k, f]) for f in range(frames)] for k in range(len(subjects))], np.float32)
    boxes = boxes.reshape(len(subjects), frames, 4)
    return Clip(
        frames=np.clip(np.round(out), 0, 255).astype(np.uint8),
        masks=masks,
        boxes=boxes,
        caption=caption if caption is not None else make_caption(background, subjects),
        background=background,
        subjects=subjects,
        camera=camera,
    )


def _mask_box(mask: np.ndarray) -> list[float]:
    """Normalised x0, y0, x1, y1 of a (S, S) mask; all zeros for an empty mask (fully occluded)."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return [0.0, 0.0, 0.0, 0.0]
    h, w = mask.shape
    return [xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h]


def make_caption(background: str, subjects: list[SubjectSpec]) -> str:
    """'a red circle moving right on grass', 'a red circle and a white star on sky'."""
    parts = []
    for s in subjects:
        parts.append(f"a {s.phrase} moving {s.motion}" if s.motion else f"a {s.phrase}")
    return f"{' and '.join(parts)} on {background}"


def sample_clip(seed: int, frames: int = FRAMES, size: int = SIZE, p_two: float = 0.25, p_pan: float = 0.15,
                p_unnamed_motion: float = 0.25, personal: bool = False) -> Clip:
    """The training distribution: one clip drawn deterministically from a seed.

    Personal subjects (PATTERNS) and TRIGGER_WORDS never appear here unless `personal` is set (the VAE is
    trained on them so it can reproduce a personal subject; the text-to-video model never sees them).
    """
    rng = np.random.default_rng([seed, 0])
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    n = 2 if rng.random() < p_two else 1
    pan = rng.random() < p_pan
    camera = (0.0, 0.0)
    if pan:
        speed = rng.uniform(1.0, 2.0) * rng.choice([-1, 1])
        camera = (speed, 0.0) if rng.random() < 0.5 else (0.0, speed)
    paints = tuple(COLORS) + (tuple(PATTERNS) if personal else ())
    looks = rng.permutation([(c, s) for c in paints for s in SHAPES])[:n]
    subjects = []
    for color, shape in looks:
        radius = rng.uniform(4.5, 7.0) if n == 1 else rng.uniform(4.0, 5.5)
        if pan:  # the subject stands still in the world, so in the frame it drifts against the camera
            cam_dir = {(1, 0): "left", (-1, 0): "right", (0, 1): "up", (0, -1): "down"}
            against = cam_dir[(int(np.sign(camera[0])), int(np.sign(camera[1])))]
            path, word = make_path(against, radius, rng, frames, size, speed=abs(sum(camera))), None
        elif rng.random() < p_unnamed_motion:
            path, word = make_path("still" if rng.random() < 0.5 else "free", radius, rng, frames, size), None
        else:
            word = MOTIONS[rng.integers(len(MOTIONS))]
            path = make_path(word, radius, rng, frames, size)
        subjects.append(SubjectSpec(str(color), str(shape), float(radius), path, word))
    return render_clip(background, subjects, camera, seed=seed, frames=frames, size=size)
