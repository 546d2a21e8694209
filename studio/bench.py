"""`studio bench`: speed and memory of a model preset, real or random weights, at any size, in one run.

    studio bench --model animatediff-sd15 --random-weights --width-factor 0.125 --set width=64 --set height=64 \
                 --set frames=8 --set steps=4 --json bench.json

Measured, on one pipeline, in one process:
- renders of one shot, plain and with controls (all of them together: a tracked subject with a reference, a
  background reference, a camera pan and a noise prior; and each alone), optionally with the refinements
  (`--cases refine`): seconds per render and per denoising step, peak memory (resident set size of the process on
  the CPU, sampled every 2 ms during one more, untimed render of each case; the allocator's peak on CUDA);
- each case's cost as a ratio to its baseline (the plain render, or for the refinements the boxed render they
  refine), paired: the cases run interleaved round by round after a warm-up, each round's time is divided by its
  baseline's in the same round, and the median of those ratios is reported with its quartiles (a slow spell of a
  shared machine shifts a ratio of medians more than a median of paired ratios);
- tuning (LoRA and ID tokens, a few steps on photos of a toy-world subject, the LoRA with one preservation clip):
  seconds per training step, and the set-up of a render with the tuned subject, cold (a new pipeline manager: the
  pipeline and the subject's files from disk) and warm (switched on by weight).

Times are CPU seconds of this process (`--clock cpu`, the default on the CPU: other programs on a shared machine
change them less than wall-clock time) or wall-clock seconds (`--clock wall`, the default on CUDA, synchronised).
Torch's thread count is fixed for the run (`--threads`, default 1). Everything goes to a table on stdout and, with
--json, to a JSON file (`RESULT_FIELDS` lists the top-level keys). The exit status is 1 when the all-controls ratio
is above `--target` (when one is given).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

BENCH_VERSION = 1
RESULT_FIELDS = ("bench_version", "model", "shot", "device", "dtype", "threads", "clock", "rounds", "load_s", "cases",
                 "tuning", "conditions", "versions")
CASE_FIELDS = ("render_s", "render_s_rounds", "step_s", "peak_memory_bytes", "memory", "controls", "baseline", "ratio")
CONTROL_CASES = ("plain", "all controls", "boxes", "camera", "references", "noise prior")
REFINE_CASES = ("boxes", "face", "tiled", "face+tiled")
PROMPT = "a red circle moving right on grass"
SETUP_ROUNDS = 3  # cold and warm set-ups of a render with a tuned subject
PHRASE = "red circle"


# --- what is measured ----------------------------------------------------------------------------------------


def reference_images(folder: Path) -> tuple[str, str]:
    """A purple square on sky (subject) and a sand background, as PNG files (toy-world images; any model takes
    them)."""
    from PIL import Image

    from studio.toyworld import world

    rng = np.random.default_rng(0)
    subject = world.render_clip("sky", [world.SubjectSpec("purple", "square", 7.0, world.make_path("still", 7.0, rng),
                                                          None)], seed=1).frames[0]
    background = world.render_clip("sand", [], seed=2).frames[0]
    paths = folder / "subject.png", folder / "background.png"
    for img, p in zip((subject, background), paths):
        Image.fromarray(img).resize((128, 128), Image.NEAREST).save(p)
    return str(paths[0]), str(paths[1])


def case_fields(name: str, subject_ref: str, background_ref: str) -> dict:
    """The shot fields a case adds to the base shot (prompt, seed, size)."""
    boxes = {"boxes": {0: [0.05, 0.3, 0.4, 0.7], 7: [0.6, 0.3, 0.95, 0.7]}}
    face = {"enabled": True, "detector": "boxes"}
    return {
        "plain": {},
        "all controls": {"subjects": [{"phrase": PHRASE, "reference": subject_ref, **boxes}],
                         "background": {"reference": background_ref}, "camera": {"cx": 0.25},
                         "noise_prior": {"gamma": 0.5}},
        "boxes": {"subjects": [{"phrase": PHRASE, **boxes}]},
        "camera": {"camera": {"cx": 0.25}},
        "references": {"subjects": [{"phrase": PHRASE, "reference": subject_ref}],
                       "background": {"reference": background_ref}},
        "noise prior": {"noise_prior": {"gamma": 0.5}},
        "face": {"subjects": [{"phrase": PHRASE, **boxes}], "refine": {"face": face}},
        "tiled": {"subjects": [{"phrase": PHRASE, **boxes}], "refine": {"tiled": {"enabled": True}}},
        "face+tiled": {"subjects": [{"phrase": PHRASE, **boxes}],
                       "refine": {"face": face, "tiled": {"enabled": True}}},
    }[name]


def baseline_of(name: str) -> str | None:
    if name == "plain":
        return None
    return "boxes" if name in ("face", "tiled", "face+tiled") else "plain"


# --- clocks and memory ---------------------------------------------------------------------------------------


class Clock:
    """CPU seconds of this process, or wall-clock seconds (CUDA synchronised before each reading)."""

    def __init__(self, kind: str, device: str):
        self.kind, self.cuda = kind, device.startswith("cuda")

    def __call__(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.process_time() if self.kind == "cpu" else time.perf_counter()


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # not Linux: the lifetime peak
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


class PeakMemory:
    """Peak memory during a block: the CUDA allocator's peak on CUDA, else the process's resident set, sampled every
    2 ms from another thread (what a render holds at its largest, weights included)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.kind = "cuda_max_allocated" if self.cuda else "cpu_rss"
        self.peak = 0

    def __enter__(self):
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
            return self
        self.peak, self._stop = _rss_bytes(), threading.Event()

        def sample():
            while not self._stop.wait(0.002):
                self.peak = max(self.peak, _rss_bytes())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            import torch

            self.peak = int(torch.cuda.max_memory_allocated())
            return False
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())
        return False


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    """(q1, median, q3) of xs (all three the value itself for one value); the benchmarks' summary of rounds."""
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], statistics.median(xs), q[2]


