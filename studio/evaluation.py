"""The evaluation harness behind `studio eval`: render a prompt set under named configurations (or score renders that
exist) and write per-video and mean metrics as JSON, a markdown table and a PNG plot.

A prompt set (presets/evals/*.yaml) is shots × seeds:

    name: toyworld
    model: toyworld                 # default model of every shot
    seeds: [0, 1]
    defaults: {steps: 20}           # shot fields under every shot
    configs: [no_control, boxes, pan, full]     # the comparison run by default
    custom_configs:                 # optional: more configurations, a base plus dotted overrides
      strong_boxes: {base: boxes, set: [box_control.strength=20]}
    shots:
      - id: star-right              # shot fields, plus id and optional subject_images
        prompt: a yellow star on sky
        subjects: [{phrase: yellow star, boxes: {0: [0.0, 0.25, 0.45, 0.75], 7: [0.55, 0.25, 1.0, 0.75]}}]
        subject_images: [star.png]  # for CLIP-I, DINO-I, R-CLIP, R-DINO: files of the shot's only subject, or
                                    # {phrase or subject index: [files]} when the shot has several subjects

Before the first render every (configuration, shot, seed) job is built and checked (`engine.prepare`): a bad
pair stops the run with every bad pair named, and nothing is rendered.

Every video is scored against its shot *as written* (the target): a config that drops the boxes is still
measured against them, so `no_control` is the baseline row of an ablation table, as in the papers.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from studio import metrics, shot as shotlib

logger = logging.getLogger(__name__)

# name: (what it keeps of the shot as written, description)
CONFIGS = {
    "no_control": "prompt only: no boxes, no camera pan, no tuned subject, no reference, no refinement",
    "boxes": "box trajectories only",
    "pan": "camera pan only",
    "tuned_subject": "tuned subjects (subjects[i].subject) only",
    "reference": "zero-shot subject / background references only",
    "full": "the shot as written",
    "refine_off": "the shot as written, refinement off",
    "refine_face": "the shot as written + Face VCD",
    "refine_tiled": "the shot as written + Tiled VCD",
}

# key, label, better (+1 higher, -1 lower, 0 neither)
METRICS = [
    ("clip_t", "CLIP-T", 1), ("clip_i", "CLIP-I", 1), ("dino_i", "DINO-I", 1), ("r_clip", "R-CLIP", 1),
    ("r_dino", "R-DINO", 1), ("temporal_consistency_clip", "T-Cons (CLIP)", 1),
    ("temporal_consistency_pixel", "T-Cons (pixel)", 1), ("dynamic_degree", "Dynamic degree", 0),
    ("flow", "Flow px", 0), ("box_hit_rate", "Box hit", 1), ("box_iou", "Box IoU", 1),
    ("camera_error", "Cam err px/f", -1), ("render_s", "Render s", -1),
]
META_KEYS = ("id", "subject_images")


# --- prompt sets and configurations ---------------------------------------------------------------------------


@dataclass
class PromptShot:
    id: str
    fields: dict  # shot fields as written (model and defaults merged in)
    subject_images: list | dict = field(default_factory=list)  # as written: [files] or {phrase or index: [files]}


@dataclass
class PromptSet:
    name: str
    seeds: list[int]
    shots: list[PromptShot]
    configs: list[str]
    custom_configs: dict = field(default_factory=dict)  # name -> {"base": config, "set": [overrides]}
    path: str | None = None


def load_prompt_set(path: str | Path) -> PromptSet:
    """Read and check a prompt set; ValueError / ShotError naming the field (shots[i].prompt, seeds, ...)."""
    from omegaconf import OmegaConf

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prompt set: file not found (got {str(path)!r})")
    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as e:
        raise ValueError(f"prompt set: not valid YAML ({str(e).splitlines()[0]}) (got {str(path)!r})") from None
    if not isinstance(data, dict):
        raise ValueError(f"prompt set: must be a mapping with shots (got {type(data).__name__})")
    known = {"name", "description", "model", "seeds", "defaults", "configs", "custom_configs", "shots"}
    for k in data:
        if k not in known:
            raise ValueError(f"{k}: unknown prompt-set field (known: {', '.join(sorted(known))})")
    seeds = data.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise ValueError(f"seeds: must be a non-empty list of seeds >= 0 (got {seeds!r})")
    shots_in = data.get("shots")
    if not isinstance(shots_in, list) or not shots_in:
        raise ValueError(f"shots: must be a non-empty list of shots (got {shots_in!r})")
    defaults = dict(data.get("defaults") or {})
    if data.get("model"):
        defaults.setdefault("model", data["model"])
    custom = data.get("custom_configs") or {}
    shots, ids = [], set()
    for i, item in enumerate(shots_in):
        if not isinstance(item, dict):
            raise ValueError(f"shots[{i}]: each shot must be a mapping of shot fields (got {item!r})")
        sid = str(item.get("id") or f"shot{i}")
        if sid in ids:
            raise ValueError(f"shots[{i}].id: two shots named {sid!r}")
        ids.add(sid)
        fields = _merge(defaults, {k: v for k, v in item.items() if k not in META_KEYS})
        try:
            from studio import engine

            shot, _ = engine.prepare(shotlib.from_container(fields))  # the preset's checks too (no weights loaded)
        except shotlib.ShotError as e:
            raise shotlib.ShotError(f"shots[{i}].{e.field}", e.value, e.problem) from None
        images = item.get("subject_images") or []
        for paths in image_files(images, shot, f"shots[{i}].subject_images").values():
            for p in paths:
                if not Path(p).is_file():
                    raise ValueError(f"shots[{i}].subject_images: image file not found (got {p!r})")
        shots.append(PromptShot(sid, fields, images))
    ps = PromptSet(str(data.get("name") or path.stem), list(seeds), shots,
                   list(data.get("configs") or ["full"]), dict(custom), str(path))
    check_configs(ps.configs, ps, "configs")
    return ps


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def known_configs(ps: PromptSet | None = None) -> list[str]:
    return list(CONFIGS) + list((ps.custom_configs if ps else {}) or {})


def check_configs(names: list[str], ps: PromptSet | None, where: str = "--configs") -> None:
    if not names:
        raise ValueError(f"{where}: name at least one configuration (known: {', '.join(known_configs(ps))})")
    for n in names:
        if n not in known_configs(ps):
            raise ValueError(f"{where}: unknown configuration {n!r} (known: {', '.join(known_configs(ps))})")
    for n, spec in ((ps.custom_configs if ps else {}) or {}).items():
        if not isinstance(spec, dict) or spec.get("base", "full") not in CONFIGS:
            raise ValueError(f"custom_configs.{n}.base: must be one of {', '.join(CONFIGS)} (got {spec!r})")


def apply_config(fields: dict, name: str, ps: PromptSet | None = None) -> tuple[dict, list[str]]:
    """The shot fields a configuration renders, and its dotted overrides (custom configurations)."""
    if ps is not None and name in (ps.custom_configs or {}):
        spec = ps.custom_configs[name]
        out, _ = apply_config(fields, spec.get("base", "full"))
        return out, [str(s) for s in spec.get("set") or []]
    out = copy.deepcopy(fields)
    keep = {"no_control": set(), "boxes": {"boxes"}, "pan": {"camera"}, "tuned_subject": {"subject"},
            "reference": {"reference"}}.get(name)
    if keep is not None:
        subjects = []
        for s in out.get("subjects") or []:
            s = dict(s)
            for k in ("boxes", "subject", "reference"):
                if k not in keep:
                    s.pop(k, None)
            subjects.append(s)
        if subjects:
            out["subjects"] = subjects
        if "camera" not in keep:
            out.pop("camera", None)
        if "reference" not in keep and isinstance(out.get("background"), dict):
            out["background"] = {k: v for k, v in out["background"].items() if k != "reference"}
        out.pop("refine", None)
    elif name == "refine_off":
        out.pop("refine", None)
    elif name in ("refine_face", "refine_tiled"):
        r = out.setdefault("refine", {})
        r.setdefault(name.removeprefix("refine_"), {})["enabled"] = True
        if name == "refine_face" and r["face"].get("detector") is None and any(
                s.get("boxes") for s in out.get("subjects") or []):
            r["face"]["detector"] = "boxes"  # no face to find on a subject-box shot: refine the subject region
    return out, []


# --- scoring ------------------------------------------------------------------------------------------------------


@dataclass
class Scorer:
    """Holds the feature models (loaded once, or the reasons they are not there)."""

    clip_model: str = metrics.CLIP_MODEL
    dino_model: str = metrics.DINO_MODEL
    notes: dict = field(default_factory=dict)  # metric -> why it was skipped
    _enc: dict = field(default_factory=dict)

    def encoder(self, kind: str):
        if kind not in self._enc:
            try:
                self._enc[kind] = metrics.encoder(kind, self.clip_model if kind == "clip" else self.dino_model)
            except metrics.MetricUnavailable as e:
                self._enc[kind] = e
        enc = self._enc[kind]
        if isinstance(enc, Exception):
            raise enc
        return enc

    def _try(self, out: dict, key: str, fn: Callable, also: tuple[str, ...] = ()):
        try:
            v = fn()
            out.update(v) if isinstance(v, dict) else out.__setitem__(key, v)
        except metrics.MetricUnavailable as e:
            for k in (key, *also):
                out[k] = None
                note = self.notes.setdefault(k, {})
                note[str(e)] = note.get(str(e), 0) + 1  # reason -> videos skipped for it

    def score(self, frames: np.ndarray, target: shotlib.Shot, fps: float | None,
              images: dict[int | None, list[np.ndarray]]) -> dict:
        """Every metric of one video (F, H, W, 3) against the shot as written; None where skipped (see notes).

        `images`: per subject index, that subject's images (key None: a subject-less shot's images, for CLIP-I /
        DINO-I only), from `subject_image_sets`. Image metrics are per subject, then averaged over the subjects.
        Motion and box metrics see the frames at the shot's render size (a tiled refine's ×scale output is
        scaled back), so their pixels compare across configurations.
        """
        from studio.refine import resize

        out: dict = {}
        boxed = [s for s in target.subjects if s.boxes]
        small = resize(frames, target.width, target.height) if frames.shape[1:3] != (target.height, target.width) \
            else frames  # (F, h, w, 3) at the render size
        self._try(out, "clip_t", lambda: metrics.clip_t(frames, target.prompt, self.encoder("clip")))
        for key, kind, region in (("clip_i", "clip", False), ("dino_i", "dino", False), ("r_clip", "clip", True),
                                  ("r_dino", "dino", True)):
            self._try(out, key, lambda kind=kind, region=region: _per_subject(frames, target, images,
                                                                              self.encoder(kind), region))
        self._try(out, "temporal_consistency_clip",
                  lambda: metrics.temporal_consistency_clip(frames, self.encoder("clip")))
        out["temporal_consistency_pixel"] = metrics.temporal_consistency_pixel(frames)
        dyn = metrics.dynamic_degree(small, fps)
        out["dynamic_degree"], out["flow"] = float(dyn["dynamic"]), dyn["flow"]
        self._try(out, "box_hit_rate", lambda: _box_adherence(small, target, boxed), also=("box_iou",))
        self._try(out, "camera_error", lambda: _camera(small, target))
        return out


def _per_subject(frames: np.ndarray, shot: shotlib.Shot, images: dict, enc, region: bool) -> float:
    """CLIP-I / DINO-I (region=False), or R-CLIP / R-DINO (region=True: each frame cropped to the subject's box):
    each subject against its own images, then the mean over the subjects scored."""
    from studio.refine import subject_boxes

    groups = {k: v for k, v in images.items() if v}
    if not groups:
        raise metrics.MetricUnavailable("no subject images to compare with (subjects[i].reference, a tuned subject "
                                        "or the prompt set's subject_images)")
    if not region:
        return float(np.mean([metrics.image_similarity(frames, v, enc) for v in groups.values()]))
    scores = [metrics.region_similarity(frames, subject_boxes(shot, shot.subjects[k]), v, enc)
              for k, v in groups.items() if k is not None and shot.subjects[k].boxes]
    if not scores:
        raise metrics.MetricUnavailable("no subject has both boxes and images")
    return float(np.mean(scores))


def _camera(frames: np.ndarray, shot: shotlib.Shot) -> dict:
    if shot.camera.cx == 0 and shot.camera.cy == 0:
        raise metrics.MetricUnavailable("no camera pan in the shot")
    cam = metrics.camera_error(frames, shot.camera.cx, shot.camera.cy)
    return {"camera_error": cam["error"], "camera_measured": cam["measured"], "camera_requested": cam["requested"]}


def _box_adherence(frames: np.ndarray, shot: shotlib.Shot, boxed: list) -> dict:
    if not boxed:
        raise metrics.MetricUnavailable("no subject boxes in the shot")
    from studio.refine import subject_boxes

    rows = [metrics.box_adherence(frames, s.phrase, subject_boxes(shot, s)) for s in boxed]
    return {"box_hit_rate": float(np.mean([r["hit_rate"] for r in rows])),
            "box_iou": float(np.mean([r["iou"] for r in rows]))}


def image_files(raw: list | dict, shot: shotlib.Shot, where: str = "subject_images") -> dict[int | None, list[str]]:
    """A prompt set's subject_images by subject index: a list belongs to the shot's only subject (key None: a shot
    without subjects, for CLIP-I / DINO-I only); a mapping names each subject by its phrase or its index.
    ValueError naming `where` when it is ambiguous."""
    if not raw:
        return {}
    n = len(shot.subjects)
    if isinstance(raw, (list, tuple)):
        if n > 1:
            raise ValueError(f"{where}: the shot has {n} subjects, so a list cannot say whose images they are; give "
                             f"a mapping of subject phrase (or index) to image files (got {list(raw)!r})")
        return {0 if n == 1 else None: [str(p) for p in raw]}
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: a list of image files or a mapping subject -> files (got {raw!r})")
    phrases = [s.phrase for s in shot.subjects]
    out: dict[int | None, list[str]] = {}
    for key, paths in raw.items():
        if isinstance(key, str) and phrases.count(key) > 1:
            raise ValueError(f"{where}.{key}: two subjects have this phrase; name them by index")
        if isinstance(key, str) and key in phrases:
            k = phrases.index(key)
        elif str(key).isdigit() and int(key) < n:  # an index (a string once a sidecar's JSON has held it)
            k = int(key)
        else:
            raise ValueError(f"{where}.{key}: no such subject (phrases: {', '.join(map(repr, phrases)) or 'none'}; "
                             f"or an index below {n})")
        out.setdefault(k, []).extend(str(p) for p in ([paths] if isinstance(paths, str) else paths or []))
    return out


def subject_image_sets(shot: shotlib.Shot, extra: list | dict) -> dict[int | None, list[np.ndarray]]:
    """Each subject's images for CLIP-I / DINO-I / R-CLIP / R-DINO, by subject index: the prompt set's
    subject_images for it (`image_files`), its reference, and a tuned subject's photos from the library (when
    it is there). Subjects without images are left out."""
    from PIL import Image

    paths = image_files(extra, shot)
    for k, s in enumerate(shot.subjects):
        if s.reference:
            paths.setdefault(k, []).append(s.reference)
        if s.subject:
            try:
                from studio.subjects.library import SubjectLibrary

                folder = SubjectLibrary().get(s.subject).path / "photos"
                paths.setdefault(k, []).extend(sorted(str(p) for p in folder.glob("*") if p.is_file()))
            except Exception as e:  # a missing subject only loses its photos here; the render reports it
                logger.info("no photos of subject %s: %s", s.subject, e)
    out: dict[int | None, list[np.ndarray]] = {}
    for k, files in paths.items():
        for p in files:
            if not Path(p).is_file():
                raise ValueError(f"subject_images: image file not found (got {p!r})")
            with Image.open(p) as im:
                out.setdefault(k, []).append(np.asarray(im.convert("RGB")))
    return out


# --- running ------------------------------------------------------------------------------------------------------


@dataclass
class EvalResult:
    rows: list[dict]
    means: dict  # config -> metric -> mean
    notes: dict  # metric -> reason skipped
    info: dict
    files: dict = field(default_factory=dict)


class InvalidJobs(ValueError):
    """Some (configuration, shot) pairs of an evaluation cannot render; `errors` has one (config, shot, message)
    per bad pair (config `ALL` when the shot as written fails). Raised before anything is rendered."""

    ALL = "all configurations"  # the config of an error in the shot as written: no configuration can score it

    def __init__(self, errors: list[tuple[str, str, str]], n_configs: int, n_shots: int):
        self.errors = errors
        bad = sum(n_configs if config == self.ALL else 1 for config, _, _ in errors)
        by_problem: dict[str, list[str]] = {}  # pairs failing the same way are named together
        for config, shot, msg in errors:
            by_problem.setdefault(msg, []).append(f"{config} x {shot}")
        pairs = " | ".join(f"{', '.join(names)}: {msg}" for msg, names in by_problem.items())  # one line (the CLI's)
        super().__init__(f"studio eval: nothing was rendered: {bad} of the {n_configs * n_shots} (configuration, "
                         f"shot) pairs cannot render: {pairs}")


@dataclass
class Job:
    config: str
    ps_shot: PromptShot
    seed: int
    shot: shotlib.Shot  # what the configuration renders (unresolved: the engine resolves it again)
    target: shotlib.Shot  # the shot as written, resolved: what the video is scored against


def plan_jobs(ps: PromptSet, configs: list[str], overrides: list[str] | None = None) -> list[Job]:
    """Every (configuration, shot, seed) job, each built and checked by `engine.prepare` (no weights loaded);
    InvalidJobs naming every bad (configuration, shot) pair and its field when any cannot render."""
    from studio import engine

    check_configs(configs, ps)
    overrides = list(overrides or [])
    errors: dict[tuple[str, str], str] = {}  # (config, shot id) -> the first problem found
    targets = {}
    for ps_shot in ps.shots:
        for seed in ps.seeds:
            try:
                targets[ps_shot.id, seed], _ = engine.prepare(
                    shotlib.from_container({**ps_shot.fields, "seed": seed}, overrides))
            except ValueError as e:  # ShotError included: it names the field
                errors.setdefault((InvalidJobs.ALL, ps_shot.id), f"the shot as written (the scoring target): {e}")
    jobs = []
    for config in configs:
        for ps_shot in ps.shots:
            for seed in ps.seeds:
                if (ps_shot.id, seed) not in targets:
                    continue
                fields, extra = apply_config(ps_shot.fields, config, ps)
                try:
                    shot = shotlib.from_container({**fields, "seed": seed}, overrides + extra)
                    engine.prepare(shot)
                except ValueError as e:
                    errors.setdefault((config, ps_shot.id), str(e))
                    continue
                jobs.append(Job(config, ps_shot, seed, shot, targets[ps_shot.id, seed]))
    if errors:
        raise InvalidJobs([(c, s, msg) for (c, s), msg in errors.items()], len(configs), len(ps.shots))
    return jobs


def run_prompt_set(ps: PromptSet, configs: list[str], out_dir: str | Path, scorer: Scorer | None = None,
                   manager=None, overrides: list[str] | None = None,
                   progress: Callable[[str], None] | None = None, executor=None) -> EvalResult:
    """Render every shot × seed under every configuration into out_dir/videos/<config>/ and score them.

    Every job is checked first (`plan_jobs`): an invalid (configuration, shot) pair stops the run before the first
    render (InvalidJobs names each).

    `executor`: a studio.batch Executor (a Ray farm, studio.ray_farm.RayExecutor) renders the jobs instead of this
    process; this process writes each video and its sidecar as they arrive and scores them. A job that fails there
    is left out of the scores and listed in info["failed"]; the rows keep the jobs' order either way."""
    from studio import engine, export
    from studio.pipelines import PipelineManager

    jobs = plan_jobs(ps, configs, overrides)
    out_dir = Path(out_dir)
    scorer = scorer or Scorer()
    rows, t0 = [], time.perf_counter()
    failed: list[dict] = []
    if executor is not None:
        rows, failed = _run_on(executor, jobs, ps, out_dir, scorer, progress)
    else:
        manager = manager or PipelineManager(max_pipelines=1)
        for k, job in enumerate(jobs):
            video = _video(out_dir, job)
            files = engine.render_to_files(job.shot, video, manager=manager)
            r = files.result
            side = json.loads(files.sidecar.read_text())
            side["eval"] = _eval_record(job, ps)
            export.write_sidecar(video, side)
            rows.append(_scored_row(job, r, video, scorer))
            _report(progress, f"[{k + 1}/{len(jobs)}] {job.config} {job.ps_shot.id} seed {job.seed}: "
                              f"{r.timings['total']:.1f} s")
    info = {"prompt_set": ps.name, "path": ps.path, "configs": configs, "seeds": ps.seeds,
            "shots": [s.id for s in ps.shots], "overrides": list(overrides or []),
            "seconds": time.perf_counter() - t0, "mode": "render"}
    if executor is not None:
        info["executor"] = executor.info() if hasattr(executor, "info") else {}
        info["failed"] = failed
    return _finish(rows, scorer, info, out_dir)


