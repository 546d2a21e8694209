"""`studio batch`: shot files × sweeps -> one render each, a manifest, a contact sheet; resumable.

The pieces, so that another executor (a Ray cluster, issue 21) can run the same jobs and the driver writes the same
outputs:

    parse_sweep("seed=1..16")       a Sweep: a field and its values (a YAML list, or an inclusive integer range)
    plan(shots, out, sweeps, sets)  the driver: every job built from its shot file, --set and one value of each sweep,
                                    validated (engine.prepare, the subjects against the library) and named after its
                                    swept values, its output paths checked, ordered by pipeline and subjects; the
                                    hash of the render already beside its outputs read from that sidecar. BatchError
                                    (one line, nothing rendered) if any job cannot render.
    execute(job, manager)           a worker: the job's hash on this machine (resolved shot, weights' identity,
                                    pixel-changing settings), then "skipped" when it equals the recorded one, else
                                    the render. Writes no files; the Outcome is plain, picklable data.
    Executor / LocalExecutor        runs jobs and hands each Outcome to the driver; LocalExecutor: in this process, in
                                    the plan's order, on one PipelineManager (a model loads once)
    Recorder                        the driver: writes a rendered job's MP4 + sidecar (all or nothing), the manifest
                                    (JSON + CSV) after every job, the contact sheet at the end
    run(plan, executor)             the batch: executor -> recorder, stop (Ctrl-C) honoured between jobs

Job hash = SHA-256 of the resolved shot, the content hashes of the components, trained subjects and input files
(studio.identity, as the sidecar records them) and the pixel-changing machine settings (studio.machine.RECORDED).
It is computed from a sidecar's own "shot", "identity" and "settings", so any render's sidecar can be checked.

Shapes: frames (F, H, W, 3) uint8.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import logging
import math
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from studio import shot as shotlib

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 1
MANIFEST_JSON = "manifest.json"
MANIFEST_CSV = "manifest.csv"
CONTACT_SHEET = "contact_sheet.png"  # then contact_sheet-2.png, ...: SHEET_ROWS jobs a page
SHEET_ROWS = 100
RESERVED_STEMS = {Path(MANIFEST_JSON).stem.lower()}  # a job's sidecar must not be the manifest
MAX_JOBS = 10_000
MAX_NAME = 120  # characters of a job's file stem (then shortened, with a hash)

# Job statuses in the manifest
DONE, SKIPPED, FAILED, PENDING, CANCELLED = "done", "skipped", "failed", "pending", "cancelled"
# Outcome statuses from an executor
RENDERED = "rendered"

# Exit statuses of `studio batch`
EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_FAILED_BASE = 10  # 10 + the number of failed jobs (at most 110: 100 or more failed)
EXIT_INTERRUPTED = 130


class BatchError(ValueError):
    """The batch cannot start (bad sweep, bad shot, invalid jobs, bad output folder); nothing was rendered."""


# --- sweeps ------------------------------------------------------------------------------------------------------

_RANGE = re.compile(r"\s*([+-]?\d+)\s*\.\.\s*([+-]?\d+)\s*")


@dataclass(frozen=True)
class Sweep:
    field: str  # a dotted shot field, as --set takes it ('noise_prior.gamma', 'subjects.0.boxes.7')
    values: tuple  # the values, in the order given (plain YAML/JSON values)

    def override(self, value) -> str:
        """The --set override giving the field this value."""
        return f"{self.field}={json.dumps(value)}"


def parse_sweep(text: str) -> Sweep:
    """'FIELD=VALUES': a YAML list ('noise_prior.gamma=[0, 0.2, 0.5]') or an inclusive integer range ('seed=1..16').
    The values are parsed as --set parses a value; ShotError naming --sweep for anything else."""
    if "=" not in text:
        raise shotlib.ShotError("--sweep", text, "a sweep is field=[v1, v2, ...] or field=a..b, e.g. seed=1..16")
    key, values_text = text.split("=", 1)
    key = key.strip()
    if not key or not all(p.strip() for p in key.split(".")) or any(c.isspace() for c in key):
        raise shotlib.ShotError("--sweep", text, "the field must be a dotted shot field, e.g. noise_prior.gamma")
    where = f"--sweep {key}"
    m = _RANGE.fullmatch(values_text)
    if m:
        a, b = int(m.group(1)), int(m.group(2))
        if b < a:
            raise shotlib.ShotError(where, values_text, f"empty range: {a}..{b} has no values (ranges are "
                                                        f"inclusive: a..b with a <= b)")
        if b - a + 1 > MAX_JOBS:
            raise shotlib.ShotError(where, values_text, f"{b - a + 1} values; a batch has at most {MAX_JOBS} jobs")
        return Sweep(key, tuple(range(a, b + 1)))
    from omegaconf import OmegaConf

    try:
        parsed = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={values_text}"]), resolve=False)["v"]
    except Exception as e:  # YAML parser errors come in several types
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise shotlib.ShotError(where, values_text, f"not a YAML list: {reason}") from None
    if not isinstance(parsed, list):
        raise shotlib.ShotError(where, values_text, "give a YAML list [v1, v2, ...] or an inclusive integer range "
                                                    "a..b (one value: use --set)")
    if not parsed:
        raise shotlib.ShotError(where, values_text, "the list is empty: a sweep needs at least one value")
    seen: set[str] = set()
    for v in parsed:
        canon = json.dumps(v, sort_keys=True)
        if canon in seen:
            raise shotlib.ShotError(where, v, "the same value twice in one sweep")
        seen.add(canon)
    return Sweep(key, tuple(parsed))


# --- jobs --------------------------------------------------------------------------------------------------------


@dataclass
class Job:
    """One render of a batch: plain, picklable data (what an executor needs, and nothing it must not have)."""

    index: int  # position in the cartesian product: the manifest's and the contact sheet's order
    id: str  # file-safe name saying the shot and the swept values; the stem of its outputs
    shot_file: str  # the shot file as given
    values: dict[str, Any]  # {swept field: value}
    overrides: list[str]  # --set overrides, then one per sweep
    shot: shotlib.Shot  # resolved (every default filled in): what renders
    model: str  # the model preset's name
    subjects: tuple[str, ...]  # trained subjects the shot uses
    group: tuple  # (pipeline key, subjects): jobs sharing it share a loaded pipeline and its subject weights
    previous_hash: str | None = None  # job hash of the render beside the outputs (video and sidecar both there)

    @property
    def video(self) -> str:
        return f"{self.id}.mp4"

    @property
    def sidecar(self) -> str:
        return f"{self.id}.json"

    def label(self, with_shot: bool = True) -> list[str]:
        """Lines naming the job: the shot file's stem (when the batch has several) and each swept value."""
        lines = [Path(self.shot_file).stem] if with_shot else []
        return lines + [f"{k} = {show_value(v)}" for k, v in self.values.items()]


