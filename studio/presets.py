"""Model presets and shot presets: YAML data under presets/, typed by the dataclasses here.

A model preset says which pipeline family to build, where its weights come from (Hugging Face ids, a local
folder, or a model the studio builds itself) and the model's native shot defaults. Presets are merged over
these dataclasses with omegaconf, so unknown keys and wrong types are errors.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from studio import trust
from studio.shot import ShotError, path_is_file, yaml_position


def presets_root() -> Path:
    """presets/ of the checkout (or SHOT_STUDIO_PRESETS)."""
    env = os.environ.get("SHOT_STUDIO_PRESETS")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "presets"


def models_root() -> Path:
    """models/ of the checkout (or SHOT_STUDIO_MODELS): weights the project ships."""
    env = os.environ.get("SHOT_STUDIO_MODELS")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "models"


@dataclass
class ShotDefaults:
    frames: int = 16
    width: int = 512
    height: int = 512
    fps: int = 8
    steps: int = 25
    guidance_scale: float = 7.5


@dataclass
class ModelPreset:
    name: str = MISSING
    description: str = ""
    family: str = "animatediff"  # animatediff | zeroscope | wan: the model family (studio.families), its pipeline
    # Where weights come from: a Hugging Face id, a local folder ('models/...' is relative to the checkout),
    # or 'builtin:<name>' for a random-weight model the studio builds in code (tests, plumbing).
    base: str = MISSING
    motion_adapter: Optional[str] = None  # animatediff only: a Hugging Face id or folder of a MotionAdapter
    revision: Optional[str] = None
    variant: Optional[str] = None  # e.g. fp16 weights files on the hub
    dtype: str = "auto"  # auto (fp16 on CUDA, fp32 on CPU) | float16 | bfloat16 | float32
    # The diffusers scheduler class to run, by name (e.g. DDIMScheduler), built from the base repo's scheduler
    # config; None keeps the class the base repo ships (SD 1.5 ships PNDMScheduler).
    scheduler_class: Optional[str] = None
    scheduler: dict = field(default_factory=dict)  # config overrides for that scheduler, from the model card
    defaults: ShotDefaults = field(default_factory=ShotDefaults)
    size_multiple: int = 8
    max_size: int = 1024
    min_frames: int = 1
    max_frames: int = 32
    # Frame rule: valid frame counts are frame_offset + k * frame_step (in min_frames..max_frames). The UNet
    # families take any count (1, 0); Wan's causal VAE takes 4k + 1 (4, 1): frame 0, then 4 frames per latent frame.
    frame_step: int = 1
    frame_offset: int = 0
    # Expected peak accelerator memory of a render at the defaults (e.g. "18.5 GB on an H100, bf16"), or
    # "not measured" until a GPU measures it.
    peak_memory: str = ""
    # Random weights of the preset's exact layout instead of its weights: the published configs under
    # presets/configs/<layout>/ built with a seeded initialisation (studio/random_weights.py), for tests and
    # benchmarks at a real size without a download. `studio render --random-weights` sets it.
    random_weights: bool = False
    width_factor: float = 1.0  # with random_weights: channel widths × this (heads and depths kept), e.g. 0.125
    layout: Optional[str] = None  # the folder of presets/configs/ with the configs; None: the preset's name


def _families() -> tuple[str, ...]:
    from studio.families import NAMES

    return NAMES


FAMILIES = _families()


def _load_yaml(path: Path, schema, what: str, value: str):
    """A preset file typed by `schema`; any problem is one line naming `what` and `value` (what the user gave) and
    the field, never the file's text (a path given as a preset may be any file)."""
    try:
        data = OmegaConf.load(path)
    except Exception as e:  # YAML errors (which quote the file), undecodable bytes, ...
        raise ShotError(what, value, f"not a preset YAML (not valid YAML{yaml_position(e)})") from None
    if not isinstance(data, DictConfig):
        raise ShotError(what, value, "not a preset YAML (a preset is a mapping of fields)")
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), data))
    except OmegaConfBaseException as e:
        key = str(getattr(e, "full_key", "") or "")
        field = f" {key!r}" if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]{0,100}", key) else ""
        problem = "unknown field" if isinstance(e, ConfigKeyError) else "field with a wrong value or type"
        raise ShotError(what, value, f"not a preset YAML ({problem}{field})") from None


