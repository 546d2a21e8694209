"""Fault injection for crash tests: the process kills itself (SIGKILL) at a named point of its work.

    SHOT_STUDIO_KILL_AT=swap-old-moved studio subject add rex ... --overwrite     # dies there, as a power cut would
    SHOT_STUDIO_KILL_AT=train-step@3 ...                                           # the 3rd time that point is reached

For tests only (tests/test_kill_safety.py): it lets a test stop a child process at an exact step of saving,
swapping or training, rather than after a guessed delay. Unset, a point costs one environment lookup.
The points are listed in POINTS, by where they are.
"""

from __future__ import annotations

import os
import signal

ENV = "SHOT_STUDIO_KILL_AT"

POINTS = {
    # studio/subjects/tune.py: add_subject
    "train-step": "after each training step (add @N for the N-th)",
    "trained": "training finished, nothing saved yet",
    # studio/subjects/library.py: save, _replace, delete
    "save-tmp-made": "the hidden build folder exists, empty",
    "save-photos-written": "photos and masks written into the build folder",
    "save-weights-written": "weight files written, metadata.json not yet",
    "save-built": "the build folder is complete, not yet in place",
    "swap-aside-made": "overwrite: the hidden folder for the previous version exists, empty",
    "swap-old-moved": "overwrite: the previous version moved aside, the new one not yet in place",
    "swap-new-in-place": "overwrite: the new version in place, the previous one not yet removed",
    "swap-old-half-removed": "overwrite: the previous version partly removed",
    "delete-moved": "delete: the subject moved aside, not yet removed",
    "delete-half-removed": "delete: the subject partly removed",
}

_seen: dict[str, int] = {}


def point(name: str) -> None:
    """SIGKILL this process if SHOT_STUDIO_KILL_AT names this point ("name", or "name@N" for its N-th time)."""
    want = os.environ.get(ENV)
    if not want:
        return
    _seen[name] = _seen.get(name, 0) + 1
    target, _, nth = want.partition("@")
    if target == name and (not nth or int(nth) == _seen[name]):
        os.kill(os.getpid(), signal.SIGKILL)