@dataclass
class Plan:
    out: Path
    shot_files: list[str]
    sweeps: list[Sweep]
    overrides: list[str]
    jobs: list[Job]  # product order
    order: list[Job]  # execution order: grouped by pipeline, then by subjects


def show_value(v) -> str:
    return v if isinstance(v, str) else json.dumps(v)


_UNSAFE = re.compile(r"[^A-Za-z0-9._,=+-]+")


def _safe(text: str) -> str:
    return _UNSAFE.sub("_", text).strip("_").lstrip(".") or "_"


def _slug(value) -> str:
    """A value as it reads in a file name: 0.2, 7, a_red_circle, 0.5,0.5,0.9,0.9."""
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    if not isinstance(value, str):
        text = text.translate(str.maketrans({"[": "", "]": "", "{": "", "}": "", '"': "", ":": "-"}))
    return _safe(text)


def _short_hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:8]


def job_names(items: list[tuple[str, dict]]) -> list[str]:
    """File-safe, unique names for (shot file, swept values) pairs: 'star__seed=3__noise_prior.gamma=0.2'. A name
    that is too long, or would collide (case-insensitively, or with the manifest's own files), gets '~' and a short
    hash of what it stands for."""
    names = []
    for shot_file, values in items:
        name = "__".join([_safe(Path(shot_file).stem)] + [f"{_safe(k)}={_slug(v)}" for k, v in values.items()])
        if len(name) > MAX_NAME:
            name = f"{name[:MAX_NAME - 9]}~{_short_hash(shot_file, values)}"
        names.append(name)
    counts: dict[str, int] = {}
    for n in names:
        counts[n.lower()] = counts.get(n.lower(), 0) + 1
    return [f"{n[:MAX_NAME - 9]}~{_short_hash(f, v)}" if counts[n.lower()] > 1 or n.lower() in RESERVED_STEMS else n
            for n, (f, v) in zip(names, items)]


def _check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise shotlib.ShotError("--out", str(out), "a file, not a folder: give the folder the batch writes into")
    parent = next(p for p in out.absolute().parents if p.exists()) if not out.exists() else out
    if not parent.is_dir():
        raise shotlib.ShotError("--out", str(out), f"{parent} is a file, so no folder can be made there")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise shotlib.ShotError("--out", str(out), f"no permission to write in {parent}")


def _read_shot_file(path: str) -> dict:
    """The shot file's fields (checked: a ShotError names the file or the field)."""
    from omegaconf import OmegaConf

    shotlib.load(path)  # every check of `studio render`'s loading, errors naming the field
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    return data if data is not None else {}


