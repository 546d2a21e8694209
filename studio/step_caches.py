"""Step caches: diffusers' own caches for diffusion transformers, as a machine setting.

A step cache skips part of the denoiser's work on some steps and reuses (or extrapolates) what an earlier step
computed. It changes pixels a little and speed a lot, like a dtype: it is a machine setting, not a shot field.
Set it with `studio render|batch --step-cache NAME` or the SHOT_STUDIO_STEP_CACHE environment variable (the flag
sets the variable for its process); every sidecar records it under settings.step_cache (studio.machine.RECORDED).
NAME is one of CACHES, optionally with parameters: `first_block:threshold=0.1`, `taylorseer:cache_interval=3`.

    first_block          FirstBlockCacheConfig: the first block's residual decides whether blocks 2..n run or their
                         last residual is reused (threshold: relative change, default 0.05)
    pyramid_broadcast    PyramidAttentionBroadcastConfig: attn1 outputs reused every other call, attn2 outputs for
                         3 of 4 calls, between timesteps 100 and 800 (spatial_skip, cross_skip)
    taylorseer           TaylorSeerCacheConfig: attention outputs predicted by a first-order Taylor series between
                         full computations every cache_interval steps (default 5), after warmup steps (3)
    sea                  SeaCacheConfig: the block stack's residual reused while a spectral indicator of the input
                         changes less than threshold (0.25); Wan T2V supported by diffusers itself
    mag                  MagCacheConfig: the block stack's residual reused while the accumulated magnitude-ratio
                         error stays under threshold (0.06); the ratios are calibrated here, once per pipeline,
                         steps and latent size, on a fixed calibration shot (`mag_ratios`)
    faster               FasterCacheConfig: refused on Wan (named so that asking for it gets the reason): it
                         approximates the unconditional branch from the conditional half of one batched call, and
                         Wan runs guidance as two calls

Where they run: the wan family (its transformer is what these caches were written for; the UNet families' denoisers
have no block list they hook): on the other families a render runs uncached, logs it, and records step_cache: none. Every cache keeps its state per denoiser call (the pipeline's cache_context "cond" /
"uncond"); diffusers' pyramid attention broadcast keeps one state for both halves of Wan's two-call guidance (the
unconditional call would reuse the conditional call's attention), so here each half gets its own (`_PerCallStates`).

The cache is enabled for the text-to-video denoising loop of one render and removed after it (the pipeline is the
same before and after: not part of the pipeline manager's key); refinement passes (WanVideoToVideoPipeline, which
sets no cache context) run uncached.

With the directing controls (refused at validation, naming the control and the cache, when they clash):
- box trajectories (attn2, conditional call) and references (attn1, appended reference frames): every cache reuses
  or extrapolates outputs that were computed with the edit, per guidance half: the effect is kept;
- camera pan: a reused residual or attention output from before a latent shift would put unshifted content back.
  The caches with a step knob are held off (every step computed) until two steps after the pan's window
  (`hold_until`: taylorseer's warmup, sea's retention steps, mag's retention ratio, pyramid_broadcast's timestep
  range); first_block decides by a residual threshold with no step knob and is refused with a pan.

Shapes: B videos, C channels, F' latent frames, h×w latent size.
"""

from __future__ import annotations

import logging
import os
import re
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

ENV = "SHOT_STUDIO_STEP_CACHE"
NONE = "none"
FAMILIES = ("wan",)  # where the caches run


@dataclass(frozen=True)
class CacheKind:
    """One step cache: its parameters (name -> default) and what it cannot run with."""

    name: str
    params: dict = field(default_factory=dict)
    refuses: dict = field(default_factory=dict)  # what it cannot run with ("camera", "family") -> why


CACHES: dict[str, CacheKind] = {k.name: k for k in (
    CacheKind("first_block", {"threshold": 0.05}, refuses={
        "camera": "it decides by a residual threshold with no step window, so it may add a residual of unshifted "
                  "content to the pan's shifted latents"}),
    CacheKind("pyramid_broadcast", {"spatial_skip": 2, "cross_skip": 4, "low": 100, "high": 800}),
    CacheKind("taylorseer", {"cache_interval": 5, "warmup": 3, "max_order": 1}),
    CacheKind("sea", {"threshold": 0.25, "retention_steps": 1}),
    CacheKind("mag", {"threshold": 0.06, "max_skip_steps": 3, "retention_ratio": 0.2}),
    CacheKind("faster", {}, refuses={
        "family": "it approximates the unconditional branch from the conditional half of one batched call, and "
                  "Wan runs guidance as two separate calls"}),
)}
NAMES = (NONE, *CACHES)


