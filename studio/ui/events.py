"""The studio's event functions: named values in -> a Shot -> a result. Plain Python, no Gradio, so tests call them
directly and the page (studio.ui.app) only wires them to components.

The shot file (YAML text, the Shot files tab's editor) is the one source of truth for what the form does not show:
subjects, their boxes, the background, the control settings. The form's values (prompt, seed, size, γ, pan, ...)
are laid over it whenever a shot is built; a render returns the resolved shot, so the editor always holds the file
that reproduces the last video from the command line.

Errors a user can fix are UserError, naming the shot field (`noise_prior.gamma: must be in [0, 1) ...`).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from studio import engine, shot as shotlib
from studio.pipelines import ModelLoadError, studio_home

logger = logging.getLogger(__name__)

GAMMA_HELP = ("γ correlates the initial noise across frames: Cov(frame i, frame j) = γ^|i−j|. 0 = independent "
              "noise per frame (more motion, more flicker); near 1 = shared noise (steadier, less motion).")
MAX_SEED = 2**31 - 1
DEFAULT_SHOT = "toyworld-star"  # the shot the page opens with: presets/shots/<name>.yaml, on the embedded model
# The form's fields, in the order the page passes them; each is the shot field of the same name, except gamma
# (noise_prior.gamma) and cx, cy (camera.cx, camera.cy).
FORM = ("model", "prompt", "negative_prompt", "seed", "steps", "guidance_scale", "frames", "width", "height",
        "gamma", "cx", "cy")
INT_FIELDS = ("seed", "steps", "frames", "width", "height")
HISTORY_COLUMNS = ["#", "time", "prompt", "model", "seed", "frames", "size", "γ", "pan", "seconds"]


class UserError(Exception):
    """A problem the user can fix; shown as a message in the page."""


class Cancelled(UserError):
    """The user cancelled the render; nothing was written."""


def user_errors(fn):
    """Run fn, turning input errors (ShotError, ValueError naming a field, a missing model) into UserError."""
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError:
            raise
        except (shotlib.ShotError, ModelLoadError, ValueError) as e:
            raise UserError(str(e)) from None

    run.__name__, run.__doc__ = fn.__name__, fn.__doc__
    return run


def output_dir() -> Path:
    """The only folder the app serves files from: this studio's renders, previews and uploads."""
    d = studio_home() / "renders"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _subdir(name: str) -> Path:
    d = output_dir() / name
    d.mkdir(parents=True, exist_ok=True)
    return d


def default_shot_yaml() -> str:
    from studio.presets import shot_preset_path

    path = shot_preset_path(DEFAULT_SHOT)
    return path.read_text() if path.exists() else ""


# --- the form and the shot file ------------------------------------------------------------------------------


def _as_int(v):
    return int(v) if isinstance(v, float) and v.is_integer() else v


def shot_from_form(shot_yaml: str, model: str | None = None, prompt: str | None = None,
                   negative_prompt: str | None = None, seed=None, steps=None, guidance_scale=None, frames=None,
                   gamma=None, cx=None, cy=None, width=None, height=None) -> shotlib.Shot:
    """The form's values laid over the shot file in the editor; validated against the model preset.

    A value left None (or "") keeps the shot file's. Raises UserError naming the field.
    """
    try:
        base = shotlib.loads(shot_yaml, where="shot file")
        data = shotlib.to_dict(base)
        values = {"model": model, "prompt": prompt, "negative_prompt": negative_prompt, "seed": seed, "steps": steps,
                  "guidance_scale": guidance_scale, "frames": frames, "width": width, "height": height}
        for k, v in values.items():
            if v is not None and (v != "" or k == "negative_prompt"):
                data[k] = _as_int(v) if k in INT_FIELDS else v  # sliders and number boxes send floats
        if gamma is not None:
            data["noise_prior"]["gamma"] = gamma
        for name, v in (("cx", cx), ("cy", cy)):
            if v is not None:
                data["camera"][name] = v
        shot = shotlib.from_container(data)
        engine.prepare(shot)  # validate against the model preset now, before any work
    except (shotlib.ShotError, ModelLoadError) as e:
        raise UserError(str(e)) from None
    return shot


def form_values(shot_yaml: str) -> dict:
    """The form's values for a shot file (the model preset's defaults where the file leaves them out)."""
    try:
        shot, _ = engine.prepare(shotlib.loads(shot_yaml, where="shot file"))
    except (shotlib.ShotError, ModelLoadError) as e:
        raise UserError(str(e)) from None
    return {"model": shot.model, "prompt": shot.prompt, "negative_prompt": shot.negative_prompt, "seed": shot.seed,
            "steps": shot.steps, "guidance_scale": shot.guidance_scale, "frames": shot.frames, "width": shot.width,
            "height": shot.height, "gamma": shot.noise_prior.gamma, "cx": shot.camera.cx, "cy": shot.camera.cy}


