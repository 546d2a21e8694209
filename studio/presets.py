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

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from studio.shot import ShotError


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
    family: str = "animatediff"  # animatediff | zeroscope: which diffusers pipeline class runs it
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
    # Random weights of the preset's exact layout instead of its weights: the published configs under
    # presets/configs/<layout>/ built with a seeded initialisation (studio/random_weights.py), for tests and
    # benchmarks at a real size without a download. `studio render --random-weights` sets it.
    random_weights: bool = False
    width_factor: float = 1.0  # with random_weights: channel widths × this (heads and depths kept), e.g. 0.125
    layout: Optional[str] = None  # the folder of presets/configs/ with the configs; None: the preset's name


FAMILIES = ("animatediff", "zeroscope")


def _load_yaml(path: Path, schema, what: str):
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.load(path))
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or ""
        raise ShotError(what, str(path), f"invalid preset field {key!r}: {str(e).splitlines()[0]}") from None


def load_model_preset(model: str) -> ModelPreset:
    """A model preset by name (presets/models/<name>.yaml) or by path to such a file."""
    p = Path(model)
    if model.endswith((".yaml", ".yml")) or p.is_file():
        path = p
    else:
        path = presets_root() / "models" / f"{model}.yaml"
    if not path.is_file():
        known = ", ".join(list_model_presets()) or "none"
        raise ShotError("model", model, f"no such model preset (known: {known}; or give a path to a preset YAML)")
    preset = _load_yaml(path, ModelPreset, "model")
    if preset.family not in FAMILIES:
        raise ShotError("model", model, f"preset family must be one of {FAMILIES}, not {preset.family!r}")
    if preset.scheduler_class is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", preset.scheduler_class):
        raise ShotError("model", model, f"scheduler_class must be a diffusers class name such as DDIMScheduler, "
                                        f"not {preset.scheduler_class!r}")
    if preset.width_factor != 1 and not preset.random_weights:
        raise ShotError("model", model, f"width_factor {preset.width_factor:g} only applies with random_weights: true")
    if preset.random_weights:
        preset = with_random_weights(preset, preset.width_factor, field="width_factor", switch="random_weights")
    return preset


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
