"""Who sent a shot, and what it may therefore name: the studio's two trust levels, enforced here in one place.

    LOCAL  the CLI and the user's own files: a shot may name any model preset file, image and detector file.
    web    every event of the served page and its API (anyone who can reach the server; the browser can call every
           event, public or private): a shot may name
             model                       a preset name from the shipped list, or the operator's allow-list
                                         (SHOT_STUDIO_WEB_MODELS);
             subjects[i].reference,      an image this studio received through an upload or rendered itself: a
             background.reference        file under the policy's `images` folders, compared by resolved real path
                                         (a link out of them is outside);
             subjects[i].subject         a library subject's name;
             refine.face.detector_model  a detector model's name (refine.detector_models: OpenCV's bundled cascades
                                         and models/detectors).
           Anything else is refused with one line naming the field, the same whether or not the path exists. A web
           shot is also held to the operator's caps (frames × width × height × steps, refine scale), and strangers
           may only do what the operator allows (render, train, delete library subjects): `studio.settings`.

The policy in force is a context variable: LOCAL unless a caller says otherwise (`using`). The page's one error
path (studio.ui.app.guarded) runs every event under the web policy; shot parsing (shot.from_container), shot
validation (shot.validate) and the model preset loader (presets.load_model_preset) ask `current()`. Work that leaves
the event's thread or process (a training thread, a ZeroGPU worker) is handed the policy explicitly.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

from studio.settings import Settings, env_name

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # a plain name: no folder, no leading dot


class NotAllowed(ValueError):
    """Something the operator has not allowed strangers to do on this studio; the message names the setting."""


@dataclass(frozen=True)
class Trust:
    """A trust level. `web=False` is LOCAL (no checks); a web policy carries the operator's settings and the
    folders its images may come from. Frozen and picklable: it crosses into GPU workers with the job."""

    web: bool = False
    settings: Settings = field(default_factory=Settings)
    images: tuple[str, ...] = ()  # folders a web shot's images may be in: the studio's uploads and renders
    uploads: tuple[str, ...] = ()  # folders an uploaded file may arrive from (the web server's upload cache)

    # --- names in a shot -------------------------------------------------------------------------------------

    def check_shot(self, shot) -> None:
        """Every name in a parsed shot that could reach a file: model, images, library subjects, detector model."""
        if not self.web:
            return
        self.check_model(shot.model)
        for i, s in enumerate(shot.subjects):
            if s.subject is not None:
                self.check_subject_name(s.subject, f"subjects[{i}].subject")
            if s.reference is not None:
                self.check_image(s.reference, f"subjects[{i}].reference")
        if shot.background.reference is not None:
            self.check_image(shot.background.reference, "background.reference")
        if shot.refine.face.detector_model is not None:
            self.check_detector_model(shot.refine.face.detector_model)

    def check_model(self, model, field: str = "model") -> None:
        """A model preset a web shot may name: a shipped preset's name (`*`) or an entry of the allow-list."""
        if not self.web:
            return
        allowed = self.models()
        if not isinstance(model, str) or model not in allowed:
            raise _refusal(field, model, f"over the web a model must be one of this studio's presets: "
                                         f"{', '.join(allowed) or 'none'} ({env_name('web_models')})")

    def models(self) -> list[str]:
        """The model presets web shots may name, in the allow-list's order (`*`: the shipped ones)."""
        from studio.presets import list_model_presets

        out: list[str] = []
        for entry in self.settings.web_models:
            for name in (list_model_presets() if entry == "*" else [entry]):
                if name not in out:
                    out.append(name)
        return out

    def check_image(self, path, field: str) -> None:
        """An image a web shot may name: a file under the policy's image folders (the studio's uploads and renders),
        by resolved real path. Refused alike whether or not the path exists."""
        if self.web and not _inside(path, self.images):
            raise _refusal(field, path, "over the web an image must be one uploaded to this studio (the page's "
                                        "upload, or the API's /upload_image, which returns the name to use) or one "
                                        "it rendered")

    def check_upload(self, path, field: str) -> None:
        """A file handed to an event as an upload: it must have arrived through the web server's upload (or be one
        of this studio's own files)."""
        if self.web and not _inside(path, self.uploads + self.images):
            raise _refusal(field, path, "over the web a file must be uploaded, not named by its path")

    def check_subject_name(self, name, field: str) -> None:
        if self.web and not (isinstance(name, str) and NAME.fullmatch(name) and ".." not in name):
            raise _refusal(field, name, "over the web a subject must be a library subject's name")

    def check_detector_model(self, name, field: str = "refine.face.detector_model") -> None:
        """A web shot names a face detector model by name: a file of refine.detector_models()."""
        if not self.web:
            return
        from studio.refine import detector_models

        known = detector_models()
        if not (isinstance(name, str) and NAME.fullmatch(name) and name in known):
            examples = ", ".join(sorted(known)[:3]) + (", ..." if len(known) > 3 else "")
            raise _refusal(field, name, "over the web a detector model must be the name of one this studio has "
                                        f"(OpenCV's bundled cascades and models/detectors: {examples or 'none'})")

    # --- caps and permissions ----------------------------------------------------------------------------------

    def check_work(self, shot, preset) -> None:
        """The operator's caps on a resolved web shot: its pixel-steps and Tiled VCD's scale."""
        if not self.web:
            return
        s = self.settings
        t = shot.refine.tiled
        if t.enabled and t.scale > s.max_refine_scale:
            raise _cap("refine.tiled.scale", t.scale, f"over this studio's cap of {s.max_refine_scale}",
                       "max_refine_scale")
        if s.max_pixel_steps:
            work = pixel_steps(shot, preset)
            total = sum(work.values())
            if total > s.max_pixel_steps:
                parts = " + ".join(f"{k} {v:,}" for k, v in work.items())
                raise _cap("frames×width×height×steps", total,
                           f"{total:,} pixel-steps ({parts}) is over this studio's cap of {s.max_pixel_steps:,}",
                           "max_pixel_steps", show_value=False)

    def allows(self, action: str) -> bool:
        """Whether this trust level may `render`, `train` or `delete` (library subjects)."""
        return not self.web or bool(getattr(self.settings, f"allow_{action}"))

    def require(self, action: str) -> None:
        if not self.allows(action):
            what = {"render": "rendering", "train": "teaching new subjects",
                    "delete": "deleting library subjects"}[action]
            raise NotAllowed(f"{action}: {what} is switched off on this studio ({env_name('allow_' + action)})")

    def check_training(self, photos: int, steps: int) -> None:
        """The caps on a stranger's training: photos of the subject, training steps."""
        if not self.web:
            return
        s = self.settings
        if s.max_train_photos and photos > s.max_train_photos:
            raise _cap("photos", photos, f"{photos} photos; this studio takes at most {s.max_train_photos}",
                       "max_train_photos", show_value=False)
        if s.max_train_steps and steps > s.max_train_steps:
            raise _cap("steps", steps, f"{steps} training steps; this studio trains at most {s.max_train_steps}",
                       "max_train_steps", show_value=False)


