"""CPU threads: how many intra-op threads torch runs with and how its OpenMP threads wait, chosen at start-up.

Why it matters: torch's CPU kernels run on an OpenMP team (GNU libgomp in the PyPI wheels) that splits each
operation between its threads and waits at a barrier for the slowest. When another process holds one of the
cores, one team thread gets a share of a core while the other spins at the barrier (libgomp spins about 3 ms
before sleeping) and takes CPU from it. Measured on a 2-core machine (issue 14): idle, 2 threads render the toy
model in 1.7-2.0 s and 1 thread in 2.5 s; with one core kept busy by another process, 2 threads take 5.7-6.9 s
while 1 thread still takes 2.5 s, and during a heavy run 1.7-s renders took 20-55 s.

The choice (a machine setting, recorded in every sidecar through studio.machine.RECORDED):
- threads: `--threads N` (CLI) > SHOT_STUDIO_THREADS > OMP_NUM_THREADS > auto (`auto_threads`): one core is
  left to the rest of the machine, i.e. 1 thread on 1-2 cores, cores - 1 from 3 cores on. Cores are those this
  process may use: its CPU affinity and the container's CPU quota (cgroup cpu.max), whichever is fewer.
- wait policy: OMP_WAIT_POLICY as the environment gives it, else PASSIVE (threads sleep at once when they wait
  instead of spinning): a team of several threads then slows down by the share of a core it loses, not by the
  spinning on top. libgomp reads the variable once, when torch loads it, so `early()` runs at `import studio`,
  before any of the studio's code imports torch (the CLI, the app, the tests and the benchmarks all import the
  studio first). A process that imported torch before the studio keeps libgomp's default (recorded as such).

`choose` is a pure function of the core count, the environment and the flag (tests call it directly); `apply`
makes the choice for this process (torch.set_num_threads) and remembers it for the sidecar.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

logger = logging.getLogger(__name__)

ENV = "SHOT_STUDIO_THREADS"  # a whole number of threads, or "auto"
WAIT_ENV = "OMP_WAIT_POLICY"
DEFAULT_WAIT = "PASSIVE"
MAX_THREADS = 1024


@dataclass(frozen=True)
class Choice:
    """The thread count torch runs with, where it came from, and the cores this process may use."""

    threads: int
    source: str  # "--threads", "SHOT_STUDIO_THREADS", "OMP_NUM_THREADS" or "auto"
    cores: int

    def describe(self) -> str:
        """One line for the sidecar and the log, e.g. 'auto: 1 of 2 cores' or '--threads 2'."""
        if self.source == "auto":
            return f"auto: {self.threads} of {self.cores} cores"
        return f"{self.source} {self.threads}"


# --- the choice (pure) ------------------------------------------------------------------------------------------


def auto_threads(cores: int) -> int:
    """Threads for a machine with `cores` usable cores when nobody says: leave one core to the rest of the machine.

    On 1-2 cores that is 1 thread: with one core busy elsewhere it renders as fast as it does idle, while a team of
    2 loses most of its speed (see the module docstring); idle, it gives up the second core's speed-up (2.5 s
    against 1.7-2.0 s on the toy model). From 3 cores on, cores - 1: one busy core then still leaves every thread
    a core of its own.
    """
    return max(1, cores - 1)


def parse_threads(value, source: str) -> int | None:
    """A thread count as a flag or variable gives it: a whole number 1..MAX_THREADS, or 0 / "auto" (None).

    Anything else is a ValueError naming the source, e.g. "SHOT_STUDIO_THREADS: must be ... (got 'many')"."""
    text = str(value).strip().lower()
    if text in ("auto", "0"):
        return None
    try:
        n = int(text)
    except ValueError:
        n = -1
    if not 1 <= n <= MAX_THREADS:
        raise ValueError(f"{source}: must be a whole number of CPU threads 1..{MAX_THREADS}, or 0 / auto for the "
                         f"studio's choice (got {value!r})")
    return n


def _omp_num_threads(value: str | None) -> int | None:
    """OMP_NUM_THREADS's first level ("4" or "4,2"); None when unset or not a positive number (libgomp ignores it)."""
    first = (value or "").split(",")[0].strip()
    return int(first) if first.isdigit() and 0 < int(first) <= MAX_THREADS else None


