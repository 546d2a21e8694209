"""The `studio` command line: render shots headless, list presets, start the UI, build the embedded model.

Bad input prints one line on stderr and exits with status 2, leaving nothing half-written.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2
STUDIO_PACKAGE = Path(__file__).resolve().parent  # code in here raises input errors; elsewhere, faults


def _quiet_libraries(verbose: bool) -> None:
    """Libraries' notices go to the log, not the terminal: warnings (e.g. huggingface_hub's UserWarnings while a
    model fails to load) become records of the 'py.warnings' logger, shown only with --verbose."""
    import os

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.WARNING if verbose else logging.CRITICAL)


def _is_input_error(e: BaseException) -> bool:
    """Errors that are the user's input (exit 2, one line): ShotError, ModelLoadError, and ValueErrors raised by
    the studio's own code at its boundaries. A ValueError from inside torch, diffusers or another library is a
    fault and keeps its traceback."""
    from studio.pipelines import ModelLoadError
    from studio.shot import ShotError

    if isinstance(e, (ShotError, ModelLoadError)):
        return True
    if not isinstance(e, ValueError):
        return False
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(STUDIO_PACKAGE)


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


EXIT_MISMATCH = 1
EXIT_FAILED_BASE = 10  # studio batch / eval --ray: 10 + the number of failed jobs


def _manager(args):
    """The pipeline manager of a command: the machine settings of the environment and the command's flags, checked
    against this machine (one line naming the flag or variable when it cannot do them). Without flags that change
    the environment's settings, the process's own manager (engine.default_manager), with what it has loaded."""
    from studio import engine, machine
    from studio.pipelines import PipelineManager

    settings = machine.from_args(args)
    if settings == machine.from_env():
        return engine.default_manager()
    return PipelineManager(settings=settings)


def use_step_cache(args) -> None:
    """--step-cache NAME: the machine's step cache for this process (SHOT_STUDIO_STEP_CACHE), checked here."""
    import os

    from studio import step_caches

    if getattr(args, "step_cache", None) is not None:
        step_caches.parse(args.step_cache, "--step-cache")
        os.environ[step_caches.ENV] = args.step_cache
    else:
        step_caches.configured()  # a bad SHOT_STUDIO_STEP_CACHE is one line too


def cli_preset(model: str, args):
    """The model preset as the CLI flags change it (--random-weights, --width-factor), or None when they don't."""
    if getattr(args, "width_factor", None) is not None and not args.random_weights:
        from studio.shot import ShotError

        raise ShotError("--width-factor", args.width_factor, "only applies with --random-weights")
    if not getattr(args, "random_weights", False):
        return None
    from studio import presets

    return presets.with_random_weights(presets.load_model_preset(model), args.width_factor)


def _add_weight_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--random-weights", action="store_true",
                        help="random weights of the model's real layout (its published configs, presets/configs/) "
                             "instead of its weights: no download; recorded in the sidecar")
    parser.add_argument("--width-factor", type=float, metavar="F",
                        help="with --random-weights: the same layout with every channel width x F (heads and depths "
                             "kept), e.g. 0.125 for a CPU")


def cmd_render(args) -> int:
    from studio import engine, shot as shotlib

    use_step_cache(args)
    if args.verify:
        if args.shot or args.out:
            raise ValueError("--verify: give only the sidecar (the shot and outputs are the sidecar's)")
        return cmd_verify(args)
    if not args.shot:
        raise ValueError("studio render: give a shot file (or --verify SIDECAR.json)")
    if not args.out:
        raise ValueError("--out: required: the .mp4 to write (its sidecar goes beside it as .json)")
    shot = shotlib.load(args.shot, args.set + [f"refine.{r}.enabled=true" for r in args.refine])
    preset = cli_preset(shot.model, args)
    last = [-1]

    def progress(i: int, n: int) -> None:
        if args.progress and i != last[0]:
            last[0] = i
            print(f"\rstep {i}/{n}", end="" if i < n else "\n", file=sys.stderr, flush=True)

    files = engine.render_to_files(shot, args.out, frames_dir=args.frames_dir, gif=args.gif, progress=progress,
                                   manager=_manager(args), preset=preset)
    r = files.result
    weights = f" (random weights, width {r.preset.width_factor:g})" if r.preset.random_weights else ""
    print(f"{files.video}  ({len(r.frames)} frames {r.frames.shape[2]}x{r.frames.shape[1]}, "
          f"model {r.preset.name}{weights}, "
          f"seed {r.shot.seed}, {r.timings['total']:.2f} s)  sidecar {files.sidecar}")
    return 0