def _video(out_dir: Path, job: Job) -> Path:
    return out_dir / "videos" / job.config / f"{job.ps_shot.id}-s{job.seed}.mp4"


def _eval_record(job: Job, ps: PromptSet) -> dict:
    """The sidecar's "eval" key: what the video is scored against."""
    return {"config": job.config, "shot_id": job.ps_shot.id, "target": shotlib.to_dict(job.target),
            "subject_images": job.ps_shot.subject_images, "prompt_set": ps.name}


def _scored_row(job: Job, r, video: Path, scorer: Scorer) -> dict:
    row = {"config": job.config, "shot": job.ps_shot.id, "seed": job.seed, "video": str(video),
           "size": [int(r.frames.shape[2]), int(r.frames.shape[1])], "render_s": r.timings["total"]}
    row.update(scorer.score(r.frames, job.target, r.shot.fps,
                            subject_image_sets(job.target, job.ps_shot.subject_images)))
    return row


def _report(progress: Callable[[str], None] | None, msg: str) -> None:
    logger.info(msg)
    if progress is not None:
        progress(msg)


def batch_jobs(jobs: list[Job], ps: PromptSet) -> list:
    """The evaluation's jobs as studio.batch Jobs (index: the position in `jobs`), so that any batch Executor can
    render them: grouped by pipeline and trained subjects like a batch's."""
    from studio import batch, engine
    from studio.pipelines import key_for
    from studio.subjects import apply as subjects

    out = []
    for k, job in enumerate(jobs):
        shot, preset = engine.prepare(job.shot)
        _, records = subjects.plan(shot, preset)
        used = tuple(rec.name for _, rec in records)
        out.append(batch.Job(k, f"{job.config}/{job.ps_shot.id}-s{job.seed}", ps.path or ps.name,
                             {"config": job.config, "shot": job.ps_shot.id, "seed": job.seed}, [], job.shot,
                             preset.name, used, (key_for(preset, "cpu"), used)))
    return out