@dataclass(frozen=True)
class Setting:
    """A parsed step-cache setting: the cache and its parameters (defaults filled in)."""

    name: str
    params: tuple = ()  # ((key, value), ...) sorted

    @property
    def label(self) -> str:
        """What the sidecar records: `none`, or `name(key=value, ...)` with every parameter."""
        if self.name == NONE:
            return NONE
        return f"{self.name}(" + ", ".join(f"{k}={v}" for k, v in self.params) + ")"

    @property
    def kind(self) -> CacheKind | None:
        return CACHES.get(self.name)

    def get(self, key: str):
        return dict(self.params)[key]


def parse(text: str | None, where: str = ENV) -> Setting:
    """`none`, `NAME` or `NAME:key=value,key=value` -> Setting (ValueError naming `where` and the known names)."""
    text = (text or NONE).strip()
    name, _, rest = text.partition(":")
    name = name.strip().lower().replace("-", "_")
    if name in ("", NONE):
        if rest.strip():
            raise ValueError(f"{where}: 'none' takes no parameters (got {text!r})")
        return Setting(NONE)
    if name not in CACHES:
        raise ValueError(f"{where}: unknown step cache {name!r}; known: {', '.join(NAMES)} (got {text!r})")
    kind = CACHES[name]
    params = dict(kind.params)
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in params:
            known = ", ".join(params) or "none"
            raise ValueError(f"{where}: step cache {name!r} takes key=value parameters among: {known} (got {item!r})")
        params[key] = _number(value.strip(), type(kind.params[key]), f"{where}: {name}.{key}")
    return Setting(name, tuple(sorted(params.items())))


def _number(text: str, kind: type, where: str):
    try:
        value = kind(text) if kind is float else int(text)
    except ValueError:
        raise ValueError(f"{where} must be {'a number' if kind is float else 'a whole number'} (got {text!r})") \
            from None
    if value < 0 or not re.fullmatch(r"[0-9.eE+-]+", text):
        raise ValueError(f"{where} must be a number >= 0 (got {text!r})")
    return value


def configured() -> Setting:
    """The machine's step cache: SHOT_STUDIO_STEP_CACHE (`none` when unset)."""
    return parse(os.environ.get(ENV))


def in_effect(pipe) -> Setting:
    """The step cache a render on `pipe` runs with: the configured one on the families the caches run on, none on
    the others (their denoisers have no block list the caches hook; logged when a render runs uncached so)."""
    from studio import families

    setting = configured()
    return setting if families.of(pipe).name in FAMILIES else Setting(NONE)


def recorded(pipe) -> str:
    """The sidecar's settings.step_cache (studio.machine.RECORDED): the label of the cache in effect."""
    return in_effect(pipe).label


# --- validation ---------------------------------------------------------------------------------------------


def check(shot, preset, setting: Setting | None = None) -> None:
    """Refuse a shot the configured step cache cannot render (ShotError naming the shot's setting and the cache)."""
    from studio.shot import ShotError

    setting = configured() if setting is None else setting
    if setting.name == NONE or preset.family not in FAMILIES:
        return
    how = f"the step cache {setting.name!r} ({ENV} / --step-cache)"
    refuses = setting.kind.refuses
    if "family" in refuses:
        others = ", ".join(n for n, k in CACHES.items() if "family" not in k.refuses)
        raise ShotError("model", preset.name, f"{how} does not run on the {preset.family} family: "
                                              f"{refuses['family']}; valid here: {others} or none")
    if "camera" in refuses:
        for axis in ("cx", "cy"):
            if getattr(shot.camera, axis):
                others = ", ".join(n for n, k in CACHES.items() if not k.refuses)
                raise ShotError(f"camera.{axis}", getattr(shot.camera, axis),
                                f"camera pan cannot run with {how}: {refuses['camera']}; valid with this cache: 0, "
                                f"or another step cache ({others}) or none")


def hold_until(shot) -> int:
    """The first step a cache may skip: two steps after the camera window (0 without a pan)."""
    c = shot.camera
    if not (c.cx or c.cy):
        return 0
    return c.start_step + c.shift_steps + 1


# --- building and installing ----------------------------------------------------------------------------------