def cmd_verify(args) -> int:
    """Re-render a sidecar's shot; exit 0 when the frames match, 1 when they do not."""
    from studio import verify

    v = verify.verify(args.verify, _manager(args))
    print(verify.format_report(v, args.verify))
    return 0 if v.frames_match else EXIT_MISMATCH


def cmd_batch(args) -> int:
    """Render every shot file × sweep value; resumable; exit 0 all done, 2 bad input, 10 + N when N jobs failed,
    130 when stopped by Ctrl-C (see studio.batch)."""
    import threading

    from studio import batch

    use_ray = _ray_flags(args)
    use_step_cache(args)
    overrides = args.set + [f"refine.{r}.enabled=true" for r in args.refine]
    plan = batch.plan(args.shots, args.out, args.sweep, overrides)
    from diffusers.utils import logging as diffusers_logging  # after the plan: bad input answers without diffusers
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()  # their loading bars would break the batch's own
    transformers_logging.disable_progress_bar()
    stop, cancel = threading.Event(), threading.Event()
    if not use_ray:
        bar = batch.ProgressBar(len(plan.jobs), quiet=not args.progress)  # failures are shown either way
        with batch.sigint_stops(stop, cancel, bar.note):
            report = batch.run(plan, batch.LocalExecutor(), bar, stop, cancel)
        print(batch.summary(report))
        return report.exit_status
    from studio import ray_farm

    faults = ray_farm.faults_from_env()
    shared = plan.out.absolute() if args.ray_shared else None
    with ray_farm.farm(args.ray_address, args.ray_workers, shared, args.verbose) as farm:
        bar = batch.ProgressBar(len(plan.jobs), quiet=not args.progress, workers=farm.pool.size)
        executor = ray_farm.RayExecutor(farm.pool, args.ray_retries, shared, faults, notify=bar.note)
        if args.progress:
            bar.note(f"ray: {farm.describe()}")
        with batch.sigint_stops(stop, cancel, bar.note):
            report = batch.run(plan, executor, bar, stop, cancel)
        replaced = executor.info()["replaced"]
        where = farm.pool.describe() + (f", {replaced} replaced after dying" if replaced else "")
    print(f"{batch.summary(report)}  ({where})")
    return report.exit_status


def _ray_flags(args) -> bool:
    """Whether the command runs on Ray (--ray or --ray-address); the Ray flags checked, and Ray importable, before
    anything else (one line, exit 2)."""
    use = bool(args.ray or args.ray_address)
    if not use:
        for flag, value in (("--ray-workers", args.ray_workers), ("--ray-retries", args.ray_retries),
                            ("--ray-shared", getattr(args, "ray_shared", False) or None)):
            if value is not None:
                raise ValueError(f"{flag}: only with --ray (or --ray-address)")
        return False
    from studio import ray_farm

    ray_farm.import_ray()
    if args.ray_workers is not None and args.ray_workers < 1:
        raise ValueError(f"--ray-workers: must be 1 or more (got {args.ray_workers})")
    if args.ray_retries is None:
        args.ray_retries = ray_farm.DEFAULT_RETRIES
    if args.ray_retries < 0:
        raise ValueError(f"--ray-retries: must be 0 or more (got {args.ray_retries})")
    return True


def _add_ray_flags(parser: argparse.ArgumentParser, what: str, shared: bool) -> None:
    parser.add_argument("--ray", action="store_true",
                        help=f"render the {what} on a Ray cluster (the optional extra: pip install -e \".[ray]\"): "
                             "one worker per GPU, or per CPU with one torch thread each; without --ray-address it "
                             "joins the cluster `ray start` runs on this machine, or starts a local one")
    parser.add_argument("--ray-address", metavar="ADDRESS",
                        help="the Ray cluster's head, HOST:PORT (implies --ray; also ray://HOST:PORT, auto)")
    parser.add_argument("--ray-workers", type=int, metavar="N", help="at most N Ray workers (default: one per GPU, "
                                                                      "or one per CPU on a CPU-only cluster)")
    parser.add_argument("--ray-retries", type=int, metavar="N",
                        help="a job whose worker dies (killed, out of memory) runs again on a new worker up to N "
                             "times, then it is recorded as failed (default: 2)")
    if shared:
        parser.add_argument("--ray-shared", action="store_true",
                            help="--out is a folder every node mounts at the same path (NFS, ...): the workers write "
                                 "each job's MP4 + sidecar there themselves, and only the job's record and "
                                 "thumbnails come back (no frames through Ray)")


