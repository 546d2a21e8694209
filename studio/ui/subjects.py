"""The Subjects and Background tabs' events: photos -> masks -> a trained subject in the library; the shot's
subjects (each bound to a phrase of the prompt, with a library subject or a zero-shot reference image) and its
background reference. Plain Python over named values; the page wires them (studio.ui.app).

A photo set is a list of {"photo": png path, "mask": png path, "backend": how the mask was made}, kept in the
output folder under names taken from the content.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np

from studio import shot as shotlib, trust
from studio.ui.events import (UserError, _subdir, keep_disk, private_name, read_image, resolved, store_image,
                              user_errors)

logger = logging.getLogger(__name__)

SUBJECT_COLUMNS = ["#", "phrase", "library subject", "reference", "keyframes"]
LIBRARY_COLUMNS = ["name", "base model", "methods", "prompt words", "photos", "created"]
NO_SUBJECT = "(none)"


def _png(image: np.ndarray, kind: str) -> str:
    from PIL import Image

    path = _subdir("subject-photos") / f"{private_name(image.tobytes() + str(image.shape).encode())}-{kind}.png"
    if not path.exists():
        Image.fromarray(image).save(path)
        keep_disk({path})
    return str(path)


def gallery(photo_set: list[dict]) -> list[tuple[str, str]]:
    """(overlay image path, caption) per photo: the subject tinted, the rest dimmed."""
    from studio.subjects import masks as masklib

    out = []
    for i, p in enumerate(photo_set):
        over = masklib.overlay(read_image(p["photo"]), masklib.load_mask(p["mask"]))
        out.append((_png(over, "overlay"), f"{i + 1}: mask by {p['backend']}"))
    return out


@user_errors
def photos_event(files: list[str] | None, phrase: str) -> tuple[list[dict], list]:
    """Uploaded photos -> a photo set with an automatic mask each (of the phrase's class word, its last word)."""
    from studio.subjects import masks as masklib
    from studio.subjects.library import import_photos

    policy = trust.current()
    policy.require("train")
    if not files:
        raise UserError("photos: upload 1..10 photos of the subject")
    policy.check_training(len(files), 0)
    for f in files:
        policy.check_upload(str(f), "photos")
    words = (phrase or "").split()
    if not words:
        raise UserError("phrase: give the subject's words first, e.g. 'sks dog' (the last word is what it is)")
    photo_set = []
    for path, photo in zip(files, import_photos([str(f) for f in files])):
        r = masklib.segment_word(photo, words[-1])
        logger.info("mask of %s: %s %s", Path(path).name, r.backend, r.note)
        photo_set.append({"photo": _png(photo, "photo"), "mask": _png(r.mask.astype(np.uint8) * 255, "mask"),
                          "backend": r.backend})
    return photo_set, gallery(photo_set)


@user_errors
def replace_mask_event(photo_set: list[dict], number, mask_path: str | None) -> tuple[list[dict], list]:
    """Replace photo `number`'s mask (1-based) with an uploaded one (white = subject), same size as the photo."""
    from studio.subjects import masks as masklib

    trust.current().require("train")
    if mask_path:
        trust.current().check_upload(str(mask_path), "mask")
    if not photo_set:
        raise UserError("photos: upload the subject's photos first")
    i = int(number or 0) - 1
    if not 0 <= i < len(photo_set):
        raise UserError(f"mask for photo: pick 1..{len(photo_set)} (got {i + 1})")
    if not mask_path:
        raise UserError("mask: no image given")
    path = store_image(mask_path, "mask")
    mask = masklib.load_mask(path)
    photo = read_image(photo_set[i]["photo"])
    if mask.shape != photo.shape[:2]:
        raise UserError(f"mask: is {mask.shape[1]}×{mask.shape[0]}, photo {i + 1} is "
                        f"{photo.shape[1]}×{photo.shape[0]}; the mask must be the photo's size")
    new = [dict(p) for p in photo_set]
    new[i] = {**new[i], "mask": _png(mask.astype(np.uint8) * 255, "mask"), "backend": "your mask"}
    return new, gallery(new)


def training_defaults(model: str) -> dict:
    """The training panel's starting values for a model preset: method, steps and the one line saying which method
    and why; from tune.DEFAULTS, the table `studio subject add` resolves its defaults from."""
    from studio import families
    from studio.presets import load_model_preset
    from studio.subjects import tune

    preset = load_model_preset(model)
    d = tune.defaults(preset)
    if "subject_tuning" not in families.get(preset.family).supports:
        return {"method": d["method"], "steps": d["steps"],
                "note": f"Subject training is not available on {preset.name} (the {preset.family} family) yet."}
    return {"method": d["method"], "steps": d["steps"], "note": tune.method_note(preset)}


@user_errors
def train_subject(photo_set: list[dict], name: str, phrase: str, method: str | None, steps, model: str,
                  progress=None, cancel: threading.Event | None = None, manager=None, library=None):
    """Train a subject on the photo set and add it to the library; (Subject, TuneResult).

    progress(step, total, loss, seconds left) after each step; `cancel` stops it and nothing is written.
    """
    from studio.presets import load_model_preset
    from studio.subjects import tune
    from studio.subjects.masks import load_mask

    policy = trust.current()
    policy.require("train")
    if not photo_set:
        raise UserError("photos: upload the subject's photos first")
    words = (phrase or "").split()
    if len(words) < 2:
        raise UserError(f"phrase: needs a trigger word and the class word, e.g. 'sks dog' (got {phrase!r})")
    steps = int(steps) if steps else None
    preset = load_model_preset(model)  # over the web: a preset name (studio.trust)
    policy.check_training(len(photo_set), steps or tune.defaults(preset)["steps"])
    photos = [read_image(p["photo"]) for p in photo_set]
    masks = [load_mask(p["mask"]) for p in photo_set]
    settings = tune.TuneSettings(method=method or None, class_word=words[-1], trigger=" ".join(words[:-1]), steps=steps)
    try:
        return tune.add_subject(name, photos, masks, model, settings, library=library, manager=manager,
                                progress=progress, cancel=cancel)
    except tune.TuneCancelled:
        raise UserError("training cancelled; nothing was saved") from None


@user_errors
def library_rows(library=None) -> list[list]:
    """The library as table rows (LIBRARY_COLUMNS); the first column is the names a shot can use."""
    from studio.subjects.library import SubjectLibrary

    return [[s.name, s.base_model, ", ".join(s.methods), f"{s.trigger} {s.class_word}", s.photos, s.created]
            for s in (library or SubjectLibrary()).list()]


@user_errors
def delete_subject_event(name: str, manager=None, library=None) -> None:
    """Remove a subject from the library (and from the loaded pipelines)."""
    from studio.subjects.library import SubjectLibrary

    trust.current().require("delete")
    if not name or name == NO_SUBJECT:
        raise UserError("library subject: pick the subject to delete")
    (library or SubjectLibrary()).delete(name)
    if manager is not None:
        manager.forget_subject(name)


# --- the shot's subjects --------------------------------------------------------------------------------------


@user_errors
def subject_rows(shot_yaml: str) -> list[list]:
    shot = shotlib.loads(shot_yaml, where="shot file")
    return [[i + 1, s.phrase, s.subject or "", Path(s.reference).name if s.reference else "",
             ", ".join(map(str, sorted(s.boxes)))] for i, s in enumerate(shot.subjects)]


@user_errors
def slot_values(shot_yaml: str, slot) -> dict:
    """Subject `slot`'s (1-based) fields, named as set_subject_event takes them: phrase, library_subject,
    reference (image path), strength; blanks for a new one."""
    shot = shotlib.loads(shot_yaml, where="shot file")
    i = int(slot or 1) - 1
    if not 0 <= i < len(shot.subjects):
        return {"phrase": "", "library_subject": NO_SUBJECT, "reference": None, "strength": 1.0}
    s = shot.subjects[i]
    return {"phrase": s.phrase, "library_subject": s.subject or NO_SUBJECT, "reference": s.reference,
            "strength": s.reference_strength}


@user_errors
def set_subject_event(shot_yaml: str, slot, phrase: str, library_subject: str | None, reference: str | None,
                      strength=1.0, library=None, **form) -> str:
    """Write subject `slot` (1-based; one past the last adds a subject) into the shot file, keeping its boxes."""
    base = shotlib.loads(shot_yaml, where="shot file")
    i = int(slot or 1) - 1
    if not 0 <= i <= len(base.subjects) or i >= shotlib.MAX_SUBJECTS:
        raise UserError(f"subjects: pick subject 1..{min(len(base.subjects) + 1, shotlib.MAX_SUBJECTS)} "
                        f"(got {i + 1})")
    where = f"subjects[{i}]"
    phrase = (phrase or "").strip()
    if not phrase:
        raise UserError(f"{where}.phrase: give the words of the prompt that name this subject")
    prompt = form.get("prompt") or base.prompt
    if not shotlib.phrase_in_prompt(phrase, prompt):
        raise UserError(f"{where}.phrase: the phrase is not in the prompt {prompt!r} (got {phrase!r})")
    subject = None if library_subject in (None, "", NO_SUBJECT) else library_subject
    if subject is not None:
        from studio.subjects.library import SubjectLibrary, check_base_model

        model = form.get("model") or base.model
        check_base_model((library or SubjectLibrary()).get(subject, f"{where}.subject"), model, f"{where}.subject")
    ref = store_image(reference, f"{where}.reference") if reference else None
    entry = shotlib.Subject(phrase=phrase, subject=subject, reference=ref, reference_strength=float(strength),
                            boxes=base.subjects[i].boxes if i < len(base.subjects) else {})
    if i < len(base.subjects):
        base.subjects[i] = entry
    else:
        base.subjects.append(entry)
    return shotlib.dumps(shotlib.from_container(shotlib.to_dict(base)))


@user_errors
def remove_subject_event(shot_yaml: str, slot) -> str:
    base = shotlib.loads(shot_yaml, where="shot file")
    i = int(slot or 1) - 1
    if not 0 <= i < len(base.subjects):
        raise UserError(f"subjects: no subject {i + 1} to remove")
    del base.subjects[i]
    return shotlib.dumps(base)


# --- background ------------------------------------------------------------------------------------------------


@user_errors
def set_background_event(shot_yaml: str, image: str | None, strength=1.0) -> str:
    """Set (an image) or clear (None) the shot's background reference."""
    base = shotlib.loads(shot_yaml, where="shot file")
    base.background.reference = store_image(image, "background.reference") if image else None
    base.background.strength = float(strength)
    return shotlib.dumps(shotlib.from_container(shotlib.to_dict(base)))


@user_errors
def background_preview_event(shot_yaml: str, **form):
    """The background reference as the model will see it (cover-cropped to the shot's size, scaled up), with the
    subjects' first boxes drawn on it; None when the shot has no background reference."""
    from studio.controls.reference import cover_crop
    from studio.previews import trajectory

    shot = resolved(shot_yaml, **form)
    if not shot.background.reference:
        return None
    crop = cover_crop(read_image(shot.background.reference), shot.width, shot.height)
    return trajectory(shot, crop, long_side=256)[0]