def build_config(setting: Setting, pipe, shot, hold: int = 0):
    """diffusers' cache config for a render of `shot` on `pipe`, held off (every step computed) before step `hold`."""
    import diffusers

    p = dict(setting.params)
    steps = shot.steps
    if setting.name == "first_block":
        return diffusers.FirstBlockCacheConfig(threshold=float(p["threshold"]))
    if setting.name == "pyramid_broadcast":
        high = float(p["high"])
        if hold:
            times = future_timesteps(pipe.scheduler, steps)
            high = min(high, times[min(hold, steps) - 1])  # skip only at t < the timestep of step hold − 1
        return diffusers.PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=int(p["spatial_skip"]) or None,
            cross_attention_block_skip_range=int(p["cross_skip"]) or None,
            spatial_attention_timestep_skip_range=(float(p["low"]), high),
            cross_attention_timestep_skip_range=(float(p["low"]), high),
            current_timestep_callback=lambda: _timestep(pipe))
    if setting.name == "taylorseer":
        from studio import families

        # diffusers' default patterns (^blocks.*attn, matched whole) miss Wan's attn1 / attn2: name them
        return diffusers.TaylorSeerCacheConfig(cache_interval=max(1, int(p["cache_interval"])),
                                               disable_cache_before_step=max(int(p["warmup"]), hold),
                                               max_order=int(p["max_order"]),
                                               taylor_factors_dtype=families.denoiser(pipe).dtype,
                                               cache_identifiers=[r"blocks\.\d+\.attn[12]"])
    if setting.name == "sea":
        return diffusers.SeaCacheConfig(threshold=float(p["threshold"]),
                                        retention_steps=max(int(p["retention_steps"]), hold))
    if setting.name == "mag":
        ratio = max(float(p["retention_ratio"]), hold / steps)
        return diffusers.MagCacheConfig(threshold=float(p["threshold"]), max_skip_steps=int(p["max_skip_steps"]),
                                        retention_ratio=ratio, num_inference_steps=steps,
                                        mag_ratios=mag_ratios(pipe, shot))
    raise ValueError(f"step cache {setting.name!r} cannot be built for this model")


def _timestep(pipe) -> float:
    t = pipe.current_timestep
    return float(t.flatten()[0]) if hasattr(t, "flatten") else float(t if t is not None else -1)


def future_timesteps(scheduler, steps: int) -> list[float]:
    """The timesteps a render of `steps` steps will run, from a copy of the scheduler (the pipeline's own is set by
    the pipeline call)."""
    copy = type(scheduler).from_config(scheduler.config)
    copy.set_timesteps(steps)
    return [float(t) for t in copy.timesteps]


@contextmanager
def enabled(pipe, shot, setting: Setting | None = None, stats: dict | None = None):
    """The step cache on the pipeline's denoiser for the block (one render's denoising loop), removed after.
    stats, when given, gets what the cache did: attention layers computed and skipped (a skipped block or a reused
    attention output never calls its attention's query projection)."""
    from studio import families

    setting = in_effect(pipe) if setting is None else setting
    if setting.name == NONE:
        if configured().name != NONE:
            logger.warning("step cache %s: not on the %s family; this render runs uncached", configured().name,
                           families.of(pipe).name)
        yield
        return

    denoiser = families.denoiser(pipe)
    config = build_config(setting, pipe, shot, hold_until(shot))
    denoiser.enable_cache(config)
    extra = _PerCallStates.install(denoiser) if setting.name == "pyramid_broadcast" else None
    counted = _count_attention(denoiser) if stats is not None else None
    try:
        yield
    finally:
        if extra is not None:
            extra.remove(denoiser)
        denoiser.disable_cache()
        if counted is not None:
            handles, calls = counted
            for h in handles:
                h.remove()
            stats.update(step_cache=setting.label, attention_computed=calls["computed"],
                         attention_calls=calls["denoiser"] * calls["layers"])


def _count_attention(denoiser):
    """Forward hooks counting attention computations (query projections) and denoiser calls."""
    calls = {"computed": 0, "denoiser": 0, "layers": 0}
    handles = []
    for name, module in denoiser.named_modules():
        if name.endswith((".attn1", ".attn2")) and hasattr(module, "to_q"):
            calls["layers"] += 1
            handles.append(module.to_q.register_forward_hook(lambda *a: calls.__setitem__("computed",
                                                                                          calls["computed"] + 1)))
    handles.append(denoiser.register_forward_pre_hook(lambda *a: calls.__setitem__("denoiser",
                                                                                   calls["denoiser"] + 1)))
    return handles, calls