def _run_on(executor, jobs: list[Job], ps: PromptSet, out_dir: Path, scorer: Scorer,
            progress: Callable[[str], None] | None) -> tuple[list[dict], list[dict]]:
    """Render the jobs on an executor; write and score each one here as it arrives. (rows in job order, failures)."""
    import threading

    from studio import batch, engine

    for job in jobs:
        engine.check_outputs(_video(out_dir, job))
    scored: dict[int, dict] = {}
    failed: list[dict] = []

    def deliver(bjob, outcome) -> None:
        job = jobs[bjob.index]
        n = len(scored) + len(failed) + 1
        if outcome.status != batch.RENDERED:
            failed.append({"config": job.config, "shot": job.ps_shot.id, "seed": job.seed,
                           "status": outcome.status, "error": outcome.error})
            _report(progress, f"[{n}/{len(jobs)}] {job.config} {job.ps_shot.id} seed {job.seed}: {outcome.status}: "
                              f"{outcome.error}")
            return
        r, video = outcome.result, _video(out_dir, job)
        engine.write_outputs(r, video, extra={"eval": _eval_record(job, ps)})
        scored[bjob.index] = _scored_row(job, r, video, scorer)
        _report(progress, f"[{n}/{len(jobs)}] {job.config} {job.ps_shot.id} seed {job.seed}: "
                          f"{r.timings['total']:.1f} s")

    executor.run(batch.order_jobs(batch_jobs(jobs, ps)), deliver, threading.Event(), threading.Event())
    return [scored[k] for k in sorted(scored)], failed


