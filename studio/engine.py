"""The engine: shot -> frames -> files. The one composer of a render.

    render(shot)          resolve the preset, fetch the cached pipeline, build the initial noise, denoise,
                          return uint8 frames (F, H, W, 3) and what the sidecar needs
    render_to_files(...)  the same, then MP4 (+ GIF, PNG frames) and the JSON sidecar, all or nothing
                          (output paths checked before rendering; previous files intact on failure)
    write_outputs(result)  the writing half of render_to_files, for a render made elsewhere (studio batch)

Shapes: B=1 video, C latent channels, F frames, h×w latent size, H×W pixels.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from studio import families, refine, shot as shotlib
from studio.controls import compose, noise_prior, noise_warp
from studio.controls.base import applied, step_end_chain
from studio.pipelines import PipelineManager
from studio.presets import ModelPreset, load_model_preset

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (steps done, total steps)

_default_manager: PipelineManager | None = None
_default_lock = threading.Lock()


def default_manager() -> PipelineManager:
    """The process-wide pipeline manager (created on first use, never at import), with the machine settings of the
    environment (SHOT_STUDIO_DEVICE, _DTYPE, _OFFLOAD, ...: studio.machine.ENV)."""
    global _default_manager
    with _default_lock:
        if _default_manager is None:
            from studio import machine

            _default_manager = PipelineManager(settings=machine.from_env())
        return _default_manager


class RenderCancelled(RuntimeError):
    """The render was cancelled between denoising steps."""


@dataclass
class RenderResult:
    frames: np.ndarray  # (F, H, W, 3) uint8
    shot: shotlib.Shot  # the resolved shot: every default filled in
    preset: ModelPreset
    timings: dict[str, float] = field(default_factory=dict)  # seconds
    info: dict = field(default_factory=dict)  # device, dtype, pipeline class, latent shape
    identity: dict = field(default_factory=dict)  # weights and inputs by content hash (studio.identity)
    settings: dict = field(default_factory=dict)  # pixel-changing machine settings (studio.machine)
    measures: dict = field(default_factory=dict)  # what the controls achieved (studio.measures; sidecar `measures`)

    def sidecar(self) -> dict:
        """Everything needed to reproduce this video: the shot, the model by name and by content hash, the machine
        settings that change pixels, and the frames' own hash (what `studio render --verify` compares)."""
        from studio.export import package_versions

        p = self.preset
        return {
            "version": shotlib.SHOT_VERSION,
            "shot": shotlib.to_dict(self.shot),
            "seed": self.shot.seed,
            "model": {"preset": p.name, "family": p.family, "base": p.base, "motion_adapter": p.motion_adapter,
                      "revision": p.revision, "variant": p.variant, "scheduler_class": p.scheduler_class,
                      "scheduler": dict(p.scheduler), "random_weights": p.random_weights,
                      "width_factor": p.width_factor, "layout": p.layout},
            "render": self.info,
            "identity": self.identity,
            "settings": self.settings,
            "frames": frames_record(self.frames),
            "timings": self.timings,
            "versions": package_versions(),
            "measures": self.measures,
        }


def frames_record(frames: np.ndarray) -> dict:
    """The frames' shape and SHA-256 of their uint8 bytes: equal hashes are identical videos, before encoding."""
    import hashlib

    frames = np.ascontiguousarray(frames, dtype=np.uint8)
    return {"shape": list(frames.shape), "sha256": hashlib.sha256(frames.tobytes()).hexdigest()}


def input_files(shot: shotlib.Shot) -> dict[str, str]:
    """{shot field: path} of the files a shot names that change pixels (reference images, a face detector)."""
    named = {f"subjects[{i}].reference": s.reference for i, s in enumerate(shot.subjects)}
    named["background.reference"] = shot.background.reference
    if shot.refine.face.enabled:
        named["refine.face.detector_model"] = shot.refine.face.detector_model
    return {k: v for k, v in named.items() if v}


def prepare(shot: shotlib.Shot, preset: ModelPreset | None = None) -> tuple[shotlib.Shot, ModelPreset]:
    """Validate a shot at the boundary: load its model preset and resolve defaults (ShotError if bad).

    preset: the shot's model preset as the caller changed it (e.g. `presets.with_random_weights`), instead of the
    one `shot.model` names; it must have that preset's name."""
    if preset is None:
        preset = load_model_preset(shot.model)
    elif preset.name != load_model_preset(shot.model).name:
        raise shotlib.ShotError("model", shot.model, f"the shot's model is not the preset given ({preset.name})")
    shot = shotlib.resolve(shot, preset)
    refine.check(shot)
    from studio import step_caches

    step_caches.check(shot, preset)  # the machine's step cache against the shot's controls
    return shot, preset


