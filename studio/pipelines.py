"""The pipeline manager: loads diffusers pipelines for model presets and keeps them, keyed by what determines them.

Every preset loads through `from_pretrained`: Hugging Face ids (SD 1.5 + an AnimateDiff motion adapter,
Zeroscope), folders the project ships (models/toyworld), and 'builtin:' random-weight models, which are built
once into the studio cache and then loaded from that folder like any other. A load that cannot find its
weights raises ModelLoadError naming the model id and how to provide it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from studio.presets import ModelPreset, resolve_local, scheduler_class

logger = logging.getLogger(__name__)

BUILTIN_MODELS = ("tiny", "tiny-wan")


class ModelLoadError(RuntimeError):
    """A model's weights could not be loaded; the message says which id and how to provide it."""


def studio_home() -> Path:
    """The studio's own folder (subject library, caches): SHOT_STUDIO_HOME or ~/.shot-studio."""
    return Path(os.environ.get("SHOT_STUDIO_HOME", Path.home() / ".shot-studio"))


def pick_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class PipelineKey:
    """Everything that determines a loaded pipeline (and nothing else: shot values never reload)."""

    family: str
    base: str
    motion_adapter: str | None
    revision: str | None
    variant: str | None
    dtype: str
    device: str
    scheduler: tuple
    scheduler_class: str | None
    # machine settings that change how the pipeline is built (studio.machine.MachineSettings)
    offload: str = "none"
    vae_tiling: bool = False
    vae_slicing: bool = False
    random_weights: tuple = ()  # (layout, width factor) of a random-weight build of the layout, else ()


def key_for(preset: ModelPreset, device: str, settings=None) -> PipelineKey:
    from studio.machine import MachineSettings, model_dtype

    settings = settings or MachineSettings()
    dtype = str(model_dtype(preset.dtype, settings, device, preset.family)).removeprefix("torch.")
    return PipelineKey(preset.family, resolve_local(preset.base), preset.motion_adapter, preset.revision,
                       preset.variant, dtype, device, tuple(sorted((k, repr(v)) for k, v in preset.scheduler.items())),
                       preset.scheduler_class, settings.offload, settings.vae_tiling, settings.vae_slicing,
                       random_key(preset))


def random_key(preset: ModelPreset) -> tuple:
    return (preset.layout or preset.name, float(preset.width_factor)) if preset.random_weights else ()


def build_scheduler(current, preset: ModelPreset):
    """The scheduler a preset asks for: its scheduler_class (or the current one's class) from the current config,
    with the preset's overrides; the current scheduler itself when the preset changes nothing."""
    cls = scheduler_class(preset) or type(current)
    if cls is type(current) and not preset.scheduler:
        return current
    return cls.from_config(current.config, **preset.scheduler)


def builtin_folder(name: str) -> Path:
    """The folder of a builtin random-weight model, built on first use."""
    if name not in BUILTIN_MODELS:
        raise ModelLoadError(f"unknown builtin model 'builtin:{name}' (known: {', '.join(BUILTIN_MODELS)})")
    import hashlib

    import diffusers

    if name == "tiny-wan":
        from studio.families import wan_build

        tag = wan_build.spec_tag(wan_build.TINY)

        def build(folder):
            wan_build.save_random_model(folder, wan_build.TINY, seed=0)
    else:
        from studio.toyworld.model import TINY_ARCH, save_random_model

        tag = hashlib.sha1(f"{TINY_ARCH!r} {diffusers.__version__}".encode()).hexdigest()[:10]

        def build(folder):
            save_random_model(folder, TINY_ARCH, seed=0)
    folder = studio_home() / "builtin" / f"{name}-{tag}"  # a new architecture or library gets a new folder
    if not (folder / "model_index.json").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        logger.info("building the random-weight '%s' model in %s", name, folder)
        build(folder)
    return folder


MAX_REASON_CHARS = 200  # of the library's own message quoted in a load error


def _is_path(ref: str) -> bool:
    return Path(ref).is_absolute() or ref.startswith(("./", "../", "~")) or Path(ref).exists()


def _how_to_provide(ref: str) -> str:
    if _is_path(ref):
        return f"the folder {ref} is missing or incomplete; rebuild or restore it"
    return (f"it is fetched from the Hugging Face hub on first use; without network, download it where you have one "
            f"(`hf download {ref}`) and point HF_HOME at that cache, or set the preset's id to a local folder")


