"""The shot file: the typed contract between the UI, the CLI and the engine.

A shot is YAML loaded through omegaconf structured configs over the dataclasses below, so unknown keys and
wrong types are rejected with the field's dotted name. Field names are a stable contract: add, never rename.
Fields left out take their defaults; frames, width, height, fps, steps and guidance_scale default to the
model preset's own values (`resolve`), and the resolved shot is what a render's sidecar records.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from studio import trust

DEFAULT_MODEL = "toyworld"  # the embedded model shipped in models/toyworld
# The shot-file format this studio reads and writes (shot files and sidecars carry it as `version`). A file without
# one is version 1; a newer one is refused, since its fields may mean what this studio cannot render.
SHOT_VERSION = 1


class ShotError(ValueError):
    """Invalid shot input; names the field (dotted path) and the offending value (unless `show_value` is False:
    a value that is not the user's own words, e.g. a key of a file that is not a shot file)."""

    def __init__(self, field: str, value: Any, problem: str, show_value: bool = True):
        self.field, self.value, self.problem = field, value, problem
        # one line, whatever the input held: a field name with control characters (a YAML key "a\nb") is quoted
        shown = field if str(field).isprintable() else repr(field)
        got = f" (got {value!r})" if show_value else ""
        super().__init__(f"{shown}: {' '.join(str(problem).splitlines())}{got}")


@dataclass
class NoisePrior:
    gamma: float = 0.0  # Cov(noise of frame i, noise of frame j) = gamma ** |i - j|; 0 = independent


@dataclass
class Camera:
    cx: float = 0.0  # fraction of the frame width the camera travels over the clip; > 0 pans right (content moves left)
    cy: float = 0.0  # same for the height; > 0 pans down (content moves up)
    # MotionBooth shifts the noisy latents during a window of early-middle steps (10..20 of 50).
    # None: 20% of the steps for both (MotionBooth); with a noise warp from 10% for 30% (CAMERA_WARP_WINDOW)
    start_step: Optional[int] = None  # first step of the shift window
    shift_steps: Optional[int] = None  # length of the window (at least 1)
    # ρ: the initial noise's fine band follows the camera path, frames k and j correlating as ρ^|k−j| along it
    # (studio/controls/noise_warp.py): n_k = ρ·shift(n_{k−1}) + sqrt(1 − ρ²)·eps_k, eps'_k = L·eps_k + H·n_k.
    noise_warp: Optional[float] = None  # None: CAMERA_NOISE_WARP when the shot pans, else 0 (no warp)
    warp_above: float = 2.0  # L keeps spatial frequencies up to this many cycles per frame each frame's own
    # The strip a shift vacates: row (MotionBooth: tokens of the same row outside the boxes) | fresh (the row's
    # level and fresh noise: the warped initial noise there when noise_warp > 0). None: fresh with a warp, else row.
    fill: Optional[str] = None


@dataclass
class Subject:
    phrase: str = MISSING  # the words of the prompt that name this subject
    subject: Optional[str] = None  # a tuned subject from the library, or None
    reference: Optional[str] = None  # a reference image for zero-shot injection, or None
    boxes: dict[int, list[float]] = field(default_factory=dict)  # frame index -> [x0, y0, x1, y1] in 0..1
    reference_strength: float = 1.0  # weight of the reference's tokens in self-attention (0 = off, 1 = plain)


@dataclass
class Background:
    reference: Optional[str] = None  # a background reference image, or None
    strength: float = 1.0  # weight of the background reference's tokens outside the subject boxes


@dataclass
class BoxControl:
    """Cross-attention editing (MotionBooth §1.2 / Direct-A-Video) for subjects with boxes."""

    strength: float = 10.0  # α: logit boost α·(1 − |box|/N) of a phrase's tokens inside its box (MotionBooth: 10)
    amplify_steps: Optional[int] = None  # steps, from the first, that amplify; None: 30% (MotionBooth: 15 of 50)
    # Which word tokens are suppressed outside where they belong, at every step:
    #   all_words: every word of the prompt (MotionBooth, Direct-A-Video): strongest control, the prompt's other
    #              words then reach the image only through the start/end tokens;
    #   subject_words: only the subjects' phrases outside their boxes: keeps prompt detail, weaker control.
    suppress: str = "all_words"
    interpolation: str = "linear"  # between keyframes: linear | smooth (ease in and out)


@dataclass
class ReferenceControl:
    """Zero-shot reference injection (VideoMaker §3.1/§3.3) for subjects' and the background's reference images."""

    # Whether the reference takes part in the motion modules' temporal attention as an extra frame (VideoMaker's
    # released code) or not (METHODS.md's advice: excluded, so the reference does not pull frames toward a still).
    temporal_attention: bool = False
    # Recompute the reference's tokens (a one-frame UNet pass) every this many steps and reuse them in between:
    # they change slowly with the timestep, and the pass is the reference's main cost (1 = every step). Wan: no
    # effect (the references ride in the render's own calls, their tokens are always the current step's).
    refresh_every: int = 4
    # Layers with more tokens than this see the reference average-pooled down to at most this many (cost; 0 < n).
    max_tokens: int = 64
    # And at most 1/token_ratio of a layer's own tokens (never below 16): bounds the cost on every layer (a 16×16
    # layer of 256 tokens reads 16 keys per reference); pooling to 16 keys carried colour better on the toy model.
    token_ratio: int = 16
    # What the unconditional videos of classifier-free guidance read: "blank" (a zero latent's tokens, VideoMaker's
    # zeros_like(z_ref), so guidance pushes toward the reference) or "plain" (no reference, as reference-only does).
    unconditional: str = "blank"


@dataclass
class FaceRefine:
    """Face VCD (Magic-Me, METHODS.md §2.3): each face track's crop re-denoised over all frames, pasted back."""

    enabled: bool = False
    strength: float = 0.8  # share of the schedule re-run on the crop (Magic-Me's workflow: denoise 0.8); 0 = off
    # Where the faces are: auto (OpenCV's Haar cascade, else YuNet when detector_model is given), haar, yunet
    # (cv2.FaceDetectorYN with its .onnx in detector_model), or boxes (the subjects' box tracks: refine a subject
    # region, on any model).
    detector: str = "auto"
    # A Haar cascade .xml or a YuNet .onnx: a file, or the name of one of refine.detector_models() (OpenCV's bundled
    # cascades, models/detectors; over the web only a name); None: OpenCV's bundled frontal-face cascade.
    detector_model: Optional[str] = None
    crop_factor: float = 2.0  # the crop is the face track's box grown by this factor (the workflow's crop_factor: 3)
    size: Optional[int] = None  # side of the square a crop is upscaled to; None: the model's default frame size
    feather: int = 5  # pixels of the paste mask's soft edge (the workflow's 5-px feather)
    steps: Optional[int] = None  # schedule length the strength is a share of; None: the shot's steps
    prompt: Optional[str] = None  # None: the shot's prompt (with its subjects' trigger words)


@dataclass
class TiledRefine:
    """Tiled VCD (Magic-Me, METHODS.md §2.3): upscale, re-denoise overlapping tiles at low strength, blend."""

    enabled: bool = False
    strength: float = 0.2  # share of the schedule re-run on each tile (the workflow's denoise 0.2); 0 = upscale only
    scale: int = 2  # output size = render size × scale
    upscaler: str = "cubic"  # OpenCV resampler for the upscale: cubic | lanczos | linear | nearest
    tile: Optional[int] = None  # tile side in output pixels; None: the model's default frame size
    overlap: Optional[int] = None  # pixels shared by neighbouring tiles, blended by ramps; None: 32 at a 512 tile, scaled (>= 8)
    steps: Optional[int] = None  # None: the shot's steps


@dataclass
class Refine:
    """Video-to-video passes after the render, in this order: face, then tiled."""

    face: FaceRefine = field(default_factory=FaceRefine)
    tiled: TiledRefine = field(default_factory=TiledRefine)


@dataclass
class Shot:
    version: int = SHOT_VERSION  # the shot-file format (see SHOT_VERSION)
    model: str = DEFAULT_MODEL  # a model preset: presets/models/<name>.yaml, or a path to such a file
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = 0
    frames: Optional[int] = None  # None: the model preset's default
    width: Optional[int] = None
    height: Optional[int] = None
    fps: Optional[int] = None
    steps: Optional[int] = None
    guidance_scale: Optional[float] = None
    noise_prior: NoisePrior = field(default_factory=NoisePrior)
    camera: Camera = field(default_factory=Camera)
    subjects: list[Subject] = field(default_factory=list)
    background: Background = field(default_factory=Background)
    box_control: BoxControl = field(default_factory=BoxControl)
    reference_control: ReferenceControl = field(default_factory=ReferenceControl)
    refine: Refine = field(default_factory=Refine)  # Face VCD / Tiled VCD after the render; off by default


PRESET_DEFAULTED = ("frames", "width", "height", "fps", "steps", "guidance_scale")
MAX_SUBJECTS = 4  # box control separates subjects by their phrases' tokens; past 4 boxes crowd a small latent
MAX_REFERENCE_BYTES = 20 * 2**20
MAX_REFERENCE_SIDE = 4096
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
REFERENCE_UNCONDITIONAL = ("blank", "plain")  # see ReferenceControl.unconditional
BOX_SUPPRESS = ("all_words", "subject_words")
BOX_INTERPOLATION = ("linear", "smooth")
CAMERA_FILLS = ("row", "fresh")  # see Camera.fill
CAMERA_NOISE_WARP = 0.9  # camera.noise_warp of a pan that does not set it (benchmarks/pan_hold.py, README)
# A warped pan's default shift window as fractions of the steps (start, length): from 10% for 30% (2..7 of 20)
CAMERA_WARP_WINDOW = (0.1, 0.3)
FACE_DETECTORS = ("auto", "haar", "yunet", "boxes")
UPSCALERS = ("cubic", "lanczos", "linear", "nearest")
MAX_REFINED_SIDE = 4096  # pixels a side of a tiled refine's output
FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")  # what an unknown key must look like to be quoted


# --- load / save -----------------------------------------------------------------------------------------


def _config_error(e: OmegaConfBaseException) -> ShotError:
    """Turn an omegaconf error into a ShotError naming the dotted field."""
    key = getattr(e, "full_key", None) or getattr(e, "key", None) or "shot"
    msg = getattr(e, "msg", None) or str(e)
    msg = msg.splitlines()[0]
    if isinstance(e, ConfigKeyError):
        name = str(key).rsplit(".", 1)[-1]
        if not re.fullmatch(r"[A-Za-z0-9_.\[\]]{1,200}", str(key)) or not FIELD_NAME.fullmatch(name):
            return _unknown_key("", key)  # not a field's name: never quoted
        return ShotError(str(key), name, "unknown field")
    value = getattr(e, "value", None)
    m = re.search(r"Value '(.*?)'", msg)
    if value is None and m:
        value = m.group(1)
    return ShotError(str(key), value, msg)


def from_container(data: Any, overrides: list[str] | None = None) -> Shot:
    """A Shot from a dict (or DictConfig) plus omegaconf dotted overrides ('noise_prior.gamma=0.3').

    Keyframe indices may be digit strings, as JSON writes them ({"0": [...]}), so a sidecar's shot loads back.
    Overrides apply to the loaded shot, so they reach list items too: 'subjects.0.phrase=star'.
    """
    if data is None:
        data = {}
    if isinstance(data, (DictConfig, ListConfig)):
        data = OmegaConf.to_container(data, resolve=False)
    if not isinstance(data, Mapping):
        raise ShotError("shot", type(data).__name__, "a shot file must be a mapping of fields")
    check_version(data.get("version"))
    data = _conform(data, Shot, "")
    _check_subject_items(data)
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Shot), data)
        for item in overrides or []:
            _apply_override(cfg, item)
        shot = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise _config_error(e) from None
    _check_subjects(shot)
    check_version(shot.version)  # an override may have set it
    trust.current().check_shot(shot)  # over the web: only names of presets, uploads, library subjects, detectors
    return shot


