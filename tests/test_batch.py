"""`studio batch`: sweep parsing, job planning and naming, outputs, manifest, contact sheet, one model load, frames
equal to `studio render`, resume by job hash, failures recorded, Ctrl-C (SIGINT) leaving a consistent manifest."""

import contextlib
import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from studio import batch, cli, engine, export
from studio.shot import ShotError

ROOT = Path(__file__).resolve().parent.parent
STAR = str(ROOT / "presets/shots/toyworld-star.yaml")  # toyworld model, 8 frames 32x32
EXAMPLE = str(ROOT / "presets/shots/example.yaml")  # tiny random model
FAST_TINY = ["--set", "width=32", "--set", "height=32", "--set", "steps=2"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """These renders are tiny: one torch thread is about as fast on an idle machine and far faster on a busy one,
    where torch's two threads wait on each other (README, Models). Restored after the module."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def manifest(out: Path) -> dict:
    return json.loads((out / batch.MANIFEST_JSON).read_text())


def statuses(out: Path) -> dict[str, str]:
    return {j["id"]: j["status"] for j in manifest(out)["jobs"]}


def leftovers(out: Path) -> list[str]:
    """Temporary files of the all-or-nothing writes (hidden names) left in the folder."""
    return [p.name for p in out.iterdir() if p.name.startswith(".")]


# --- sweeps ------------------------------------------------------------------------------------------------------


def test_sweep_ranges_are_inclusive_integers():
    assert batch.parse_sweep("seed=1..4") == batch.Sweep("seed", (1, 2, 3, 4))
    assert batch.parse_sweep("seed=-2..0").values == (-2, -1, 0)
    assert batch.parse_sweep("seed=3..3").values == (3,)
    assert batch.parse_sweep("seed= 1 .. 2").values == (1, 2)


def test_sweep_lists_take_yaml_values_as_set_does():
    assert batch.parse_sweep("noise_prior.gamma=[0, 0.2, 0.5]").values == (0, 0.2, 0.5)
    boxes = batch.parse_sweep("subjects.0.boxes.7=[[0.5,0.5,0.9,0.9], [0.1,0.5,0.5,0.9]]")
    assert boxes.field == "subjects.0.boxes.7" and boxes.values == ([0.5, 0.5, 0.9, 0.9], [0.1, 0.5, 0.5, 0.9])
    words = batch.parse_sweep("prompt=[a red circle on grass, 'a white star: on sky']")
    assert words.values == ("a red circle on grass", "a white star: on sky")
    # each value goes back through --set's parser unchanged
    from studio import shot as shotlib

    for sweep in (boxes, words, batch.parse_sweep("noise_prior.gamma=[0.25]")):
        for v in sweep.values:
            s = shotlib.load(STAR, [sweep.override(v)])
            got = {"prompt": s.prompt, "noise_prior.gamma": s.noise_prior.gamma,
                   "subjects.0.boxes.7": s.subjects[0].boxes.get(7)}[sweep.field]
            assert got == v


@pytest.mark.parametrize("text, words", [
    ("seed=5..1", "empty range"),
    ("seed=[]", "empty"),
    ("seed=abc", "YAML list"),
    ("seed=[1, 2", "not a YAML list"),
    ("seed=1.5..3", "YAML list"),
    ("seed", "field=[v1"),
    ("=[1, 2]", "dotted shot field"),
    ("noise_prior..gamma=[0]", "dotted shot field"),
    ("seed=[1, 1]", "twice"),
    ("seed=1..100000", "at most"),
])
def test_bad_sweeps_are_one_line_naming_the_sweep(text, words):
    with pytest.raises(ShotError) as e:
        batch.parse_sweep(text)
    assert str(e.value).startswith("--sweep") and words in str(e.value) and "\n" not in str(e.value)


# --- planning: names, order ---------------------------------------------------------------------------------------


def test_job_names_say_the_values_and_are_safe_and_unique():
    names = batch.job_names([
        ("shots/star.yaml", {"seed": 3, "noise_prior.gamma": 0.2}),
        ("shots/star.yaml", {"seed": 3, "noise_prior.gamma": 0.5}),
        ("a/star.yaml", {"prompt": "a red/circle on grass"}),
        ("b/star.yaml", {"prompt": "a red/circle on grass"}),  # the same stem and value: must still differ
        ("x/manifest.yaml", {}),  # would overwrite the manifest's own files
        ("x/Big.yaml", {"seed": 1}), ("y/big.yaml", {"seed": 1}),  # differ only in case
        ("s.yaml", {"subjects.0.boxes.7": [0.5, 0.5, 0.9, 0.9]}),
        ("s.yaml", {"prompt": "word " * 80}),
    ])
    assert names[0] == "star__seed=3__noise_prior.gamma=0.2"
    assert names[1] == "star__seed=3__noise_prior.gamma=0.5"
    assert names[2].startswith("star__prompt=a_red_circle_on_grass~") and names[2] != names[3]
    assert names[4].startswith("manifest~") and names[5].lower() != names[6].lower()
    assert names[7] == "s__subjects.0.boxes.7=0.5,0.5,0.9,0.9"
    assert len(names[8]) <= batch.MAX_NAME
    assert len({n.lower() for n in names}) == len(names)
    for n in names:
        assert all(c.isalnum() or c in "._,=+-~" for c in n) and not n.startswith(".")


def test_plan_checks_everything_and_orders_jobs_by_model(tmp_path):
    star2 = tmp_path / "star2.yaml"
    shutil.copy(STAR, star2)
    plan = batch.plan([STAR, EXAMPLE, str(star2)], tmp_path / "out", ["seed=1..2"], ["steps=2"])
    assert [j.id for j in plan.jobs] == ["toyworld-star__seed=1", "toyworld-star__seed=2", "example__seed=1",
                                         "example__seed=2", "star2__seed=1", "star2__seed=2"]
    assert [j.model for j in plan.order] == ["toyworld"] * 4 + ["tiny"] * 2  # each model's jobs together
    assert [j.index for j in plan.order] == [0, 1, 4, 5, 2, 3]
    assert all(j.shot.steps == 2 and j.shot.width is not None for j in plan.jobs)  # resolved
    assert not (tmp_path / "out").exists(), "planning writes nothing"


def test_order_groups_subjects_within_a_model():
    def job(i, model, subjects):
        return batch.Job(i, f"j{i}", "s.yaml", {}, [], None, model, subjects, (model, subjects))

    jobs = [job(0, "m", ("rex",)), job(1, "m", ()), job(2, "n", ()), job(3, "m", ("rex",)), job(4, "m", ())]
    assert [j.index for j in batch.order_jobs(jobs)] == [0, 3, 1, 4, 2]


def test_job_hash_covers_shot_weights_subjects_inputs_and_settings():
    shot = {"prompt": "a star", "seed": 1, "subjects": [{"boxes": {0: [0, 0, 1, 1]}}]}
    ident = {"components": {"unet": {"source": "models/a/unet", "sha256": "u1", "files": 2}},
             "subjects": {"rex": {"created": "monday", "files": {"lora.safetensors": "l1"}}},
             "inputs": {"subjects[0].reference": "r1"}}
    settings = {"device": "cpu", "torch_threads": 2}
    h = batch.job_hash(shot, ident, settings)
    assert h == batch.job_hash(json.loads(json.dumps(shot)), ident, settings)  # as a sidecar stores it
    moved = json.loads(json.dumps(ident))
    moved["components"]["unet"]["source"] = "/elsewhere/unet"
    moved["subjects"]["rex"]["created"] = "tuesday"
    assert batch.job_hash(shot, moved, settings) == h  # same bytes, same pixels
    for path, value in [(("components", "unet", "sha256"), "u2"), (("subjects", "rex", "files"), {"lora": "l2"}),
                        (("inputs", "subjects[0].reference"), "r2")]:
        changed = json.loads(json.dumps(ident))
        node = changed
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
        assert batch.job_hash(shot, changed, settings) != h, path
    assert batch.job_hash(shot, ident, {**settings, "torch_threads": 1}) != h
    assert batch.job_hash({**shot, "seed": 2}, ident, settings) != h


def test_progress_bar_redraws_on_a_terminal_with_an_eta(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(batch.time, "perf_counter", lambda: clock[0])
    stream = io.StringIO()
    bar = batch.ProgressBar(4, stream, tty=True)
    jobs = [batch.Job(i, f"star__seed={i}", "s.yaml", {"seed": i}, [], None, "m", (), ("m", ())) for i in range(4)]
    bar.step(jobs[0], 0, 1)
    assert "0/4 jobs" in stream.getvalue() and "ETA --:--" in stream.getvalue()
    clock[0] += 10
    bar.step(jobs[0], 5, 10)  # half of the first job in 10 s: 3.5 jobs of 20 s left
    assert stream.getvalue().endswith("ETA 1:10  star__seed=0")
    clock[0] += 10
    bar.done(jobs[0], {"status": "done", "seconds": 20.0, "error": None})
    bar.done(jobs[1], {"status": "failed", "seconds": 1.0, "error": "boom"})
    text = stream.getvalue()
    assert "job star__seed=1 failed: boom\n" in text  # a line of its own
    assert text.rsplit("\r", 1)[-1].endswith("2/4 jobs (1 done, 1 failed)  ETA 0:40")  # 2 left at 20 s a render
    assert "\x1b[2K[############------------]" in text


# --- bad input: one line, exit 2, nothing written -----------------------------------------------------------------


@pytest.mark.parametrize("args, words", [
    (["--sweep", "colour=[1, 2]"], "colour: unknown field"),
    (["--sweep", "seed=5..1"], "empty range"),
    (["--sweep", "seed=[1, 2"], "--sweep seed"),
    (["--sweep", "seed=abc"], "--sweep seed"),
    (["--sweep", "noise_prior.gamma=[0, 1.5]"], "noise_prior.gamma"),
    (["--sweep", "subjects.0.boxes.7=[0.1, 0.5, 0.9, 0.95]"], "subjects[0].boxes.7"),  # a box sweep is a list of boxes
    (["--sweep", "subjects.3.phrase=[a, b]"], "subjects[3]"),
    (["--set", "width=60"], "width"),
    (["--set", "seed=[1, 2"], "--set"),
])
def test_bad_input_exits_2_with_one_line_before_any_render(tmp_path, capsys, monkeypatch, args, words):
    monkeypatch.setattr(engine, "render", lambda *a, **k: pytest.fail("rendered before checking"))
    out = tmp_path / "out"
    assert cli.main(["batch", STAR, "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err and "Traceback" not in err, err
    assert not out.exists()


def test_bad_output_folder_and_shot_file(tmp_path, capsys, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = [([STAR, "--out", str(afile)], "a file, not a folder"),
             ([STAR, "--out", str(afile / "sub")], "is a file"),
             ([str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o")], "nope.yaml"),
             ([STAR, STAR, "--out", str(tmp_path / "o")], "given twice")]
    for args, words in cases:
        assert cli.main(["batch", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err
    monkeypatch.setattr(batch.os, "access", lambda *a: False)  # this machine's tests run as root: no read-only dirs
    assert cli.main(["batch", STAR, "--out", str(tmp_path / "o")]) == 2
    assert "no permission" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


# --- a 4-job batch on the embedded model --------------------------------------------------------------------------

SWEEPS = ["--sweep", "seed=[3, 4]", "--sweep", "noise_prior.gamma=[0, 0.4]"]
SETS = ["--set", "steps=2"]


@pytest.fixture(scope="module")
def star_batch(tmp_path_factory):
    out = tmp_path_factory.mktemp("batch") / "out"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.main(["batch", STAR, "--out", str(out), *SWEEPS, *SETS])
    return out, code, err.getvalue()


def test_four_jobs_write_videos_sidecars_manifest_and_sheet_with_one_model_load(star_batch):
    out, code, err = star_batch
    assert code == 0
    names = ["toyworld-star__seed=3__noise_prior.gamma=0", "toyworld-star__seed=3__noise_prior.gamma=0.4",
             "toyworld-star__seed=4__noise_prior.gamma=0", "toyworld-star__seed=4__noise_prior.gamma=0.4"]
    assert sorted(p.name for p in out.glob("*.mp4")) == sorted(f"{n}.mp4" for n in names)
    m = manifest(out)
    assert m["status"] == "finished" and m["pipeline_loads"] == 1 and m["contact_sheets"] == ["contact_sheet.png"]
    assert m["counts"] == {"done": 4, "skipped": 0, "failed": 0, "cancelled": 0, "pending": 0}
    assert m["sweeps"] == [{"field": "seed", "values": [3, 4]}, {"field": "noise_prior.gamma", "values": [0, 0.4]}]
    assert [j["id"] for j in m["jobs"]] == names
    for j, (seed, gamma) in zip(m["jobs"], [(3, 0), (3, 0.4), (4, 0), (4, 0.4)]):
        assert j["values"] == {"seed": seed, "noise_prior.gamma": gamma} and j["error"] is None
        side = json.loads((out / j["sidecar"]).read_text())
        assert side["shot"]["seed"] == seed and side["shot"]["noise_prior"]["gamma"] == gamma
        assert side["batch"]["job_hash"] == j["job_hash"] == batch.sidecar_hash(out / j["sidecar"])
        assert export.probe_video(out / j["video"])["frames"] == 8
    with open(out / batch.MANIFEST_CSV, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["id"], r["seed"], r["noise_prior.gamma"], r["job_hash"], r["status"], r["video"]) for r in rows] == \
        [(j["id"], str(j["values"]["seed"]), str(j["values"]["noise_prior.gamma"]), j["job_hash"], j["status"],
          j["video"]) for j in m["jobs"]]
    assert "ETA" in err and "[4/4]" in err  # the progress lines (stderr is not a terminal here)
    assert not leftovers(out)


def test_contact_sheet_shows_each_jobs_first_middle_last_frame_in_its_row(star_batch):
    from PIL import Image

    out, _, _ = star_batch
    jobs = manifest(out)["jobs"]
    sheet = np.asarray(Image.open(out / batch.CONTACT_SHEET).convert("RGB")).astype(float)
    own = [batch.thumbnails(export.read_video(out / j["video"])) for j in jobs]  # decoded: close, not equal
    w = own[0][0].shape[1]
    assert w == 128  # 32-pixel frames enlarged 4x
    cells = batch.sheet_cells(len(jobs), [w] * 3)
    assert sheet.shape[0] == cells[-1][0][1] + batch.THUMB_HEIGHT + batch.PAD
    for r, row in enumerate(cells):
        for c, (x, y) in enumerate(row):
            cell = sheet[y:y + batch.THUMB_HEIGHT, x:x + w]
            dist = [np.abs(cell - o[c]).mean() for o in own]
            assert np.argmin(dist) == r and dist[r] < 12, (r, c, dist)


def test_each_jobs_frames_equal_studio_render_of_the_same_shot(star_batch, tmp_path):
    out, _, _ = star_batch
    for j in manifest(out)["jobs"]:
        sets = [f"seed={j['values']['seed']}", f"noise_prior.gamma={j['values']['noise_prior.gamma']}"]
        single = tmp_path / f"{j['id']}.mp4"
        assert cli.main(["render", STAR, "--out", str(single), *SETS, *[a for s in sets for a in ("--set", s)],
                         "--no-progress"]) == 0
        mine = json.loads((out / j["sidecar"]).read_text())
        theirs = json.loads(single.with_suffix(".json").read_text())
        assert mine["frames"] == theirs["frames"] and mine["shot"] == theirs["shot"]
        assert mine["identity"] == theirs["identity"] and mine["settings"] == theirs["settings"]


def test_resume_renders_nothing_then_only_the_deleted_job(star_batch, tmp_path):
    out, _, _ = star_batch
    again = tmp_path / "again"
    shutil.copytree(out, again)
    mtimes = {p.name: p.stat().st_mtime_ns for p in again.glob("*.mp4")}
    args = ["batch", STAR, "--out", str(again), *SWEEPS, *SETS, "--no-progress"]
    assert cli.main(args) == 0
    m = manifest(again)
    assert m["counts"]["skipped"] == 4 and m["counts"]["done"] == 0
    assert {p.name: p.stat().st_mtime_ns for p in again.glob("*.mp4")} == mtimes
    gone = m["jobs"][2]
    before = json.loads((again / gone["sidecar"]).read_text())["frames"]
    (again / gone["video"]).unlink()
    assert cli.main(args) == 0
    assert statuses(again) == {j["id"]: "done" if j["id"] == gone["id"] else "skipped" for j in m["jobs"]}
    assert json.loads((again / gone["sidecar"]).read_text())["frames"] == before
    assert (again / batch.CONTACT_SHEET).is_file() and not leftovers(again)


# --- a retrained model re-renders ---------------------------------------------------------------------------------


def test_a_retrained_model_renders_again(tmp_path):
    import safetensors.torch

    from studio.pipelines import builtin_folder

    model = tmp_path / "model"
    shutil.copytree(builtin_folder("tiny"), model)
    preset = tmp_path / "mine.yaml"
    preset.write_text(f"name: mine\nfamily: animatediff\nbase: {model}\n"
                      "defaults: {frames: 4, width: 32, height: 32, fps: 8, steps: 1, guidance_scale: 7.5}\n")
    shot = tmp_path / "s.yaml"
    shot.write_text(f"model: {preset}\nprompt: a red circle on grass\n")
    out = tmp_path / "out"
    args = ["batch", str(shot), "--out", str(out), "--sweep", "seed=0..1", "--no-progress"]
    assert cli.main(args) == 0 and manifest(out)["counts"]["done"] == 2
    old = {j["id"]: j["job_hash"] for j in manifest(out)["jobs"]}
    assert cli.main(args) == 0 and manifest(out)["counts"]["skipped"] == 2
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"  # "retrain": other bytes in the same folder
    tensors = safetensors.torch.load_file(weights)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 0.01
    safetensors.torch.save_file(tensors, weights)
    assert cli.main(args) == 0
    m = manifest(out)
    assert m["counts"]["done"] == 2 and m["pipeline_loads"] == 1
    assert all(j["job_hash"] != old[j["id"]] for j in m["jobs"])


def test_jobs_group_by_subject_and_a_retrained_subject_renders_again(tmp_path):
    import torch

    from studio.subjects.library import SubjectLibrary

    lib, name = SubjectLibrary(), "batch-pip"  # the studio home's library: the one renders read
    photos = [np.full((32, 32, 3), 200, np.uint8)]

    def save(seed: int):
        embeds = {"<batch-pip>": torch.randn(16, generator=torch.Generator().manual_seed(seed))}  # tiny: text_dim 16
        lib.save(name, photos, None, {"trigger": "<batch-pip>", "class_word": "circle", "base_model": "tiny"},
                 embeds=embeds, overwrite=True)

    save(0)
    try:
        out = tmp_path / "out"
        args = ["batch", EXAMPLE, "--out", str(out), "--sweep", "seed=0..1", "--sweep",
                f"subjects.0.subject=[null, {name}]", *FAST_TINY, "--no-progress"]
        assert cli.main(args) == 0
        m = manifest(out)
        assert m["order"] == ["example__seed=0__subjects.0.subject=null", "example__seed=1__subjects.0.subject=null",
                              f"example__seed=0__subjects.0.subject={name}",
                              f"example__seed=1__subjects.0.subject={name}"]
        side = json.loads((out / f"example__seed=0__subjects.0.subject={name}.json").read_text())
        assert list(side["identity"]["subjects"]) == [name]
        save(1)  # "retrained": other token weights
        assert cli.main(args) == 0
        assert [statuses(out)[i] for i in m["order"]] == ["skipped", "skipped", "done", "done"]
    finally:
        lib.delete(name)


# --- failures do not stop the batch -------------------------------------------------------------------------------


def test_a_failing_job_is_recorded_and_the_others_finish(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(batch, "SHEET_ROWS", 3)  # and the contact sheet comes in pages
    preset = tmp_path / "broken.yaml"  # valid preset, weights folder gone: fails when the job loads it
    preset.write_text(f"name: broken\nfamily: animatediff\nbase: {tmp_path / 'gone'}\n")
    broken = tmp_path / "broken-shot.yaml"
    broken.write_text(f"model: {preset}\nprompt: a red circle on grass\n")
    out = tmp_path / "out"
    code = cli.main(["batch", str(broken), EXAMPLE, "--out", str(out), "--sweep", "seed=0..1", *FAST_TINY,
                     "--no-progress"])
    assert code == batch.EXIT_FAILED_BASE + 2
    m = manifest(out)
    assert m["order"][:2] == ["broken-shot__seed=0", "broken-shot__seed=1"]  # they failed first; the rest went on
    assert m["counts"] == {"done": 2, "skipped": 0, "failed": 2, "cancelled": 0, "pending": 0}
    for j in m["jobs"]:
        if j["shot"] == str(broken):
            assert j["status"] == "failed" and "could not be loaded" in j["error"] and j["video"] is None
            assert not (out / f"{j['id']}.mp4").exists()
        else:
            assert j["status"] == "done" and (out / j["video"]).is_file()
    captured = capsys.readouterr()
    assert "2 failed" in captured.out
    assert captured.err.count("failed: model") == 2 and "Traceback" not in captured.err
    from PIL import Image

    assert m["contact_sheets"] == ["contact_sheet.png", "contact_sheet-2.png"]
    pages = [np.asarray(Image.open(out / name).convert("RGB")) for name in m["contact_sheets"]]
    assert pages[0].shape[0] == batch.sheet_cells(3, [128] * 3)[-1][0][1] + batch.THUMB_HEIGHT + batch.PAD
    (x, y) = batch.sheet_cells(3, [128] * 3)[0][0]
    assert (pages[0][y + 5:y + 100, x + 5:x + 100] == 70).all()  # a failed job's cell is a grey box
    assert (pages[1][y + 5:y + 100, x + 5:x + 100] != 70).any()  # the 4th job rendered


# --- Ctrl-C -------------------------------------------------------------------------------------------------------

CHILD = """
import os, signal, sys
from studio import cli, engine

real, calls = engine.render, []
SIGNAL_AT = {signal_at!r}  # denoising steps of the 2nd job at which this process sends itself SIGINT


def render(shot, manager=None, progress=None, cancel=None):
    calls.append(shot.seed)
    def step(i, n):
        if len(calls) == 2 and i in SIGNAL_AT:
            os.kill(os.getpid(), signal.SIGINT)
        if progress is not None:
            progress(i, n)
    return real(shot, manager, step, cancel)


engine.render = render
sys.exit(cli.main(sys.argv[1:]))
"""


def _batch_args(out):
    return ["batch", EXAMPLE, "--out", str(out), "--sweep", "seed=1..4", "--set", "width=32", "--set", "height=32",
            "--set", "steps=3"]


def test_sigint_to_a_child_stops_after_the_current_job_with_a_consistent_manifest(tmp_path):
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-c", CHILD.format(signal_at=(1,)), *_batch_args(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, check=False,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})  # as this module's own renders (see above)
    assert p.returncode == batch.EXIT_INTERRUPTED, p.stderr[-3000:]
    assert "stopping after the current job" in p.stderr and "interrupted" in p.stdout
    m = manifest(out)
    assert m["status"] == "interrupted" and m["finished"] is not None
    assert [statuses(out)[i] for i in m["order"]] == ["done", "done", "pending", "pending"]  # the 2nd one finished
    for j in m["jobs"]:
        done = j["status"] == "done"
        assert (out / f"{j['id']}.mp4").exists() == done and (out / f"{j['id']}.json").exists() == done
    with open(out / batch.MANIFEST_CSV, newline="") as f:
        assert [r["status"] for r in csv.DictReader(f)] == [j["status"] for j in m["jobs"]]
    assert (out / batch.CONTACT_SHEET).is_file() and not leftovers(out)
    # the same command again finishes the batch: the two done jobs are skipped
    assert cli.main(_batch_args(out) + ["--no-progress"]) == 0
    assert sorted(statuses(out).values()) == ["done", "done", "skipped", "skipped"]


def test_second_sigint_cancels_the_current_job_and_writes_nothing_of_it(tmp_path, monkeypatch):
    assert threading.current_thread() is threading.main_thread()
    real, calls = engine.render, []

    def render(shot, manager=None, progress=None, cancel=None):
        calls.append(shot.seed)

        def step(i, n):
            if len(calls) == 2 and i in (1, 2):
                os.kill(os.getpid(), signal.SIGINT)  # handled by batch.sigint_stops, in this (main) thread
            if progress is not None:
                progress(i, n)
        return real(shot, manager, step, cancel)

    monkeypatch.setattr(engine, "render", render)
    out = tmp_path / "out"
    plan = batch.plan([EXAMPLE], out, ["seed=1..4"], ["width=32", "height=32", "steps=4"])
    stop, cancel, notes = threading.Event(), threading.Event(), []
    before = signal.getsignal(signal.SIGINT)
    with batch.sigint_stops(stop, cancel, notes.append):
        report = batch.run(plan, batch.LocalExecutor(), None, stop, cancel)
    assert signal.getsignal(signal.SIGINT) is before
    assert report.exit_status == batch.EXIT_INTERRUPTED and len(notes) == 2
    assert [statuses(out)[i] for i in manifest(out)["order"]] == ["done", "cancelled", "pending", "pending"]
    second = plan.order[1]
    assert not (out / second.video).exists() and not (out / second.sidecar).exists() and not leftovers(out)
