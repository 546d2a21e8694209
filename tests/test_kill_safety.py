"""`studio subject add --overwrite` and `studio subject remove` killed (SIGKILL) at every point of training, saving
and swapping: the next start lists only complete subjects, the previous version of an overwritten subject intact
or restored, the new one only when it was whole, and nothing stray.

The points are studio.faults' (SHOT_STUDIO_KILL_AT): the child process kills itself exactly there, no timing.
One helper process (tests/kill_helper.py) imports the CLI and its libraries once, then forks one child per point,
each with a studio home of its own holding the previous version of 'rex'. The children of CLI points run the real
`studio subject add rex --overwrite` (the embedded toy-world model, learned tokens, 2 steps); those of the points
inside the library's save and delete call SubjectLibrary.save(overwrite=True) / delete directly (the same code the
command reaches after training, without training 2 steps each time).
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from studio import cli, faults
from studio.subjects.library import SubjectLibrary

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the helper forks after importing torch (Linux)")
ROOT = Path(__file__).resolve().parent.parent
OLD = "<rex> dog"  # the previous version's trigger; the new one trains tokens and records its own
# point -> which version of 'rex' the next start must list after `subject add rex --overwrite` died there
OVERWRITE = {"train-step@1": "old", "train-step@2": "old", "trained": "old", "save-tmp-made": "old",
             "save-photos-written": "old", "save-weights-written": "old", "save-built": "old",
             "swap-aside-made": "old", "swap-old-moved": "old", "swap-new-in-place": "new",
             "swap-old-half-removed": "new"}
CLI_POINTS = ("train-step@1", "train-step@2", "trained", "swap-old-moved", "swap-new-in-place")  # via `studio`
DELETE = ("delete-moved", "delete-half-removed")  # `subject remove rex` died there: rex is gone, nothing stray

def _previous_rex(home: Path) -> None:
    """The subject as it was before the overwrite: a complete 'rex' for the toy-world model."""
    g = torch.Generator().manual_seed(0)
    photos = [np.full((32, 32, 3), 200, np.uint8)]
    SubjectLibrary(home / "subjects").save("rex", photos, None, {"trigger": OLD, "class_word": "dog",
                                                                 "base_model": "toyworld"},
                                           embeds={"<rex>": torch.randn(32, generator=g)})


def _photos(tmp_path: Path) -> tuple[Path, Path]:
    photos, masks = tmp_path / "photos", tmp_path / "masks"
    photos.mkdir()
    masks.mkdir()
    for i in range(2):
        img = np.zeros((32, 32, 3), np.uint8)
        img[:] = (30, 60 + 40 * i, 200)
        img[8:24, 10:22] = (240, 200, 20)
        Image.fromarray(img).save(photos / f"{i}.png")
        m = np.zeros((32, 32), np.uint8)
        m[8:24, 10:22] = 255
        Image.fromarray(m).save(masks / f"{i}.png")
    return photos, masks


def _entries(home: Path) -> list[str]:
    return sorted(p.name for p in (home / "subjects").iterdir())


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """{point: (home, signal the child died of)} for every point of OVERWRITE and DELETE."""
    tmp = tmp_path_factory.mktemp("killed")
    photos, masks = _photos(tmp)
    add = ["subject", "add", "rex", "--images", str(photos), "--masks", str(masks), "--model", "toyworld",
           "--method", "tokens", "--steps", "2", "--phrase", "sks dog", "--seed", "1", "--overwrite", "--no-progress"]
    jobs, homes = [], {}
    for point in [*OVERWRITE, *DELETE]:
        home = tmp / point.replace("@", "-")
        _previous_rex(home)
        homes[point] = home
        job = {"argv": add} if point in CLI_POINTS else {"library": "overwrite" if point in OVERWRITE else "delete"}
        jobs.append({"home": str(home), "point": point, **job})
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    env = {k: v for k, v in os.environ.items() if k != faults.ENV}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "kill_helper.py"), str(tmp / "jobs.json")],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    died = json.loads(proc.stdout.strip().splitlines()[-1])
    return {point: (home, died[str(home)]) for point, home in homes.items()}


def test_every_fault_point_is_exercised():
    assert {p.split("@")[0] for p in [*OVERWRITE, *DELETE]} == set(faults.POINTS)


@pytest.mark.parametrize("point", list(OVERWRITE))
def test_an_overwrite_killed_at_any_point_leaves_one_whole_version(killed, point, capsys, monkeypatch):
    home, died = killed[point]
    assert died == signal.SIGKILL, f"the child was not killed at {point} (exit {-died})"
    lib = SubjectLibrary(home / "subjects")
    # the next start: `studio subject list` shows rex, whole, in the version the point implies
    monkeypatch.setenv("SHOT_STUDIO_HOME", str(home))
    assert cli.main(["subject", "list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed] == ["rex"], listed
    rex = lib.get("rex")
    if OVERWRITE[point] == "old":
        assert rex.trigger == OLD and rex.photos == 1 and rex.metadata.get("training") == {}
    else:
        assert rex.trigger != OLD and rex.photos == 2 and rex.masks == 2 and rex.metadata["training"]["steps"] == 2
        assert point not in CLI_POINTS or len(rex.tokens) == 4  # trained by the CLI: Magic-Me's 4 ID tokens
    embeds = lib.load_embeds("rex")
    assert set(embeds) == set(rex.tokens) and all(torch.isfinite(v).all() for v in embeds.values())
    assert len(lib.load_photos("rex")) == rex.photos
    assert _entries(home) == ["rex"]  # nothing stray left on disk either


@pytest.mark.parametrize("point", DELETE)
def test_a_remove_killed_midway_leaves_the_subject_gone_and_nothing_stray(killed, point):
    home, died = killed[point]
    assert died == signal.SIGKILL
    assert SubjectLibrary(home / "subjects").list() == []
    assert _entries(home) == []


def test_recovery_waits_for_a_live_writer(tmp_path):
    """Hidden folders of a writer that is alive (it holds the lock) are left alone; once it is gone they go."""
    from studio.subjects import library

    _previous_rex(tmp_path)
    lib = SubjectLibrary(tmp_path / "subjects")
    building = tmp_path / "subjects" / ".tmp-pip-abc"
    building.mkdir()
    with library._locked(lib.root, wait=True):
        assert [s.name for s in lib.list()] == ["rex"] and building.is_dir()  # a writer is at work: untouched
    assert lib.recover() == ["removed an unfinished save (.tmp-pip-abc)"] and not building.exists()


def test_a_kill_between_the_two_renames_is_restored_by_the_next_reader(tmp_path, caplog):
    """The state a kill at swap-old-moved leaves, made by hand: the previous version only in its .old folder."""
    _previous_rex(tmp_path)
    lib = SubjectLibrary(tmp_path / "subjects")
    aside = lib.root / ".old-rex-x1"
    aside.mkdir()
    os.replace(lib.root / "rex", aside / "rex")
    (lib.root / ".tmp-rex-x2").mkdir()
    assert lib.exists("rex")  # any reader recovers first
    assert "restored the previous version of subject 'rex'" in caplog.text
    assert lib.get("rex").trigger == OLD and _entries(tmp_path) == ["rex"]