def paired(times: list[float], base: list[float]) -> dict:
    """Median and quartiles of the per-round ratios times[i] / base[i]."""
    q1, q2, q3 = quartiles([t / b for t, b in zip(times, base)])
    return {"median": q2, "q1": q1, "q3": q3}


# --- the run -------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class BenchConfig:
    model: str = "toyworld"
    random_weights: bool = False
    width_factor: float | None = None
    overrides: list = dataclasses.field(default_factory=list)  # --set KEY=VALUE on the base shot
    cases: tuple = CONTROL_CASES
    rounds: int = 11
    warmup: int = 1
    threads: int = 1
    device: str = "cpu"
    clock: str | None = None  # cpu | wall; None: cpu on the CPU, wall on CUDA
    tune_steps: int = 4  # 0: no tuning


def model_preset(cfg: BenchConfig):
    """The preset the bench runs: the model's, with random weights if asked."""
    from studio import presets

    if cfg.width_factor is not None and not cfg.random_weights:
        from studio.shot import ShotError

        raise ShotError("--width-factor", cfg.width_factor, "only applies with --random-weights")
    preset = presets.load_model_preset(cfg.model)
    return presets.with_random_weights(preset, cfg.width_factor) if cfg.random_weights else preset


def at_size(preset, shot):
    """The preset with its defaults set to a resolved shot's size, so that tuning and refinement run at that size."""
    from studio.presets import ShotDefaults

    return dataclasses.replace(preset, defaults=ShotDefaults(
        frames=shot.frames, width=shot.width, height=shot.height, fps=shot.fps, steps=shot.steps,
        guidance_scale=shot.guidance_scale))