def score_videos(paths: list[str | Path], out_dir: str | Path, scorer: Scorer | None = None) -> EvalResult:
    """Score existing renders (an .mp4 with its .json sidecar, or folders of them) without rendering."""
    from studio import export

    scorer = scorer or Scorer()
    videos: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            videos += sorted(p.rglob("*.mp4"))
        elif p.is_file():
            videos.append(p)
        else:
            raise ValueError(f"--videos: no such video or folder (got {str(p)!r})")
    if not videos:
        raise ValueError(f"--videos: no .mp4 files found in {', '.join(map(str, paths))!r}")
    rows, t0 = [], time.perf_counter()
    for v in videos:
        side_path = export.sidecar_path(v)
        if not side_path.is_file():
            raise ValueError(f"--videos: {str(v)!r} has no sidecar {side_path.name} (needed for its shot)")
        side = json.loads(side_path.read_text())
        ev = side.get("eval") or {}
        target = shotlib.from_container(ev.get("target") or side["shot"])  # JSON keyframe keys load too
        frames = export.read_video(v)
        row = {"config": ev.get("config") or v.parent.name, "shot": ev.get("shot_id") or v.stem,
               "seed": side.get("seed"), "video": str(v), "size": [int(frames.shape[2]), int(frames.shape[1])],
               "render_s": (side.get("timings") or {}).get("total")}
        fps = target.fps or (side.get("shot") or {}).get("fps")
        row.update(scorer.score(frames, target, fps, subject_image_sets(target, ev.get("subject_images") or [])))
        rows.append(row)
    info = {"videos": [str(v) for v in videos], "seconds": time.perf_counter() - t0, "mode": "score",
            "configs": list(dict.fromkeys(r["config"] for r in rows))}
    return _finish(rows, scorer, info, Path(out_dir))


