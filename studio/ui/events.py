"""The studio's event functions: named values in -> a Shot -> a result. Plain Python, no Gradio, so tests call them
directly and the page (studio.ui.app) only wires them to components.

The shot file (YAML text, the Shot files tab's editor) is the one source of truth for what the form does not show:
subjects, their boxes, the background, the control settings. The form's values (prompt, seed, size, γ, pan, ...)
are laid over it whenever a shot is built; a render returns the resolved shot, so the editor always holds the file
that reproduces the last video from the command line.

Errors a user can fix are UserError, naming the shot field (`noise_prior.gamma: must be in [0, 1) ...`); every
event function turns input errors into it through one decorator, `user_errors`.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import inspect
import logging
import os
import secrets
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from studio import engine, measures, shot as shotlib, trust
from studio.pipelines import ModelLoadError, studio_home
from studio.settings import Settings

logger = logging.getLogger(__name__)

GAMMA_HELP = ("γ correlates the initial noise across frames: Cov(frame i, frame j) = γ^|i−j|. 0 = independent "
              "noise per frame (more motion, more flicker); near 1 = shared noise (steadier, less motion). On a model "
              "whose latent frames span several video frames (Wan: 4) the noise is drawn per latent frame at the "
              "same correlation per video frame; the preview shows the latent frames the model gets.")
MAX_SEED = 2**31 - 1
DEFAULT_SHOT = "toyworld-star"  # the shot the page opens with: presets/shots/<name>.yaml, on the embedded model
# The form's fields: the name the page passes each by (a keyword) -> the shot field it shows (dotted path).
FORM_FIELDS = {
    "model": "model", "prompt": "prompt", "negative_prompt": "negative_prompt", "seed": "seed", "steps": "steps",
    "guidance_scale": "guidance_scale", "frames": "frames", "width": "width", "height": "height",
    "gamma": "noise_prior.gamma", "cx": "camera.cx", "cy": "camera.cy",
    "refine_face": "refine.face.enabled", "refine_face_strength": "refine.face.strength",
    "refine_face_detector": "refine.face.detector", "refine_tiled": "refine.tiled.enabled",
    "refine_tiled_strength": "refine.tiled.strength", "refine_tiled_scale": "refine.tiled.scale",
}
FORM = tuple(FORM_FIELDS)
INT_FIELDS = ("seed", "steps", "frames", "width", "height", "refine_tiled_scale")  # sliders, number boxes send floats
KEEP_EMPTY = ("negative_prompt",)  # fields where "" is a value; elsewhere "" keeps the shot file's value
HISTORY_COLUMNS = ["#", "time", "prompt", "model", "seed", "frames", "size", "γ", "pan", "seconds", "weights"]


class UserError(Exception):
    """A problem the user can fix; shown as a message in the page."""


class Cancelled(UserError):
    """The user cancelled the render; nothing was written."""


INPUT_ERRORS = (shotlib.ShotError, ModelLoadError, ValueError)  # what the user gave (trust.NotAllowed: a ValueError)


def user_errors(fn):
    """fn (a function or a generator function) with input errors (ShotError, ModelLoadError, a ValueError naming a
    field, e.g. a control's) raised as UserError; anything else passes through unchanged."""
    def convert(e: Exception) -> UserError:
        logger.info("%s: %s", fn.__name__, e)
        return UserError(str(e))

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def run_generator(*args, **kwargs):
            try:
                return (yield from fn(*args, **kwargs))
            except UserError:
                raise
            except INPUT_ERRORS as e:
                raise convert(e) from None

        return run_generator

    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError:
            raise
        except INPUT_ERRORS as e:
            raise convert(e) from None

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


# Files in the output folder are served to anyone who knows their name, so no name can be guessed: renders take a
# random token; files named by their content (uploads, previews, photos: the same content is one file) take a keyed
# hash whose key never leaves this process.
_NAME_KEY = secrets.token_bytes(32)


def private_name(data: bytes) -> str:
    """A file name for content: the same bytes give the same name in this process; nobody else can compute it."""
    return hmac.new(_NAME_KEY, data, hashlib.sha256).hexdigest()[:32]


def keep_disk(keep: set[Path] = frozenset(), settings: Settings | None = None) -> int:
    """Remove the output folder's oldest files until it holds at most SHOT_STUDIO_MAX_DISK_MB (0: no limit), never
    one of `keep`; empty folders left behind go too. The number of files removed."""
    cap = (settings or Settings.from_env()).max_disk_mb * 2**20
    root = output_dir()
    if not cap:
        return 0
    files = []
    for folder, _, names in os.walk(root):
        for name in names:
            path = Path(folder, name)
            try:
                st = path.lstat()
            except OSError:  # removed meanwhile
                continue
            files.append((st.st_mtime, st.st_size, path))
    total = sum(size for _, size, _ in files)
    keep = {Path(k).resolve() for k in keep}
    removed = 0
    for _, size, path in sorted(files, key=lambda f: f[0]):
        if total <= cap:
            break
        if path.resolve() in keep:
            continue
        try:
            path.unlink()
        except OSError:
            continue
        total -= size
        removed += 1
        parent = path.parent
        while parent != root and parent.is_relative_to(root):
            try:
                parent.rmdir()  # only when empty
            except OSError:
                break
            parent = parent.parent
    if removed:
        logger.info("output folder over %d MB: removed its %d oldest files", cap // 2**20, removed)
    return removed


def default_shot_yaml() -> str:
    from studio.presets import shot_preset_path

    path = shot_preset_path(DEFAULT_SHOT)
    return path.read_text() if path.exists() else ""


# --- the form and the shot file ------------------------------------------------------------------------------


def _as_int(v):
    return int(v) if isinstance(v, float) and v.is_integer() else v


def _check_names(form: dict) -> None:
    unknown = sorted(set(form) - set(FORM_FIELDS))
    if unknown:  # a wiring mistake, not a user's: fail loudly
        raise TypeError(f"not form fields: {', '.join(unknown)} (the form is {', '.join(FORM)})")


@user_errors
def shot_from_form(shot_yaml: str, **form) -> shotlib.Shot:
    """The form's values (by FORM name) laid over the shot file in the editor; validated against the model preset.

    A value left None (or "", except for the negative prompt) keeps the shot file's. Raises UserError naming the
    field.
    """
    _check_names(form)
    data = shotlib.to_dict(shotlib.loads(shot_yaml, where="shot file"))
    for name, v in form.items():
        if v is None or (v == "" and name not in KEEP_EMPTY):
            continue
        *parents, leaf = FORM_FIELDS[name].split(".")
        node = data
        for key in parents:
            node = node[key]
        node[leaf] = _as_int(v) if name in INT_FIELDS else v
    shot = shotlib.from_container(data)
    engine.prepare(shot)  # validate against the model preset now, before any work
    return shot


@user_errors
def form_values(shot_yaml: str) -> dict:
    """The form's values (by FORM name) for a shot file, the model preset's defaults where the file leaves them out."""
    shot, _ = engine.prepare(shotlib.loads(shot_yaml, where="shot file"))
    return {name: functools.reduce(getattr, path.split("."), shot) for name, path in FORM_FIELDS.items()}


@user_errors
def preset_defaults_event(model: str) -> dict:
    """A model preset's frames, width, height, steps and guidance scale: the form's values after picking it."""
    from studio.presets import load_model_preset

    d = load_model_preset(model).defaults
    return {"frames": d.frames, "width": d.width, "height": d.height, "steps": d.steps,
            "guidance_scale": d.guidance_scale}


@user_errors
def preset_rules_event(model: str) -> dict:
    """The valid frames and sizes of a model preset, as slider ranges: {"frames": {minimum, maximum, step},
    "size": {...}}. A slider from `minimum` in steps of `step` holds exactly the valid values (frames = 4k+1 on Wan)."""
    from studio.presets import load_model_preset, nearest_frames

    p = load_model_preset(model)
    first = nearest_frames(p, p.min_frames)[0]  # the smallest valid frame count
    return {"frames": {"minimum": first, "maximum": nearest_frames(p, p.max_frames)[-1], "step": p.frame_step},
            "size": {"minimum": p.size_multiple, "maximum": p.max_size // p.size_multiple * p.size_multiple,
                     "step": p.size_multiple}}


def _closest(value: float, candidates: list[int]) -> int:
    """The candidate nearest to value; a tie goes to the larger."""
    return min(candidates, key=lambda c: (abs(c - value), -c))


@user_errors
def snap_event(model: str, frames=None, width=None, height=None) -> dict:
    """The frames, width and height the page's sliders snap to for a model preset: each value moved to the nearest
    valid one (None stays None). What a shot file says is never snapped: there an invalid value is refused."""
    from studio.presets import load_model_preset, nearest_frames, nearest_sizes

    p = load_model_preset(model)
    out = {}
    for name, v, nearest in (("frames", frames, nearest_frames), ("width", width, nearest_sizes),
                             ("height", height, nearest_sizes)):
        out[name] = None if v is None else _closest(float(v), nearest(p, int(round(float(v)))))
    return out


@user_errors
def load_shot_event(path: str | None) -> str:
    """An uploaded shot file -> the editor text (validated)."""
    if not path:
        raise UserError("shot file: no file given")
    trust.current().check_upload(str(path), "shot file")
    if Path(path).suffix.lower() not in (".yaml", ".yml"):
        raise UserError(f"shot file: must be a .yaml or .yml file (got {Path(path).name!r})")
    shot = shotlib.load(path)
    engine.prepare(shot)
    return shotlib.dumps(shot)


@user_errors
def save_shot_event(shot_yaml: str, name: str = "", **form) -> str:
    """The form's shot saved as a YAML file in the output folder (the file `studio render` takes); its path.

    The file keeps the name given, in a folder of its own with a random name (served files must not be guessable,
    nor one session's file overwrite another's)."""
    shot = shot_from_form(shot_yaml, **form)
    stem = "".join(c if c.isalnum() or c in "-_" else "-" for c in (name or "").strip())[:64] or \
        time.strftime("shot-%Y%m%d-%H%M%S")
    path = shotlib.save(shot, _subdir("shots") / secrets.token_hex(12) / f"{stem}.yaml")
    keep_disk({path})
    return str(path)


@user_errors
def apply_form_event(shot_yaml: str, **form) -> str:
    """The shot file with the form's values written into it (what Save and Render store)."""
    return shotlib.dumps(shot_from_form(shot_yaml, **form))


# --- uploads -------------------------------------------------------------------------------------------------


@user_errors
def store_image(path: str | None, field: str) -> str:
    """Check an uploaded image (type, size, readable) and keep a copy in the output folder; the copy's path.

    The copy is named by its content (private_name), so the same image uploaded twice is one file, and a shot file
    that names it keeps working after Gradio's upload cache is cleaned. Over the web the file must have come
    through the upload (trust.check_upload).
    """
    if not path:
        raise UserError(f"{field}: no image given")
    trust.current().check_upload(str(path), field)
    shotlib.validate_image_file(str(path), field)
    target = _subdir("uploads") / f"{private_name(Path(path).read_bytes())}{Path(path).suffix.lower()}"
    if not target.exists():
        shutil.copyfile(path, target)
        keep_disk({target})
    return str(target)


@user_errors
def upload_image_event(image: str | None) -> str:
    """An uploaded reference image -> the name a shot uses for it (subjects[i].reference, background.reference):
    the path of the studio's copy (the API's /upload_image)."""
    return store_image(image, "image")


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
    """A render's file stem: time and seed (for people), then 96 random bits (so nobody can guess it)."""
    while True:
        name = time.strftime("%Y%m%d-%H%M%S") + f"-{seed}-{secrets.token_hex(12)}"
        if not (folder / f"{name}.mp4").exists():
            return name


class StageProgress:
    """The engine's progress calls (i, n) labelled by stage for the page: `report(i, n, stage)`.

    The engine reports denoising steps (1..steps of steps), then, when the shot refines, the refinement passes'
    own count from 1 again (Face VCD then Tiled VCD, one total over both): a call is refinement once the
    denoising count has reached its end and the count starts over or its total changes.
    """

    DENOISING = "denoising"

    def __init__(self, report, shot: shotlib.Shot):
        self.report, self.steps = report, shot.steps
        passes = [name for name, r in (("Face VCD", shot.refine.face), ("Tiled VCD", shot.refine.tiled))
                  if r.enabled]
        self.refining = f"refining: {' then '.join(passes)}"
        self.last: int | None = None
        self.in_refine = False

    def __call__(self, i: int, n: int) -> None:
        if not self.in_refine and self.last is not None and self.last >= self.steps and (i <= self.last or
                                                                                          n != self.steps):
            self.in_refine = True
        self.last = i
        self.report(i, n, self.refining if self.in_refine else self.DENOISING)


@user_errors
def render_event(shot_yaml: str, progress=None, manager=None, cancel: threading.Event | None = None,
                 **form) -> Rendered:
    """Render the form's shot (FORM names) to MP4, GIF, PNG frames (zip), the shot file and its sidecar, all in the
    output folder.

    progress(i, total, stage) is called after each denoising step (stage "denoising") and, when the shot refines,
    after each refinement step (stage "refining: ..."); setting `cancel` stops the render between steps.
    """
    from studio import export

    shot = render_ready(shot_yaml, **form)
    folder = output_dir()
    stem = _unique_stem(folder, shot.seed)
    out = folder / f"{stem}.mp4"
    frames_dir = folder / f"{stem}-frames"
    staged = StageProgress(progress, engine.prepare(shot)[0]) if progress is not None else None
    try:
        files = engine.render_to_files(shot, out, frames_dir=frames_dir, gif=folder / f"{stem}.gif",
                                       manager=manager, cancel=cancel, progress=staged)
    except engine.RenderCancelled:
        raise Cancelled("render cancelled; nothing was written") from None
    r = files.result
    frames_zip = shutil.make_archive(str(frames_dir), "zip", root_dir=frames_dir)
    first = export.write_png_frames(r.frames[:1], folder / f"{stem}-first")[0]
    shot_file = shotlib.save(r.shot, out.with_suffix(".yaml"))
    status = _status(r)
    t = r.timings
    entry = {"time": time.strftime("%H:%M:%S"), "prompt": r.shot.prompt, "model": r.preset.name, "seed": r.shot.seed,
             "frames": r.shot.frames, "size": f"{r.shot.width}×{r.shot.height}", "gamma": r.shot.noise_prior.gamma,
             "pan": f"{r.shot.camera.cx:+.2f}, {r.shot.camera.cy:+.2f}", "seconds": round(t["total"], 2),
             "video": str(out), "shot_file": str(shot_file), "shot_yaml": shotlib.dumps(r.shot),
             "identity": r.identity}
    keep_disk({out, files.sidecar, files.gif, Path(frames_zip), first, shot_file})
    logger.info("studio render %s: %s", out.name, status)
    return Rendered(video=str(out), gif=str(files.gif), frames_zip=frames_zip, sidecar=str(files.sidecar),
                    shot_file=str(shot_file), shot_yaml=entry["shot_yaml"], status=status, first_frame=str(first),
                    entry=entry, timings=dict(t))


@user_errors
def render_ready(shot_yaml: str, **form) -> shotlib.Shot:
    """The form's shot, when this caller may render it (trust: permission, names, caps); else UserError."""
    trust.current().require("render")
    return shot_from_form(shot_yaml, **form)


def _status(r) -> str:
    """One line on a finished render: size, model, seed, and where the time went; then one warning line when a control
    did not take (studio.measures.warnings: a pan below half the request, a subject mostly outside its box)."""
    t, s = r.timings, r.shot
    line = (f"{s.frames} frames {s.width}×{s.height} on {r.preset.name}, seed {s.seed}: {t['total']:.2f} s "
            f"(set-up {t['load'] + t.get('prepare', 0.0):.2f} s, denoising {t.get('denoise', 0.0):.2f} s")
    if "refine" in t:
        h, w = r.frames.shape[1:3]
        line += f", refining {t['refine']:.2f} s to {w}×{h}"
    line += ")"
    missed = measures.warnings(r.measures)
    return line + (f"\n\n**Warning:** {'; '.join(missed)}." if missed else "")


def history_rows(history: list[dict]) -> list[list]:
    """The session history as table rows (newest first), columns HISTORY_COLUMNS. "weights" says whether the files
    that made a render (model weights, subjects, reference images) are still the ones on disk."""
    rows = []
    for i, h in reversed(list(enumerate(history))):
        rows.append([i + 1, h["time"], h["prompt"], h["model"], h["seed"], h["frames"], h["size"], h["gamma"],
                     h["pan"], h["seconds"], weights_state(h)])
    return rows


def weights_state(entry: dict) -> str:
    """'as rendered', or 'changed: <what>' when a component, subject or input file is no longer the one that made
    the render (re-rendering it would not give the same video)."""
    from studio import identity

    recorded = entry.get("identity")
    if not recorded:
        return "not recorded"
    try:
        shot = shotlib.loads(entry.get("shot_yaml", ""))
    except shotlib.ShotError:
        shot = None
    changed = [what for what, _, _ in identity.differences(recorded, identity.on_disk(recorded, shot))]
    return "changed: " + ", ".join(changed) if changed else "as rendered"


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


MAX_STRIP_FRAMES = 24  # noise frames shown side by side under the γ slider


@user_errors
def gamma_preview_event(gamma: float, model: str | None = None, frames: int | None = None):
    """The prior's covariance as a heat map and a strip of sampled noise frames (uint8 images), over the latent frames
    the model gets: a model preset's (with its default frame count unless `frames` is given); without a model, 8
    frames of one latent each."""
    import cv2
    import numpy as np

    from studio import previews

    if gamma is None:
        raise UserError("noise_prior.gamma: no value given")
    # the shot's own validation of γ, on the smallest shot that has one
    engine.prepare(shotlib.Shot(prompt="noise preview", noise_prior=shotlib.NoisePrior(gamma=float(gamma))))
    frames, per_latent = _noise_frames(model, frames)
    cov, noise, _ = previews.noise(float(gamma), frames, per_latent, size=32, seed=0)  # (F', F'), (F', s, s)
    heat = cv2.applyColorMap((np.asarray(cov) * 255).astype(np.uint8), cv2.COLORMAP_VIRIDIS)[..., ::-1]
    heat = cv2.resize(heat, (160, 160), interpolation=cv2.INTER_NEAREST)
    noise = noise[:MAX_STRIP_FRAMES]  # the strip shows the first ones; the heat map all of them
    grey = np.repeat((noise[..., None] * 255).round().astype(np.uint8), 3, axis=-1)  # (F', size, size, 3)
    strip_ = strip(grey)
    strip_ = cv2.resize(strip_, (strip_.shape[1] * 2, strip_.shape[0] * 2), interpolation=cv2.INTER_NEAREST)
    return heat, strip_


def _noise_frames(model: str | None, frames) -> tuple[int, int]:
    """(video frames, video frames per latent frame) for the γ preview."""
    if not model:
        return int(frames or 8), 1
    from studio import families
    from studio.presets import load_model_preset

    p = load_model_preset(model)
    frames = int(round(float(frames))) if frames else p.defaults.frames
    return frames, families.get(p.family).temporal_factor(p)


@user_errors
def gamma_caption_event(gamma: float, model: str | None = None, frames: int | None = None) -> str:
    """One line under the γ preview: how γ reaches the model's latent frames."""
    from studio import previews

    frames, per_latent = _noise_frames(model, frames)
    return previews.noise_caption(float(gamma or 0.0), frames, per_latent)


def strip(frames):
    """(F, H, W, 3) -> (H, F·(W+2) − 2, 3): the frames side by side with white gaps."""
    import numpy as np

    gap = np.full((frames.shape[1], 2, 3), 255, np.uint8)
    return np.concatenate([x for f in frames for x in (f, gap)][:-1], 1)


def preview_gif(frames, fps: int = 4) -> str:
    """An animated GIF of preview frames in the output folder (named by content: the same preview is one file)."""
    from studio import export

    path = _subdir("previews") / f"{private_name(frames.tobytes() + str(frames.shape).encode())}.gif"
    if not path.exists():
        export.write_gif(frames, path, fps)
        keep_disk({path})
    return str(path)


@user_errors
def resolved(shot_yaml: str, **form) -> shotlib.Shot:
    """The form's shot with every default filled in (frames, size, step windows)."""
    return engine.prepare(shot_from_form(shot_yaml, **form))[0]


@user_errors
def camera_preview_event(shot_yaml: str, **form):
    """(animated GIF path, strip): the grid, a landmark and the boxes moving as the pan will move them."""
    from studio import previews

    shot = resolved(shot_yaml, **form)
    return preview_gif(previews.camera(shot, long_side=192)), strip(previews.camera(shot, long_side=96))