def choose(cores: int, env: Mapping[str, str], flag=None) -> Choice:
    """The thread count for a process that may use `cores` cores: the flag, else SHOT_STUDIO_THREADS, else
    OMP_NUM_THREADS, else `auto_threads(cores)`. A bad flag or SHOT_STUDIO_THREADS is a ValueError naming it."""
    cores = max(1, int(cores))
    if flag is not None:
        n = parse_threads(flag, "--threads")
        if n is not None:
            return Choice(n, "--threads", cores)
    if env.get(ENV, "").strip():
        n = parse_threads(env[ENV], ENV)
        if n is not None:
            return Choice(n, ENV, cores)
    n = _omp_num_threads(env.get("OMP_NUM_THREADS"))
    if n is not None:
        return Choice(n, "OMP_NUM_THREADS", cores)
    return Choice(auto_threads(cores), "auto", cores)


# --- the machine ------------------------------------------------------------------------------------------------


def cgroup_cpu_limit(root: str | Path = "/sys/fs/cgroup") -> float | None:
    """The container's CPU quota in cores (cgroup v2 cpu.max "200000 100000" = 2.0; v1 cfs files), None if none."""
    root = Path(root)
    candidates = [(root / "cpu.max", None), (root / "cpu" / "cpu.cfs_quota_us", root / "cpu" / "cpu.cfs_period_us"),
                  (root / "cpu,cpuacct" / "cpu.cfs_quota_us", root / "cpu,cpuacct" / "cpu.cfs_period_us")]
    for quota_file, period_file in candidates:
        try:
            if period_file is None:
                quota, period = quota_file.read_text().split()[:2]
            else:
                quota, period = quota_file.read_text().strip(), period_file.read_text().strip()
            if quota in ("max", "-1"):
                return None
            return int(quota) / int(period)
        except (OSError, ValueError, ZeroDivisionError):
            continue
    return None


def available_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by the container's CPU quota (rounded up)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_limit()
    if quota:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


# --- this process -----------------------------------------------------------------------------------------------

_wait_policy: str | None = None  # what libgomp read when torch loaded, as far as the studio knows
_current: Choice | None = None


def early(env=None) -> str:
    """At start-up, before torch loads: OMP_WAIT_POLICY defaults to PASSIVE. Returns the policy torch runs with.

    Called by `import studio`. When torch is already loaded (a script imported it first), libgomp has read its
    environment already: nothing is set, and the policy is recorded as libgomp's default (or the variable it saw)."""
    global _wait_policy
    env = os.environ if env is None else env
    if _wait_policy is not None:
        return _wait_policy
    given = env.get(WAIT_ENV, "").strip()
    if given:
        _wait_policy = given.upper()
    elif "torch" in sys.modules:
        _wait_policy = "default (torch loaded before the studio)"
    else:
        env[WAIT_ENV] = DEFAULT_WAIT
        _wait_policy = DEFAULT_WAIT
    return _wait_policy


def wait_policy() -> str:
    """The OpenMP wait policy torch's threads run with (sidecar render.machine.torch_wait_policy)."""
    return early()


def apply(flag=None, env=None) -> Choice:
    """Choose the thread count for this process (flag > SHOT_STUDIO_THREADS > OMP_NUM_THREADS > auto) and set it
    in torch. ValueError naming the flag or the variable when it is not a thread count."""
    global _current
    import torch

    choice = choose(available_cores(), os.environ if env is None else env, flag)
    torch.set_num_threads(choice.threads)
    _current = choice
    logger.info("torch CPU threads: %s; OpenMP wait policy %s", choice.describe(), wait_policy())
    return choice


def current() -> Choice | None:
    """The choice `apply` made in this process (None: never applied; torch runs with its own default)."""
    return _current


def chosen_by() -> str:
    """How this process's thread count was chosen (sidecar render.machine.torch_threads_chosen_by)."""
    import torch

    if _current is None:
        return "torch's default (the studio's choice was not applied)"
    if torch.get_num_threads() != _current.threads:
        return f"set in this process after the studio's choice ({_current.describe()})"
    return _current.describe()