def preset_defaults_event(model: str) -> dict:
    """A model preset's frames, width, height, steps and guidance scale: the form's values after picking it."""
    from studio.presets import load_model_preset

    try:
        d = load_model_preset(model).defaults
    except (shotlib.ShotError, ModelLoadError) as e:
        raise UserError(str(e)) from None
    return {"frames": d.frames, "width": d.width, "height": d.height, "steps": d.steps,
            "guidance_scale": d.guidance_scale}


def load_shot_event(path: str | None) -> str:
    """An uploaded shot file -> the editor text (validated)."""
    if not path:
        raise UserError("shot file: no file given")
    if Path(path).suffix.lower() not in (".yaml", ".yml"):
        raise UserError(f"shot file: must be a .yaml or .yml file (got {Path(path).name!r})")
    try:
        shot = shotlib.load(path)
        engine.prepare(shot)
    except (shotlib.ShotError, ModelLoadError) as e:
        raise UserError(str(e)) from None
    return shotlib.dumps(shot)


def save_shot_event(shot_yaml: str, name: str = "", **form) -> str:
    """The form's shot saved as a YAML file in the output folder (the file `studio render` takes); its path."""
    shot = shot_from_form(shot_yaml, **form)
    stem = "".join(c if c.isalnum() or c in "-_" else "-" for c in (name or "").strip())[:64] or \
        time.strftime("shot-%Y%m%d-%H%M%S")
    return str(shotlib.save(shot, _subdir("shots") / f"{stem}.yaml"))


def apply_form_event(shot_yaml: str, **form) -> str:
    """The shot file with the form's values written into it (what Save and Render store)."""
    return shotlib.dumps(shot_from_form(shot_yaml, **form))


# --- uploads -------------------------------------------------------------------------------------------------


def store_image(path: str | None, field: str) -> str:
    """Check an uploaded image (type, size, readable) and keep a copy in the output folder; the copy's path.

    The copy is named by its content, so the same image uploaded twice is one file, and a shot file that names it
    keeps working after Gradio's upload cache is cleaned.
    """
    if not path:
        raise UserError(f"{field}: no image given")
    try:
        shotlib.validate_image_file(str(path), field)
    except shotlib.ShotError as e:
        raise UserError(str(e)) from None
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    target = _subdir("uploads") / f"{digest}{Path(path).suffix.lower()}"
    if not target.exists():
        shutil.copyfile(path, target)
    return str(target)