class _PerCallStates:
    """Pyramid attention broadcast's state kept per denoiser call (cond / uncond), as the other caches keep theirs.

    diffusers' PyramidAttentionBroadcastHook holds one `state` (cached output, iteration) per attention layer for
    every call; with Wan's two calls per step the unconditional call would reuse the conditional call's attention.
    A hook on the transformer, stateful like diffusers' own cache hooks so the pipeline's cache_context names its
    calls, swaps each layer's state for that call's before the blocks run."""

    NAME = "studio_pab_per_call"

    def __init__(self, hooks: list):
        from diffusers.hooks.hooks import BaseState, ModelHook, StateManager

        layer_hooks = hooks

        class States(BaseState):
            def __init__(self):
                from diffusers.hooks.pyramid_attention_broadcast import PyramidAttentionBroadcastState

                self.by_layer = {id(h): PyramidAttentionBroadcastState() for h in layer_hooks}

            def reset(self):
                for s in self.by_layer.values():
                    s.reset()

        class Swap(ModelHook):
            _is_stateful = True

            def __init__(self):
                super().__init__()
                self.state_manager = StateManager(States)

            def pre_forward(self, module, *args, **kwargs):
                if self.state_manager._context is not None:
                    states = self.state_manager.get_state()
                    for h in layer_hooks:
                        h.state = states.by_layer[id(h)]
                return args, kwargs

            def reset_state(self, module):
                self.state_manager.reset()
                return module

        self.hook = Swap()

    @classmethod
    def install(cls, denoiser) -> "_PerCallStates":
        from diffusers.hooks import HookRegistry
        from diffusers.hooks.pyramid_attention_broadcast import _PYRAMID_ATTENTION_BROADCAST_HOOK

        hooks = [m._diffusers_hook.get_hook(_PYRAMID_ATTENTION_BROADCAST_HOOK) for m in denoiser.modules()
                 if hasattr(m, "_diffusers_hook") and m._diffusers_hook.get_hook(_PYRAMID_ATTENTION_BROADCAST_HOOK)]
        self = cls(hooks)
        registry = HookRegistry.check_if_exists_or_initialize(denoiser)
        registry.register_hook(self.hook, cls.NAME)
        registry.invalidate_child_registries_cache()
        return self

    def remove(self, denoiser) -> None:
        from diffusers.hooks import HookRegistry

        registry = HookRegistry.check_if_exists_or_initialize(denoiser)
        registry.remove_hook(self.NAME, recurse=False)
        registry.invalidate_child_registries_cache()


# --- MagCache's magnitude ratios ------------------------------------------------------------------------------

_MAG_RATIOS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # denoiser -> {(steps, shape): ratios}
CALIBRATION_PROMPT = "a calibration shot: a landscape with a subject in the middle"


def mag_ratios(pipe, shot) -> list[float]:
    """MagCache's per-step magnitude ratios for this pipeline at the shot's steps, frames and size: the mean ratio of
    the block stack's residual norms of consecutive steps (MagCache's calibration), measured on the conditional
    calls of one uncached render of a fixed calibration shot (CALIBRATION_PROMPT, seed 0, the shot's guidance).
    Calibrated once per pipeline, steps and size, and kept with the pipeline: deterministic, so renders with the
    cache reproduce."""
    from studio import families

    denoiser = families.denoiser(pipe)
    key = (shot.steps, shot.frames, shot.width, shot.height, float(shot.guidance_scale))
    kept = _MAG_RATIOS.setdefault(denoiser, {})
    if key not in kept:
        kept[key] = _calibrate(pipe, denoiser, shot)
    return list(kept[key])


def _calibrate(pipe, denoiser, shot) -> list[float]:
    import torch

    blocks = denoiser.blocks
    seen: dict[str, Any] = {"calls": 0, "input": None, "previous": None}
    ratios: list[float] = []

    def head(module, args, kwargs):
        seen["input"] = args[0] if args else kwargs["hidden_states"]

    def tail(module, args, kwargs, output):
        residual = (output[0] if isinstance(output, tuple) else output) - seen["input"]
        if seen["calls"] % 2 == 0 or shot.guidance_scale <= 1.0:  # the conditional calls
            prev = seen["previous"]
            ratios.append(1.0 if prev is None else float(
                (residual.float().norm(dim=-1) / (prev.float().norm(dim=-1) + 1e-8)).mean()))
            seen["previous"] = residual.detach()
        seen["calls"] += 1

    handles = [blocks[0].register_forward_pre_hook(head, with_kwargs=True),
               blocks[-1].register_forward_hook(tail, with_kwargs=True)]
    try:
        with torch.inference_mode():
            pipe(prompt=CALIBRATION_PROMPT, num_frames=shot.frames, height=shot.height, width=shot.width,
                 num_inference_steps=shot.steps, guidance_scale=shot.guidance_scale,
                 generator=torch.Generator("cpu").manual_seed(0), output_type="latent")
    finally:
        for h in handles:
            h.remove()
    logger.info("MagCache ratios calibrated for %d steps: %s", shot.steps, [round(r, 4) for r in ratios])
    return ratios


def describe() -> list[tuple[str, str]]:
    """(name, parameters with defaults) for every cache, for --help texts."""
    return [(n, ", ".join(f"{k}={v}" for k, v in k.params.items())) for n, k in CACHES.items()]


__all__ = ["CACHES", "ENV", "NAMES", "NONE", "Setting", "check", "configured", "enabled", "hold_until", "parse",
           "recorded"]
