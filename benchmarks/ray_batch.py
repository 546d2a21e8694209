"""The same 16-job sweep locally and on a local Ray cluster of 2 CPU workers: wall time, jobs per minute, model loads.

    python benchmarks/ray_batch.py [--jobs 16] [--steps 20] [--rounds 2] [--modes local-1,ray-2] [--json FILE]

The sweep is presets/shots/toyworld-star.yaml × seed=1..JOBS on the embedded toy-world model (8 frames 32×32, the
model's 20 steps). Each round runs, in an order that alternates between rounds so that a slow spell of a shared
machine does not fall on one mode only:

- local-1: `studio batch` in this process, one torch thread (the Ray workers' thread count: the same frames);
- local-2: the same with two torch threads (this machine's 2 cores: the single-process baseline of an idle
           machine). Not run by default: on a busy shared machine torch's two threads wait on each other (measured
           here at load average 11-13: 60-125 s a job, against 10 s with one thread), so a round takes half an hour;
- ray-2:   `studio batch --ray` on a local Ray cluster of 2 CPUs (ray.init(num_cpus=2), started once, before the
           rounds: its start is reported, not counted): 2 workers with one torch thread each; the wall time counts
           starting the workers (torch and the studio imported in each), their model loads, the renders and the
           driver writing every MP4, sidecar, manifest and the contact sheet.

Every mode writes a fresh folder (nothing is skipped). Printed per mode: the median wall time over the rounds, jobs
per minute, model loads, and the ratio to local-1 and local-2 of the same round (median over rounds). The frames of
ray-2 are compared with local-1's by the sidecars' SHA-256.

The per-job and load times measured on the Ray workers (a worker's first job includes its model load) give a
projection of N workers — labelled as such: it assumes every worker renders a job and loads the model in the times
measured here. A GPU renders in other times: measure those on the GPU and put them into the same formula
(start + load + ceil(jobs / N) × per job).

Conditions matter on a shared 2-core machine: the load average before and after is printed with the numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
STAR = str(ROOT / "presets/shots/toyworld-star.yaml")


def run_local(jobs: int, steps: int, threads: int, out: Path) -> dict:
    import torch

    from studio import batch
    from studio.pipelines import PipelineManager

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t0 = time.perf_counter()
        plan = batch.plan([STAR], out, [f"seed=1..{jobs}"], [f"steps={steps}"])
        report = batch.run(plan, batch.LocalExecutor(PipelineManager(max_pipelines=1)))
        wall = time.perf_counter() - t0
    finally:
        torch.set_num_threads(before)
    return summarise(out, report, wall, 0.0)


def run_ray(jobs: int, steps: int, out: Path) -> dict:
    from studio import batch, ray_farm

    t0 = time.perf_counter()
    plan = batch.plan([STAR], out, [f"seed=1..{jobs}"], [f"steps={steps}"])
    with ray_farm.farm() as farm:
        start = time.perf_counter() - t0
        executor = ray_farm.RayExecutor(farm.pool)
        report = batch.run(plan, executor)
        wall = time.perf_counter() - t0
        workers = farm.pool.size
    result = summarise(out, report, wall, start)
    result["workers"] = workers
    return result


def summarise(out: Path, report, wall: float, start: float) -> dict:
    m = json.loads((out / "manifest.json").read_text())
    seconds = [j["seconds"] for j in m["jobs"]]
    return {"wall_s": wall, "start_s": start, "jobs": len(m["jobs"]), "done": m["counts"]["done"],
            "loads": m["pipeline_loads"], "job_seconds": seconds, "order": m["order"],
            "frames": {j["id"]: json.loads((out / j["sidecar"]).read_text())["frames"]["sha256"]
                       for j in m["jobs"] if j["sidecar"]},
            "jobs_per_min": 60.0 * m["counts"]["done"] / wall, "exit": report.exit_status}


def per_job_and_load(result: dict) -> tuple[float, float]:
    """(median seconds of a job on a worker that holds the model, seconds a model load adds to a worker's first job).
    One model, so jobs start in the plan's order: its first `workers` jobs are the workers' first (each loads)."""
    k = result.get("workers", 1)
    ordered = result["job_seconds_in_order"]
    warm = statistics.median(ordered[k:]) if len(ordered) > k else statistics.median(ordered)
    load = max(0.0, statistics.mean(ordered[:k]) - warm)
    return warm, load


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--modes", default="local-1,ray-2", help="comma-separated, of local-1, local-2, ray-2")
    ap.add_argument("--json", help="also write every measurement here")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray
    import torch

    load0 = os.getloadavg()
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    cluster_s = time.perf_counter() - t0
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not set(modes) <= {"local-1", "local-2", "ray-2"} or "local-1" not in modes or "ray-2" not in modes:
        ap.error("--modes: local-1 and ray-2, optionally local-2")
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    rounds = []
    try:
        with tempfile.TemporaryDirectory(prefix="ray-bench-") as tmp:
            for r in range(args.rounds):
                order = modes if r % 2 == 0 else modes[::-1]
                got = {}
                for mode in order:
                    out = Path(tmp) / f"r{r}-{mode}"
                    if mode == "ray-2":
                        got[mode] = run_ray(args.jobs, args.steps, out)
                    else:
                        got[mode] = run_local(args.jobs, args.steps, int(mode[-1]), out)
                    m = json.loads((out / "manifest.json").read_text())
                    by_id = {j["id"]: j["seconds"] for j in m["jobs"]}
                    got[mode]["job_seconds_in_order"] = [by_id[i] for i in m["order"]]
                    print(f"round {r + 1} {mode:8s} {got[mode]['wall_s']:7.1f} s  {got[mode]['jobs_per_min']:5.1f} "
                          f"jobs/min  {got[mode]['loads']} load(s)  load avg {os.getloadavg()[0]:.1f}", flush=True)
                rounds.append(got)
    finally:
        ray.shutdown()
    load1 = os.getloadavg()

    print()
    print(f"Conditions: {os.cpu_count()} CPU cores shared with other developers' jobs; load average (1 min) "
          f"{load0[0]:.1f} before, {load1[0]:.1f} after; torch {torch.__version__}, ray {ray.__version__}; "
          f"{args.jobs} jobs of toyworld-star (8 frames 32x32, {args.steps} steps), {args.rounds} round(s); local "
          f"Ray cluster of 2 CPUs started once in {cluster_s:.1f} s (not counted below).")
    print()
    bases = [m for m in ("local-1", "local-2") if m in modes]
    print("| mode | wall s (median) | jobs/min | model loads | " + " | ".join(f"wall / {b}" for b in bases) + " |")
    print("|---|---|---|---|" + "---|" * len(bases))
    for mode in modes:
        walls = [g[mode]["wall_s"] for g in rounds]
        ratios = [statistics.median(g[mode]["wall_s"] / g[b]["wall_s"] for g in rounds) for b in bases]
        loads = sorted({g[mode]["loads"] for g in rounds})
        print(f"| {mode} | {statistics.median(walls):.1f} | {60 * args.jobs / statistics.median(walls):.1f} | "
              f"{'/'.join(map(str, loads))} | " + " | ".join(f"{r:.2f}" for r in ratios) + " |")
    per_round = [g["ray-2"]["wall_s"] / g["local-1"]["wall_s"] for g in rounds]
    print("(ray-2 / local-1 per round: " + ", ".join(f"{r:.2f}" for r in per_round) + ")")
    same = [sum(g["ray-2"]["frames"][k] == g["local-1"]["frames"].get(k) for k in g["ray-2"]["frames"])
            for g in rounds]
    print()
    print(f"ray-2 frames identical to local-1's (same thread count): {min(same)}/{args.jobs} in every round")

    ray_runs = [g["ray-2"] for g in rounds]
    job_s = statistics.median(per_job_and_load(g)[0] for g in ray_runs)
    load_s = statistics.median(per_job_and_load(g)[1] for g in ray_runs)
    start_s = statistics.median(g["start_s"] for g in ray_runs)
    print(f"Measured on the Ray workers: {job_s:.2f} s a job (a worker holding the model), {load_s:.2f} s a model "
          f"load (added to a worker's first job), {start_s:.1f} s to start the workers (node checks, torch and the "
          "studio imported in each).")
    print()
    print("PROJECTION (not measured): N workers, each rendering a job and loading the model in the times measured "
          "above; wall = start + load + ceil(jobs / N) x per job. A GPU's per-job and load times are its own: measure "
          "them there and use the same formula.")
    print()
    print("| workers N | 16 jobs: wall s | jobs/min | 256 jobs: wall s | jobs/min |")
    print("|---|---|---|---|---|")
    for n in (1, 2, 4, 8, 16):
        w16 = start_s + load_s + math.ceil(16 / n) * job_s
        w256 = start_s + load_s + math.ceil(256 / n) * job_s
        print(f"| {n} | {w16:.1f} | {60 * 16 / w16:.1f} | {w256:.1f} | {60 * 256 / w256:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"rounds": rounds, "load_avg": [load0, load1],
                                               "cluster_start_s": cluster_s}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