def plan(shot_files: list[str], out: str | Path, sweeps: list[str | Sweep] = (), overrides: list[str] = (),
         library=None) -> Plan:
    """Every job of the batch, built and checked before anything renders (see the module doc). BatchError or
    ShotError (one line) if the batch cannot start."""
    from studio import engine, export
    from studio.pipelines import key_for
    from studio.subjects import apply as subjects

    out = Path(out)
    if not shot_files:
        raise BatchError("studio batch: give at least one shot file")
    for path in shot_files:
        if shot_files.count(path) > 1:
            raise shotlib.ShotError("shot", path, "the same shot file is given twice")
    _check_out_dir(out)
    sweeps = [parse_sweep(s) if isinstance(s, str) else s for s in sweeps]
    fields = [s.field for s in sweeps]
    for f in fields:
        if fields.count(f) > 1:
            raise shotlib.ShotError(f"--sweep {f}", f, "the same field is swept twice: give its values in one list")
    n = len(shot_files) * math.prod(len(s.values) for s in sweeps)
    if n > MAX_JOBS:
        raise BatchError(f"studio batch: {n} jobs (shots × sweep values); a batch has at most {MAX_JOBS}")
    overrides = list(overrides)
    data = {}
    for path in shot_files:
        try:
            data[path] = _read_shot_file(path)
            shotlib.from_container(data[path], overrides)  # --set itself, before the product multiplies its errors
        except shotlib.ShotError as e:
            raise BatchError(f"{path}: {e}") from None
    items = [(path, dict(zip(fields, combo))) for path in shot_files
             for combo in itertools.product(*(s.values for s in sweeps))]
    names = job_names(items)
    jobs, errors = [], []
    for k, ((path, values), name) in enumerate(zip(items, names)):
        sets = overrides + [s.override(values[s.field]) for s in sweeps]
        try:
            shot, preset = engine.prepare(shotlib.from_container(data[path], sets))
            _, records = subjects.plan(shot, preset, library)
            engine.check_outputs(out / f"{name}.mp4")
        except ValueError as e:  # ShotError included: it names the field
            errors.append((name, str(e)))
            continue
        used = tuple(rec.name for _, rec in records)
        jobs.append(Job(k, name, path, values, sets, shot, preset.name, used, (key_for(preset, "cpu"), used)))
    if errors:
        raise BatchError(_invalid_jobs(errors, len(items)))
    for job in jobs:
        video = out / job.video
        if video.is_file() and export.sidecar_path(video).is_file():
            job.previous_hash = sidecar_hash(export.sidecar_path(video))
    return Plan(out, list(shot_files), sweeps, overrides, jobs, order_jobs(jobs))


def order_jobs(jobs: list[Job]) -> list[Job]:
    """The jobs grouped by pipeline, and within a pipeline by trained subjects (each group in the order it first
    appears, each job in product order within its group): each model loads once and each set of subject weights
    is switched to once."""
    first_seen: dict = {}
    for job in jobs:
        first_seen.setdefault(("model", job.group[0]), len(first_seen))
        first_seen.setdefault(("group", job.group), len(first_seen))
    return sorted(jobs, key=lambda j: (first_seen["model", j.group[0]], first_seen["group", j.group], j.index))


def _invalid_jobs(errors: list[tuple[str, str]], total: int) -> str:
    """One line: how many jobs cannot render and why, jobs failing the same way named together."""
    by_problem: dict[str, list[str]] = {}
    for name, msg in errors:
        by_problem.setdefault(msg, []).append(name)
    parts = []
    for msg, names in list(by_problem.items())[:3]:
        who = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        parts.append(f"{msg} [{who}]")
    more = f" | and {len(by_problem) - 3} other problems" if len(by_problem) > 3 else ""
    return (f"studio batch: nothing was rendered: {len(errors)} of {total} jobs cannot render: "
            + " | ".join(parts) + more)


# --- the job hash ------------------------------------------------------------------------------------------------


def _plain(obj):
    """JSON's view of a value (int keys become strings, tuples lists), as a sidecar stores it."""
    return json.loads(json.dumps(obj, default=str))