def load_model_preset(model: str) -> ModelPreset:
    """A model preset by name (presets/models/<name>.yaml) or by path to such a file (not over the web: there only
    the names studio.trust allows)."""
    trust.current().check_model(model)
    p = Path(model)
    if model.endswith((".yaml", ".yml")) or path_is_file(p):
        path = p
    else:
        path = presets_root() / "models" / f"{model}.yaml"
    if not path_is_file(path):
        known = ", ".join(list_model_presets()) or "none"
        raise ShotError("model", model, f"no such model preset (known: {known}; or give a path to a preset YAML)")
    preset = _load_yaml(path, ModelPreset, "model", model)
    if preset.family not in FAMILIES:
        raise ShotError("model", model, f"not a preset YAML (its family must be one of {', '.join(FAMILIES)})")
    _check_frame_rule(preset, model)
    if preset.scheduler_class is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", preset.scheduler_class):
        raise ShotError("model", model, "not a preset YAML (its scheduler_class must be a diffusers class name "
                                        "such as DDIMScheduler)")
    if preset.width_factor != 1 and not preset.random_weights:
        raise ShotError("model", model, f"width_factor {preset.width_factor:g} only applies with random_weights: true")
    if preset.random_weights:
        preset = with_random_weights(preset, preset.width_factor, field="width_factor", switch="random_weights")
    return preset


def valid_frames(preset: ModelPreset, frames: int) -> bool:
    """Whether the preset renders that many frames (its range and frame rule)."""
    return (preset.min_frames <= frames <= preset.max_frames
            and (frames - preset.frame_offset) % preset.frame_step == 0)


def nearest_frames(preset: ModelPreset, frames: int) -> list[int]:
    """The valid frame counts nearest to `frames`: one, or the two either side of it."""
    lo, hi, step = preset.min_frames, preset.max_frames, preset.frame_step
    first = lo + (preset.frame_offset - lo) % step  # the smallest valid count
    last = first + (hi - first) // step * step  # the largest
    if frames <= first:
        return [first]
    if frames >= last:
        return [last]
    below = first + (frames - first) // step * step
    return [below] if below == frames else [below, below + step]


def nearest_sizes(preset: ModelPreset, size: int) -> list[int]:
    """The valid widths/heights nearest to `size` (positive multiples of size_multiple up to max_size)."""
    m = preset.size_multiple
    last = preset.max_size // m * m
    if size <= m:
        return [m]
    if size >= last:
        return [last]
    below = size // m * m
    return [below] if below == size else [below, below + m]


def _check_frame_rule(preset: ModelPreset, model: str) -> None:
    if preset.frame_step < 1 or not 0 <= preset.frame_offset < preset.frame_step:
        raise ShotError("model", model, f"frame_step must be >= 1 and frame_offset in 0..frame_step-1, not "
                                        f"{preset.frame_step} and {preset.frame_offset}")
    if not any(valid_frames(preset, f) for f in range(preset.min_frames, preset.max_frames + 1)):
        raise ShotError("model", model, f"no frame count in {preset.min_frames}..{preset.max_frames} is "
                                        f"{preset.frame_offset} + k·{preset.frame_step} (the frame rule)")


def with_random_weights(preset: ModelPreset, width_factor: float | None = None, field: str = "--width-factor",
                        switch: str = "--random-weights") -> ModelPreset:
    """The preset with random weights of its layout at `width_factor` (default: the preset's). ShotError naming
    `field` for a factor that breaks the layout, and naming `switch` for a preset without published configs (or whose
    motion adapter the configs lack), before anything is built."""
    import dataclasses

    from studio import random_weights

    factor = preset.width_factor if width_factor is None else width_factor
    layout = preset.layout or preset.name
    random_weights.check(layout, factor, field, switch)
    adapter = preset.family == "animatediff" and preset.motion_adapter
    if adapter and not random_weights.has_repo(layout, "motion_adapter"):
        raise ShotError(switch, preset.name, f"the configs of layout '{layout}' have no motion_adapter/, "
                                                       f"which this preset loads")
    return dataclasses.replace(preset, random_weights=True, width_factor=float(factor))


def scheduler_class(preset: ModelPreset):
    """The diffusers scheduler class a preset names (None: keep the base repo's). ShotError if it names none.

    Imports diffusers (and torch), so it is checked when a pipeline is built, before any weights load.
    """
    if preset.scheduler_class is None:
        return None
    import diffusers

    cls = getattr(diffusers, preset.scheduler_class, None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        known = ", ".join(n for n in ("DDIMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler",
                                      "PNDMScheduler") if hasattr(diffusers, n))
        raise ShotError("model", preset.name, f"scheduler_class {preset.scheduler_class!r} is not a diffusers "
                                              f"scheduler (e.g. {known})")
    return cls


def list_model_presets() -> list[str]:
    return sorted(p.stem for p in (presets_root() / "models").glob("*.yaml"))


def list_shot_presets() -> list[str]:
    return sorted(p.stem for p in (presets_root() / "shots").glob("*.yaml"))


def shot_preset_path(name: str) -> Path:
    return presets_root() / "shots" / f"{name}.yaml"


def resolve_local(ref: str) -> str:
    """A preset's weight reference: 'models/...' and './...' paths resolve against the checkout."""
    if ref.startswith("models/"):
        return str(models_root() / ref[len("models/"):])
    return ref
