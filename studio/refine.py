"""Face VCD and Tiled VCD: video-to-video refinement passes after a render (Magic-Me, METHODS.md §2.3).

Both re-denoise part of a finished video with the same pipeline, prompt and subjects (video-to-video: encode the
frames with the VAE, noise them to `strength` of the schedule, denoise the remaining steps):

- Face VCD: faces found per frame, linked into tracks; one fixed crop box per track (covering the face through
  the clip, so the crop does not jitter), the crop upscaled to the model's size, re-denoised over all frames at
  strength ~0.8, scaled back and pasted with a feathered mask. Pixels outside every crop box stay unchanged.
- Tiled VCD: the video upscaled ×scale with a plain resampler, re-denoised in overlapping tiles of the model's
  size at strength ~0.2 (neighbours share at least 32 px at a 512 tile, the workflow's padding), the overlaps
  blended by weights that ramp linearly across them (they sum to one everywhere, so no seam).

Every random draw comes from the torch.Generator passed in. Shapes: F frames, H×W pixels, uint8 (F, H, W, 3).
"""

from __future__ import annotations

import logging
import math
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from studio import shot as shotlib

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (steps done, total steps) of the refinement stage
Detector = Callable[[np.ndarray], list]  # one RGB frame (H, W, 3) -> [(x0, y0, x1, y1) pixel boxes]

_MIN_TRACK_SHARE = 0.25  # a face track must be found in at least this share of the frames (drops stray hits)
_TRACK_IOU = 0.2  # a detection joins the track whose last box it overlaps at least this much
_RESAMPLERS = {"cubic": "INTER_CUBIC", "lanczos": "INTER_LANCZOS4", "linear": "INTER_LINEAR",
               "nearest": "INTER_NEAREST"}


class RefineCancelled(RuntimeError):
    """The refinement was cancelled between denoising steps."""


# --- the video-to-video pass -------------------------------------------------------------------------------

_V2V: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # text-to-video pipeline -> its v2v twin
_V2V_LOCK = threading.Lock()


def v2v_pipeline(pipe):
    """The video-to-video pipeline sharing `pipe`'s modules (diffusers `from_pipe`: no weights copied)."""
    import diffusers

    from studio import families

    family = families.of(pipe)
    if family.video_to_video is None:
        raise ValueError(f"refine: no video-to-video pass on the {family.name} family yet")
    with _V2V_LOCK:
        v2v = _V2V.get(pipe)
        if v2v is None:  # AnimateDiff: AnimateDiffVideoToVideoPipeline; Zeroscope / ModelScope: VideoToVideoSD;
            # Wan: WanVideoToVideoPipeline
            v2v = getattr(diffusers, family.video_to_video).from_pipe(pipe)
            v2v.set_progress_bar_config(disable=True)
            _V2V[pipe] = v2v
        return v2v


def schedule_steps(steps: int, strength: float) -> tuple[int, int]:
    """(schedule length handed to the pipeline, denoising steps it runs) for a strength in (0, 1].

    diffusers runs int(steps · strength) steps; a short schedule at low strength would run none, so the schedule is
    lengthened until one step runs (then the strength is still the share of the schedule re-run).
    """
    n = max(steps, math.ceil(1.0 / strength - 1e-9))
    return n, max(1, min(n, int(n * strength)))


@dataclass
class Pass:
    """What one video-to-video pass needs besides the frames."""

    pipe: object
    prompt: str
    negative_prompt: str
    steps: int
    guidance_scale: float
    generator: object  # torch.Generator: noise of every pass is drawn from it, in order
    on_step: Callable[[], None] | None = None  # called after every denoising step
    cancel: threading.Event | None = None