def run(cfg: BenchConfig, progress=None) -> dict:
    """Measure; returns the result dict (RESULT_FIELDS). progress(message) hears what is being done."""
    import torch

    from studio import engine, shot as shotlib
    from studio.pipelines import PipelineManager

    say = progress or (lambda msg: None)
    unknown = [c for c in cfg.cases if c not in CONTROL_CASES + REFINE_CASES]
    if unknown:
        raise ValueError(f"--cases: unknown case {unknown[0]!r} (cases: {', '.join(CONTROL_CASES + REFINE_CASES)})")
    if cfg.rounds < 1 or cfg.threads < 1 or cfg.warmup < 0 or cfg.tune_steps < 0:
        raise ValueError("--rounds and --threads must be >= 1, --warmup and --tune-steps >= 0")
    clock_kind = cfg.clock or ("wall" if cfg.device.startswith("cuda") else "cpu")
    if clock_kind not in ("cpu", "wall"):
        raise ValueError(f"--clock: cpu or wall (got {clock_kind!r})")
    torch.set_num_threads(cfg.threads)
    clock = Clock(clock_kind, cfg.device)
    base = shotlib.from_container({"model": cfg.model, "prompt": PROMPT, "seed": 3}, cfg.overrides)
    raw = model_preset(cfg)
    preset = at_size(raw, engine.prepare(base, raw)[0])  # the shot's size, checked against the model's limits
    shot0, _ = engine.prepare(base, preset)
    manager = PipelineManager(max_pipelines=1, device=cfg.device)
    cases = list(dict.fromkeys([*cfg.cases, *(b for c in cfg.cases if (b := baseline_of(c)))]))  # + baselines
    work = Path(tempfile.mkdtemp(prefix="studio-bench-"))
    try:
        subject_ref, background_ref = reference_images(work)
        shots = {c: shotlib.from_container({**shotlib.to_dict(base), **case_fields(c, subject_ref, background_ref)})
                 for c in cases}
        say(f"loading {preset.name}")
        t0 = time.perf_counter()
        manager.get(preset)
        load_s = time.perf_counter() - t0
        for _ in range(cfg.warmup):  # the pipeline's caches, the references' encodings, the kernels
            for c in cases:
                engine.render(shots[c], manager, preset=preset)
        times = {c: [] for c in cases}
        steps = {c: [] for c in cases}
        peaks = {c: 0 for c in cases}
        controls = {}
        mem_kind = PeakMemory(cfg.device).kind
        for r in range(cfg.rounds):
            say(f"round {r + 1}/{cfg.rounds}")
            for c in cases:  # interleaved: a slow spell of the machine hits every case
                stamps = []
                t = clock()
                result = engine.render(shots[c], manager, preset=preset, progress=lambda i, n: stamps.append(clock()))
                times[c].append(clock() - t)
                denoise = stamps[:shot0.steps]  # the render's own steps (refinement passes report after)
                if len(denoise) > 1:
                    steps[c].append((denoise[-1] - denoise[0]) / (len(denoise) - 1))
                controls[c] = result.info["controls"]
        for c in cases:  # memory in a render of its own (the sampling thread would cost the timed ones CPU time)
            with PeakMemory(cfg.device) as mem:
                engine.render(shots[c], manager, preset=preset)
            peaks[c] = mem.peak
        out_cases = {}
        for c in cases:
            b = baseline_of(c)
            out_cases[c] = {
                "render_s": statistics.median(times[c]), "render_s_rounds": times[c],
                "step_s": statistics.median(steps[c]) if steps[c] else None,
                "peak_memory_bytes": peaks[c], "memory": mem_kind, "controls": controls[c], "baseline": b,
                "ratio": paired(times[c], times[b]) if b else None}
        tuning = _tune(cfg, preset, manager, work, clock, say) if cfg.tune_steps else None
    finally:
        manager.clear()
        shutil.rmtree(work, ignore_errors=True)
    from studio.export import package_versions

    return {
        "bench_version": BENCH_VERSION,
        "model": {"preset": preset.name, "family": preset.family, "base": preset.base,
                  "motion_adapter": preset.motion_adapter, "random_weights": preset.random_weights,
                  "width_factor": preset.width_factor, "layout": preset.layout},
        "shot": {"frames": shot0.frames, "width": shot0.width, "height": shot0.height, "steps": shot0.steps,
                 "guidance_scale": shot0.guidance_scale, "prompt": shot0.prompt},
        "device": cfg.device, "dtype": str(manager_dtype(preset, cfg.device)), "threads": cfg.threads,
        "clock": clock_kind, "rounds": cfg.rounds, "load_s": load_s, "cases": out_cases, "tuning": tuning,
        "conditions": conditions(), "versions": package_versions(),
    }