def job_hash(shot: dict, identity: dict, settings: dict) -> str:
    """SHA-256 over what makes a render's pixels: the resolved shot, the content hash of every component, trained
    subject file and input file, and the pixel-changing machine settings. Where files came from and when a
    subject was created are left out: the same bytes render the same frames."""
    identity = identity or {}
    record = {
        "shot": shot,
        "components": {k: (v or {}).get("sha256") for k, v in (identity.get("components") or {}).items()},
        "subjects": {k: (v or {}).get("files") for k, v in (identity.get("subjects") or {}).items()},
        "inputs": identity.get("inputs") or {},
        "settings": settings or {},
    }
    text = json.dumps(_plain(record), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def sidecar_hash(path: str | Path) -> str | None:
    """The job hash of the render a sidecar describes (None: unreadable, or from a studio that did not record the
    identity and settings, so it cannot be trusted to match)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), dict) for k in ("shot", "identity", "settings")):
        return None
    return job_hash(data["shot"], data["identity"], data["settings"])


def current_hash(shot: shotlib.Shot, manager) -> str:
    """The job hash a render of `shot` would have on this machine now: the model's pipeline is loaded (or taken
    from the manager's cache) to read its components' identity and machine settings; nothing is rendered."""
    from studio import engine, machine
    from studio.subjects import apply as subjects

    shot, preset = engine.prepare(shot)
    _, records = subjects.plan(shot, preset)
    with manager.hold(preset) as pipe:
        ident = engine.render_identity(pipe, shot, preset, records)
        settings = machine.record(pipe)
    return job_hash(shotlib.to_dict(shot), ident, settings)


# --- executing a job (worker side) -------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What an executor hands back for one job (picklable)."""

    job_id: str
    status: str  # rendered | skipped | failed | cancelled
    job_hash: str | None = None
    seconds: float = 0.0
    error: str | None = None
    result: Any = None  # engine.RenderResult of a rendered job (frames, resolved shot, identity, settings, timings)
    written: bool = False  # the worker wrote the MP4 + sidecar itself (a shared folder): `result` is None then
    thumbs: list[bytes] | None = None  # with `written`: the contact sheet's thumbnails as PNG


def _error_text(e: BaseException) -> str:
    from studio.pipelines import ModelLoadError

    text = str(e).strip()
    line = text.splitlines()[0] if text else ""
    if isinstance(e, (ValueError, ModelLoadError)) and line:
        return line  # the studio's own errors name the field or the model
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


def execute(job: Job, manager, progress: Callable[[int, int], None] | None = None,
            cancel: threading.Event | None = None) -> Outcome:
    """Run one job on this machine's pipeline manager: skip it when its outputs' recorded hash equals its hash here,
    else render it. Never raises for a job's own failure (the Outcome says it); writes no files."""
    from studio import engine

    t0 = time.perf_counter()
    try:
        if job.previous_hash is not None:
            now = current_hash(job.shot, manager)
            if now == job.previous_hash:
                return Outcome(job.id, SKIPPED, now, time.perf_counter() - t0)
            logger.info("job %s: outputs are from another shot, model or setting; rendering again", job.id)
        result = engine.render(job.shot, manager, progress, cancel)
        h = job_hash(shotlib.to_dict(result.shot), result.identity, result.settings)
        return Outcome(job.id, RENDERED, h, time.perf_counter() - t0, result=result)
    except engine.RenderCancelled:
        return Outcome(job.id, CANCELLED, None, time.perf_counter() - t0, "cancelled (Ctrl-C)")
    except Exception as e:
        logger.info("job %s failed", job.id, exc_info=True)
        return Outcome(job.id, FAILED, None, time.perf_counter() - t0, _error_text(e))


def batch_record(job: Job, job_hash: str | None) -> dict:
    """The sidecar's "batch" key of a job's render."""
    return {"job_id": job.id, "job_hash": job_hash, "values": job.values, "shot_file": job.shot_file,
            "manifest": MANIFEST_JSON}


def write_on_worker(job: Job, outcome: Outcome, out: Path) -> Outcome:
    """A rendered job's MP4 + sidecar written by the worker into `out` (an output folder every machine mounts at
    the same path), as the Recorder would write them; the Outcome then carries thumbnails instead of frames. A
    failed write is a failed job."""
    from studio import engine

    t0 = time.perf_counter()
    try:
        engine.write_outputs(outcome.result, out / job.video, extra={"batch": batch_record(job, outcome.job_hash)})
        thumbs = [_png(t) for t in thumbnails(outcome.result.frames)]
    except Exception as e:
        logger.info("job %s: writing failed", job.id, exc_info=True)
        return Outcome(job.id, FAILED, outcome.job_hash, outcome.seconds + time.perf_counter() - t0, _error_text(e))
    return Outcome(job.id, RENDERED, outcome.job_hash, outcome.seconds + time.perf_counter() - t0, written=True,
                   thumbs=thumbs)


Deliver = Callable[[Job, Outcome], None]
StepProgress = Callable[[Job, int, int], None]


class Executor(Protocol):
    """Runs a batch's jobs. `run` calls deliver(job, outcome) on the calling (driver) thread for each job it ran,
    and returns when every job was delivered, or, once `stop` is set, after delivering the jobs already started
    (no new ones start). `cancel` asks running renders to stop between denoising steps (Outcome "cancelled").
    `loads`: pipelines loaded so far (all workers together)."""

    loads: int

    def run(self, jobs: list[Job], deliver: Deliver, stop: threading.Event, cancel: threading.Event,
            on_step: StepProgress | None = None) -> None: ...


def _steps_of(job: Job, on_step: StepProgress | None) -> Callable[[int, int], None] | None:
    """The engine's per-step progress (i, n) of one job, as the batch's (job, i, n)."""
    if on_step is None:
        return None

    def step(i: int, n: int) -> None:
        on_step(job, i, n)

    return step


class LocalExecutor:
    """Jobs one after another in this process, in the given order, on one pipeline manager (one pipeline kept: the
    plan's order loads each model once)."""

    def __init__(self, manager=None):
        from studio.pipelines import PipelineManager

        self.manager = manager or PipelineManager(max_pipelines=1)
        self._loads0 = self.manager.loads

    @property
    def loads(self) -> int:
        return self.manager.loads - self._loads0

    def info(self) -> dict:
        """The manifest's "executor"."""
        return {"kind": "local", "workers": 1, "devices": [self.manager.device]}

    def run(self, jobs: list[Job], deliver: Deliver, stop: threading.Event, cancel: threading.Event,
            on_step: StepProgress | None = None) -> None:
        for job in jobs:
            if stop.is_set():
                return
            if on_step is not None:
                on_step(job, 0, 1)  # the job starts (its model may load first)
            deliver(job, execute(job, self.manager, _steps_of(job, on_step), cancel))


# --- the driver: outputs, manifest, contact sheet ----------------------------------------------------------------


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Report:
    counts: dict[str, int]
    loads: int
    interrupted: bool
    manifest: Path
    csv: Path
    contact_sheets: list[Path]
    seconds: float

    @property
    def exit_status(self) -> int:
        """0 every job done or skipped; 130 interrupted (Ctrl-C); else 10 + the number of failed jobs (≤ 110)."""
        if self.interrupted:
            return EXIT_INTERRUPTED
        failed = self.counts.get(FAILED, 0)
        return EXIT_FAILED_BASE + min(failed, 100) if failed else EXIT_OK


class Recorder:
    """The driver's side of a batch: every output under the plan's folder.

    - a rendered job's MP4 + sidecar (engine.write_outputs: all or nothing; the sidecar's "batch" key holds the job
      id, hash and swept values);
    - manifest.json and manifest.csv, rewritten (atomically) at the start and after every job, so they are
      consistent whenever the batch stops;
    - contact_sheet.png at the end: first / middle / last frame of every job, labelled by its swept values
      (contact_sheet-2.png, ... beyond SHEET_ROWS jobs).
    """

    def __init__(self, plan: Plan, loads: Callable[[], int] = lambda: 0,
                 executor_info: Callable[[], dict] | None = None):
        self.plan = plan
        self.loads = loads
        self.executor_info = executor_info
        self.started = _now()
        self.t0 = time.perf_counter()
        self.rows = {j.id: {"id": j.id, "index": j.index, "shot": j.shot_file, "values": j.values, "model": j.model,
                            "job_hash": None, "status": PENDING, "seconds": None, "video": None, "sidecar": None,
                            "error": None} for j in plan.jobs}
        self.thumbs: dict[str, list[bytes]] = {}  # job id -> its contact-sheet thumbnails as PNG (memory is bounded)
        self.status = "running"
        self.contact_sheets: list[Path] = []
        plan.out.mkdir(parents=True, exist_ok=True)
        self.write_manifest()

    def record(self, job: Job, outcome: Outcome) -> dict:
        from studio import engine

        row = self.rows[job.id]
        row.update(job_hash=outcome.job_hash, seconds=round(outcome.seconds, 3), error=outcome.error)
        if outcome.status == RENDERED and outcome.written:  # by the worker, into this folder (shared)
            row.update(status=DONE, video=job.video, sidecar=job.sidecar)
            self.thumbs[job.id] = list(outcome.thumbs or [])
        elif outcome.status == RENDERED:
            t0 = time.perf_counter()
            try:
                engine.write_outputs(outcome.result, self.plan.out / job.video,
                                     extra={"batch": batch_record(job, outcome.job_hash)})
                row.update(status=DONE, video=job.video, sidecar=job.sidecar)
                self.thumbs[job.id] = [_png(t) for t in thumbnails(outcome.result.frames)]
            except Exception as e:  # a full disk, a folder gone: this job fails, the batch goes on
                logger.info("job %s: writing failed", job.id, exc_info=True)
                row.update(status=FAILED, error=_error_text(e))
            row["seconds"] = round(outcome.seconds + time.perf_counter() - t0, 3)
        elif outcome.status == SKIPPED:
            row.update(status=SKIPPED, video=job.video, sidecar=job.sidecar)
        else:
            row.update(status=outcome.status)
        self.write_manifest()
        return row

    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in (DONE, SKIPPED, FAILED, CANCELLED, PENDING)}
        for row in self.rows.values():
            out[row["status"]] += 1
        return out

    def manifest(self) -> dict:
        return {
            "version": MANIFEST_VERSION,
            "status": self.status,
            "started": self.started,
            "finished": None if self.status == "running" else _now(),
            "seconds": round(time.perf_counter() - self.t0, 3),
            "shots": self.plan.shot_files,
            "sweeps": [{"field": s.field, "values": list(s.values)} for s in self.plan.sweeps],
            "overrides": self.plan.overrides,
            "counts": self.counts(),
            "pipeline_loads": self.loads(),
            **({"executor": self.executor_info()} if self.executor_info is not None else {}),
            "order": [j.id for j in self.plan.order],
            "contact_sheets": [p.name for p in self.contact_sheets],
            "jobs": [self.rows[j.id] for j in self.plan.jobs],
        }

    def csv_text(self) -> str:
        fields = [s.field for s in self.plan.sweeps]
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["id", "shot", *fields, "job_hash", "status", "seconds", "video", "sidecar", "error"])
        for j in self.plan.jobs:
            r = self.rows[j.id]
            w.writerow([r["id"], r["shot"], *(show_value(j.values[f]) for f in fields),
                        *("" if r[k] is None else r[k] for k in ("job_hash", "status", "seconds", "video", "sidecar",
                                                                  "error"))])
        return buf.getvalue()

    def write_manifest(self) -> None:
        from studio import export

        outputs = export.OutputSet()
        try:
            export.write_json(outputs.file(self.plan.out / MANIFEST_JSON), self.manifest())
            tmp = outputs.file(self.plan.out / MANIFEST_CSV)
            tmp.write_text(self.csv_text(), encoding="utf-8")
            tmp.chmod(0o644)
            outputs.commit()
        except BaseException:
            outputs.discard()
            raise

    def finish(self, interrupted: bool) -> Report:
        """The contact sheet, then the final manifest."""
        from studio import export

        self.status = "interrupted" if interrupted else "finished"
        try:
            jobs = self.plan.jobs
            pages = [jobs[i:i + SHEET_ROWS] for i in range(0, len(jobs), SHEET_ROWS)]
            paths = [self.plan.out / sheet_name(k) for k in range(len(pages))]
            outputs = export.OutputSet()
            try:
                for page, path in zip(pages, paths):  # one page's frames in memory at a time
                    tmp = outputs.file(path)
                    contact_sheet([self._sheet_row(job) for job in page]).save(tmp, format="PNG")
                    tmp.chmod(0o644)
                outputs.commit()
            except BaseException:
                outputs.discard()
                raise
            self.contact_sheets = paths
            k = len(pages)
            while (self.plan.out / sheet_name(k)).is_file():  # pages of an earlier, longer batch
                (self.plan.out / sheet_name(k)).unlink()
                k += 1
        except Exception:  # the sheet only summarises: its failure must not lose the manifest
            logger.warning("could not write the contact sheet", exc_info=True)
        self.write_manifest()
        return Report(self.counts(), self.loads(), interrupted, self.plan.out / MANIFEST_JSON,
                      self.plan.out / MANIFEST_CSV, self.contact_sheets, time.perf_counter() - self.t0)

    def _sheet_row(self, job: Job) -> tuple[list[str], list[np.ndarray] | None]:
        """A job's contact-sheet label and thumbnails (a skipped job's from its video)."""
        from studio import export

        r = self.rows[job.id]
        thumbs = [_unpng(b) for b in self.thumbs[job.id]] if job.id in self.thumbs else None
        if thumbs is None and r["status"] == SKIPPED:
            try:
                thumbs = thumbnails(export.read_video(self.plan.out / job.video))
            except Exception:
                logger.info("job %s: could not read its video for the contact sheet", job.id, exc_info=True)
        label = job.label(len(self.plan.shot_files) > 1) or [job.id]
        if r["status"] not in (DONE, SKIPPED):
            label.append(r["status"] + (f": {r['error']}" if r["error"] else ""))
        return label, thumbs