LOCAL = Trust()
_CURRENT: ContextVar[Trust] = ContextVar("studio_trust", default=LOCAL)


def current() -> Trust:
    """The trust level of the work running in this context (LOCAL unless `using` says otherwise)."""
    return _CURRENT.get()


@contextmanager
def using(policy: Trust):
    """Run the block under `policy`."""
    token = _CURRENT.set(policy)
    try:
        yield policy
    finally:
        _CURRENT.reset(token)


def web(images=(), uploads=(), settings: Settings | None = None) -> Trust:
    """The web policy: the operator's settings (the environment's unless given) and the folders images and uploads
    may come from."""
    return Trust(web=True, settings=settings or Settings.from_env(), images=tuple(str(p) for p in images),
                 uploads=tuple(str(p) for p in uploads))


def pixel_steps(shot, preset) -> dict[str, int]:
    """A resolved shot's work by pass: frames × pixels × denoising steps of the render and of each refinement pass
    (Face VCD counted for one face track; Tiled VCD at its output size)."""
    from studio.refine import planned_steps

    F = shot.frames
    work = {"render": F * shot.width * shot.height * shot.steps}
    f, t = shot.refine.face, shot.refine.tiled
    if f.enabled:
        side = f.size or min(preset.defaults.width, preset.defaults.height)
        work["Face VCD"] = F * side * side * planned_steps(shot, f, f.strength)
    if t.enabled:
        work["Tiled VCD"] = F * shot.width * shot.height * t.scale ** 2 * planned_steps(shot, t, t.strength)
    return work


def _inside(path, roots) -> bool:
    """Whether `path`, resolved (links followed), is in one of the folders `roots` (also resolved)."""
    if not isinstance(path, str) or not path or "\0" in path:
        return False
    try:
        real = Path(path).resolve()
        return any(real.is_relative_to(Path(r).resolve()) for r in roots)
    except (OSError, RuntimeError, ValueError):
        return False


def _refusal(field: str, value, problem: str):
    from studio.shot import ShotError

    return ShotError(field, value, problem)


def _cap(field: str, value, problem: str, setting: str, show_value: bool = True):
    from studio.shot import ShotError

    return ShotError(field, value, f"{problem} ({env_name(setting)})", show_value=show_value)