def manager_dtype(preset, device: str) -> str:
    from studio import machine

    settings = machine.MachineSettings(device=device)
    return str(machine.model_dtype(preset.dtype, settings, device, preset.family)).removeprefix("torch.")


def conditions() -> dict:
    """What the numbers were measured on: the machine and how busy it was."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "load_average": list(load) if load else None,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}


def _tune(cfg: BenchConfig, preset, manager, work: Path, clock: Clock, say) -> dict:
    """Seconds per training step of each method, and the set-up of a render with the tuned subject, cold and warm.
    The subject goes into the studio's library under a name of its own and is removed after."""
    import torch

    from studio import engine, shot as shotlib
    from studio.pipelines import PipelineManager
    from studio.subjects import tune
    from studio.subjects.library import SubjectLibrary
    from studio.toyworld import evaluate

    side = max(preset.defaults.width, preset.defaults.height)
    photos, masks = evaluate.subject_photos(n=2)
    photos = [_resize(p, side) for p in photos]
    masks = [_resize(m.astype(np.uint8) * 255, side) > 127 for m in masks]
    clips = work / "clips"  # one preservation clip (the LoRA's video loss each step)
    clips.mkdir()
    _write_clip(clips / "clip.gif", preset.defaults.frames, preset.defaults.width, preset.defaults.height)
    library = SubjectLibrary()
    name = f"bench-{os.getpid()}"
    out = {}
    manager.clear()  # training loads a pipeline of its own
    try:
        for method in ("lora", "tokens"):
            say(f"tuning {method}, {cfg.tune_steps} steps")
            stamps = []
            settings = tune.TuneSettings(method=method, class_word="star", steps=cfg.tune_steps,
                                         preservation=str(clips) if method == "lora" else None)
            with PeakMemory(cfg.device) as mem:
                t = clock()
                tune.add_subject(f"{name}-{method}", photos, masks, preset, settings, library=library,
                                 manager=manager, progress=lambda i, n, loss, left: stamps.append(clock()),
                                 overwrite=True)
                total = clock() - t
            per = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else total / max(1, len(stamps))
            out[method] = {"steps": cfg.tune_steps, "step_s": per, "total_s": total, "peak_memory_bytes": mem.peak}
        shot = shotlib.from_container({"model": preset.name, "prompt": "a star on sky", "seed": 0,
                                       "subjects": [{"phrase": "star", "subject": f"{name}-lora",
                                                     "boxes": {0: [0.0, 0.2, 0.5, 0.8]}}]})
        cold, warm = [], []
        for _ in range(SETUP_ROUNDS):
            m = PipelineManager(max_pipelines=1, device=cfg.device)
            r = engine.render(shot, m, preset=preset)
            cold.append(r.timings["load"] + r.timings["prepare"])
            r = engine.render(shot, m, preset=preset)
            warm.append(r.timings["load"] + r.timings["prepare"])
            m.clear()
        out["setup"] = {"cold_s": statistics.median(cold), "warm_s": statistics.median(warm),
                        "what": "wall seconds from the shot to the first denoising step (engine timings load + "
                                "prepare), cold = a new pipeline manager, warm = the same one again"}
        torch.set_num_threads(cfg.threads)
    finally:
        for method in ("lora", "tokens"):
            if library.exists(f"{name}-{method}"):
                library.delete(f"{name}-{method}")
    return out


def _resize(img: np.ndarray, side: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((side, side), Image.NEAREST))