# --- contact sheet -----------------------------------------------------------------------------------------------

THUMB_HEIGHT = 128
THUMB_MAX_WIDTH = 256
LABEL_WIDTH = 260
PAD = 6
HEADER = 20
COLUMNS = ("first", "middle", "last")


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _unpng(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def frame_indices(n: int) -> list[int]:
    """First, middle and last frame of n."""
    return [0, (n - 1) // 2, n - 1]


def thumbnails(frames: np.ndarray) -> list[np.ndarray]:
    """The first, middle and last frame (F, H, W, 3) scaled to THUMB_HEIGHT rows (nearest when enlarging, so a
    32-pixel frame stays crisp; area-averaged when shrinking)."""
    from PIL import Image

    out = []
    for i in frame_indices(len(frames)):
        im = Image.fromarray(np.ascontiguousarray(frames[i]))
        w = max(1, min(THUMB_MAX_WIDTH, round(im.width * THUMB_HEIGHT / im.height)))
        resample = Image.Resampling.NEAREST if im.height <= THUMB_HEIGHT else Image.Resampling.BOX
        out.append(np.asarray(im.resize((w, THUMB_HEIGHT), resample)))
    return out


def sheet_cells(n_rows: int, widths: list[int]) -> list[list[tuple[int, int]]]:
    """Top-left (x, y) of each row's three thumbnails; `widths` are the columns' widths."""
    cells = []
    for r in range(n_rows):
        y = HEADER + PAD + r * (THUMB_HEIGHT + PAD)
        x = LABEL_WIDTH + PAD
        row = []
        for w in widths:
            row.append((x, y))
            x += w + PAD
        cells.append(row)
    return cells


def sheet_name(page: int) -> str:
    """contact_sheet.png, contact_sheet-2.png, ... (page counts from 0)."""
    return CONTACT_SHEET if page == 0 else f"{Path(CONTACT_SHEET).stem}-{page + 1}.png"


def contact_sheet(rows: list[tuple[list[str], list[np.ndarray] | None]]):
    """A PIL image: one row per job (its label lines, then its first / middle / last frame thumbnails; a grey box
    for a job without frames)."""
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    width = max([t.shape[1] for _, thumbs in rows if thumbs for t in thumbs] or [THUMB_HEIGHT])
    widths = [width] * len(COLUMNS)
    cells = sheet_cells(len(rows), widths)
    size = (LABEL_WIDTH + PAD + len(COLUMNS) * (width + PAD), HEADER + PAD + len(rows) * (THUMB_HEIGHT + PAD))
    sheet = Image.new("RGB", size, (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    chars = max(8, int(LABEL_WIDTH / max(1.0, draw.textlength("x" * 10, font=font) / 10)) - 1)
    for c, name in enumerate(COLUMNS):
        draw.text((LABEL_WIDTH + PAD + c * (width + PAD), 4), name, fill=(200, 200, 200), font=font)
    for (label, thumbs), row in zip(rows, cells):
        lines = [part for line in label for part in textwrap.wrap(line, chars) or [""]]
        y = row[0][1]
        for line in lines[:THUMB_HEIGHT // 14]:
            draw.text((PAD, y), line, fill=(235, 235, 235), font=font)
            y += 14
        for c, (x, y0) in enumerate(row):
            if thumbs:
                t = thumbs[c]
                sheet.paste(Image.fromarray(t), (x + (width - t.shape[1]) // 2, y0))
            else:
                draw.rectangle([x, y0, x + width - 1, y0 + THUMB_HEIGHT - 1], fill=(70, 70, 70))
    return sheet


# --- progress ----------------------------------------------------------------------------------------------------


def _clock(seconds: float) -> str:
    seconds = max(0, round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class ProgressBar:
    """Progress across the batch's jobs on a stream (stderr): a bar redrawn at each denoising step on a terminal,
    one line per finished job otherwise. ETA: the mean time of the rendered jobs so far times the work left.
    A failed job is always a line of its own; `quiet`: nothing else (no bar, no per-job lines)."""

    WIDTH = 24

    def __init__(self, total: int, stream=None, tty: bool | None = None, quiet: bool = False, workers: int = 1):
        self.total = total
        self.workers = max(1, workers)  # jobs running at once (a Ray farm): the ETA divides by them
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.tty = False if quiet else self.stream.isatty() if tty is None else tty
        self.finished = 0
        self.rendered_s = 0.0
        self.rendered = 0
        self.counts: dict[str, int] = {}
        self.job: Job | None = None
        self.job_t0 = time.perf_counter()
        self.fraction = 0.0
        self._last_draw = 0.0

    def eta(self) -> float | None:
        left = self.total - self.finished - self.fraction
        if self.rendered:
            return left * self.rendered_s / self.rendered / self.workers
        elapsed = time.perf_counter() - self.job_t0
        if self.job is not None and self.fraction > 0.05:
            return left * elapsed / self.fraction
        return None

    def line(self) -> str:
        done = (self.finished + self.fraction) / max(1, self.total)
        filled = round(done * self.WIDTH)
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        counts = ", ".join(f"{v} {k}" for k, v in self.counts.items() if v)
        eta = self.eta()
        text = f"[{bar}] {self.finished}/{self.total} jobs" + (f" ({counts})" if counts else "")
        text += f"  ETA {_clock(eta)}" if eta is not None else "  ETA --:--"
        if self.job is not None:
            text += f"  {self.job.id}"
        return text

    def start(self, job: Job) -> None:
        self.job, self.job_t0, self.fraction = job, time.perf_counter(), 0.0
        self._draw(force=True)

    def step(self, job: Job, i: int, n: int) -> None:
        if self.job is not job:
            self.start(job)
        self.fraction = min(1.0, i / max(1, n))
        self._draw()

    def done(self, job: Job, row: dict) -> None:
        status = row["status"]
        self.finished += 1
        self.counts[status] = self.counts.get(status, 0) + 1
        if status == DONE:
            self.rendered += 1
            self.rendered_s += row["seconds"] or 0.0
        self.job, self.fraction = None, 0.0
        if status == FAILED:
            self._print(f"job {job.id} failed: {row['error']}")
        elif not self.tty and not self.quiet:
            eta = self.eta()
            self._print(f"[{self.finished}/{self.total}] {job.id}: {status} {row['seconds'] or 0:.1f} s"
                        + (f"  ETA {_clock(eta)}" if eta is not None and self.finished < self.total else ""))
        self._draw(force=True)

    def note(self, text: str) -> None:
        self._print(text)

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def _print(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r\x1b[2K")
        self.stream.write(text + "\n")
        self.stream.flush()

    def _draw(self, force: bool = False) -> None:
        if not self.tty:
            return
        now = time.perf_counter()
        if not force and now - self._last_draw < 0.1:
            return
        self._last_draw = now
        self.stream.write("\r\x1b[2K" + self.line())
        self.stream.flush()


# --- the batch ---------------------------------------------------------------------------------------------------


@contextmanager
def sigint_stops(stop: threading.Event, cancel: threading.Event, notify: Callable[[str], None] | None = None):
    """While the block runs, Ctrl-C (SIGINT) sets `stop` (the batch ends after the current job); a second one sets
    `cancel` too (the current render stops at its next step, nothing of it written); a third is Python's
    KeyboardInterrupt. Only in the main thread (elsewhere signals cannot be handled): there it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        if not stop.is_set():
            stop.set()
            if notify:
                notify("Ctrl-C: stopping after the current job (Ctrl-C again to cancel it)")
        else:
            cancel.set()
            signal.signal(signal.SIGINT, previous)
            if notify:
                notify("Ctrl-C: cancelling the current job")

    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run(plan: Plan, executor: Executor | None = None, progress: ProgressBar | None = None,
        stop: threading.Event | None = None, cancel: threading.Event | None = None) -> Report:
    """Run a planned batch: the executor runs the jobs (LocalExecutor by default), the Recorder writes each one's
    outputs and the manifest as it arrives, and the contact sheet and final manifest at the end, also when the
    batch is stopped (`stop`, Ctrl-C) or an exception ends it."""
    executor = executor or LocalExecutor()
    stop = stop or threading.Event()
    cancel = cancel or threading.Event()
    recorder = Recorder(plan, lambda: executor.loads, getattr(executor, "info", None))

    def deliver(job: Job, outcome: Outcome) -> None:
        row = recorder.record(job, outcome)
        if progress is not None:
            progress.done(job, row)

    on_step = progress.step if progress is not None else None
    completed = False
    try:
        executor.run(plan.order, deliver, stop, cancel, on_step)
        completed = True
    finally:
        if progress is not None:
            progress.close()
        counts = recorder.counts()
        unfinished = counts[PENDING] + counts[CANCELLED] > 0
        report = recorder.finish(interrupted=not completed or (stop.is_set() and unfinished))
    return report


def summary(report: Report) -> str:
    c = report.counts
    parts = [f"{c[DONE]} done", f"{c[SKIPPED]} skipped", f"{c[FAILED]} failed"]
    parts += [f"{c[k]} {k}" for k in (CANCELLED, PENDING) if c[k]]
    head = "interrupted: " if report.interrupted else ""
    return (f"{head}{sum(c.values())} jobs: {', '.join(parts)}; {report.loads} model load(s), {report.seconds:.1f} s  "
            f"manifest {report.manifest}"
            + (f"  contact sheet {', '.join(map(str, report.contact_sheets))}" if report.contact_sheets else ""))