def video_to_video(frames: np.ndarray, strength: float, p: Pass) -> np.ndarray:
    """Re-denoise (F, H, W, 3) uint8 frames from `strength` of the schedule; same shape back. strength 0: a copy."""
    if strength <= 0.0:
        return frames.copy()
    import torch

    v2v = v2v_pipeline(p.pipe)
    total, _ = schedule_steps(p.steps, strength)
    video = [list(frames.astype(np.float32) / 255.0)]  # 1 video of F (H, W, 3) float frames in 0..1

    def on_step_end(pipe, i, t, kw):
        if p.on_step is not None:
            p.on_step()
        if p.cancel is not None and p.cancel.is_set():
            pipe._interrupt = True
        return {}

    _, h, w, _ = frames.shape
    kwargs = dict(video=video, prompt=p.prompt, negative_prompt=p.negative_prompt or None, height=h, width=w,
                  strength=strength, num_inference_steps=total, guidance_scale=p.guidance_scale,
                  generator=p.generator, output_type="np")
    import inspect

    if "callback_on_step_end" in inspect.signature(type(v2v).__call__).parameters:  # AnimateDiff's, Wan's
        kwargs.update(callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["latents"])
    else:  # VideoToVideoSDPipeline: legacy callback, no height/width (the video's size is used)
        kwargs.pop("height"), kwargs.pop("width")
        kwargs.update(callback=lambda i, t, lat: on_step_end(v2v, i, t, {}), callback_steps=1)
    with torch.inference_mode():
        out = v2v(**kwargs).frames
    if p.cancel is not None and p.cancel.is_set():
        raise RefineCancelled("refinement cancelled")
    video = np.asarray(out[0] if len(out) == 1 else out)  # (F, H, W, 3) float in 0..1
    return (np.clip(video, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def resize(frames: np.ndarray, width: int, height: int, method: str = "cubic") -> np.ndarray:
    """(F, H, W, 3) uint8 -> (F, height, width, 3); shrinking uses area averaging whatever `method` says."""
    import cv2

    _, h, w, _ = frames.shape
    if (w, h) == (width, height):
        return frames.copy()
    interp = cv2.INTER_AREA if width < w and height < h else getattr(cv2, _RESAMPLERS[method])
    return np.stack([cv2.resize(f, (width, height), interpolation=interp) for f in frames])


# --- face detection and tracks -------------------------------------------------------------------------------


def haar_cascade_path() -> str | None:
    """OpenCV's bundled frontal-face Haar cascade, if this OpenCV build ships it (4.x wheels do; 5.x does not)."""
    import cv2

    if not hasattr(cv2, "CascadeClassifier"):
        return None
    from pathlib import Path

    folder = getattr(getattr(cv2, "data", None), "haarcascades", None)
    path = Path(folder or "", "haarcascade_frontalface_default.xml")
    return str(path) if folder and path.is_file() else None


DETECTOR_SUFFIXES = (".xml", ".onnx")  # Haar cascades, YuNet models


def detector_models() -> dict[str, str]:
    """Face detector models by name: the cascades OpenCV bundles (cv2.data.haarcascades) and the .xml / .onnx files
    in models/detectors (SHOT_STUDIO_MODELS); `refine.face.detector_model` may name one (the only way over the web)."""
    import cv2
    from pathlib import Path

    from studio.presets import models_root

    folders = [getattr(getattr(cv2, "data", None), "haarcascades", None), models_root() / "detectors"]
    out: dict[str, str] = {}
    for folder in folders:
        if folder and Path(folder).is_dir():
            for f in sorted(Path(folder).iterdir()):
                if f.suffix.lower() in DETECTOR_SUFFIXES and f.is_file():
                    out.setdefault(f.name, str(f))
    return out


def detector_model_path(model: str) -> str | None:
    """The file a `refine.face.detector_model` stands for: a detector model's name (detector_models), else a path
    to a file; None when it is neither."""
    if "/" not in model and "\\" not in model:
        found = detector_models().get(model)
        if found:
            return found
    from studio.shot import path_is_file

    return model if path_is_file(model) else None


def _haar(model: str | None) -> Detector:
    import cv2

    clf = cv2.CascadeClassifier(model or haar_cascade_path())
    if clf.empty():
        raise ValueError(f"could not load the Haar cascade {model or haar_cascade_path()!r}")

    def detect(frame: np.ndarray) -> list:
        gray = cv2.equalizeHist(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY))
        side = max(8, min(frame.shape[:2]) // 16)
        found = clf.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=4, minSize=(side, side))
        return [(float(x), float(y), float(x + w), float(y + h)) for x, y, w, h in np.asarray(found).reshape(-1, 4)]

    return detect


def _yunet(model: str) -> Detector:
    import cv2

    net = cv2.FaceDetectorYN.create(model, "", (320, 320), 0.6, 0.3, 5000)

    def detect(frame: np.ndarray) -> list:
        h, w = frame.shape[:2]
        net.setInputSize((w, h))
        _, faces = net.detect(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        rows = [] if faces is None else faces[:, :4]  # (N, 4) x, y, w, h
        return [(float(x), float(y), float(x + bw), float(y + bh)) for x, y, bw, bh in rows]

    return detect


def face_detector_backend(detector: str, model: str | None) -> str:
    """The backend a `refine.face.detector` setting resolves to here; ShotError naming the field if none can run."""
    import cv2

    if detector == "boxes":
        return "boxes"
    suffix = (model or "").lower().rsplit(".", 1)[-1]
    if detector in ("auto", "haar") and hasattr(cv2, "CascadeClassifier") and (
            (model and suffix == "xml") or (not model and haar_cascade_path())):
        return "haar"
    if detector in ("auto", "yunet") and model and suffix == "onnx" and hasattr(cv2, "FaceDetectorYN"):
        return "yunet"
    why = (f"OpenCV {cv2.__version__} has no Haar cascades (opencv-python-headless<5 ships them)"
           if haar_cascade_path() is None else "the detector_model does not fit this detector")
    raise shotlib.ShotError("refine.face.detector", detector,
                            f"no face detector can run here: {why}; set refine.face.detector_model to a Haar "
                            f"cascade .xml or a YuNet .onnx file, or use detector: boxes (the subjects' boxes)")


def make_detector(detector: str, model: str | None) -> Detector:
    backend = face_detector_backend(detector, model)
    model = detector_model_path(model) if model else None  # a name stands for its file
    if backend == "haar":
        return _haar(model)
    if backend == "yunet":
        return _yunet(model)
    raise ValueError("detector 'boxes' has no per-frame detector: use subject_box_tracks")


def _iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def link_tracks(detections: list[list], min_share: float = _MIN_TRACK_SHARE) -> list[dict[int, tuple]]:
    """Per-frame boxes -> tracks {frame: box}: each detection joins the track whose latest box it overlaps most
    (IoU ≥ 0.2), else starts a new one; tracks found in fewer than `min_share` of the frames are dropped."""
    tracks: list[dict[int, tuple]] = []
    for f, boxes in enumerate(detections):
        taken: set[int] = set()
        for box in sorted(boxes, key=lambda b: -(b[2] - b[0]) * (b[3] - b[1])):  # big faces pick first
            best, arg = _TRACK_IOU, None
            for k, tr in enumerate(tracks):
                last = tr[max(tr)]
                if k not in taken and max(tr) < f and _iou(last, box) >= best:
                    best, arg = _iou(last, box), k
            if arg is None:
                tracks.append({f: tuple(box)})
                taken.add(len(tracks) - 1)
            else:
                tracks[arg][f] = tuple(box)
                taken.add(arg)
    need = max(1, math.ceil(min_share * len(detections)))
    return [t for t in tracks if len(t) >= need]


def crop_box(track: dict[int, tuple], crop_factor: float, width: int, height: int) -> tuple[int, int, int, int]:
    """One square crop (x0, y0, x1, y1) in pixels for a whole track: the union of its boxes, grown on each side by
    (crop_factor − 1)/2 of the median face side, kept inside the frame (a side longer than the frame is cut).

    The shot's default crop_factor, 2.0, is below the workflow's 3 (METHODS.md §2.3) on purpose: at 3 the crop of
    a face a third of the frame wide (a close-up) already spans the whole frame, and Face VCD at strength 0.8 then
    re-renders the whole shot instead of the face; at 2 that happens only for faces half the frame wide. Set
    `refine.face.crop_factor: 3` to match the workflow."""
    b = np.array(list(track.values()), np.float64)  # (n, 4)
    face = float(np.median(np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1])))
    x0, y0, x1, y1 = b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()
    side = max(x1 - x0, y1 - y0) + (crop_factor - 1.0) * face
    side = int(round(min(side, width, height)))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left = int(round(min(max(cx - side / 2, 0), width - side)))
    top = int(round(min(max(cy - side / 2, 0), height - side)))
    return left, top, left + side, top + side