def cmd_eval(args) -> int:
    from studio import evaluation

    use_ray = _ray_flags(args)
    if bool(args.prompt_set) == bool(args.videos):
        raise ValueError("studio eval: give a prompt set (YAML) or --videos, one of the two")
    if use_ray and args.videos:
        raise ValueError("--ray: renders prompt sets; --videos only scores renders that exist (no Ray needed)")
    scorer = evaluation.Scorer(clip_model=args.clip_model, dino_model=args.dino_model)
    if args.videos:
        res = evaluation.score_videos(args.videos, args.out, scorer)
    else:
        ps = evaluation.load_prompt_set(args.prompt_set)
        configs = [c.strip() for c in args.configs.split(",") if c.strip()] if args.configs else ps.configs
        evaluation.check_configs(configs, ps)
        if args.seeds:
            try:
                ps.seeds = [int(x) for x in args.seeds.split(",")]
            except ValueError:
                raise ValueError(f"--seeds: a comma-separated list of integers (got {args.seeds!r})") from None
        if args.limit:
            ps.shots = ps.shots[:args.limit]
        progress = (lambda msg: print(msg, file=sys.stderr, flush=True)) if args.progress else None
        if use_ray:
            from studio import ray_farm

            evaluation.plan_jobs(ps, configs, args.set)  # bad pairs answer before any cluster starts
            with ray_farm.farm(args.ray_address, args.ray_workers, None, args.verbose) as farm:
                if progress is not None:
                    progress(f"ray: {farm.describe()}")
                executor = ray_farm.RayExecutor(farm.pool, args.ray_retries, faults=ray_farm.faults_from_env(),
                                                notify=lambda msg: print(msg, file=sys.stderr, flush=True))
                res = evaluation.run_prompt_set(ps, configs, args.out, scorer, overrides=args.set, progress=progress,
                                                executor=executor)
        else:
            res = evaluation.run_prompt_set(ps, configs, args.out, scorer, overrides=args.set, progress=progress)
    print(evaluation.markdown(res))
    print(f"wrote {res.files['json']}, {res.files['markdown']}, {res.files['plot']}")
    failed = len(res.info.get("failed") or [])
    return EXIT_FAILED_BASE + min(failed, 100) if failed else 0


def cmd_bench(args) -> int:
    from studio import bench

    return bench.main(args)


def cmd_presets(args) -> int:
    from studio import presets

    print("model presets:")
    for name in presets.list_model_presets():
        p = presets.load_model_preset(name)
        d = p.defaults
        rule = f" ({p.frame_step}k+{p.frame_offset})" if p.frame_step > 1 else ""
        memory = f", peak memory {p.peak_memory}" if p.peak_memory else ""
        print(f"  {name:18s} {d.width}x{d.height}, {d.frames} frames{rule}, {d.steps} steps, {p.family}{memory}  "
              f"{p.description}")
    print("shot presets:")
    for name in presets.list_shot_presets():
        print(f"  {name:18s} {presets.shot_preset_path(name)}")
    return 0


def cmd_ui(args) -> int:
    from studio.ui import launch

    launch(host=args.host, port=args.port, share=args.share, manager=_manager(args))
    return 0


def train_config(args):
    """The TrainConfig of parsed `studio toyworld train` arguments (one flag per field)."""
    from studio.toyworld.train import TrainConfig

    return TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})


def cmd_toyworld_train(args) -> int:
    from studio.toyworld.train import train

    train(train_config(args))
    return 0