def check_version(version) -> None:
    """Refuse a shot-file format this studio does not know (None: a file from before versions, read as 1)."""
    if version is None:
        return
    if isinstance(version, bool) or not isinstance(version, int):
        if isinstance(version, str) and re.fullmatch(r"\s*\d+\s*", version):
            return check_version(int(version))
        raise ShotError("version", version, f"the shot-file format version is a whole number ({SHOT_VERSION})")
    if version > SHOT_VERSION:
        raise ShotError("version", version, f"this shot file is format version {version}, newer than this Shot "
                                            f"Studio reads (up to {SHOT_VERSION}): upgrade Shot Studio to render it")
    if version < 1:
        raise ShotError("version", version, f"shot-file format versions start at 1 (this studio: {SHOT_VERSION})")


# --- container kinds against the schema (omegaconf reports these without the key) -------------------------

_SCALAR_NAMES = {str: "string", int: "whole number", float: "number", bool: "true or false"}


def _hints(cls) -> dict[str, Any]:
    return get_type_hints(cls)


def _unwrap_optional(tp):
    if get_origin(tp) is Union:
        args = [a for a in get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _join(where: str, key) -> str:
    return f"{where}.{key}" if where else str(key)


def _kind(value) -> str:
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, bool):
        return "true/false"
    return "a number" if isinstance(value, (int, float)) else "a string" if isinstance(value, str) else "a value"


