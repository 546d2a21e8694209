"""Render farms on Ray: `studio batch --ray` and `studio eval --ray` run their jobs on a pool of Ray actors.

Ray is the optional extra `ray` (`pip install -e ".[ray]"`): nothing here imports it at module level, and the base
install never imports it.

    connect(address)        join the cluster at ADDRESS, or start / join a local one (the address is checked for a
                            listener first: an unreachable one is one line, not a minutes-long hang)
    check_nodes(...)        every node has the studio, with the same code and the same torch / diffusers /
                            transformers / ray versions as this machine, and (--ray-shared) sees the output folder
                            and can write there; FarmError (one line) otherwise, before anything renders
    plan_slots(nodes)       one worker per GPU, or on a CPU-only cluster one per CPU (one torch thread each)
    Pool                    the actors: each holds its own PipelineManager (one pipeline), so a model loads once per
                            actor; a dead actor is replaced on its node
    RayExecutor(pool)       studio.batch's Executor: jobs go to actors already holding their model (affinity by the
                            job's PipelineKey, job.group[0]); an actor that dies (killed, out of memory) is replaced
                            and its job retried on another actor up to `retries` times, then recorded as failed with
                            the reason; the rest of the batch finishes
    farm(...)               all of the above as one context manager, for the CLI

Outputs. By default an actor returns the job's Outcome with its frames (uint8, through Ray's object store) and the
driver writes the MP4 + sidecar, the manifest and the contact sheet exactly as a local batch does. With a shared
output folder (`shared_out`: the same path on every node, e.g. NFS) the actor writes its job's MP4 + sidecar there
itself and returns only the job record and three thumbnails: large clips then never travel through the object store
(an 81×480×832×3 clip is 97 MB).

Shapes: frames (F, H, W, 3) uint8.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studio import batch

logger = logging.getLogger(__name__)

INSTALL = 'pip install -e ".[ray]" in the checkout (or pip install "shot-studio[ray]")'
CPU_PER_WORKER = 0.5  # logical CPUs an actor asks for: the rest stays free for the node checks and replacements
PROBE_TIMEOUT_S = 120.0  # a node's check (a fresh worker process) must answer within this
READY_TIMEOUT_S = 600.0  # actors importing torch and the studio on a busy node
CONNECT_TIMEOUT_S = 5.0  # the TCP check of a cluster's address
DEFAULT_RETRIES = 2
STUDIO_PACKAGE = "studio"  # what must import on every node (a test names a missing one to see the check fail)
FAULT_ENV = "SHOT_STUDIO_RAY_FAULT"  # fault injection: JOB_ID[:TIMES[:STEP]][;JOB_ID...] (see Fault)


RECORDED = "the cluster recorded by `ray start` on this machine"


class FarmError(ValueError):
    """The Ray farm cannot start (Ray missing, cluster unreachable, a node without the studio, a shared folder not
    writable): one line naming the flag or the node; nothing was rendered."""


def import_ray():
    """The ray module, or FarmError saying how to install the extra."""
    try:
        import ray
    except ImportError:
        raise FarmError(f"--ray: Ray is not installed; install the optional extra: {INSTALL}") from None
    return ray


# --- connecting ---------------------------------------------------------------------------------------------------


def _endpoint(address: str | None) -> tuple[str | None, str]:
    """(host:port that must accept a TCP connection, what named it) for an address as ray.init takes it. None: ray.init
    starts a new local cluster (no address given, no RAY_ADDRESS, no cluster recorded by `ray start` here)."""
    where = "--ray-address"
    if address in (None, "auto"):
        env = os.environ.get("RAY_ADDRESS")
        if env:
            address, where = env, "RAY_ADDRESS"
        else:
            try:  # the cluster `ray start --head` recorded on this machine (what ray.init itself would join)
                from ray._private.services import find_bootstrap_address

                found = find_bootstrap_address(None)
            except Exception:  # an internal helper: when it is not there, ray.init finds the cluster itself
                found = None
            if not found:
                if address == "auto":
                    raise FarmError("--ray-address auto: no running Ray cluster found on this machine: start one with "
                                    "`ray start --head`, or leave --ray-address out to start a local one")
                return None, where
            address, where = found, RECORDED
    if address == "local":
        return None, where
    text = address.removeprefix("ray://")
    if "://" in text:
        raise FarmError(f"{where}: {address!r} is not a Ray address: give HOST:PORT (the head's GCS port, 6379 by "
                        "default), ray://HOST:PORT (Ray Client), auto or local")
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, "10001" if address.startswith("ray://") else "6379"
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise FarmError(f"{where}: {address!r} is not a Ray address: give HOST:PORT, ray://HOST:PORT, auto or local")
    return f"{host.strip('[]')}:{port}", where


def _check_reachable(endpoint: str, where: str) -> None:
    host, _, port = endpoint.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as e:
        reason = e.strerror or (str(e) or type(e).__name__)
        if isinstance(e, (TimeoutError, socket.timeout)):
            reason = f"no answer within {CONNECT_TIMEOUT_S:.0f} s"
        raise FarmError(f"{where}: cannot reach a Ray cluster at {endpoint} ({reason}): start one with "
                        f"`ray start --head` there, or give the head's address") from None


@dataclass
class Cluster:
    address: str | None  # as given (None: local)
    where: str  # what named the cluster, for errors
    started: bool  # this process connected (ray.shutdown() at the end); False: Ray was already initialised here
    nodes: list[dict] = field(default_factory=list)  # alive nodes: id, ip, CPU, GPU

    def describe(self) -> str:
        cpus = sum(n["CPU"] for n in self.nodes)
        gpus = sum(n["GPU"] for n in self.nodes)
        return f"{len(self.nodes)} node(s), {cpus:g} CPU(s), {gpus:g} GPU(s)"


def alive_nodes() -> list[dict]:
    ray = import_ray()
    return [{"id": n["NodeID"], "ip": n.get("NodeManagerAddress", "?"),
             "CPU": float(n.get("Resources", {}).get("CPU", 0)), "GPU": float(n.get("Resources", {}).get("GPU", 0))}
            for n in ray.nodes() if n.get("Alive")]


def connect(address: str | None = None, verbose: bool = False) -> Cluster:
    """Join the Ray cluster at `address` (HOST:PORT, ray://HOST:PORT, auto), or the one RAY_ADDRESS or `ray start`
    names, or start a local one (ray.init's own rules); FarmError (one line) if it cannot be reached. When Ray is
    already initialised in this process (a test's cluster, a program embedding the studio), that one is used."""
    ray = import_ray()
    if ray.is_initialized() and address is None:
        return Cluster(address, "the Ray cluster this process is connected to", False, alive_nodes())
    endpoint, where = _endpoint(address)
    if endpoint is not None:
        try:
            _check_reachable(endpoint, where)
        except FarmError:
            if address is not None or where != RECORDED:
                raise
            # no address asked for, and the cluster `ray start` recorded here is gone (stopped without `ray stop`):
            # start a local one, as when none was recorded
            logger.warning("the Ray cluster recorded by `ray start` here (%s) does not answer; starting a local one",
                           endpoint)
            address, endpoint = "local", None
    if ray.is_initialized():  # one connection per process: the address was checked, the connection stays
        return Cluster(address, where, False, alive_nodes())
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=verbose,
                 logging_level=logging.INFO if verbose else logging.WARNING)
    except Exception as e:  # version mismatches, auth tokens, a port that is not a Ray head
        text = str(e).strip()
        line = text.splitlines()[0] if text else type(e).__name__
        raise FarmError(f"{where}: could not join the Ray cluster at {endpoint or 'this machine'}: {line}") from None
    return Cluster(address, where, True, alive_nodes())


def disconnect(cluster: Cluster) -> None:
    if cluster.started:
        import_ray().shutdown()


# --- checking the nodes -------------------------------------------------------------------------------------------


def _base_version(v: str | None) -> str | None:
    return v.split("+", 1)[0] if v else v  # torch 2.13.0+cpu and 2.13.0+cu128 are the same torch code


def check_nodes(cluster: Cluster, shared: Path | None = None, package: str | None = None) -> list[dict]:
    """Run studio.ray_probe.probe on every alive node (a zero-CPU task pinned to it) and compare with this machine:
    the studio must be installed there with the same code, and the same versions of Python, torch, diffusers,
    transformers and ray; a shared output folder must be the same folder and writable. FarmError (one line naming
    the node) otherwise. `package`: the package that must import there (a test names a missing one)."""
    ray = import_ray()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from studio import ray_probe

    if not cluster.nodes:
        raise FarmError(f"{cluster.where}: the Ray cluster has no alive node")
    try:
        ray.cloudpickle.register_pickle_by_value(ray_probe)  # the probe runs where the studio may be missing
    except Exception:  # an older cloudpickle: it is then sent by reference (a missing studio fails to unpickle)
        logger.info("cannot send the node check by value", exc_info=True)
    marker, created = None, False
    if shared is not None:
        marker, created = f".studio-ray-check-{uuid.uuid4().hex}", not shared.exists()
        try:
            shared.mkdir(parents=True, exist_ok=True)
            (shared / marker).write_bytes(b"")
        except OSError as e:
            raise FarmError(f"--ray-shared: cannot write in {shared} on this machine ({e.strerror})") from None
    probe = ray.remote(num_cpus=0, max_retries=0)(ray_probe.probe)
    here = ray_probe.installed("studio")
    package = package or STUDIO_PACKAGE
    try:
        refs = {probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["id"], soft=False)).remote(
            package, str(shared) if shared is not None else None, marker): n for n in cluster.nodes}
        ready, missing = ray.wait(list(refs), num_returns=len(refs), timeout=PROBE_TIMEOUT_S)
        if missing:
            raise FarmError(f"{cluster.where}: node {refs[missing[0]]['ip']} did not answer a check within "
                            f"{PROBE_TIMEOUT_S:.0f} s")
        results = []
        for ref in ready:
            node = refs[ref]
            try:
                got = ray.get(ref)
            except Exception as e:
                text = str(e).strip().splitlines()
                raise FarmError(f"{cluster.where}: the check on node {node['ip']} failed: "
                                f"{text[-1] if text else type(e).__name__}") from None
            _compare(here, got, node, cluster.where, shared)
            results.append({**got, "node": node["ip"]})
        return results
    except FarmError:
        if created:  # nothing left behind by a batch that did not start
            (shared / marker).unlink(missing_ok=True)
            shared.rmdir()
        raise
    finally:
        if marker is not None:
            (shared / marker).unlink(missing_ok=True)