def _write_clip(path: Path, frames: int, width: int, height: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    images = [Image.fromarray(np.roll(base, 2 * f, 1)) for f in range(frames)]
    images[0].save(path, save_all=True, append_images=images[1:], duration=125)


# --- output --------------------------------------------------------------------------------------------------


def table(res: dict) -> str:
    """The result as a text table."""
    m, s = res["model"], res["shot"]
    weights = f" (random weights, width {m['width_factor']:g})" if m["random_weights"] else ""
    lines = [f"model {m['preset']}{weights}: {s['frames']} frames {s['width']}x{s['height']}, {s['steps']} steps; "
             f"{res['device']} {res['dtype']}, {res['threads']} thread(s), {res['clock']} clock, "
             f"{res['rounds']} round(s); load {res['load_s']:.2f} s",
             f"{'case':14s} {'render s':>9s} {'step s':>8s} {'peak MB':>8s}  ratio to baseline (quartiles)"]
    for name, c in res["cases"].items():
        ratio = "" if c["ratio"] is None else (f"{c['ratio']['median']:.3f} ({c['ratio']['q1']:.3f}-"
                                               f"{c['ratio']['q3']:.3f}) vs {c['baseline']}")
        step = "-" if c["step_s"] is None else f"{c['step_s']:.4f}"
        lines.append(f"{name:14s} {c['render_s']:9.3f} {step:>8s} {c['peak_memory_bytes'] / 2**20:8.0f}  {ratio}")
    t = res.get("tuning")
    if t:
        lines.append("tuning: " + ", ".join(f"{k} {v['step_s']:.3f} s/step ({v['steps']} steps, peak "
                                            f"{v['peak_memory_bytes'] / 2**20:.0f} MB)" for k, v in t.items()
                                            if k != "setup")
                     + f"; subject set-up cold {t['setup']['cold_s'] * 1000:.0f} ms, warm "
                       f"{t['setup']['warm_s'] * 1000:.0f} ms")
    load = res["conditions"]["load_average"]
    if load:
        lines.append(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {res['conditions']['cpu_count']} "
                     f"CPU(s)")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="toyworld", help="model preset (name or YAML path)")
    p.add_argument("--random-weights", action="store_true", help="random weights of the model's real layout")
    p.add_argument("--width-factor", type=float, metavar="F", help="with --random-weights: channel widths x F")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a field of the benchmarked shot (frames, width, height, steps, ...)")
    p.add_argument("--cases", default="controls",
                   help="comma-separated cases, or the groups 'controls' (plain, all controls and each alone) and "
                        "'refine' (face, tiled, both, against the boxed render); default: controls")
    p.add_argument("--rounds", type=int, default=11, help="timed rounds (each renders every case once)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads for the whole run")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--clock", choices=["cpu", "wall"], help="CPU seconds of this process (default on the CPU) or "
                                                            "wall-clock seconds (default on CUDA)")
    p.add_argument("--tune-steps", type=int, default=4, help="training steps per tuning method (0: no tuning)")
    p.add_argument("--json", help="also write the result here")
    p.add_argument("--target", type=float, help="exit 1 when the all-controls ratio is above this")


def config(args) -> BenchConfig:
    names: list[str] = []
    for part in (x.strip() for x in args.cases.split(",")):
        names += list(CONTROL_CASES) if part == "controls" else list(REFINE_CASES) if part == "refine" else [part]
    if args.device is None:
        from studio.pipelines import pick_device

        args.device = pick_device()
    return BenchConfig(model=args.model, random_weights=args.random_weights, width_factor=args.width_factor,
                       overrides=args.set, cases=tuple(dict.fromkeys(n for n in names if n)), rounds=args.rounds,
                       warmup=args.warmup, threads=args.threads, device=args.device, clock=args.clock,
                       tune_steps=args.tune_steps)


def main(args) -> int:
    """`studio bench` (args parsed by add_arguments)."""
    res = run(config(args), progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(table(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {args.json}")
    allc = res["cases"].get("all controls")
    if args.target is not None and allc is not None and allc["ratio"]["median"] > args.target:
        print(f"all controls {allc['ratio']['median']:.3f} is above the target {args.target:.3f}")
        return 1
    return 0
