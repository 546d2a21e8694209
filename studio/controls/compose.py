"""From a resolved shot to the list of controls of one render (the engine's only door to the controls).

Each control is built only when the shot asks for it, so a plain shot runs the unmodified pipeline. Problems
found here (a phrase the tokenizer cannot find, a model without the layers a control needs) are ShotErrors naming
the field, raised before any denoising.
"""

from __future__ import annotations

import torch

from studio import families, shot as shotlib
from studio.controls.base import Context, Control


def context(shot: shotlib.Shot, latent_h: int, latent_w: int) -> Context:
    """The per-render context; its generator (for the controls' own random draws) is derived from the seed."""
    gen = torch.Generator("cpu").manual_seed((shot.seed * 0x9E3779B1 + 0x5EED) % 2**63)
    ctx = Context(frames=shot.frames, latent_h=latent_h, latent_w=latent_w, steps=shot.steps,
                  do_cfg=shot.guidance_scale > 1.0, generator=gen)
    from studio.controls.boxes import interpolate

    for k, s in enumerate(shot.subjects):
        if s.boxes:
            ctx.boxes[k] = torch.from_numpy(interpolate(s.boxes, shot.frames, shot.box_control.interpolation))
    return ctx


def build(shot: shotlib.Shot, pipe, ctx: Context, preset_name: str = "", adapters=()) -> list[Control]:
    """adapters: (LoRA adapter name, subject index) of the shot's trained subjects (studio.subjects.apply.plan)."""
    controls: list[Control] = []
    family = families.of(pipe)
    unet = family.denoiser(pipe)
    model = f"model '{preset_name}'" if preset_name else "this model"
    # 1. Box trajectories: cross-attention editing.
    tracked = [k for k, s in enumerate(shot.subjects) if s.boxes]
    if tracked:
        if not family.cross_attention_names(unet):
            raise shotlib.ShotError(f"subjects[{tracked[0]}].boxes", "…",
                                    f"{model} has no spatial cross-attention, which box control edits")
        from studio.controls.boxes import PhraseError

        # Each tracked subject's own tokens: subjects sharing a phrase take its occurrences in order (the
        # untracked ones too, so that the k-th subject keeps the k-th occurrence).
        try:
            tokens = family.phrase_tokens(pipe, shot.prompt, {k: s.phrase for k, s in enumerate(shot.subjects)},
                                          required=tracked)
        except PhraseError as e:
            raise shotlib.ShotError(f"subjects[{e.index}].phrase", shot.subjects[e.index].phrase, str(e)) from None
        tracks = {k: tokens[k] for k in tracked}
        b = shot.box_control
        controls.append(family.box_control(ctx, tracks, family.word_tokens(pipe, shot.prompt), b.strength,
                                           b.amplify_steps, b.suppress))
    # 2. Camera pan: latent shift.
    c = shot.camera
    if c.cx or c.cy:
        from studio.controls.camera import CameraShift

        level = None
        if c.noise_warp:  # the initial noise was warped along the pan (engine): shift the content, not the noise
            from studio.controls.noise_warp import noise_level

            level = noise_level(pipe.scheduler)
        controls.append(CameraShift(c.cx, c.cy, c.start_step, c.shift_steps, scheduler=pipe.scheduler, fill=c.fill,
                                    noise_level=level))
    # 3./4. Subject and background references: injection into spatial self-attention.
    refs = [(k, s.reference, s.reference_strength) for k, s in enumerate(shot.subjects) if s.reference]
    if shot.background.reference:
        refs.append((None, shot.background.reference, shot.background.strength))
    if refs:
        where = f"subjects[{refs[0][0]}].reference" if refs[0][0] is not None else "background.reference"
        if not family.self_attention_names(unet):
            raise shotlib.ShotError(where, refs[0][1], f"{model} has no spatial self-attention to inject into")
        problem = family.reference_problem(pipe, shot, ctx, len(refs), model)
        if problem:
            raise shotlib.ShotError(*(problem if isinstance(problem, tuple) else (where, refs[0][1], problem)))
        items = []
        for k, path, strength in refs:
            latent = family.encode_reference(pipe, path, shot.width, shot.height)
            region = ("outside",) if k is None else ("box", k)
            items.append((latent, strength, region))
        controls.append(family.reference_control(pipe, ctx, items, shot.reference_control))
    # 5. Several trained subjects' LoRAs, each confined to its own box.
    from studio.subjects import apply

    if apply.needs_regions(shot, list(adapters)):
        controls.append(apply.RegionalLora(ctx, list(adapters)))
    return controls