def trim_words(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """The text cut to at most `limit` characters at a word boundary (mid-word only inside a word longer than half
    the limit), with '…' when something was cut."""
    if len(text) <= limit:
        return text
    cut = text[:limit - 1]
    if not text[limit - 1].isspace():
        head = cut.rsplit(" ", 1)[0] if " " in cut else ""
        if len(head) >= limit // 2:  # else one long word (a path): keep its start rather than lose it
            cut = head
    return cut.rstrip(" ,;:(") + "…"


def _load_error(preset: ModelPreset, ref: str, err: Exception) -> ModelLoadError:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ModelLoadError(f"model '{ref}' of preset '{preset.name}' could not be loaded ({trim_words(reason)}); "
                          f"{_how_to_provide(ref)}")


def _check_reference(preset: ModelPreset, ref: str) -> None:
    """A weight reference must be an existing folder or a well-formed hub id; refused here, before diffusers would
    raise a bare ValueError that cannot be told apart from a real fault."""
    if Path(ref).expanduser().is_dir():
        return
    if _is_path(ref):
        raise ModelLoadError(f"model '{ref}' of preset '{preset.name}' could not be loaded (not a folder); "
                             f"{_how_to_provide(ref)}")
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(ref)
    except HFValidationError:
        raise ModelLoadError(f"model '{ref}' of preset '{preset.name}' is neither a local folder nor a Hugging Face "
                             f"id (owner/name)") from None


def _is_missing_weights(e: Exception) -> bool:
    """Errors that mean the weights are not there (files, cache, network), as opposed to faults in loading them."""
    return isinstance(e, OSError) or type(e).__module__.startswith(("huggingface_hub", "requests", "httpx"))


def load_pipeline(preset: ModelPreset, device: str, settings=None):
    """Build the diffusers pipeline of a preset on a device (no caching here; see PipelineManager), with the machine
    settings' dtype, offload and VAE options (studio.machine; default: none of them).

    The one load path of every preset: the family (studio.families) names the pipeline class and loads its parts.
    """
    from studio import families, machine

    family = families.get(preset.family)
    settings = settings or machine.MachineSettings()
    scheduler_class(preset)  # a bad class name fails before any weights load
    dtype = machine.model_dtype(preset.dtype, settings, device, preset.family)
    if preset.random_weights:  # the layout's published configs with random weights, built once into the cache
        import dataclasses

        from studio import random_weights

        built = random_weights.build_folder(*random_key(preset))
        adapter = str(built / "motion_adapter") if preset.family == "animatediff" and preset.motion_adapter else None
        preset = dataclasses.replace(preset, base=str(built / "base"), motion_adapter=adapter, revision=None,
                                     variant=None)
    base = resolve_local(preset.base)
    if base.startswith("builtin:"):
        base = str(builtin_folder(base.removeprefix("builtin:")))
    kw = dict(dtype=dtype, revision=preset.revision, variant=preset.variant)
    for r in [resolve_local(r) for r in family.weight_refs(preset)] + [base]:
        _check_reference(preset, r)
    loading = [preset.base]  # the reference being loaded, for the error
    try:
        pipe = family.load(preset, base, kw, loading.append)
    except Exception as e:  # only missing weights become a ModelLoadError; any other fault keeps its traceback
        if _is_missing_weights(e):
            ref = loading[-1]
            raise _load_error(preset, base if ref == preset.base else ref, e) from None
        raise
    family.check_pipeline(pipe, preset)
    pipe.scheduler = build_scheduler(pipe.scheduler, preset)
    pipe.set_progress_bar_config(disable=True)
    # Inference only, and it must stay so: on the CPU torch's linear on a non-contiguous input takes another kernel
    # when the weight requires grad (results differ in the last bits), so a LoRA load (peft freezes the base weights)
    # would otherwise change every later plain render of Zeroscope's UNet3D (its proj_in). Training sets its own.
    for module in pipe.components.values():
        if hasattr(module, "requires_grad_"):
            module.requires_grad_(False)
    return machine.place(pipe, device, settings)


class PipelineManager:
    """Loaded pipelines by PipelineKey, least recently used evicted beyond `max_pipelines`.

    Thread-safe; one instance is shared by the CLI, the UI's tabs and the evaluation harness.
    """

    def __init__(self, max_pipelines: int = 2, device: str | None = None, settings=None):
        """settings: the machine settings (studio.machine; default: none, device auto), checked against this
        machine here (ValueError, one line); `device` overrides theirs. Their attention choice is applied
        process-wide now."""
        from studio import machine

        settings = settings or machine.MachineSettings()
        if device is not None:
            settings = settings.replace(device=device)
        self.settings = settings.checked()
        machine.apply_attention(self.settings)
        self.max_pipelines = max_pipelines
        self.device = self.settings.device
        self._cache: OrderedDict[PipelineKey, object] = OrderedDict()
        self._lock = threading.RLock()
        self.loads = 0  # how many pipelines were built (a cache hit builds none)

    def get(self, preset: ModelPreset):
        key = key_for(preset, self.device, self.settings)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            t0 = time.perf_counter()
            pipe = load_pipeline(preset, self.device, self.settings)
            from studio import identity

            identity.of_pipeline(pipe, preset.variant)  # hashed while the pipeline is as loaded (see identity)
            self.loads += 1
            logger.info("loaded %s (%s) in %.1f s", preset.name, key.base, time.perf_counter() - t0)
            pipe._studio_hold = threading.RLock()  # see hold()
            self._cache[key] = pipe
            while len(self._cache) > self.max_pipelines:
                old, _ = self._cache.popitem(last=False)
                logger.info("evicted %s", old.base)
            return pipe

    @contextmanager
    def hold(self, preset: ModelPreset):
        """The preset's pipeline, for this thread alone until the block ends.

        A render installs attention processors, hooks and adapter weights on the shared pipeline and restores them
        after; two renders on one pipeline at once would save and restore each other's state, so each holds it.
        Other pipelines stay free (the UI's queue already runs one GPU job at a time; the eval harness, tests and
        scripts sharing a manager across threads rely on this).
        """
        pipe = self.get(preset)
        with pipe._studio_hold:
            yield pipe

    def forget_subject(self, name: str) -> None:
        """Drop a subject's weights from every cached pipeline (after it was retrained or removed)."""
        from studio.subjects import apply

        with self._lock:
            pipes = list(self._cache.values())
        for pipe in pipes:
            with pipe._studio_hold:  # not in the middle of someone's render
                apply.forget(pipe, name)

    def loaded(self) -> list[PipelineKey]:
        with self._lock:
            return list(self._cache)

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()