def _compare(here: dict, there: dict, node: dict, where: str, shared: Path | None) -> None:
    name = f"node {node['ip']} ({there.get('host')})"
    if there.get("code") is None:
        raise FarmError(f"{where}: the studio is not installed on {name}: install the same shot-studio (and the "
                        f"`ray` extra) on every node, e.g. {INSTALL}")
    if there.get("python", "").rsplit(".", 1)[0] != here["python"].rsplit(".", 1)[0]:
        raise FarmError(f"{where}: {name} runs Python {there.get('python')}, this machine {here['python']}: every "
                        "node needs the same Python and packages")
    from studio.ray_probe import DISTRIBUTIONS

    for dist, label in DISTRIBUTIONS.items():
        a, b = _base_version(here["versions"].get(dist)), _base_version(there["versions"].get(dist))
        if a != b:
            raise FarmError(f"{where}: {name} has {label} {b or 'not installed'}, this machine {a}: every node needs "
                            "the same package versions (the frames depend on them)")
    if there["code"] != here["code"]:
        raise FarmError(f"{where}: {name} runs other studio code than this machine (same version, different "
                        "files): install the same checkout on every node")
    if shared is not None and there.get("shared_error"):
        raise FarmError(f"--ray-shared: {name} cannot use {shared}: {there['shared_error']}")