def subject_boxes(shot: shotlib.Shot, subject: shotlib.Subject) -> np.ndarray:
    """(F, 4) normalised boxes of a subject in every frame of the shot, as the box control interpolates them."""
    from studio.controls.boxes import interpolate

    return interpolate(subject.boxes, shot.frames, shot.box_control.interpolation)


def subject_box_tracks(shot: shotlib.Shot) -> list[dict[int, tuple]]:
    """detector 'boxes': one track per subject with boxes, its per-frame box in pixels."""
    scale = np.array([shot.width, shot.height, shot.width, shot.height], np.float32)
    return [{f: tuple(float(v) for v in b * scale) for f, b in enumerate(subject_boxes(shot, s))}
            for s in shot.subjects if s.boxes]


def feather_mask(height: int, width: int, feather: int, open_sides: tuple[bool, bool, bool, bool]) -> np.ndarray:
    """(height, width) float32 paste weights: 1 inside, ramping to 0 over `feather` px at each side in
    `open_sides` (left, top, right, bottom: the sides inside the frame; a side on the frame border stays 1)."""
    def ramp(n: int, lo: bool, hi: bool) -> np.ndarray:
        i = np.arange(n, dtype=np.float32)
        r = np.ones(n, np.float32)
        if feather > 0:
            if lo:
                r = np.minimum(r, (i + 0.5) / feather)
            if hi:
                r = np.minimum(r, (n - i - 0.5) / feather)
        return np.clip(r, 0.0, 1.0)

    left, top, right, bottom = open_sides
    return np.outer(ramp(height, top, bottom), ramp(width, left, right))