def cmd_toyworld_eval(args) -> int:
    import json

    from studio.toyworld import evaluate

    result = evaluate.evaluate(args.model, n=args.n, seed=args.seed, threads=args.threads)
    print(evaluate.format_report(result))
    if args.controls:
        result["controls"] = evaluate.measure_controls(args.model)
        print(json.dumps(result["controls"], indent=2))
    if args.card:
        Path(args.model, "README.md").write_text(evaluate.model_card(result, args.model, args.hardware,
                                                                     args.train_seconds))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def _subject_photos(folder: str):
    d = Path(folder)
    if not d.is_dir():
        raise ValueError(f"--images: not a folder (got {folder!r})")
    files = sorted(p for p in d.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise ValueError(f"--images: no files in {folder!r}")
    return files


def cmd_subject_add(args) -> int:
    from studio.subjects import masks as masklib, tune
    from studio.subjects.library import SubjectLibrary, import_photos

    words = (args.phrase or f"sks {args.name}").split()
    if len(words) < 2:
        raise ValueError(f"--phrase: needs a trigger word and the class word, e.g. 'sks dog' (got {args.phrase!r})")
    files = _subject_photos(args.images)
    photos = import_photos(files)
    if args.masks:
        by_stem = {p.stem: p for p in _subject_photos(args.masks)}
        missing = [f.name for f in files if f.stem not in by_stem]
        if missing:
            raise ValueError(f"--masks: no mask named like {missing[0]!r} in {args.masks!r}")
        masks = [masklib.load_mask(by_stem[f.stem]) for f in files]
    else:
        masks = []
        for f, ph in zip(files, photos):
            r = masklib.segment_word(ph, words[-1])
            logging.getLogger("studio").info("mask of %s: %s %s", f.name, r.backend, r.note)
            masks.append(r.mask)
    settings = tune.TuneSettings(method=args.method, class_word=words[-1], trigger=" ".join(words[:-1]),
                                 steps=args.steps, seed=args.seed, preservation=args.preservation)

    def progress(i, n, loss, left, stage="training"):
        if not args.progress:
            return
        if stage == "preservation":  # the frozen model making its preservation clips (once per base model)
            print(f"\rpreservation clip {i}/{n}", end="" if i < n else "\n", file=sys.stderr, flush=True)
        else:
            print(f"\rstep {i}/{n}  loss {loss:.4f}  {left:.0f} s left", end="" if i < n else "\n",
                  file=sys.stderr, flush=True)

    model = cli_preset(args.model, args) or args.model
    subject, result = tune.add_subject(args.name, photos, masks, model, settings, SubjectLibrary(),
                                       manager=_manager(args), progress=progress, overwrite=args.overwrite,
                                       photo_names=[f.name for f in files])
    print(f"{subject.name}: {', '.join(subject.methods)} for {subject.base_model}, phrase "
          f"'{subject.trigger} {subject.class_word}', {subject.photos} photos, {result.seconds:.0f} s  {subject.path}")
    return 0


def cmd_subject_list(args) -> int:
    from studio.subjects.library import SubjectLibrary

    lib = SubjectLibrary()
    subjects = lib.list()
    if not subjects:
        print(f"no subjects in {lib.root}")
    for s in subjects:
        print(f"{s.name:20s} {s.base_model:16s} {', '.join(s.methods):12s} '{s.trigger} {s.class_word}'  "
              f"{s.photos} photos  {s.created}")
    return 0


def cmd_subject_remove(args) -> int:
    from studio.subjects.library import SubjectLibrary

    SubjectLibrary().delete(args.name)
    print(f"removed {args.name}")
    return 0


STEP_CACHE_HELP = ("a machine setting: diffusers' step cache for Wan models, NAME or NAME:key=value,...: none, "
                   "first_block, pyramid_broadcast, taylorseer, sea, mag, faster (see studio.step_caches); same as "
                   "SHOT_STUDIO_STEP_CACHE=NAME; recorded in the sidecar's settings.step_cache")


def build_parser() -> argparse.ArgumentParser:
    from studio import machine

    p = argparse.ArgumentParser(prog="studio", description="Shot Studio: customized text-to-video.")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("render", help="render a shot file to an MP4 (+ JSON sidecar)")
    r.add_argument("shot", nargs="?", help="shot YAML file")
    r.add_argument("--out", help="output .mp4 (the sidecar goes beside it as .json); required with a shot")
    r.add_argument("--verify", metavar="SIDECAR", help="render a render's JSON sidecar again and report whether the "
                                                       "frames match and which weights or settings differ (exit 0 "
                                                       "match, 1 differ, 2 bad input)")
    r.add_argument("--frames-dir", help="also write PNG frames into this folder")
    r.add_argument("--gif", help="also write a GIF here")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a shot field, omegaconf dotted style (e.g. noise_prior.gamma=0.3)")
    r.add_argument("--refine", action="append", default=[], choices=["face", "tiled"],
                   help="also run a refinement pass (Face VCD, Tiled VCD); same as --set refine.NAME.enabled=true")
    r.add_argument("--no-progress", dest="progress", action="store_false", help="no per-step progress on stderr")
    r.add_argument("--threads", metavar="N", help=THREADS_HELP)
    machine.add_arguments(r)
    r.add_argument("--step-cache", metavar="NAME", help=STEP_CACHE_HELP)
    _add_weight_flags(r)
    r.set_defaults(func=cmd_render)

    b = sub.add_parser("batch", help="render shot files × sweeps of fields into a folder: MP4 + sidecar per job, a "
                                     "manifest (JSON, CSV) and a contact sheet; re-running skips finished jobs",
                       description="Render the cartesian product of the shot files and the sweeps. Every job is "
                                   "checked before the first render. Re-running the same command skips jobs whose "
                                   "outputs exist and whose hash (resolved shot, weights, machine settings) matches. "
                                   "Ctrl-C stops after the current job (twice: cancels it). Exit status: 0 every "
                                   "job done or skipped; 2 bad input (nothing rendered); 10 + N when N jobs failed "
                                   "(110: 100 or more); 130 stopped by Ctrl-C.")
    b.add_argument("shots", nargs="+", metavar="SHOT.yaml", help="shot files")
    b.add_argument("--out", required=True, metavar="DIR", help="output folder (created): <job>.mp4 + <job>.json "
                                                               "per job, manifest.json, manifest.csv, "
                                                               "contact_sheet.png")
    b.add_argument("--sweep", action="append", default=[], metavar="FIELD=VALUES",
                   help="render each value of a field: a YAML list (noise_prior.gamma=[0, 0.2, 0.5]) or an "
                        "inclusive integer range (seed=1..16); several sweeps multiply")
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of every job's shot, as studio render --set (applied before the sweeps)")
    b.add_argument("--refine", action="append", default=[], choices=["face", "tiled"],
                   help="also run a refinement pass on every job; same as --set refine.NAME.enabled=true")
    b.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar on stderr (failed jobs are still reported there)")
    _add_ray_flags(b, "jobs", shared=True)
    b.add_argument("--step-cache", metavar="NAME", help=STEP_CACHE_HELP)
    b.set_defaults(func=cmd_batch)

    ev = sub.add_parser("eval", help="render a prompt set under configurations (or score renders) and write "
                                     "metrics: JSON, markdown table, PNG plot")
    ev.add_argument("prompt_set", nargs="?", help="prompt set YAML (presets/evals/*.yaml)")
    ev.add_argument("--videos", nargs="+", help="score these existing renders (.mp4 with .json sidecar, or folders)")
    ev.add_argument("--out", default="runs/eval", help="output folder (results.json, results.md, results.png, videos/)")
    ev.add_argument("--configs", help="comma-separated configurations to compare (default: the prompt set's); "
                                      "built in: no_control, boxes, pan, tuned_subject, reference, full, refine_off, "
                                      "refine_face, refine_tiled")
    ev.add_argument("--seeds", help="comma-separated seeds, instead of the prompt set's")
    ev.add_argument("--limit", type=int, help="only the first N shots of the prompt set")
    ev.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a field of every shot (e.g. steps=10)")
    ev.add_argument("--clip-model", default="openai/clip-vit-base-patch32", help="CLIP weights (local cache only)")
    ev.add_argument("--dino-model", default="facebook/dino-vits16", help="DINO weights (local cache only)")
    ev.add_argument("--no-progress", dest="progress", action="store_false")
    _add_ray_flags(ev, "renders", shared=False)
    ev.set_defaults(func=cmd_eval)

    b = sub.add_parser("bench", help="speed and memory of a model: seconds per render and step, peak memory, "
                                     "the controls' overhead (paired ratios), tuning seconds per step; table + JSON")
    from studio import bench as bench_module

    bench_module.add_arguments(b)
    b.set_defaults(func=cmd_bench)

    s = sub.add_parser("presets", help="list model and shot presets")
    s.set_defaults(func=cmd_presets)

    u = sub.add_parser("ui", help="start the browser studio")
    u.add_argument("--host", default="127.0.0.1")
    u.add_argument("--port", type=int, default=7860)
    u.add_argument("--share", action="store_true", help="create a public Gradio link")
    u.add_argument("--threads", metavar="N", help=THREADS_HELP)
    machine.add_arguments(u)
    u.set_defaults(func=cmd_ui)

    sj = sub.add_parser("subject", help="teach the studio a subject; list and remove subjects")
    ssub = sj.add_subparsers(dest="subject_command", required=True)
    sa = ssub.add_parser("add", help="train a subject from a folder of 1-10 photos and add it to the library")
    sa.add_argument("name", help="the subject's name (letters, digits, - and _), used as subjects[i].subject")
    sa.add_argument("--images", required=True, help="folder of photos (png, jpg, webp)")
    sa.add_argument("--model", default="toyworld", help="model preset the subject is trained for")
    sa.add_argument("--method", choices=["lora", "tokens", "both"],
                    help="what to train (default: the model's, from the table the page's training panel also reads: "
                         "studio.subjects.tune.DEFAULTS)")
    sa.add_argument("--steps", type=int, help="training steps (default: the model's)")
    sa.add_argument("--phrase", help="trigger word(s) and class word, e.g. 'sks dog' (default: 'sks NAME')")
    sa.add_argument("--masks", help="folder of masks named like the photos (default: automatic masks)")
    sa.add_argument("--preservation", help="folder of your own clips for the video-preservation loss")
    sa.add_argument("--seed", type=int, default=0)
    sa.add_argument("--overwrite", action="store_true", help="replace a subject of that name")
    sa.add_argument("--no-progress", dest="progress", action="store_false")
    machine.add_arguments(sa)
    _add_weight_flags(sa)
    sa.set_defaults(func=cmd_subject_add)
    sl = ssub.add_parser("list", help="the subjects in the library")
    sl.set_defaults(func=cmd_subject_list)
    sr = ssub.add_parser("remove", help="delete a subject from the library")
    sr.add_argument("name")
    sr.set_defaults(func=cmd_subject_remove)

    t = sub.add_parser("toyworld", help="the embedded toy-world model: train it, evaluate it")
    tsub = t.add_subparsers(dest="toyworld_command", required=True)
    tt = tsub.add_parser("train", help="train (or resume, or continue with --init) the toy-world model; log goes to "
                                       "stderr; defaults are the shipped run's settings")
    _add_train_flags(tt)
    tt.set_defaults(func=cmd_toyworld_train)
    te = tsub.add_parser("eval", help="measure the model's gates on held-out seeds")
    te.add_argument("--model", default="models/toyworld")
    te.add_argument("--n", type=int, default=48, help="held-out prompts")
    te.add_argument("--seed", type=int, default=0)
    te.add_argument("--threads", type=int, default=2, help="torch CPU threads (the render-time gate is for 2 cores; "
                                                            "0: torch's default); recorded in the result")
    te.add_argument("--json", help="also write the result as JSON here")
    te.add_argument("--controls", action="store_true", help="also measure box, camera and reference control")
    te.add_argument("--card", action="store_true", help="write the model card (README.md) into the model folder")
    te.add_argument("--hardware", default="2 CPU cores", help="for the model card")
    te.add_argument("--train-seconds", type=float, help="training wall clock, for the model card")
    te.set_defaults(func=cmd_toyworld_eval)
    return p


TRAIN_FLAG_NAMES = {"budget_s": "--budget"}  # fields whose flag is not --field-name


def _add_train_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, with its default and help (so every recorded setting can be given)."""
    from studio.toyworld.train import TrainConfig

    for f in dataclasses.fields(TrainConfig):
        flag = TRAIN_FLAG_NAMES.get(f.name, "--" + f.name.replace("_", "-"))
        kind = {"int": int, "float": float}.get(str(f.type), str)
        metavar = "FOLDER" if f.name in ("work", "out", "init") else None
        parser.add_argument(flag, dest=f.name, type=kind, default=f.default, metavar=metavar,
                            help=f"{f.metadata.get('help', '')} (default: {f.default})")


def _runs_models(args) -> bool:
    """Whether the command runs a model (and so needs torch's CPU threads chosen): not presets, subject list/remove."""
    return args.command not in ("presets",) and getattr(args, "subject_command", "add") == "add"


THREADS_HELP = ("torch CPU threads (a machine setting, recorded in the sidecar; default: SHOT_STUDIO_THREADS, else "
                "OMP_NUM_THREADS, else the studio's choice: one core left free, so 1 thread on 2 cores)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries(args.verbose)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.command == "toyworld":
        logging.getLogger("studio").setLevel(logging.INFO)
    try:
        if _runs_models(args):  # before any model loads: torch's CPU threads (studio.threads)
            from studio import threads

            threads.apply(args.threads if args.command in ("render", "ui") else None)
        return args.func(args)
    except Exception as e:
        if not _is_input_error(e):
            raise
        print(f"studio: error: {first_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("studio: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