# --- the workers --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    """Where one worker runs: a node, and whether it owns a GPU there; `threads`: its torch CPU threads."""

    node: str
    ip: str
    gpu: bool
    threads: int


def plan_slots(nodes: list[dict], max_workers: int | None = None) -> list[Slot]:
    """One worker per GPU when the cluster has GPUs (torch threads: the node's CPUs shared among its GPUs); on a
    CPU-only cluster one per (whole) CPU, with one torch thread each. Nodes take turns, so that `max_workers`
    spreads the workers over the nodes."""
    gpus = any(n["GPU"] >= 1 for n in nodes)
    per_node = []
    for n in nodes:
        if gpus:
            k = int(n["GPU"])
            threads = max(1, int(n["CPU"]) // k) if k else 1
        else:
            k, threads = int(n["CPU"]), 1
        per_node.append([Slot(n["id"], n["ip"], gpus, threads) for _ in range(k)])
    slots = []
    while any(per_node):
        for queue in per_node:
            if queue:
                slots.append(queue.pop(0))
    return slots[:max_workers] if max_workers else slots


class Worker:
    """A Ray actor (made remote in `Pool`): one PipelineManager holding one pipeline, so a model loads once per actor;
    `execute` runs a batch job on it. Two calls at a time (max_concurrency=2): `stop_job` reaches a running job."""

    def __init__(self, threads: int):
        import torch

        from studio.pipelines import PipelineManager, pick_device

        torch.set_num_threads(threads)
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()  # their loading bars would flood the driver's log (--verbose)
        transformers_logging.disable_progress_bar()
        self.manager = PipelineManager(max_pipelines=1, device=pick_device())
        self.cancel = threading.Event()

    def ready(self) -> dict:
        import torch

        return {"pid": os.getpid(), "host": socket.gethostname(), "device": self.manager.device,
                "threads": torch.get_num_threads(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}

    def execute(self, job: batch.Job, write_to: str | None = None, crash_at: int | None = None) -> dict:
        """The job's Outcome (see batch.execute) and this actor's pipeline loads so far. `write_to`: a shared output
        folder: the MP4 + sidecar are written there and the Outcome carries thumbnails instead of frames.
        `crash_at`: fault injection, the process exits at that denoising step (0: before the render)."""
        self.cancel.clear()
        progress = None
        if crash_at is not None:
            if crash_at <= 0:
                os._exit(3)

            def progress(i: int, n: int) -> None:
                if i >= crash_at:
                    os._exit(3)
        outcome = batch.execute(job, self.manager, progress, self.cancel)
        if write_to is not None and outcome.status == batch.RENDERED:
            outcome = batch.write_on_worker(job, outcome, Path(write_to))
        return {"outcome": outcome, "loads": self.manager.loads, "pid": os.getpid(), "device": self.manager.device}

    def stop_job(self) -> None:
        self.cancel.set()


@dataclass
class Member:
    """One worker of the pool: its slot, its actor, what it holds."""

    slot: Slot
    actor: Any
    number: int  # 1, 2, ...: its position in the pool
    key: Any = None  # the PipelineKey of the model it holds (job.group[0] of its last job)
    group: Any = None  # job.group of its last job (model and subjects)
    loads: int = 0  # its pipeline loads so far
    generation: int = 0  # replacements of this slot's worker
    info: dict = field(default_factory=dict)  # from ready(): pid, host, device, threads


class Pool:
    """The farm's actors, one per slot, each pinned to its node (softly: when the node is gone, elsewhere). A dead
    actor is replaced by a new one on the same slot; the loads of dead actors are kept."""

    def __init__(self, slots: list[Slot]):
        if not slots:
            raise FarmError("--ray: the cluster has no CPU or GPU a worker could use")
        self.ray = import_ray()
        self.slots = slots
        self.members: list[Member] = []
        self.replaced = 0
        self.lost = 0  # workers not replaced: their node was gone
        self.events: list[dict] = []  # {"worker", "job", "reason"} per death
        self._dead_loads = 0
        self._remote = self.ray.remote(max_concurrency=2, max_restarts=0)(Worker)
        for k, slot in enumerate(slots, 1):
            self.members.append(Member(slot, self._start(slot), k))

    def _start(self, slot: Slot):
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        opts: dict = {"scheduling_strategy": NodeAffinitySchedulingStrategy(slot.node, soft=True),
                      "num_cpus": CPU_PER_WORKER}
        if slot.gpu:
            opts["num_gpus"] = 1
        return self._remote.options(**opts).remote(slot.threads)

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Every actor built (torch and the studio imported): FarmError naming the first that could not start."""
        refs = {m.actor.ready.remote(): m for m in self.members}
        ready, missing = self.ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
        if missing:
            m = refs[missing[0]]
            raise FarmError(f"--ray: worker {m.number} on node {m.slot.ip} did not start within {timeout:.0f} s "
                            "(no free CPU or GPU for it?)")
        for ref in ready:
            m = refs[ref]
            try:
                m.info = self.ray.get(ref)
            except Exception as e:
                raise FarmError(f"--ray: worker {m.number} on node {m.slot.ip} could not start: "
                                f"{death_reason(e)}") from None

    @property
    def size(self) -> int:
        return len(self.members)

    @property
    def loads(self) -> int:
        return self._dead_loads + sum(m.loads for m in self.members)

    def replace(self, member: Member, reason: str, job_id: str | None) -> bool:
        """Kill what is left of a worker and start a new one on its slot (its model is gone: it loads again). When
        the slot's node itself is gone, the worker is dropped instead (False): the pool shrinks."""
        self.events.append({"worker": member.number, "node": member.slot.ip, "job": job_id, "reason": reason})
        try:
            self.ray.kill(member.actor, no_restart=True)
        except Exception:  # already gone
            pass
        self._dead_loads += member.loads
        if member.slot.node not in {n["id"] for n in alive_nodes()}:
            self.members.remove(member)
            self.lost += 1
            logger.info("worker %d: its node %s is gone; not replaced", member.number, member.slot.ip)
            return False
        member.actor, member.key, member.group, member.loads = self._start(member.slot), None, None, 0
        member.info = {**member.info, "pid": None}  # same slot: same device and threads
        member.generation += 1
        self.replaced += 1
        logger.info("worker %d on %s died (%s); replaced", member.number, member.slot.ip, reason)
        return True

    def close(self) -> None:
        for m in self.members:
            try:
                self.ray.kill(m.actor, no_restart=True)  # frees its GPU memory
            except Exception:
                pass
        self.members = []

    def describe(self) -> str:
        kinds = {("GPU" if m.slot.gpu else f"CPU, {m.slot.threads} torch thread(s)") for m in self.members}
        nodes = {m.slot.node for m in self.members}
        return f"{self.size} Ray worker(s) ({', '.join(sorted(kinds))}) on {len(nodes)} node(s)"


def death_reason(e: BaseException) -> str:
    """One line: why a worker died (out of memory, could not start, its process exited), from Ray's error."""
    import re

    text = str(e)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if type(e).__name__ == "OutOfMemoryError" or "low on memory" in text.lower():
        return "out of memory: Ray's memory monitor killed the worker (its node ran low on memory)"
    if getattr(e, "actor_init_failed", False):
        return f"the worker could not start: {lines[-1] if lines else type(e).__name__}"
    m = re.search(r"exit detail: (.*?)(?:\. |\.?$)", text, re.M)
    if m:
        return f"the worker process exited unexpectedly ({m.group(1).strip()}): killed, out of memory or crashed"
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


# --- the executor -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    """Fault injection: the worker running `job_id` exits (os._exit) at denoising step `step` (0: before rendering),
    on the job's first `times` attempts. For tests and demonstrations (SHOT_STUDIO_RAY_FAULT)."""

    job_id: str
    times: int = 1
    step: int = 1


def faults_from_env(text: str | None = None) -> list[Fault]:
    """SHOT_STUDIO_RAY_FAULT=JOB_ID[:TIMES[:STEP]][;JOB_ID[:TIMES[:STEP]]...] (job ids have no ':' or ';')"""
    text = os.environ.get(FAULT_ENV, "") if text is None else text
    out = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, *nums = part.rsplit(":", 2)
        try:
            values = [int(x) for x in nums]
        except ValueError:
            raise FarmError(f"{FAULT_ENV}: {part!r}: give JOB_ID[:TIMES[:STEP]] with integers") from None
        out.append(Fault(name, *values))
    return out


def _is_memory_failure(outcome: batch.Outcome) -> bool:
    """A job that failed for lack of memory inside a live worker (CUDA OOM): its GPU memory is only freed when the
    actor dies, so the worker is replaced and the job retried, as for a killed worker."""
    return outcome.status == batch.FAILED and (outcome.error or "").startswith(("OutOfMemoryError", "MemoryError"))


def choose(member_key, member_group, pending: list[batch.Job], holders: dict) -> batch.Job | None:
    """The next job for a free worker holding `member_key` (None: nothing loaded): a job of its model and subjects,
    else one of its model; else a job of the model with the most pending jobs per worker already holding it (so a
    model loads on more workers only while it has more jobs left than they share). Plan order breaks ties."""
    if not pending:
        return None
    if member_key is not None:
        for job in pending:
            if job.group == member_group:
                return job
        for job in pending:
            if job.group[0] == member_key:
                return job
    left: dict = {}
    first: dict = {}
    for job in pending:
        left[job.group[0]] = left.get(job.group[0], 0) + 1
        first.setdefault(job.group[0], job)
    best = max(first, key=lambda k: (left[k] / (1 + holders.get(k, 0)), -pending.index(first[k])))
    return first[best]


class RayExecutor:
    """Runs a batch's jobs on a Pool (studio.batch.Executor). `retries`: how often a job whose worker died is run
    again (on another, new worker) before it is recorded as failed. `shared_out`: the output folder, the same path
    on every node: workers write the MP4 + sidecar there. `faults`: fault injection (see Fault)."""

    def __init__(self, pool: Pool, retries: int = DEFAULT_RETRIES, shared_out: Path | None = None,
                 faults: list[Fault] = (), notify=None, poll_s: float = 0.25):
        if retries < 0:
            raise FarmError(f"--ray-retries: must be 0 or more (got {retries})")
        self.pool = pool
        self.ray = pool.ray
        self.retries = retries
        self.shared_out = shared_out
        self.faults = {f.job_id: f for f in faults}
        self.poll_s = poll_s
        self.notify = notify  # a line for the user (the progress bar's note) when a worker dies
        self._loads0 = pool.loads
        self._replaced0 = pool.replaced
        self.retried: dict[str, list[str]] = {}  # job id -> the reason of each attempt its worker died in

    @property
    def loads(self) -> int:
        return self.pool.loads - self._loads0

    def info(self) -> dict:
        """The manifest's "executor": where the jobs ran, replacements, retried jobs and why."""
        return {"kind": "ray", "workers": self.pool.size, "nodes": len({m.slot.node for m in self.pool.members}),
                "devices": sorted({m.info.get("device", "?") for m in self.pool.members}),
                "torch_threads": sorted({m.slot.threads for m in self.pool.members if not m.slot.gpu}),
                "replaced": self.pool.replaced - self._replaced0, "lost": self.pool.lost, "retries": self.retries,
                "retried": self.retried, "outputs": "written by the workers" if self.shared_out else
                "written by the driver"}

    def run(self, jobs: list[batch.Job], deliver: batch.Deliver, stop: threading.Event, cancel: threading.Event,
            on_step: batch.StepProgress | None = None) -> None:
        ray = self.ray
        pending = list(jobs)
        attempts: dict[str, int] = {}
        running: dict[Any, tuple[Member, batch.Job]] = {}
        cancel_sent = False
        try:
            while pending or running:
                if cancel.is_set() and not cancel_sent:
                    for member, _ in running.values():
                        member.actor.stop_job.remote()
                    cancel_sent = True
                if not (stop.is_set() or cancel.is_set()):
                    self._dispatch(pending, running, attempts, on_step)
                    if not running and pending:  # not stopped, yet nothing runs: every worker's node is gone
                        for job in pending:
                            deliver(job, batch.Outcome(job.id, batch.FAILED, error="no Ray worker left: the nodes "
                                                                                    "of every worker are gone"))
                        pending.clear()
                if not running:
                    break  # done, or stopped (the pending jobs stay pending)
                ready, _ = ray.wait(list(running), num_returns=1, timeout=self.poll_s)
                for ref in ready:
                    member, job = running.pop(ref)
                    self._collect(ref, member, job, pending, attempts, deliver)
        finally:
            for member, _ in running.values():  # an exception (a third Ctrl-C): stop what still runs
                try:
                    member.actor.stop_job.remote()
                except Exception:
                    pass

    def _dispatch(self, pending: list[batch.Job], running: dict, attempts: dict, on_step) -> None:
        busy = {id(m) for m, _ in running.values()}
        for member in self.pool.members:
            if id(member) in busy or not pending:
                continue
            holders: dict = {}
            for m in self.pool.members:
                if m is not member and m.key is not None:
                    holders[m.key] = holders.get(m.key, 0) + 1
            job = choose(member.key, member.group, pending, holders)
            pending.remove(job)
            fault = self.faults.get(job.id)
            crash_at = fault.step if fault is not None and attempts.get(job.id, 0) < fault.times else None
            ref = member.actor.execute.remote(job, str(self.shared_out) if self.shared_out else None, crash_at)
            member.key, member.group = job.group[0], job.group
            running[ref] = (member, job)
            if on_step is not None:
                on_step(job, 0, 1)  # the job started (the bar moves per job: steps are not sent back)

    def _collect(self, ref, member: Member, job: batch.Job, pending: list[batch.Job], attempts: dict,
                 deliver: batch.Deliver) -> None:
        ray = self.ray
        try:
            got = ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.ObjectLostError,
                getattr(ray.exceptions, "OutOfMemoryError", ray.exceptions.RayActorError)) as e:
            self._died(member, job, death_reason(e), pending, attempts, deliver)
            return
        except ray.exceptions.RayTaskError as e:  # execute itself raised (it returns failures, so: a fault)
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            deliver(job, batch.Outcome(job.id, batch.FAILED, error=lines[-1] if lines else type(e).__name__))
            return
        member.loads = got["loads"]
        member.info.update(pid=got["pid"], device=got["device"])
        outcome: batch.Outcome = got["outcome"]
        if _is_memory_failure(outcome):
            self._died(member, job, outcome.error, pending, attempts, deliver)
            return
        deliver(job, outcome)

    def _died(self, member: Member, job: batch.Job, reason: str, pending: list[batch.Job], attempts: dict,
              deliver: batch.Deliver) -> None:
        attempts[job.id] = attempts.get(job.id, 0) + 1
        self.retried.setdefault(job.id, []).append(reason)
        replaced = self.pool.replace(member, reason, job.id)
        if self.notify is not None:
            again = "retrying it" if attempts[job.id] <= self.retries else "no retries left"
            self.notify(f"worker {member.number} died running {job.id} ({reason}); "
                        f"{'replaced' if replaced else 'its node is gone, not replaced'}, {again}")
        if attempts[job.id] > self.retries:
            n = attempts[job.id]
            deliver(job, batch.Outcome(job.id, batch.FAILED, error=f"its worker died {n} time(s) (retries: "
                                                                    f"{self.retries}); last: {reason}"))
        else:
            pending.insert(0, job)  # next, on whichever worker is free first (never the dead one)


# --- the whole farm, for the CLI ----------------------------------------------------------------------------------


@dataclass
class Farm:
    cluster: Cluster
    pool: Pool
    nodes: list[dict]  # the node checks' results

    def describe(self) -> str:
        return f"{self.pool.describe()}; cluster: {self.cluster.describe()}"


@contextmanager
def farm(address: str | None = None, workers: int | None = None, shared: Path | None = None,
         verbose: bool = False, package: str | None = None) -> Iterator[Farm]:
    """Connect, check every node, start the workers and wait until each is ready; FarmError (one line) before
    anything renders if any of it fails. At the end the workers are killed, and a cluster this process started or
    joined is left (ray.shutdown(); a local one it started stops)."""
    if workers is not None and workers < 1:
        raise FarmError(f"--ray-workers: must be 1 or more (got {workers})")
    cluster = connect(address, verbose)
    pool = None
    try:
        nodes = check_nodes(cluster, shared, package)
        t0 = time.perf_counter()
        pool = Pool(plan_slots(cluster.nodes, workers))
        pool.wait_ready()
        logger.info("%s ready in %.1f s", pool.describe(), time.perf_counter() - t0)
        yield Farm(cluster, pool, nodes)
    finally:
        if pool is not None:
            pool.close()
        disconnect(cluster)