def paste(frames: np.ndarray, patch: np.ndarray, box: tuple[int, int, int, int], feather: int) -> np.ndarray:
    """Blend `patch` (F, h, w, 3) into `frames` (F, H, W, 3) at box with a feathered mask; outside the box the
    frames are returned unchanged, bit for bit."""
    x0, y0, x1, y1 = box
    _, H, W, _ = frames.shape
    m = feather_mask(y1 - y0, x1 - x0, feather, (x0 > 0, y0 > 0, x1 < W, y1 < H))[None, :, :, None]  # (1,h,w,1)
    out = frames.copy()
    region = frames[:, y0:y1, x0:x1].astype(np.float32)
    out[:, y0:y1, x0:x1] = np.clip(region * (1 - m) + patch.astype(np.float32) * m + 0.5, 0, 255).astype(np.uint8)
    return out


# --- tiles ------------------------------------------------------------------------------------------------------


def default_overlap(tile: int) -> int:
    """The overlap of neighbouring tiles when `refine.tiled.overlap` is null: the workflow's 32 px padding at a 512-px
    tile (METHODS.md §2.3), scaled with the tile, never under its 8-px mask blur and at most half the tile."""
    return min(tile // 2, max(8, round(tile * 32 / 512)))


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of the fewest tiles of `tile` px covering `length` px with at least `overlap` px shared by
    neighbours, spread evenly (first at 0, last flush with the end), so every overlap is about the same width."""
    if length <= tile:
        return [0]
    stride = max(1, tile - overlap)
    n = math.ceil((length - overlap) / stride)  # ≥ 2 tiles; their n - 1 gaps are at most `stride` each
    return [round(k * (length - tile) / (n - 1)) for k in range(n)]


def _axis_weights(starts: list[int], tile: int, length: int) -> list[np.ndarray]:
    """Per tile, (tile,) weights along one axis that sum to exactly 1 at every pixel: inside an overlap the earlier
    tile ramps down linearly while the later one ramps up; elsewhere a tile's weight is 1."""
    n = min(tile, length)
    ws = [np.ones(n, np.float64) for _ in starts]
    for k in range(1, len(starts)):
        a0, a1 = starts[k], starts[k - 1] + n  # overlap [a0, a1) between tile k-1 and tile k
        if a1 <= a0:
            continue
        t = (np.arange(a0, a1, dtype=np.float64) - a0 + 0.5) / (a1 - a0)  # 0..1 across the overlap
        ws[k - 1][a0 - starts[k - 1]:] = np.minimum(ws[k - 1][a0 - starts[k - 1]:], 1.0 - t)
        ws[k][:a1 - a0] = np.minimum(ws[k][:a1 - a0], t)
    # three tiles can share a pixel when the stride is short; normalise so every pixel's weights sum to 1
    total = np.zeros(length, np.float64)
    for s, w in zip(starts, ws):
        total[s:s + n] += w
    return [w / total[s:s + n] for s, w in zip(starts, ws)]


def tile_weights(height: int, width: int, tile: int, overlap: int) -> list[tuple[int, int, np.ndarray]]:
    """(top, left, (t_h, t_w) weights) per tile; the weights of all tiles add up to 1 at every pixel."""
    ys, xs = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
    wy, wx = _axis_weights(ys, tile, height), _axis_weights(xs, tile, width)
    return [(y, x, np.outer(a, b)) for y, a in zip(ys, wy) for x, b in zip(xs, wx)]


# --- the two passes ---------------------------------------------------------------------------------------------


@dataclass
class Refined:
    frames: np.ndarray  # (F, H', W', 3) uint8
    info: dict = field(default_factory=dict)  # what the sidecar records


def face_tracks(frames: np.ndarray, shot: shotlib.Shot, detector: Detector | None = None) -> list[dict[int, tuple]]:
    """The tracks Face VCD refines: the subjects' box tracks (detector 'boxes'), else faces found on every frame by
    `detector` (default: the one `refine.face.detector` names) and linked into tracks."""
    face = shot.refine.face
    if face.detector == "boxes":
        return subject_box_tracks(shot)
    detect = detector or make_detector(face.detector, face.detector_model)
    return link_tracks([detect(f) for f in frames])


def face_vcd(frames: np.ndarray, cfg: shotlib.FaceRefine, p: Pass, model_size: int,
             tracks: list[dict[int, tuple]]) -> Refined:
    """Face VCD: per track (per-frame pixel boxes, from `face_tracks`), the stable crop upscaled to model_size²,
    re-denoised over all frames, pasted back."""
    F, H, W, _ = frames.shape
    t0 = time.perf_counter()
    if cfg.strength <= 0.0:  # nothing re-denoised: the frames as they were (no resampling round trip)
        return Refined(frames.copy(), {"tracks": 0, "crop_boxes": [], "strength": 0.0, "seconds": 0.0})
    size = cfg.size or model_size
    out, boxes = frames, []
    for track in tracks:
        x0, y0, x1, y1 = crop_box(track, cfg.crop_factor, W, H)
        if x1 - x0 < 2 or y1 - y0 < 2:
            continue
        crop = resize(frames[:, y0:y1, x0:x1], size, size)  # (F, size, size, 3)
        new = video_to_video(crop, cfg.strength, p)
        patch = resize(new, x1 - x0, y1 - y0)  # (F, h, w, 3)
        out = paste(out, patch, (x0, y0, x1, y1), cfg.feather)
        boxes.append([x0, y0, x1, y1])
    info = {"tracks": len(boxes), "crop_boxes": boxes, "crop_size": size, "strength": cfg.strength,
            "seconds": time.perf_counter() - t0}
    logger.info("face VCD: %d track(s) refined in %.2f s", len(boxes), info["seconds"])
    return Refined(out, info)


def tiled_vcd(frames: np.ndarray, cfg: shotlib.TiledRefine, p: Pass, model_size: int, multiple: int = 8) -> Refined:
    """Tiled VCD: upscale ×scale, re-denoise overlapping tiles at cfg.strength, blend by ramp weights."""
    F, H, W, _ = frames.shape
    t0 = time.perf_counter()
    big = resize(frames, W * cfg.scale, H * cfg.scale, cfg.upscaler)  # (F, sH, sW, 3)
    if cfg.strength <= 0.0:
        return Refined(big, {"scale": cfg.scale, "tiles": 0, "output_size": [W * cfg.scale, H * cfg.scale],
                             "strength": 0.0, "seconds": time.perf_counter() - t0})
    sH, sW = big.shape[1:3]
    tile = cfg.tile or model_size
    overlap = cfg.overlap if cfg.overlap is not None else default_overlap(tile)
    grid = tile_weights(sH, sW, tile, overlap)
    acc = np.zeros(big.shape, np.float64)  # (F, sH, sW, 3) weighted sum of refined tiles
    for top, left, w in grid:
        th, tw = w.shape
        piece = big[:, top:top + th, left:left + tw]
        if th % multiple or tw % multiple:  # a frame smaller than the tile: refine at the nearest valid size
            ph, pw = max(multiple, th // multiple * multiple), max(multiple, tw // multiple * multiple)
            new = resize(video_to_video(resize(piece, pw, ph), cfg.strength, p), tw, th)
        else:
            new = video_to_video(piece, cfg.strength, p)
        acc[:, top:top + th, left:left + tw] += new.astype(np.float64) * w[None, :, :, None]
    out = np.clip(acc + 0.5, 0, 255).astype(np.uint8)
    info = {"scale": cfg.scale, "tiles": len(grid), "tile": tile, "overlap": overlap, "upscaler": cfg.upscaler,
            "output_size": [sW, sH], "strength": cfg.strength, "seconds": time.perf_counter() - t0}
    logger.info("tiled VCD: %d tiles, %dx%d -> %dx%d in %.2f s", len(grid), W, H, sW, sH, info["seconds"])
    return Refined(out, info)


# --- the engine's refinement step -------------------------------------------------------------------------------


def enabled(shot: shotlib.Shot) -> bool:
    return shot.refine.face.enabled or shot.refine.tiled.enabled


def check(shot: shotlib.Shot) -> None:
    """Boundary check of what can only be known here (a face detector that can run); ShotError naming the field."""
    f = shot.refine.face
    if f.enabled and f.strength > 0:
        if f.detector == "boxes":
            if not any(s.boxes for s in shot.subjects):
                raise shotlib.ShotError("refine.face.detector", "boxes", "needs a subject with boxes")
        else:
            face_detector_backend(f.detector, f.detector_model)


def seed_for(seed: int, stream: int) -> int:
    """A seed for one refinement pass, independent of the render's noise and of the other pass."""
    return int(np.random.SeedSequence([seed, stream]).generate_state(1, np.uint64)[0] >> 1)


def planned_steps(shot: shotlib.Shot, cfg, strength: float) -> int:
    return schedule_steps(cfg.steps or shot.steps, strength)[1] if strength > 0 else 0


def run(frames: np.ndarray, shot: shotlib.Shot, prompt: str, pipe, model_size: int, multiple: int,
        progress: Progress | None = None, cancel: threading.Event | None = None,
        detector: Detector | None = None) -> Refined:
    """The shot's refinement passes on rendered frames: face (if enabled), then tiled (if enabled).

    `prompt` is the prompt as rendered (subjects' words in). Progress counts denoising steps over both passes;
    the face pass's total is known once its tracks are.
    """
    import torch

    info: dict = {}
    face, tiled = shot.refine.face, shot.refine.tiled
    done = [0]
    total = [0]

    def step():
        done[0] += 1
        if progress is not None:
            progress(done[0], max(total[0], done[0]))

    def make_pass(cfg, stream: int) -> Pass:
        return Pass(pipe, cfg.prompt if getattr(cfg, "prompt", None) else prompt, shot.negative_prompt,
                    cfg.steps or shot.steps, shot.guidance_scale,
                    torch.Generator("cpu").manual_seed(seed_for(shot.seed, stream)), step, cancel)

    tiled_steps = 0
    if tiled.enabled and tiled.strength > 0:
        tile = tiled.tile or model_size
        n_tiles = len(tile_weights(shot.height * tiled.scale, shot.width * tiled.scale, tile,
                                   tiled.overlap if tiled.overlap is not None else default_overlap(tile)))
        tiled_steps = n_tiles * planned_steps(shot, tiled, tiled.strength)
    if face.enabled:
        tracks = face_tracks(frames, shot, detector) if face.strength > 0 else []
        total[0] = len(tracks) * planned_steps(shot, face, face.strength) + tiled_steps
        r = face_vcd(frames, face, make_pass(face, 1), model_size, tracks)
        frames, info["face"] = r.frames, {**r.info, "detector": face.detector}
    else:
        total[0] = tiled_steps
    if tiled.enabled:
        r = tiled_vcd(frames, tiled, make_pass(tiled, 2), model_size, multiple)
        frames, info["tiled"] = r.frames, r.info
    info["output_size"] = [int(frames.shape[2]), int(frames.shape[1])]
    return Refined(frames, info)