def render(shot: shotlib.Shot, manager: PipelineManager | None = None, progress: Progress | None = None,
           cancel: threading.Event | None = None, preset: ModelPreset | None = None) -> RenderResult:
    """Render a shot to frames. Reproducible bit for bit on the same machine for the same shot (and preset: see
    `prepare`)."""
    from studio.subjects import apply as subjects

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    # 1. Validate and resolve the shot against its model preset; its trained subjects against the library (before
    #    any weights load: a subject of another base model must not cost a model load first).
    shot, preset = prepare(shot, preset)
    plan, records = subjects.plan(shot, preset)
    # 2. Fetch the pipeline (cached by what determines it) and hold it: a render installs controls and adapters on
    #    it, so two renders on one pipeline at once would restore each other's state.
    manager = manager or default_manager()
    with manager.hold(preset) as pipe:
        return _render_on(pipe, shot, preset, plan, records, manager, progress, cancel, timings, t0)


def _render_on(pipe, shot: shotlib.Shot, preset: ModelPreset, plan, records: list, manager: PipelineManager,
               progress: Progress | None, cancel: threading.Event | None, timings: dict, t0: float) -> RenderResult:
    """Steps 2b-7 of `render` on a pipeline this thread holds."""
    import torch

    from studio import machine
    from studio.subjects import apply as subjects

    # 2a. What exactly renders: the components by content hash (hashed once per pipeline, before any subject's
    #     adapter is added), each subject's files and the shot's input files (cached by size and mtime).
    ident = render_identity(pipe, shot, preset, records)
    # 2b. Trained subjects: their words go into the prompt and phrases, their weights into the pipeline (loaded
    #     once per pipeline, then switched by adapter weights).
    if records:
        with machine.offload_paused(pipe):  # weights where peft can see them (sequential offload keeps none)
            subjects.load(pipe, records)
    timings["load"] = time.perf_counter() - t0
    # 3. Initial noise from the 3D Gaussian prior over the model's latent frames, drawn on the CPU from the shot's
    #    seed. The family says the latent layout (B, C, F', h, w) and when each latent frame stands in video time.
    t1 = time.perf_counter()
    family = families.get(preset.family)
    denoiser = family.denoiser(pipe)
    shape = family.latent_shape(pipe, shot.frames, shot.height, shot.width)  # (B, C, F', h, w)
    generator = torch.Generator("cpu").manual_seed(shot.seed)
    prior = latent_prior(shot, family, family.temporal_factor(pipe))
    latents = noise_prior.sample(shape, shot.noise_prior.gamma, generator, times=prior["times"])
    latents = noise_warp.for_shot(shot, preset.family, pipe.scheduler, latents, generator)  # along the pan
    latents = latents.to(machine.execution_device(pipe), family.latent_dtype(pipe))
    # 4. Controls the shot asks for (boxes, camera, references): built and checked before any denoising.
    ctx = compose.context(plan.shot, shape[3], shape[4])
    ctx.latent_frames, ctx.cfg_batched = shape[2], family.cfg_batched
    ctx.temporal = family.temporal_factor(pipe)
    controls = compose.build(plan.shot, pipe, ctx, preset.name, plan.adapters)
    regional = any(c.name == subjects.RegionalLora.name for c in controls)
    chain = step_end_chain(ctx, controls)
    latents = chain(-1, latents)  # edits due before the first step
    timings["prepare"] = time.perf_counter() - t1
    # 5. Denoise, reporting progress and honouring cancellation between steps.
    t2 = time.perf_counter()
    step_cb = _step_callback(shot.steps, progress, cancel, chain)

    def check_cancel():
        if cancel is not None and cancel.is_set():
            raise RenderCancelled("render cancelled")

    kwargs = dict(prompt=plan.shot.prompt, negative_prompt=shot.negative_prompt or None, num_frames=shot.frames,
                  height=shot.height, width=shot.width, num_inference_steps=shot.steps,
                  guidance_scale=shot.guidance_scale, latents=latents, generator=generator, output_type="np")
    kwargs.update(family.call_kwargs(pipe, step_cb, check_cancel))
    from studio import step_caches

    cache_stats: dict = {}
    with torch.inference_mode(), step_caches.enabled(pipe, shot, stats=cache_stats), \
            subjects.activated(pipe, plan.adapters, regional), applied(pipe, controls, ctx):
        out = pipe(**kwargs).frames
    check_cancel()
    timings["denoise"] = time.perf_counter() - t2
    # 6. Frames to uint8.
    video = np.asarray(out[0] if len(out) == 1 else out)  # (F, H, W, 3) float in 0..1
    frames = (np.clip(video, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    info = {"device": str(machine.execution_device(pipe)), "dtype": str(denoiser.dtype).removeprefix("torch."),
            "pipeline": type(pipe).__name__, "latent_shape": list(shape), "pipeline_loads": manager.loads,
            "controls": [c.name for c in controls], "noise_prior": prior, "machine": machine.notes(pipe)}
    if cache_stats:  # the step cache and how much attention it skipped
        info["step_cache"] = cache_stats
    if ctx.temporal > 1 and ctx.boxes:  # how the video frames' boxes became one box per latent frame
        info["latent_boxes"] = {"rule": "union", "frames": ctx.frame_groups()}
    # 7. Refinement (Face VCD, then Tiled VCD) when the shot asks for it: video-to-video with the same pipeline,
    #    prompt and subjects (box/camera/reference controls are not applied to these passes).
    if refine.enabled(shot):
        t3 = time.perf_counter()
        model_size = min(preset.defaults.width, preset.defaults.height)
        try:
            with subjects.activated(pipe, plan.adapters, False):
                refined = refine.run(frames, plan.shot, plan.shot.prompt, pipe, model_size, preset.size_multiple,
                                     progress, cancel)
        except refine.RefineCancelled:
            raise RenderCancelled("render cancelled") from None
        frames = refined.frames
        info["refine"] = refined.info
        timings["refine"] = time.perf_counter() - t3
    measured = _measure(frames, shot, preset, ctx.boxes, timings)
    timings["total"] = time.perf_counter() - t0
    if plan.names:
        info.update(subjects=plan.names, prompt=plan.shot.prompt)
    logger.info("rendered %d frames %dx%d in %.2f s", len(frames), frames.shape[2], frames.shape[1], timings["total"])
    return RenderResult(frames, shot, preset, timings, info, ident, machine.record(pipe), measured)


def latent_prior(shot: shotlib.Shot, family, temporal: int) -> dict:
    """How the shot's per-video-frame γ reaches the model's latent frames (recorded in the sidecar, render.noise_prior):
    each latent frame stands at the time of the frames it encodes (times; None: one latent per frame, t_k = k), and
    neighbouring latents correlate by step_gamma = γ^(t_k − t_{k−1}) (Wan: γ^2.5 between latents 0 and 1, γ⁴ after)."""
    times = family.latent_times(shot.frames, temporal)
    gamma = shot.noise_prior.gamma
    return {"gamma": gamma, "latent_frames": len(times), "frames_per_latent": temporal,
            "times": None if temporal == 1 else times,
            "step_gamma": noise_prior.step_gammas(gamma, times)}


def render_identity(pipe, shot: shotlib.Shot, preset: ModelPreset, records: list) -> dict:
    """The sidecar's "identity" of a render of `shot` on `pipe`: its components, the trained subjects `records`
    (from subjects.plan) and the shot's input files, by content hash (see studio.identity). Cheap when warm: the
    components are hashed once per pipeline, files once per version."""
    from studio import identity

    return {"components": identity.of_pipeline(pipe, preset.variant),
            "subjects": {rec.name: identity.subject_identity(rec) for _, rec in records},
            "inputs": {k: identity.file_sha256(v) for k, v in input_files(shot).items()}}


def _measure(frames: np.ndarray, shot: shotlib.Shot, preset: ModelPreset, boxes: dict, timings: dict) -> dict:
    """The render's per-control measures (studio.measures), the boxes where the controls left them; a measure that
    fails is logged and recorded as not measured, never a lost render."""
    from studio import measures

    t = time.perf_counter()
    try:
        out = measures.measure(frames, shot, preset, {k: b.cpu().numpy() for k, b in boxes.items()})
    except Exception as e:  # noqa: BLE001 - the render itself succeeded
        logger.exception("measuring the render failed")
        out = {"status": "not measured", "reason": f"the measure failed: {type(e).__name__}"}
    timings["measure"] = time.perf_counter() - t
    return out


def _step_callback(total: int, progress: Progress | None, cancel: threading.Event | None, chain=None):
    def on_step_end(pipe, i, t, kw):
        out = {}
        if chain is not None and "latents" in kw:
            out["latents"] = chain(i, kw["latents"])
        if progress is not None:
            progress(i + 1, total)
        if cancel is not None and cancel.is_set():
            pipe._interrupt = True  # diffusers skips the remaining steps
        return out

    return on_step_end


@dataclass
class RenderFiles:
    video: Path
    sidecar: Path
    gif: Path | None = None
    frames_dir: Path | None = None
    result: RenderResult | None = None


def render_to_files(shot: shotlib.Shot, out: str | Path, frames_dir: str | Path | None = None,
                    gif: str | Path | None = None, manager: PipelineManager | None = None,
                    progress: Progress | None = None, cancel: threading.Event | None = None,
                    preset: ModelPreset | None = None) -> RenderFiles:
    """Render and write the MP4 with its JSON sidecar (and optional GIF / PNG frames).

    The output paths are checked before rendering (ShotError naming --out, --gif or --frames-dir). All or
    nothing: every output is written under a temporary name and they replace their targets together at the
    end; if any write fails, the previous files stay as they were and the error is a ShotError naming the output.
    """
    out = Path(out)
    gif = Path(gif) if gif is not None else None
    frames_dir = Path(frames_dir) if frames_dir is not None else None
    check_outputs(out, gif, frames_dir)
    result = render(shot, manager, progress, cancel, preset)
    return write_outputs(result, out, frames_dir, gif)


def write_outputs(result: RenderResult, out: str | Path, frames_dir: str | Path | None = None,
                  gif: str | Path | None = None, extra: dict | None = None) -> RenderFiles:
    """Write a render's MP4 and JSON sidecar (and optional GIF / PNG frames), all or nothing (see render_to_files).
    `extra`: more top-level keys for the sidecar (e.g. a batch's job record)."""
    from studio import export

    out = Path(out)
    gif = Path(gif) if gif is not None else None
    frames_dir = Path(frames_dir) if frames_dir is not None else None
    t0 = time.perf_counter()
    files = RenderFiles(video=out, sidecar=export.sidecar_path(out), gif=gif, frames_dir=frames_dir, result=result)
    outputs = export.OutputSet()
    step = ("--out", out)  # the output being written, for the error
    try:
        try:
            export.write_mp4(result.frames, outputs.file(out), result.shot.fps)
            if gif is not None:
                step = ("--gif", gif)
                export.write_gif(result.frames, outputs.file(gif), result.shot.fps)
            if frames_dir is not None:
                step = ("--frames-dir", frames_dir)
                export.write_png_frames(result.frames, outputs.folder(frames_dir))
            result.timings["export"] = time.perf_counter() - t0
            data = result.sidecar()
            data["files"] = {"video": out.name, "gif": str(gif) if gif else None,
                             "frames_dir": str(frames_dir) if frames_dir else None}
            data.update(extra or {})
            step = ("--out", files.sidecar)
            export.write_json(outputs.file(files.sidecar), data)
            step = ("--out", out)
            outputs.commit()
        except BaseException:
            outputs.discard()
            raise
    except OSError as e:
        reason = (e.strerror or str(e) or type(e).__name__).strip().splitlines()[0]
        raise shotlib.ShotError(step[0], str(step[1]), f"could not write it: {reason}") from None
    return files


_OUTPUT_FLAGS = {"--out": "video", "--gif": "GIF", "--frames-dir": "frames folder"}


def check_outputs(out: Path, gif: Path | None = None, frames_dir: Path | None = None) -> None:
    """Refuse output paths that cannot be written, before any rendering (ShotError naming the flag)."""
    from studio.export import sidecar_path

    if out.suffix.lower() != ".mp4":
        raise shotlib.ShotError("--out", str(out), "the video file must end in .mp4")
    targets = [("--out", out, False), ("--out", sidecar_path(out), False)]
    targets += [("--gif", gif, False)] if gif is not None else []
    targets += [("--frames-dir", frames_dir, True)] if frames_dir is not None else []
    seen: dict[Path, str] = {}
    for flag, path, is_folder in targets:
        if path.exists() and path.is_dir() != is_folder:
            kind = "a folder, not a file" if path.is_dir() else "a file, not a folder"
            raise shotlib.ShotError(flag, str(path), f"the {_OUTPUT_FLAGS[flag]} path is {kind}")
        parent = next(p for p in path.absolute().parents if p.exists())
        if not parent.is_dir():
            raise shotlib.ShotError(flag, str(path), f"{parent} is a file, so no folder can be made there")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise shotlib.ShotError(flag, str(path), f"no permission to write in {parent}")
        key = path.absolute()
        if key in seen and seen[key] != flag:
            raise shotlib.ShotError(flag, str(path), f"the same path as {seen[key]} (or its .json sidecar)")
        seen[key] = flag