def means(rows: list[dict]) -> dict:
    """Per configuration, the mean of every metric over its videos (skipped values left out; None if all are)."""
    out: dict = {}
    for config in dict.fromkeys(r["config"] for r in rows):
        mine = [r for r in rows if r["config"] == config]
        m = {"n": len(mine)}
        for key, _, _ in METRICS:
            vals = [r[key] for r in mine if isinstance(r.get(key), (int, float)) and r.get(key) is not None]
            m[key] = float(np.mean(vals)) if vals else None
        out[config] = m
    return out


def _finish(rows: list[dict], scorer: Scorer, info: dict, out_dir: Path) -> EvalResult:
    order = [key for key, _, _ in METRICS]  # skipped metrics in the table's order, whatever order videos came in
    notes = dict(sorted(scorer.notes.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
    res = EvalResult(rows, means(rows), notes, info)
    out_dir.mkdir(parents=True, exist_ok=True)
    res.files = {"json": str(out_dir / "results.json"), "markdown": str(out_dir / "results.md"),
                 "plot": str(out_dir / "results.png")}
    Path(res.files["json"]).write_text(json.dumps({"info": info, "means": res.means, "skipped": res.notes,
                                                   "definitions": _definitions(), "videos": rows}, indent=2,
                                                  default=str) + "\n")
    Path(res.files["markdown"]).write_text(markdown(res))
    write_plot(res, res.files["plot"])
    return res


def _definitions() -> dict:
    """Definition and source of every value a video's row holds (results.json `definitions`)."""
    return {**metrics.DEFINITIONS,
            "render_s": {"definition": "wall-clock seconds of the render, refinement included (the engine's "
                                       "timings 'total'), on the machine that rendered it",
                         "source": "this project (studio.engine timings)"}}


def _shown(res: EvalResult) -> list[tuple[str, str, int]]:
    return [m for m in METRICS if any(v.get(m[0]) is not None for v in res.means.values())]


def markdown(res: EvalResult) -> str:
    """One table, configurations as rows and metrics as columns (↑ higher is better, ↓ lower), like the papers'
    ablation tables; then the skipped metrics and why."""
    cols = _shown(res)
    head = "| config | n | " + " | ".join(f"{label} {'↑' if b > 0 else '↓' if b < 0 else ''}".strip()
                                         for _, label, b in cols) + " |"
    lines = [f"# Evaluation: {res.info.get('prompt_set') or 'existing renders'}", "",
             f"{sum(m['n'] for m in res.means.values())} videos, {res.info['seconds']:.0f} s. Each video is scored "
             "against its shot as written (boxes and pan included, whatever its configuration renders).", "",
             head, "|" + "---|" * (len(cols) + 2)]
    for config, m in res.means.items():
        cells = ["–" if m[k] is None else f"{m[k]:.3f}" if abs(m[k]) < 100 else f"{m[k]:.0f}" for k, _, _ in cols]
        lines.append(f"| {config} | {m['n']} | " + " | ".join(cells) + " |")
    failed = res.info.get("failed") or []
    if failed:
        lines += ["", f"Failed, not scored ({len(failed)}):", ""] + [
            f"- {f['config']} x {f['shot']} seed {f['seed']}: {f['status']}: {f['error']}" for f in failed]
    if res.notes:
        by_reason: dict[str, list[str]] = {}
        for key, reasons in res.notes.items():
            for reason, n in reasons.items():
                by_reason.setdefault(reason, []).append(f"{key} ({n} of {len(res.rows)})")
        lines += ["", "Skipped (metric, videos):", ""] + [f"- {', '.join(keys)}: {reason}"
                                                          for reason, keys in by_reason.items()]
    lines += ["", "Dynamic degree: share of videos that are dynamic by VBench's rule (Farnebäck flow, not RAFT). "
              "T-Cons (pixel) is this project's stand-in when no CLIP weights are cached, not the papers' metric. "
              "Definitions and sources: results.json `definitions`, studio/metrics.py."]
    return "\n".join(lines) + "\n"


def write_plot(res: EvalResult, path: str | Path) -> Path:
    """A PNG: one bar panel per metric shown in the table, one bar per configuration (OpenCV drawing, no
    matplotlib needed)."""
    import cv2

    cols = [m for m in _shown(res) if m[0] != "render_s"] or _shown(res)
    configs = list(res.means)
    palette = [(66, 133, 244), (219, 68, 55), (244, 180, 0), (15, 157, 88), (171, 71, 188), (0, 172, 193),
               (255, 112, 67), (158, 157, 36), (92, 107, 192)]
    pw, ph, per_row = 260, 200, 4
    rows_n = max(1, -(-len(cols) // per_row))
    legend_h = 24 + 18 * len(configs)
    img = np.full((rows_n * ph + legend_h, per_row * pw, 3), 255, np.uint8)
    font = cv2.FONT_HERSHEY_SIMPLEX
    for i, (key, label, better) in enumerate(cols):
        ox, oy = (i % per_row) * pw, (i // per_row) * ph
        vals = [res.means[c][key] for c in configs]
        top = max([abs(v) for v in vals if v is not None] + [1e-9])
        cv2.putText(img, label + (" (higher better)" if better > 0 else " (lower better)" if better < 0 else ""),
                    (ox + 8, oy + 18), font, 0.38, (0, 0, 0), 1, cv2.LINE_AA)
        base = oy + ph - 30
        cv2.line(img, (ox + 10, base), (ox + pw - 10, base), (0, 0, 0), 1)
        bw = max(4, (pw - 30) // max(1, len(configs)) - 6)
        for j, v in enumerate(vals):
            x = ox + 16 + j * (bw + 6)
            colour = palette[j % len(palette)][::-1]  # RGB -> BGR
            if v is None:
                cv2.putText(img, "n/a", (x, base - 4), font, 0.3, (120, 120, 120), 1, cv2.LINE_AA)
                continue
            h = int((ph - 70) * abs(v) / top)
            cv2.rectangle(img, (x, base - h), (x + bw, base), colour, -1)
            cv2.putText(img, f"{v:.2f}", (x, base - h - 4), font, 0.3, (0, 0, 0), 1, cv2.LINE_AA)
    for j, c in enumerate(configs):
        y = rows_n * ph + 18 + 18 * j
        cv2.rectangle(img, (10, y - 10), (24, y + 2), palette[j % len(palette)][::-1], -1)
        cv2.putText(img, c, (30, y), font, 0.42, (0, 0, 0), 1, cv2.LINE_AA)
    path = Path(path)
    if not cv2.imwrite(str(path), img):
        raise OSError(f"could not write {path}")
    return path