def _conform(value, tp, where: str):
    """Check that `value` has the container kind the schema type `tp` asks for, naming the dotted key.

    Returns the value with keyframe keys (dict[int, ...]) turned into ints where they are digit strings.
    Unknown fields are refused here (quoted only when they look like a field name); scalar types are left to
    omegaconf, which names them itself. Strings holding an omegaconf interpolation ("${...}") are refused: a shot
    file is data, and a resolver could read the environment.
    """
    tp = _unwrap_optional(tp)
    if value is None:
        return value
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            if tp is Subject:
                raise ShotError(where, value, "each subject must be a mapping with a phrase")
            fields = ", ".join(f.name for f in dataclasses.fields(tp))
            raise ShotError(where, value, f"must be a mapping of fields ({fields}), not {_kind(value)}")
        hints = _hints(tp)
        for k in value:
            if k not in hints:
                raise _unknown_key(where, k)
        return {k: _conform(v, hints[k], _join(where, k)) for k, v in value.items()}
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ShotError(where, value, f"must be a list, not {_kind(value)}")
        (item,) = get_args(tp)
        return [_conform(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_type, value_type = get_args(tp)
        if not isinstance(value, Mapping):
            raise ShotError(where, value, f"must be a mapping (frame index -> [x0, y0, x1, y1]), not {_kind(value)}")
        out: dict = {}
        for k, v in value.items():
            key = _dict_key(k, key_type, where)
            if key in out:
                raise ShotError(_join(where, key), k, "the same keyframe is given twice")
            out[key] = _conform(v, value_type, _join(where, key))
        return out
    if isinstance(value, (Mapping, list, tuple)):
        raise ShotError(where, value, f"must be a {_SCALAR_NAMES.get(tp, 'single value')}, not {_kind(value)}")
    if isinstance(value, str) and "${" in value:  # omegaconf would resolve it: ${oc.env:...} reads the environment
        raise ShotError(where, value, "interpolations (${...}) are not allowed in a shot file: write the value itself")
    return value


def _unknown_key(where: str, key) -> ShotError:
    """An unknown field, named when it looks like a field name; a key that does not (a line of a file that is not a
    shot file, say) is never quoted."""
    if isinstance(key, str) and FIELD_NAME.fullmatch(key):
        return ShotError(_join(where, key), key, "unknown field")
    return ShotError(where or "shot", None, "a key that is not a field name (not a shot file?)", show_value=False)


def _dict_key(key, key_type, where: str):
    """A mapping key as the schema's key type: JSON's '3' is keyframe 3."""
    if key_type is int:
        if isinstance(key, int) and not isinstance(key, bool):
            return key
        if isinstance(key, str) and re.fullmatch(r"\s*-?\d+\s*", key):
            return int(key)
        raise ShotError(_join(where, key), key, "a keyframe index must be a whole number (a frame index)")
    return key


def _apply_override(cfg: DictConfig, item: str) -> None:
    """Apply one 'dotted.key=value' to the loaded shot; list items by index ('subjects.0.phrase=star')."""
    if "=" not in item:
        raise ShotError("--set", item, "an override must look like key=value, e.g. noise_prior.gamma=0.3")
    key, text = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ShotError("--set", item, "the key must be a dotted field name, e.g. noise_prior.gamma")
    try:
        value = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={text}"]), resolve=False)["v"]
    except OmegaConfBaseException:
        raise
    except Exception as e:  # the YAML parser's errors ('seed=[1,2' leaves a list open)
        raise ShotError("--set", item, f"the value is {_yaml_problem(e)}") from None
    node, tp, where = cfg, Shot, ""
    for i, part in enumerate(parts):
        k, tp, name = _child(node, tp, part, where)
        if i == len(parts) - 1:
            break
        node, where = node[k], name
        if not isinstance(node, (DictConfig, ListConfig)):
            raise ShotError(_join(name, parts[i + 1]), parts[i + 1], f"{name} is a single value, it has no fields")
    value = _conform(value, tp, name)
    current = node[k] if (isinstance(node, ListConfig) or k in node) else None
    if isinstance(value, dict) and isinstance(current, DictConfig):
        value = OmegaConf.merge(current, value)  # a mapping given to a mapping field sets the keys it names
    elif isinstance(value, list):
        value = _typed_items(value, _unwrap_optional(tp), name)
    node[k] = value


def _typed_items(value: list, tp, where: str) -> list:
    """Items of a list given whole by an override (subjects=[{phrase: x}]) as typed configs, errors named."""
    item = _unwrap_optional(get_args(tp)[0]) if get_origin(tp) is list else None
    if not dataclasses.is_dataclass(item):
        return value
    out = []
    for i, v in enumerate(value):
        try:
            out.append(OmegaConf.merge(OmegaConf.structured(item), v))
        except OmegaConfBaseException as e:
            err = _config_error(e)
            raise ShotError(f"{where}[{i}].{err.field}", err.value, err.problem) from None
    return out


def _child(node, tp, part: str, where: str):
    """(key into node, schema type, dotted name) of one step of an override's key."""
    tp = _unwrap_optional(tp)
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        hints = _hints(tp)
        if part not in hints:
            raise ShotError(_join(where, part), part, "unknown field")
        return part, hints[part], _join(where, part)
    if origin is list:
        if not re.fullmatch(r"\d+", part):
            raise ShotError(_join(where, part), part, f"{where} is a list: give an item's index, e.g. {where}.0")
        i = int(part)
        if i >= len(node):
            raise ShotError(f"{where}[{i}]", i, f"{where} has {len(node)} item(s): --set changes an existing one, "
                                                f"add new ones in the shot file")
        return i, get_args(tp)[0], f"{where}[{i}]"
    if origin is dict:
        key = _dict_key(part, get_args(tp)[0], where)
        return key, get_args(tp)[1], _join(where, key)
    raise ShotError(_join(where, part), part, f"{where} is a single value, it has no fields")


def _check_subject_items(data) -> None:
    """Merge each subject on its own first, so an error inside one names it: subjects[1].boxes.first."""
    items = data.get("subjects") if hasattr(data, "get") else None
    if not isinstance(items, (list, ListConfig)):
        return
    for i, item in enumerate(items):
        if not isinstance(item, (dict, DictConfig)):
            raise ShotError(f"subjects[{i}]", item, "each subject must be a mapping with a phrase")
        try:
            OmegaConf.merge(OmegaConf.structured(Subject), item)
        except OmegaConfBaseException as e:
            err = _config_error(e)
            raise ShotError(f"subjects[{i}].{err.field}", err.value, err.problem) from None


def _check_subjects(shot: Shot) -> None:
    for i, s in enumerate(shot.subjects):
        if not isinstance(s, Subject):
            raise ShotError(f"subjects[{i}]", s, "each subject must be a mapping with a phrase")


def load(path: str | Path, overrides: list[str] | None = None) -> Shot:
    """Load a shot YAML file; any problem is a ShotError naming the field."""
    path = Path(path)
    if not path_is_file(path):
        raise ShotError("shot", str(path), "shot file not found")
    try:
        data = OmegaConf.load(path)
    except Exception as e:  # YAML syntax errors come in several types; their text quotes the file: never shown
        raise ShotError("shot", str(path), _yaml_problem(e, quote=False)) from None
    return from_container(data, overrides)


def yaml_position(e: Exception) -> str:
    """' (line L, column C)' of a YAML error, where it says; never the file's text."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    return f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""


def loads(text: str, overrides: list[str] | None = None, where: str = "shot") -> Shot:
    """A shot from YAML text (the UI's shot editor); an empty text is the default shot."""
    try:
        data = OmegaConf.create(text or "{}")
    except Exception as e:
        raise ShotError(where, (text or "").strip()[:40], _yaml_problem(e)) from None
    if isinstance(data, ListConfig):
        raise ShotError(where, "a list", "a shot file must be a mapping of fields")
    return from_container(data, overrides)


def _yaml_problem(e: Exception, quote: bool = True) -> str:
    """One line for YAML omegaconf could not load (its parsers' errors span lines; some have no message). quote:
    the parser's own first line (it may quote the text: only for text the caller sent), else only the position."""
    lines = str(e).strip().splitlines()
    if not lines or str(e).startswith("Invalid loaded object type"):  # a lone value ("3"): omegaconf asserts
        return "a shot file must be a mapping of fields, not a single value"
    return f"not valid YAML: {lines[0]}" if quote else f"not valid YAML{yaml_position(e)}"


def path_is_file(path: str | Path) -> bool:
    """Whether a path names a file; False, rather than an OSError, for names the system refuses (too long, NUL)."""
    try:
        return Path(path).is_file()
    except (OSError, ValueError):
        return False


def to_dict(shot: Shot) -> dict:
    """Plain, YAML/JSON-ready dict of a shot (keyframe indices stay ints)."""
    return OmegaConf.to_container(OmegaConf.structured(shot), resolve=True)


def dumps(shot: Shot) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(shot))


def save(shot: Shot, path: str | Path) -> Path:
    """Write a shot as YAML atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(dumps(shot))
    tmp.replace(path)
    return path


# --- resolution and validation against a model preset ----------------------------------------------------


def resolve(shot: Shot, preset) -> Shot:
    """A copy of the shot with every preset-defaulted field filled in, validated against the preset.

    `preset` is a `studio.presets.ModelPreset`. Raises ShotError naming the first bad field.
    """
    out = copy.deepcopy(shot)
    for name in PRESET_DEFAULTED:
        if getattr(out, name) is None:
            setattr(out, name, getattr(preset.defaults, name))
    if isinstance(out.steps, int) and out.steps >= 1:  # step windows default to the methods' fractions
        if out.box_control.amplify_steps is None:
            out.box_control.amplify_steps = round(0.3 * out.steps)
    _resolve_camera(out.camera, preset)
    if isinstance(out.steps, int) and out.steps >= 1:
        # MotionBooth's window (from 20% of the steps, for 20%); a warped pan's starts earlier and lasts longer
        # (CAMERA_WARP_WINDOW, measured with benchmarks/pan_hold.py)
        c = out.camera
        start, length = CAMERA_WARP_WINDOW if c.noise_warp and (c.cx or c.cy) else (0.2, 0.2)
        if out.camera.start_step is None:
            out.camera.start_step = min(out.steps - 1, round(start * out.steps))
        if out.camera.shift_steps is None:
            out.camera.shift_steps = max(1, min(out.steps - out.camera.start_step, round(length * out.steps)))
    validate(out, preset)
    return out


def _resolve_camera(c: Camera, preset) -> None:
    """A pan warps its initial noise and fills with fresh noise unless the shot says otherwise (issue 22: the pan
    then holds per render), where the preset's family and scheduler allow it (a preset that keeps its model's own
    scheduler is assumed to; one that does not is refused at render, naming both); a shot without a pan, or on a
    model the warp does not support, resolves to no warp (MotionBooth's shift alone)."""
    from studio.controls.noise_warp import unsupported

    if c.noise_warp is None:
        c.noise_warp = CAMERA_NOISE_WARP if (c.cx or c.cy) and not unsupported(preset.family,
                                                                               preset.scheduler_class) else 0.0
    if c.fill is None:
        c.fill = "fresh" if c.noise_warp else "row"


def _check_range(field: str, value, lo: int, hi: int) -> None:
    """ShotError naming the field unless lo <= value <= hi."""
    if not lo <= value <= hi:
        raise ShotError(field, value, f"must be in {lo}..{hi}")


def validate(shot: Shot, preset) -> None:
    """Check a resolved shot's values against each other and the model preset."""
    trust.current().check_shot(shot)  # a shot built in code, not parsed, is checked too before any file is read
    if not shot.prompt.strip():
        raise ShotError("prompt", shot.prompt, "the prompt must not be empty")
    if shot.seed < 0 or shot.seed >= 2**63:
        raise ShotError("seed", shot.seed, "the seed must be in 0..2**63-1")
    _validate_frames_and_size(shot, preset)
    _check_range("fps", shot.fps, 1, 120)
    _check_range("steps", shot.steps, 1, 1000)
    _check_range("guidance_scale", shot.guidance_scale, 0, 50)
    g = shot.noise_prior.gamma
    if not 0.0 <= g < 1.0:
        raise ShotError("noise_prior.gamma", g, "must be in [0, 1): gamma = 1 would repeat one noise frame")
    for name in ("cx", "cy"):
        v = getattr(shot.camera, name)
        if not -1.0 <= v <= 1.0:  # the fraction of the frame travelled over the clip
            raise ShotError(f"camera.{name}", v, f"the camera would travel more than the frame over the clip, so "
                            f"the clip would leave the first frame's view entirely; the largest valid value is "
                            f"{1.0 if v > 0 else -1.0}")
    c = shot.camera
    if c.fill not in CAMERA_FILLS:
        raise ShotError("camera.fill", c.fill, f"must be one of {', '.join(CAMERA_FILLS)}")
    if not 0.0 <= c.noise_warp <= 1.0:
        raise ShotError("camera.noise_warp", c.noise_warp, "must be in 0..1 (the correlation of consecutive "
                        "frames' fine noise along the camera path)")
    if not 0.0 <= c.warp_above <= 64.0:
        raise ShotError("camera.warp_above", c.warp_above, "must be in 0..64 (cycles per frame)")
    if c.noise_warp and (c.cx or c.cy):
        from studio.controls.noise_warp import unsupported

        why = unsupported(preset.family, preset.scheduler_class)  # the model's own scheduler is checked at render
        if why:
            raise ShotError("camera.noise_warp", c.noise_warp, why)
    if c.start_step is not None and not 0 <= c.start_step < shot.steps:
        raise ShotError("camera.start_step", c.start_step, f"must be in 0..{shot.steps - 1} (steps - 1)")
    if c.shift_steps is not None and not 1 <= c.shift_steps <= shot.steps - (c.start_step or 0):
        raise ShotError("camera.shift_steps", c.shift_steps,
                        f"must be in 1..{shot.steps - (c.start_step or 0)} (the steps left after camera.start_step)")
    b = shot.box_control
    _check_range("box_control.strength", b.strength, 0, 100)
    if b.amplify_steps is not None and not 0 <= b.amplify_steps <= shot.steps:
        raise ShotError("box_control.amplify_steps", b.amplify_steps, f"must be in 0..{shot.steps} (steps)")
    if b.suppress not in BOX_SUPPRESS:
        raise ShotError("box_control.suppress", b.suppress, f"must be one of {', '.join(BOX_SUPPRESS)}")
    if b.interpolation not in BOX_INTERPOLATION:
        raise ShotError("box_control.interpolation", b.interpolation,
                        f"must be one of {', '.join(BOX_INTERPOLATION)}")
    rc = shot.reference_control
    _check_range("reference_control.refresh_every", rc.refresh_every, 1, 1000)
    _check_range("reference_control.max_tokens", rc.max_tokens, 1, 4096)
    _check_range("reference_control.token_ratio", rc.token_ratio, 1, 4096)
    if rc.unconditional not in REFERENCE_UNCONDITIONAL:
        raise ShotError("reference_control.unconditional", rc.unconditional,
                        f"must be one of {', '.join(REFERENCE_UNCONDITIONAL)}")
    if len(shot.subjects) > MAX_SUBJECTS:
        raise ShotError("subjects", len(shot.subjects), f"at most {MAX_SUBJECTS} subjects per shot")
    for i, s in enumerate(shot.subjects):
        _validate_subject(s, f"subjects[{i}]", shot)
    _validate_shared_phrases(shot)
    if shot.background.reference is not None:
        validate_image_file(shot.background.reference, "background.reference")
    _check_range("background.strength", shot.background.strength, 0, 10)
    _validate_refine(shot, preset)
    from studio import families

    families.get(preset.family).check_shot(shot, preset)  # settings the model's family does not take (yet)
    trust.current().check_work(shot, preset)  # over the web: the operator's caps


def _nearest(values: list[int]) -> str:
    return f"nearest valid: {' or '.join(map(str, values))}"


def _validate_frames_and_size(shot: Shot, preset) -> None:
    """frames by the preset's range and frame rule, width and height by its size_multiple and max_size; the message
    names the nearest valid values."""
    from studio.presets import nearest_frames, nearest_sizes, valid_frames

    lo, hi = preset.min_frames, preset.max_frames
    if not valid_frames(preset, shot.frames):
        step, offset = preset.frame_step, preset.frame_offset
        counts = f"{lo}..{hi} frames" if step == 1 else f"{step}k+{offset} frames ({lo}..{hi})"
        raise ShotError("frames", shot.frames, f"model '{preset.name}' renders {counts}; "
                                               f"{_nearest(nearest_frames(preset, shot.frames))}")
    for name in ("width", "height"):
        v = getattr(shot, name)
        m = preset.size_multiple
        if v <= 0 or v % m:
            raise ShotError(name, v, f"must be a positive multiple of {m} for model '{preset.name}'; "
                                     f"{_nearest(nearest_sizes(preset, v))}")
        if v > preset.max_size:
            raise ShotError(name, v, f"model '{preset.name}' renders at most {preset.max_size} pixels; "
                                     f"{_nearest(nearest_sizes(preset, v))}")


def find_phrase(phrase: str, prompt: str) -> re.Match | None:
    """The first place the phrase's words appear together in the prompt (case-insensitive, whole words)."""
    words = phrase.split()
    if not words:
        return None
    return re.search(_phrase_pattern(words), prompt, flags=re.IGNORECASE)


def _phrase_pattern(words: list[str]) -> str:
    return r"\b" + r"\s+".join(re.escape(w) for w in words) + r"\b"


def phrase_in_prompt(phrase: str, prompt: str) -> bool:
    """Whether the phrase's words appear together in the prompt (case-insensitive, whole words)."""
    return find_phrase(phrase, prompt) is not None


def _validate_shared_phrases(shot: Shot) -> None:
    """Each subject with boxes needs an occurrence of its phrase no other subject takes.

    The word-level twin of box control's token assignment (controls.boxes.assign_phrases), checked here so that a
    shot short of occurrences ("a red circle", two subjects on "red circle") is refused before any model loads:
    longer phrases choose first, each the first whole-word occurrence no earlier choice overlaps.
    """
    claimed: set[int] = set()  # character positions of the prompt taken by a subject
    order = sorted(range(len(shot.subjects)), key=lambda k: (-len(shot.subjects[k].phrase.split()), k))
    for k in order:
        s = shot.subjects[k]
        spans = [range(m.start(), m.end())
                 for m in re.finditer(_phrase_pattern(s.phrase.split()), shot.prompt, flags=re.IGNORECASE)]
        free = [r for r in spans if not claimed.intersection(r)]
        if free:
            claimed.update(free[0])
        elif s.boxes:
            raise ShotError(f"subjects[{k}].phrase", s.phrase,
                            f"the prompt holds it {len(spans)} time(s) and other subjects take every one; each "
                            "subject with boxes needs an occurrence of its own (repeat the words in the prompt)")


def _validate_subject(s: Subject, where: str, shot: Shot) -> None:
    if not s.phrase.strip():
        raise ShotError(f"{where}.phrase", s.phrase, "the phrase must name the subject in the prompt")
    if not phrase_in_prompt(s.phrase, shot.prompt):
        raise ShotError(f"{where}.phrase", s.phrase, f"the phrase is not in the prompt {shot.prompt!r}")
    for name in ("subject", "reference"):
        v = getattr(s, name)
        if v is not None and not str(v).strip():
            raise ShotError(f"{where}.{name}", v, "must be null or non-empty")
    if s.reference is not None:
        validate_image_file(s.reference, f"{where}.reference")
    _check_range(f"{where}.reference_strength", s.reference_strength, 0, 10)
    for f, box in s.boxes.items():
        key = f"{where}.boxes.{f}"
        if not 0 <= f < shot.frames:
            raise ShotError(key, f, f"keyframe index must be in 0..{shot.frames - 1}")
        if len(box) != 4:
            raise ShotError(key, list(box), "a box is [x0, y0, x1, y1]")
        x0, y0, x1, y1 = box
        if not all(0.0 <= v <= 1.0 for v in box):
            raise ShotError(key, list(box), "box coordinates are normalised to 0..1")
        if x1 <= x0:
            raise ShotError(key, list(box), "x1 must be greater than x0")
        if y1 <= y0:
            raise ShotError(key, list(box), "y1 must be greater than y0")


def validate_image_file(path: str, where: str) -> None:
    """A reference must be an existing, readable image of sane size (checked without decoding all pixels)."""
    p = Path(path)
    if not path_is_file(p):
        raise ShotError(where, path, "image file not found")
    if p.suffix.lower() not in IMAGE_SUFFIXES:
        raise ShotError(where, path, f"must be an image ({', '.join(IMAGE_SUFFIXES)})")
    size = p.stat().st_size
    if size > MAX_REFERENCE_BYTES:
        raise ShotError(where, path, f"image file is {size / 2**20:.0f} MB; at most {MAX_REFERENCE_BYTES // 2**20} MB")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(p) as im:
            w, h = im.size
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ShotError(where, path, f"not a readable image ({type(e).__name__})") from None
    if max(w, h) > MAX_REFERENCE_SIDE:
        raise ShotError(where, path, f"image is {w}x{h}; at most {MAX_REFERENCE_SIDE} pixels a side")


def _validate_refine(shot: Shot, preset) -> None:
    """refine.face / refine.tiled settings (checked whether or not enabled, so a saved shot stays valid)."""
    f, t = shot.refine.face, shot.refine.tiled
    for where, r in (("refine.face", f), ("refine.tiled", t)):
        if not 0.0 <= r.strength <= 1.0:
            raise ShotError(f"{where}.strength", r.strength, "must be in 0..1 (share of the schedule re-run)")
        if r.steps is not None and not 1 <= r.steps <= 1000:
            raise ShotError(f"{where}.steps", r.steps, "must be in 1..1000 or null (the shot's steps)")
    if f.detector not in FACE_DETECTORS:
        raise ShotError("refine.face.detector", f.detector, f"must be one of {', '.join(FACE_DETECTORS)}")
    if f.detector_model is not None:
        from studio.refine import detector_model_path

        if detector_model_path(f.detector_model) is None:
            raise ShotError("refine.face.detector_model", f.detector_model,
                            "file not found, nor a detector model's name (refine.detector_models)")
    _check_range("refine.face.crop_factor", f.crop_factor, 1, 8)
    if not 0 <= f.feather <= 64:
        raise ShotError("refine.face.feather", f.feather, "must be in 0..64 pixels")
    m = preset.size_multiple
    if f.size is not None and (f.size <= 0 or f.size % m or f.size > preset.max_size):
        raise ShotError("refine.face.size", f.size,
                        f"must be a positive multiple of {m}, at most {preset.max_size}, for model '{preset.name}'")
    if f.prompt is not None and not f.prompt.strip():
        raise ShotError("refine.face.prompt", f.prompt, "must be null (the shot's prompt) or non-empty")
    _check_range("refine.tiled.scale", t.scale, 1, 4)
    if max(shot.width, shot.height) * t.scale > MAX_REFINED_SIDE:
        raise ShotError("refine.tiled.scale", t.scale,
                        f"{shot.width}x{shot.height} x {t.scale} exceeds {MAX_REFINED_SIDE} pixels a side")
    if t.upscaler not in UPSCALERS:
        raise ShotError("refine.tiled.upscaler", t.upscaler, f"must be one of {', '.join(UPSCALERS)}")
    if t.tile is not None and (t.tile <= 0 or t.tile % m or t.tile > preset.max_size):
        raise ShotError("refine.tiled.tile", t.tile,
                        f"must be a positive multiple of {m}, at most {preset.max_size}, for model '{preset.name}'")
    tile = t.tile or min(preset.defaults.width, preset.defaults.height)
    if t.overlap is not None and not 0 <= t.overlap <= tile // 2:
        raise ShotError("refine.tiled.overlap", t.overlap, f"must be in 0..{tile // 2} (half the tile of {tile})")