def read_image(path: str):
    """(H, W, 3) uint8 RGB."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


# --- render --------------------------------------------------------------------------------------------------


@dataclass
class Rendered:
    video: str  # MP4
    gif: str
    frames_zip: str  # the PNG frames, zipped
    sidecar: str  # JSON
    shot_file: str  # YAML: `studio render` of it reproduces the video
    shot_yaml: str  # the resolved shot, for the editor
    status: str
    first_frame: str  # PNG of frame 0 (the trajectory canvas's backdrop)
    entry: dict = field(default_factory=dict)  # this render's line in the session history
    timings: dict = field(default_factory=dict)

    @property
    def downloads(self) -> list[str]:
        return [self.video, self.gif, self.frames_zip, self.shot_file, self.sidecar]


def _unique_stem(folder: Path, seed: int) -> str:
    stem = time.strftime("%Y%m%d-%H%M%S") + f"-{seed}"
    name, n = stem, 1
    while (folder / f"{name}.mp4").exists():
        name, n = f"{stem}-{n}", n + 1
    return name


def render_event(shot_yaml: str, model=None, prompt=None, negative_prompt=None, seed=None, steps=None,
                 guidance_scale=None, frames=None, gamma=None, cx=None, cy=None, width=None, height=None,
                 progress=None, manager=None, cancel: threading.Event | None = None) -> Rendered:
    """Render the form's shot to MP4, GIF, PNG frames (zip), the shot file and its sidecar, all in the output folder.

    progress(i, total) is called after each denoising step; setting `cancel` stops the render between steps.
    """
    from studio import export

    shot = shot_from_form(shot_yaml, model, prompt, negative_prompt, seed, steps, guidance_scale, frames, gamma,
                          cx, cy, width, height)
    folder = output_dir()
    stem = _unique_stem(folder, shot.seed)
    out = folder / f"{stem}.mp4"
    frames_dir = folder / f"{stem}-frames"
    try:
        files = engine.render_to_files(shot, out, frames_dir=frames_dir, gif=folder / f"{stem}.gif",
                                       manager=manager, cancel=cancel, progress=progress)
    except (shotlib.ShotError, ModelLoadError) as e:
        raise UserError(str(e)) from None
    except engine.RenderCancelled:
        raise Cancelled("render cancelled; nothing was written") from None
    r = files.result
    frames_zip = shutil.make_archive(str(frames_dir), "zip", root_dir=frames_dir)
    first = export.write_png_frames(r.frames[:1], folder / f"{stem}-first")[0]
    shot_file = shotlib.save(r.shot, out.with_suffix(".yaml"))
    t = r.timings
    status = (f"{r.shot.frames} frames {r.shot.width}×{r.shot.height} on {r.preset.name}, seed {r.shot.seed}: "
              f"{t['total']:.2f} s (set-up {t['load'] + t.get('prepare', 0.0):.2f} s, "
              f"denoising {t.get('denoise', 0.0):.2f} s)")
    entry = {"time": time.strftime("%H:%M:%S"), "prompt": r.shot.prompt, "model": r.preset.name, "seed": r.shot.seed,
             "frames": r.shot.frames, "size": f"{r.shot.width}×{r.shot.height}", "gamma": r.shot.noise_prior.gamma,
             "pan": f"{r.shot.camera.cx:+.2f}, {r.shot.camera.cy:+.2f}", "seconds": round(t["total"], 2),
             "video": str(out), "shot_file": str(shot_file), "shot_yaml": shotlib.dumps(r.shot)}
    logger.info("studio render %s: %s", out.name, status)
    return Rendered(video=str(out), gif=str(files.gif), frames_zip=frames_zip, sidecar=str(files.sidecar),
                    shot_file=str(shot_file), shot_yaml=entry["shot_yaml"], status=status, first_frame=str(first),
                    entry=entry, timings=dict(t))


def history_rows(history: list[dict]) -> list[list]:
    """The session history as table rows (newest first), columns HISTORY_COLUMNS."""
    rows = []
    for i, h in reversed(list(enumerate(history))):
        rows.append([i + 1, h["time"], h["prompt"], h["model"], h["seed"], h["frames"], h["size"], h["gamma"],
                     h["pan"], h["seconds"]])
    return rows


def history_entry(history: list[dict], number) -> dict:
    """History entry `number` (1-based, the table's # column)."""
    if not history:
        raise UserError("history: no renders yet in this session")
    try:
        i = int(number) - 1
    except (TypeError, ValueError):
        raise UserError(f"history: pick a render by its number (got {number!r})") from None
    if not 0 <= i < len(history):
        raise UserError(f"history: no render #{number}; renders are numbered 1..{len(history)}")
    return history[i]


# --- previews ------------------------------------------------------------------------------------------------


def gamma_preview_event(gamma: float):
    """The prior's covariance as a heat map and a strip of sampled noise frames (uint8 images)."""
    import cv2
    import numpy as np

    from studio.controls import noise_prior

    if gamma is None or not 0.0 <= float(gamma) < 1.0:
        raise UserError(f"noise_prior.gamma: must be in [0, 1): gamma = 1 would repeat one noise frame (got {gamma})")
    cov, frames = noise_prior.preview(float(gamma), frames=8, size=32, seed=0)
    heat = cv2.applyColorMap((np.asarray(cov) * 255).astype(np.uint8), cv2.COLORMAP_VIRIDIS)[..., ::-1]
    heat = cv2.resize(heat, (160, 160), interpolation=cv2.INTER_NEAREST)
    gap = np.ones((frames.shape[1], 2))  # white 2 px gap between frames
    strip = np.concatenate([x for f in frames for x in (f, gap)][:-1], axis=1)  # (size, F·size + gaps)
    strip = (strip * 255).round().astype(np.uint8)
    strip = cv2.resize(strip, (strip.shape[1] * 2, strip.shape[0] * 2), interpolation=cv2.INTER_NEAREST)
    return heat, strip


def strip(frames):
    """(F, H, W, 3) -> (H, F·(W+2) − 2, 3): the frames side by side with white gaps."""
    import numpy as np

    gap = np.full((frames.shape[1], 2, 3), 255, np.uint8)
    return np.concatenate([x for f in frames for x in (f, gap)][:-1], 1)


def preview_gif(frames, fps: int = 4) -> str:
    """An animated GIF of preview frames in the output folder (named by content: the same preview is one file)."""
    from studio import export

    digest = hashlib.sha256(frames.tobytes() + str(frames.shape).encode()).hexdigest()[:16]
    path = _subdir("previews") / f"{digest}.gif"
    if not path.exists():
        export.write_gif(frames, path, fps)
    return str(path)


def resolved(shot_yaml: str, **form) -> shotlib.Shot:
    """The form's shot with every default filled in (frames, size, step windows)."""
    return engine.prepare(shot_from_form(shot_yaml, **form))[0]


def preview_event(shot_yaml: str, model: str, prompt: str, frames, cx, cy, width=None, height=None):
    """Strips of the boxes' trajectory and of the camera pan over the shot's frames (no rendering)."""
    from studio import previews

    shot = resolved(shot_yaml, model=model, prompt=prompt, frames=frames, cx=cx, cy=cy, width=width, height=height)
    return strip(previews.trajectory(shot, long_side=96)), strip(previews.camera(shot, long_side=96))


def camera_preview_event(shot_yaml: str, model: str, prompt: str, frames, cx, cy, width=None, height=None):
    """(animated GIF path, strip): the grid, a landmark and the boxes moving as the pan will move them."""
    from studio import previews

    shot = resolved(shot_yaml, model=model, prompt=prompt, frames=frames, cx=cx, cy=cy, width=width, height=height)
    return preview_gif(previews.camera(shot, long_side=192)), strip(previews.camera(shot, long_side=96))
