"""The studio's event functions as plain Python (values in -> shot -> result), and the app served on a local port
and driven through gradio_client."""

import asyncio
import inspect
import logging
import pickle
import sys
import types
import zipfile

import numpy as np
import pytest

from studio import export, shot as shotlib, ui
from studio.ui import events as ev, subjects as sj, trajectory as tj

EXAMPLE = open("presets/shots/example.yaml").read()
STAR = open("presets/shots/toyworld-star.yaml").read()


def _form(**kw):
    values = dict(shot_yaml=EXAMPLE, model="tiny", prompt="a red circle on grass", negative_prompt="", seed=3,
                  steps=3.0, guidance_scale=7.5, frames=8.0, gamma=0.2, cx=0.0, cy=0.0)
    values.update(kw)
    return values


def _toy(**kw):
    """A short render of the page's opening shot on the embedded toy-world model."""
    values = dict(shot_yaml=STAR, model="toyworld", prompt="a yellow star moving right on sky", negative_prompt="",
                  seed=7, steps=4, guidance_scale=7.5, frames=8, gamma=0.2, cx=0.25, cy=0.0, width=32, height=32)
    values.update(kw)
    return values


def _image(tmp_path, name="ref.png", size=(48, 40), colour=(200, 40, 40)):
    from PIL import Image

    path = tmp_path / name
    img = np.zeros((size[1], size[0], 3), np.uint8)
    img[:] = (40, 160, 60)
    img[size[1] // 4:3 * size[1] // 4, size[0] // 4:3 * size[0] // 4] = colour
    Image.fromarray(img).save(path)
    return str(path)


# --- the form and the shot file ----------------------------------------------------------------------------------


def test_form_values_override_the_shot_file_and_keep_its_subjects():
    shot = ui.shot_from_form(**_form(prompt="a red circle on sand", seed=5.0, width=96.0))
    assert (shot.prompt, shot.seed, shot.steps, shot.frames, shot.noise_prior.gamma, shot.width) == (
        "a red circle on sand", 5, 3, 8, 0.2, 96)
    assert shot.subjects[0].phrase == "red circle" and shot.subjects[0].boxes[7] == [0.65, 0.3, 0.95, 0.7]
    # the form shows a shot file's values, preset defaults filled in
    values = ui.form_values(STAR)
    assert (values["model"], values["frames"], values["width"], values["steps"], values["gamma"]) == (
        "toyworld", 8, 32, 20, 0.2)
    assert tuple(values) == ui.FORM
    assert (values["refine_face"], values["refine_face_detector"], values["refine_tiled"],
            values["refine_tiled_scale"]) == (False, "auto", False, 2)
    assert ev.preset_defaults_event("tiny") == {"frames": 8, "width": 64, "height": 64, "steps": 20,
                                                "guidance_scale": 7.5}
    with pytest.raises(ui.UserError, match="model"):
        ev.preset_defaults_event("no-such-model")


@pytest.mark.parametrize("kw, field", [
    ({"gamma": 1.0}, "noise_prior.gamma"),
    ({"frames": 99}, "frames"),
    ({"width": 60}, "width"),
    ({"cx": 1.5}, "camera.cx"),
    ({"prompt": "a yellow star on sand"}, "subjects[0].phrase"),
    ({"shot_yaml": "prompt: [oops"}, "shot file"),
    ({"shot_yaml": "colour: red"}, "colour"),
    ({"model": "no-such-model"}, "model"),
    ({"refine_face_strength": 1.5}, "refine.face.strength"),
    ({"refine_tiled_scale": 5.0}, "refine.tiled.scale"),
    ({"refine_face_detector": "dlib"}, "refine.face.detector"),
    ({"refine_face": True, "refine_face_detector": "boxes", "shot_yaml": "prompt: a red circle on grass"},
     "refine.face.detector"),  # boxes, but no subject has any
])
def test_bad_form_values_are_user_errors_naming_the_field(kw, field):
    with pytest.raises(ui.UserError) as e:
        ui.render_event(**_form(**kw))
    assert field in str(e.value)


def test_refine_toggles_are_the_shot_refine_settings_and_load_back():
    shot = ui.shot_from_form(**_form(refine_face=True, refine_face_strength=0.6, refine_face_detector="boxes",
                                     refine_tiled=True, refine_tiled_strength=0.3, refine_tiled_scale=3.0))
    assert (shot.refine.face.enabled, shot.refine.face.strength, shot.refine.face.detector) == (True, 0.6, "boxes")
    assert (shot.refine.tiled.enabled, shot.refine.tiled.strength, shot.refine.tiled.scale) == (True, 0.3, 3)
    assert isinstance(shot.refine.tiled.scale, int)
    # the shot file keeps them, and loading it fills the form's toggles
    values = ui.form_values(shotlib.dumps(shot))
    assert {k: values[k] for k in values if k.startswith("refine_")} == {
        "refine_face": True, "refine_face_strength": 0.6, "refine_face_detector": "boxes", "refine_tiled": True,
        "refine_tiled_strength": 0.3, "refine_tiled_scale": 3}
    # a toggle left None keeps the shot file's setting; False turns it off
    assert ui.shot_from_form(shotlib.dumps(shot), refine_face=None).refine.face.enabled
    assert not ui.shot_from_form(shotlib.dumps(shot), refine_face=False).refine.face.enabled
    with pytest.raises(TypeError, match="not form fields: refine_scale"):  # a wiring mistake is loud
        ui.shot_from_form(EXAMPLE, refine_scale=2)


def test_progress_labels_denoising_then_refinement():
    seen = []
    shot = ev.resolved(STAR, **_kw(steps=4, refine_face=True, refine_face_detector="boxes", refine_tiled=True))
    staged = ev.StageProgress(lambda i, n, stage: seen.append((i, n, stage)), shot)
    for i, n in [(1, 4), (2, 4), (3, 4), (4, 4), (1, 4), (2, 4), (3, 9), (9, 9)]:  # refine's own count after
        staged(i, n)
    assert [x[2] for x in seen] == ["denoising"] * 4 + ["refining: Face VCD then Tiled VCD"] * 4
    assert seen[4][:2] == (1, 4)  # the refinement's own count, even when its total equals the steps
    plain = ev.StageProgress(lambda i, n, stage: seen.append(stage), ev.resolved(STAR, **_kw(steps=2)))
    plain(1, 2)
    plain(2, 2)
    assert seen[-2:] == ["denoising", "denoising"]


def test_render_writes_every_download_and_a_shot_file_that_reproduces_it(manager):
    from studio import engine

    steps = []
    r = ui.render_event(**_toy(), manager=manager, progress=lambda i, n, stage: steps.append((i, n, stage)))
    assert steps == [(i, 4, "denoising") for i in range(1, 5)]
    assert export.probe_video(r.video)["frames"] == 8 and r.video.startswith(str(ui.output_dir()))
    assert all(p.startswith(str(ui.output_dir())) for p in r.downloads)
    assert [p.rsplit(".", 1)[1] for p in r.downloads] == ["mp4", "gif", "zip", "yaml", "json"]
    with zipfile.ZipFile(r.frames_zip) as z:
        names = sorted(z.namelist())
        assert len(names) == 8 and names[0].endswith(".png")
        from PIL import Image

        with z.open(names[0]) as f:
            first = np.asarray(Image.open(f).convert("RGB"))
    again = shotlib.load(r.shot_file)
    assert shotlib.loads(r.shot_yaml) == again and again.camera.cx == 0.25 and again.steps == 4
    # the saved shot file renders headless to exactly the frames the page rendered (frame 0 of the zip)
    replay = engine.render(again, manager)
    assert np.array_equal(replay.frames[0], first)
    # a second render of an unchanged subject and model starts denoising in well under a second of set-up
    assert replay.timings["load"] + replay.timings["prepare"] < 1.0
    assert "toyworld" in r.status and "set-up" in r.status


def test_cancelled_render_is_a_message_and_writes_nothing(manager):
    import threading

    cancel = threading.Event()
    before = set(ui.output_dir().glob("*.mp4"))
    with pytest.raises(ui.Cancelled, match="cancelled"):
        ui.render_event(**_toy(steps=6), manager=manager, cancel=cancel, progress=lambda i, n, s: cancel.set())
    assert set(ui.output_dir().glob("*.mp4")) == before


def test_cancel_stops_only_the_running_job_of_its_session_and_kind():
    from studio.ui.app import Jobs

    jobs = Jobs()
    assert not jobs.cancel("a", "render")  # nothing running
    with jobs.running("a", "render") as render, jobs.running("a", "train") as train, \
            jobs.running("b", "render") as other:
        assert jobs.find(render.key) is render
        assert jobs.cancel("a", "render") and render.cancel.is_set()
        assert not train.cancel.is_set() and not other.cancel.is_set()  # training and other sessions go on
    assert not jobs.cancel("a", "render") and not jobs.cancel("a", "train")  # finished: nothing to cancel
    with pytest.raises(RuntimeError):
        with jobs.running("a", "render"):
            raise RuntimeError("the render failed")
    assert not jobs.cancel("a", "render")  # cleared after a failure too
    with jobs.running("a", "render") as again:
        assert not again.cancel.is_set()  # the next job starts uncancelled
    lost = jobs.find("render-elsewhere")  # a worker process without the job: no progress, no cancel, default manager
    assert lost.progress is None and lost.manager is None and not lost.cancel.is_set()


def test_cancel_buttons_say_what_they_did(manager):
    from studio.ui.app import Page

    page = Page(manager)
    request = types.SimpleNamespace(session_hash="cancel-buttons")
    cancel_render, cancel_train = page.canceller("render"), page.canceller("train")
    assert cancel_render(request) == "nothing to cancel"
    with page.jobs.running("cancel-buttons", "render"):
        assert cancel_train(request) == "nothing to cancel"  # a training's Cancel leaves the render alone
        assert cancel_render(request) == "cancelling…"
    assert cancel_render(request) == "nothing to cancel"  # after the render finished


def test_history_rows_newest_first_and_entries_load_back():
    history = [{"time": "10:00:00", "prompt": "a", "model": "toyworld", "seed": 1, "frames": 8, "size": "32×32",
                "gamma": 0.0, "pan": "+0.00, +0.00", "seconds": 1.0, "shot_yaml": STAR},
               {"time": "10:01:00", "prompt": "b", "model": "toyworld", "seed": 2, "frames": 8, "size": "32×32",
                "gamma": 0.5, "pan": "+0.25, +0.00", "seconds": 1.1, "shot_yaml": EXAMPLE}]
    rows = ui.history_rows(history)
    assert [r[0] for r in rows] == [2, 1] and rows[0][2] == "b" and len(rows[0]) == len(ev.HISTORY_COLUMNS)
    assert ui.history_entry(history, 1.0)["prompt"] == "a"
    with pytest.raises(ui.UserError, match="history"):
        ui.history_entry(history, 3)
    with pytest.raises(ui.UserError, match="no renders"):
        ui.history_entry([], 1)


def test_shot_files_load_and_save_the_file_the_cli_renders(tmp_path):
    good = tmp_path / "s.yaml"
    good.write_text(EXAMPLE)
    assert "red circle" in ui.load_shot_event(str(good))
    bad = tmp_path / "b.yaml"
    bad.write_text("seed: many\n")
    with pytest.raises(ui.UserError, match="seed"):
        ui.load_shot_event(str(bad))
    txt = tmp_path / "s.txt"
    txt.write_text(EXAMPLE)
    with pytest.raises(ui.UserError, match="shot file"):
        ui.load_shot_event(str(txt))
    saved = ui.save_shot_event(EXAMPLE, "my shot/../x", **{k: v for k, v in _form().items() if k != "shot_yaml"})
    assert saved.startswith(str(ui.output_dir())) and saved.endswith("my-shot----x.yaml")
    assert shotlib.load(saved) == ui.shot_from_form(**_form())
    assert shotlib.load(saved).noise_prior.gamma == 0.2  # the form's values are in the file


def test_gamma_preview_shows_covariance_and_noise_strip():
    heat0, strip0 = ui.gamma_preview_event(0.0)
    heat9, strip9 = ui.gamma_preview_event(0.9)
    assert heat0.dtype == np.uint8 and heat0.ndim == 3 and strip0.dtype == np.uint8
    assert strip0.shape == (64, 8 * 64 + 7 * 4, 3)  # eight 32 px noise frames, 2 px gaps, shown twice as large
    assert heat9.mean() > heat0.mean()  # more off-diagonal covariance is brighter
    for bad in (1.0, -0.1, None):  # the shot's own check of noise_prior.gamma
        with pytest.raises(ui.UserError, match="noise_prior.gamma"):
            ui.gamma_preview_event(bad)


def test_previews_show_the_track_and_the_pan():
    def previews(cx):
        kw = dict(model="tiny", prompt="a red circle on grass", frames=8, cx=cx, cy=0.0)
        return tj.trajectory_preview_event(EXAMPLE, **kw)[1], ui.camera_preview_event(EXAMPLE, **kw)[1]

    track, pan = previews(0.5)
    assert track.dtype == np.uint8 and track.shape[1] > 8 * 90  # eight frames side by side
    # the red box of subject 0 moves right across the track strip: its leftmost red column per frame grows
    w = (track.shape[1] + 2) // 8 - 2
    red = (track[..., 0] > 200) & (track[..., 1] < 120)
    lefts = [np.nonzero(red[:, f * (w + 2):f * (w + 2) + w].any(0))[0].min() for f in (0, 7)]
    assert lefts[1] > lefts[0] + w // 3
    # with cx > 0 the scene's landmark moves left by half the width over the clip; cx = 0 keeps it still
    _, still = previews(0.0)

    def landmark_x(img, f):
        ys, xs = np.nonzero((img[:, f * (w + 2):f * (w + 2) + w] == 40).all(-1))
        return xs.mean()

    assert landmark_x(pan, 7) == pytest.approx(landmark_x(pan, 0) - w / 2, abs=2)
    assert landmark_x(still, 7) == pytest.approx(landmark_x(still, 0), abs=0.5)
    with pytest.raises(ui.UserError, match="camera.cx"):
        previews(1.5)
    gif, strip_ = ui.camera_preview_event(EXAMPLE, model="tiny", prompt="a red circle on grass", frames=8, cx=0.5)
    assert export.read_video(gif).shape[0] == 8 and gif.startswith(str(ui.output_dir()))


# --- trajectory ---------------------------------------------------------------------------------------------------


def _kw(**kw):
    return {k: v for k, v in _toy(**kw).items() if k != "shot_yaml"}


def test_canvas_boxes_become_normalized_keyframes_and_showing_them_changes_nothing():
    canvas = tj.canvas_event(STAR, 0, 1, **_kw())
    value = canvas["value"]
    assert canvas["label_list"] == ["1: yellow star"] and canvas["label_colors"] == [(255, 80, 80)]
    assert value["image"].shape == (384, 384, 3)
    assert value["boxes"] == [{"xmin": 19, "ymin": 115, "xmax": 154, "ymax": 269, "label": "1: yellow star",
                               "color": (255, 80, 80)}]
    # the canvas as shown, sent back (as the component's change event does): the file is unchanged
    assert tj.boxes_event(STAR, value, 0, 1, **_kw()) == shotlib.dumps(shotlib.loads(STAR))
    # a box drawn on frame 3 (corners in any order, no label) is subject 1's keyframe 3, in 0..1
    drawn = {"image": value["image"], "boxes": [{"xmin": 288, "ymin": 96, "xmax": 192, "ymax": 192}]}
    out = shotlib.loads(tj.boxes_event(STAR, drawn, 3, 1, **_kw()))
    assert out.subjects[0].boxes == {0: [0.05, 0.3, 0.4, 0.7], 3: [0.5, 0.25, 0.75, 0.5], 7: [0.6, 0.3, 0.95, 0.7]}
    # a box being drawn (no area yet) holds; an empty canvas removes the frame's keyframe
    half = {"image": value["image"], "boxes": [{"xmin": 50, "ymin": 50, "xmax": 50, "ymax": 50}]}
    assert 0 in shotlib.loads(tj.boxes_event(STAR, half, 0, 1, **_kw())).subjects[0].boxes
    empty = {"image": value["image"], "boxes": []}
    assert sorted(shotlib.loads(tj.boxes_event(STAR, empty, 0, 1, **_kw())).subjects[0].boxes) == [7]
    with pytest.raises(ui.UserError, match="keyframe"):
        tj.boxes_event(STAR, drawn, 8, 1, **_kw())


def test_labels_route_boxes_to_their_subjects_and_a_shot_without_subjects_says_so():
    two = sj.set_subject_event(STAR, 2, "sky", None, None, **_kw())
    canvas = tj.canvas_event(two, 5, 2, **_kw())  # subject 2 picked: its label first, so a new box takes it
    assert canvas["label_list"] == ["2: sky", "1: yellow star"]
    assert canvas["label_colors"] == [(80, 200, 255), (255, 80, 80)]
    assert tj.canvas_event(two, 99, 1, **_kw())["value"]["boxes"] == tj.canvas_value(ev.resolved(two, **_kw()), 7)[
        "boxes"]  # a keyframe past the end (slider not yet shortened) shows the last frame
    value = canvas["value"]
    assert value["boxes"] == []
    value["boxes"] = [{"xmin": 0, "ymin": 0, "xmax": 384, "ymax": 192, "label": "2: sky"},
                      {"xmin": 10, "ymin": 10, "xmax": 100, "ymax": 100, "label": "1: yellow star"}]
    out = shotlib.loads(tj.boxes_event(two, value, 5, 1, **_kw()))
    assert out.subjects[1].boxes == {5: [0.0, 0.0, 1.0, 0.5]} and 5 in out.subjects[0].boxes
    bare = "model: toyworld\nprompt: a yellow star moving right on sky\n"
    with pytest.raises(ui.UserError, match="add one in the Subjects tab"):
        tj.boxes_event(bare, {"image": value["image"], "boxes": value["boxes"][:1]}, 0, 1, **_kw(shot_yaml=bare))


def test_path_presets_clear_and_duplicate_keyframes():
    right = tj.path_preset("left to right", 8)
    assert sorted(right) == [0, 7] and right[7][0] > right[0][0] + 0.4
    near = tj.path_preset("approach", 8)
    assert (near[7][2] - near[7][0]) > 3 * (near[0][2] - near[0][0])  # it grows as it comes closer
    loop = tj.path_preset("circle", 16)
    assert len(loop) >= 8 and loop[0] == loop[15]
    assert all(0.0 <= v <= 1.0 for b in loop.values() for v in b)
    assert tj.path_preset("left to right", 1) == {0: [0.325, 0.325, 0.675, 0.675]}
    with pytest.raises(ui.UserError, match="path preset"):
        tj.path_preset("zigzag", 8)
    y = tj.path_preset_event(STAR, "circle", 1, **_kw())
    shot = ev.shot_from_form(y, **_kw())  # still a valid shot on the form
    assert len(shot.subjects[0].boxes) == 8
    y = tj.clear_keyframe_event(STAR, 0, 1, **_kw())
    assert sorted(shotlib.loads(y).subjects[0].boxes) == [7]
    y = tj.duplicate_keyframe_event(STAR, 7, 2, 1, **_kw())
    assert shotlib.loads(y).subjects[0].boxes[2] == [0.6, 0.3, 0.95, 0.7]
    y = tj.duplicate_keyframe_event(STAR, 3, 5, 1, **_kw())  # frame 3 is interpolated: its box is copied
    assert shotlib.loads(y).subjects[0].boxes[5] == pytest.approx([0.2857, 0.3, 0.6357, 0.7], abs=1e-4)
    y = tj.clear_keyframe_event(STAR, 0, 1, every_frame=True, **_kw())
    assert shotlib.loads(y).subjects[0].boxes == {}
    assert "keyframes 0, 7" in tj.keyframes_text(STAR, **_kw())


def test_trajectory_preview_is_an_animation_over_the_background(tmp_path):
    gif, strip_ = tj.trajectory_preview_event(STAR, **_kw())
    frames = export.read_video(gif)
    assert frames.shape[0] == 8 and strip_.shape[1] > 8 * 90
    with_bg = sj.set_background_event(STAR, _image(tmp_path))
    assert tj.backdrop(ev.resolved(with_bg, **_kw()))[0, 0].tolist() == [40, 160, 60]
    assert tj.backdrop(ev.resolved(STAR, **_kw()))[0, 0].tolist() == [232, 232, 232]  # the grid


# --- errors: a message naming the field, never a stack trace ----------------------------------------------------

BROKEN = "prompt: [oops"  # not YAML


@pytest.mark.parametrize("event", [
    lambda: tj.boxes_event(BROKEN, {"boxes": []}, 0, 1),
    lambda: tj.canvas_event(BROKEN, 0, 1),
    lambda: tj.clear_keyframe_event(BROKEN, 0, 1),
    lambda: tj.duplicate_keyframe_event(BROKEN, 0, 1, 1),
    lambda: tj.path_preset_event(BROKEN, "circle", 1),
    lambda: tj.keyframes_text(BROKEN),
    lambda: tj.trajectory_preview_event(BROKEN),
    lambda: sj.slot_values(BROKEN, 1),
    lambda: sj.subject_rows(BROKEN),
    lambda: sj.set_subject_event(BROKEN, 1, "star", None, None),
    lambda: sj.remove_subject_event(BROKEN, 1),
    lambda: sj.set_background_event(BROKEN, None),
    lambda: sj.background_preview_event(BROKEN),
    lambda: ui.camera_preview_event(BROKEN),
    lambda: ui.form_values(BROKEN),
    lambda: ui.save_shot_event(BROKEN),
    lambda: ev.apply_form_event(BROKEN),
], ids=lambda f: f.__code__.co_names[-1])
def test_every_event_names_the_shot_file_when_it_is_broken(event):
    with pytest.raises(ui.UserError, match="shot file"):
        event()


def test_a_control_value_error_during_the_render_is_a_user_error(monkeypatch):
    from studio import engine

    def refuse(*args, **kwargs):
        raise ValueError("the phrase 'yellow star' is not among the prompt's first 77 tokens")

    monkeypatch.setattr(engine, "render_to_files", refuse)
    with pytest.raises(ui.UserError, match="first 77 tokens"):
        ui.render_event(**_toy())


def test_user_errors_keeps_the_signature_and_wraps_generators():
    def phrase_event(shot_yaml: str, phrase: str = "x"):
        """Doc."""
        raise shotlib.ShotError("subjects[0].phrase", phrase, "not in the prompt")

    def frames_event(n):
        yield 1
        raise ValueError(f"frames: too many (got {n})")

    wrapped = ui.user_errors(phrase_event)
    assert wrapped.__name__ == "phrase_event" and wrapped.__doc__ == "Doc."
    assert list(inspect.signature(wrapped).parameters) == ["shot_yaml", "phrase"]
    with pytest.raises(ui.UserError, match=r"subjects\[0\]\.phrase"):
        wrapped("")
    gen = ui.user_errors(frames_event)(9)
    assert next(gen) == 1
    with pytest.raises(ui.UserError, match="frames: too many"):
        next(gen)
    with pytest.raises(KeyError):  # a bug is not an input error: it passes through
        ui.user_errors(lambda: {}["x"])()


def test_guarded_shows_one_line_and_logs_unexpected_errors(caplog):
    import gradio as gr

    from studio.ui.app import guarded

    def boxes_event(shot_yaml):
        raise shotlib.ShotError("shot file", shot_yaml, "not valid YAML")

    def preview_event():
        raise RuntimeError("CUDA out of memory\n  at line 3 of something deep")

    def training():
        yield "step 1"
        raise ZeroDivisionError("division by zero")

    with pytest.raises(gr.Error) as e:
        guarded(boxes_event)(BROKEN)
    assert e.value.message == "shot file: not valid YAML (got 'prompt: [oops')"
    with caplog.at_level(logging.ERROR, logger="studio.ui.app"), pytest.raises(gr.Error) as e:
        guarded(preview_event)()
    assert e.value.message == "preview failed: RuntimeError: CUDA out of memory"  # one line; the trace is logged
    assert caplog.records[-1].exc_info and "preview failed" in caplog.records[-1].getMessage()
    run = guarded(training, "training")
    assert inspect.isgeneratorfunction(run)  # Gradio streams it
    gen = run()
    assert next(gen) == "step 1"
    with pytest.raises(gr.Error, match="training failed: ZeroDivisionError: division by zero"):
        next(gen)


# --- subjects and background ---------------------------------------------------------------------------------------


def test_subjects_are_bound_to_phrases_with_references(tmp_path):
    ref = _image(tmp_path)
    y = sj.set_subject_event(STAR, 2, "sky", sj.NO_SUBJECT, ref, 0.8, **_kw())
    shot = shotlib.loads(y)
    assert shot.subjects[1].phrase == "sky" and shot.subjects[1].reference_strength == 0.8
    assert shot.subjects[1].reference.startswith(str(ui.output_dir()))  # a copy the app serves and keeps
    assert sj.slot_values(y, 2) == {"phrase": "sky", "library_subject": sj.NO_SUBJECT,
                                    "reference": shot.subjects[1].reference, "strength": 0.8}
    assert sj.slot_values(y, 3) == {"phrase": "", "library_subject": sj.NO_SUBJECT, "reference": None,
                                    "strength": 1.0}
    assert sj.set_subject_event(y, 2, **sj.slot_values(y, 2), **_kw()) == y  # the names set_subject_event takes
    assert sj.subject_rows(y)[1][:4] == [2, "sky", "", shot.subjects[1].reference.rsplit("/", 1)[1]]
    # editing subject 1 keeps its boxes
    y2 = sj.set_subject_event(y, 1, "star", None, None, **_kw())
    assert shotlib.loads(y2).subjects[0].boxes == shotlib.loads(STAR).subjects[0].boxes
    assert len(shotlib.loads(sj.remove_subject_event(y, 2)).subjects) == 1
    with pytest.raises(ui.UserError, match=r"subjects\[1\]\.phrase"):
        sj.set_subject_event(STAR, 2, "red square", None, None, **_kw())
    with pytest.raises(ui.UserError, match=r"subjects\[1\]\.subject"):
        sj.set_subject_event(STAR, 2, "sky", "nobody", None, **_kw())
    with pytest.raises(ui.UserError, match="subjects"):
        sj.set_subject_event(STAR, 4, "sky", None, None, **_kw())
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    with pytest.raises(ui.UserError, match=r"subjects\[1\]\.reference"):
        sj.set_subject_event(STAR, 2, "sky", None, str(notes), **_kw())
    # the render takes the reference
    assert ev.shot_from_form(y, **_kw()).subjects[1].reference == shot.subjects[1].reference


def test_background_reference_and_its_preview(tmp_path):
    y = sj.set_background_event(STAR, _image(tmp_path), 0.5)
    shot = shotlib.loads(y)
    assert shot.background.reference.startswith(str(ui.output_dir())) and shot.background.strength == 0.5
    preview = sj.background_preview_event(y, **_kw())
    assert preview.dtype == np.uint8 and preview.shape[2] == 3
    assert sj.background_preview_event(STAR, **_kw()) is None
    assert shotlib.loads(sj.set_background_event(y, None)).background.reference is None
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG" + b"0" * 64)
    with pytest.raises(ui.UserError, match="background.reference"):
        sj.set_background_event(STAR, str(big))


def test_photos_get_masks_and_a_trained_subject_enters_the_library(tmp_path, manager, page):

    photos = [_image(tmp_path, f"p{i}.png", (64, 64), (220, 30 + 40 * i, 30)) for i in range(2)]
    photo_set, shown = sj.photos_event(photos, "sks circle")
    assert len(photo_set) == 2 and len(shown) == 2 and shown[0][1].startswith("1: mask by")
    mask = ev.read_image(photo_set[0]["mask"])[..., 0] > 127
    assert mask[32, 32] and not mask[2, 2]  # the centre square is the subject
    wrong = _image(tmp_path, "m.png", (20, 20))
    with pytest.raises(ui.UserError, match="mask"):
        sj.replace_mask_event(photo_set, 1, wrong)
    own = _image(tmp_path, "own.png", (64, 64), (255, 255, 255))
    replaced, _ = sj.replace_mask_event(photo_set, 2, own)
    assert replaced[1]["backend"] == "your mask" and replaced[0] == photo_set[0]
    with pytest.raises(ui.UserError, match="photos"):
        sj.photos_event([], "sks circle")
    with pytest.raises(ui.UserError, match="phrase"):
        sj.train_subject(photo_set, "dot", "circle", "tokens", 2, "tiny")

    # the Train button's event: named settings through the GPU-side function, the loss as it goes, the library
    seen = []
    settings = dict(photo_set=replaced, name="dot", phrase="sks circle", method="tokens", steps=2, model="tiny")
    updates = list(page.train_progress(settings, "s1", lambda value, desc=None: seen.append((value, desc))))
    assert [value for value, _ in seen] == [(1, 2), (2, 2)] and all("loss" in desc for _, desc in seen)
    losses = updates[-1][page.loss_plot]
    assert list(losses["step"]) == [1, 2] and np.isfinite(losses["loss"]).all()
    assert "**dot** trained (tokens)" in updates[-1][page.train_status]
    assert all(page.library not in u for u in updates[:-1])  # the library is read once, at the end
    # the library is the session's (other tests' subjects in it too): dot's row, by name
    assert [r[:3] for r in updates[-1][page.library] if r[0] == "dot"] == [["dot", "tiny", "tokens"]]
    assert not page.jobs.cancel("s1", "train")  # finished: nothing left to cancel
    y = sj.set_subject_event(EXAMPLE, 1, "red circle", "dot", None,
                             **{**_kw(), "model": "tiny", "prompt": "a red circle on grass"})
    assert shotlib.loads(y).subjects[0].subject == "dot"
    sj.delete_subject_event("dot", manager=manager)
    assert "dot" not in [row[0] for row in sj.library_rows()]  # other tests may have left subjects of their own
    with pytest.raises(ui.UserError, match="library subject"):
        sj.delete_subject_event(sj.NO_SUBJECT)
    with pytest.raises(ui.UserError, match="phrase"):  # a failure in the worker thread reaches the event
        list(page.train_progress({**settings, "phrase": "circle"}, "s1", lambda value, desc=None: None))




# --- Spaces --------------------------------------------------------------------------------------------------------


def test_zero_gpu_decorator_is_used_when_spaces_imports_and_a_no_op_otherwise(monkeypatch):
    from studio.ui import gpu

    def work():
        return 1

    monkeypatch.setattr(gpu, "zero_gpu_available", lambda: False)
    assert gpu.gpu(60)(work) is work
    calls = []
    fake = types.ModuleType("spaces")
    fake.GPU = lambda duration: (lambda fn: calls.append(duration) or fn)
    monkeypatch.setitem(sys.modules, "spaces", fake)
    monkeypatch.setattr(gpu, "zero_gpu_available", lambda: True)
    assert gpu.gpu(60)(work) is work and calls == [60]


def test_space_requirements_are_the_package_dependencies():
    tomllib = pytest.importorskip("tomllib")
    deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
    lines = [x.strip() for x in open("requirements.txt") if x.strip() and not x.startswith("#")]
    assert lines == deps


def test_readme_has_the_space_header():
    text = open("README.md").read()
    head = text.split("---\n")[1]
    assert text.startswith("---\n")
    for line in ("sdk: gradio", "app_file: app.py", "title: Shot Studio"):
        assert line in head


# --- the page ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def page(manager):
    from studio.ui.app import Page

    p = Page(manager)
    p.demo = p.build()
    return p


def test_the_training_panel_starts_from_the_subject_add_defaults(page):
    # the page's method, steps label and method line are tune.DEFAULTS', the table `studio subject add` resolves
    start = sj.training_defaults(page.start["model"])
    assert start["method"] in ("lora", "tokens", "both")
    assert page.method.value == start["method"] and page.method_note.value == start["note"]
    assert str(start["steps"]) in page.train_steps.label and start["note"].startswith("Default for")


def _event(demo, api_name):
    return next(fn for fn in demo.fns.values() if fn.api_name == api_name)


def test_the_render_button_passes_the_form_by_name(page):
    for button, api in (("render_form", "render"), ("save_shot_form", "save_shot")):
        clicked, endpoint = _event(page.demo, button), _event(page.demo, api)
        inputs = dict(zip(clicked.input_parameter_names, clicked.inputs))  # what Gradio passes under each name
        assert set(ui.FORM) <= set(inputs) and tuple(page.form) == ui.FORM
        assert all(inputs[name] is page.form[name] for name in ui.FORM)  # the page sends its form
        assert inputs["shot_yaml"] is page.shot_yaml and clicked.api_visibility == "private"
        # the API endpoint takes the same names from stand-ins whose value is None: "not sent", keep the file's
        sent = dict(zip(endpoint.input_parameter_names, endpoint.inputs))
        assert [n for n in endpoint.input_parameter_names if n in ui.FORM] == list(ui.FORM)  # named, not *v
        assert all(sent[name] is page.api_form[name] and sent[name].value is None for name in ui.FORM)
        assert endpoint.fn.__name__ == clicked.fn.__name__ and endpoint.api_visibility == "public"
        advertised = page.demo.get_api_info()["named_endpoints"][f"/{api}"]["parameters"]
        assert {p["parameter_name"]: (p["parameter_has_default"], p["parameter_default"]) for p in advertised
                if p["parameter_name"] in ui.FORM} == {name: (True, None) for name in ui.FORM}
    # each component shows the shot field of its name: the opening shot's values are where their names say
    start = ui.form_values(page.default_yaml)
    assert {name: page.form[name].value for name in ui.FORM} == start


def test_a_render_redraws_the_canvas_and_refreshes_the_previews_once(page):
    fns = page.demo.fns.values()
    render = _event(page.demo, "render_form")
    assert [fn.name for fn in fns if fn.trigger_after == render._id] == ["canvas_for"]
    # the previews follow the shot file the render writes, through its change event alone
    assert [fn.name for fn in fns if (page.shot_yaml._id, "change") in fn.targets] == ["refresh_views"]
    train = next(fn for fn in fns if fn.name == "train")
    assert render.concurrency_id == train.concurrency_id == _event(page.demo, "render").concurrency_id == "gpu"


def test_loading_a_shot_fills_the_form_and_the_subject_fields_by_name(page):
    refined = STAR.replace("seed: 7", "seed: 11") + "refine:\n  tiled: {enabled: true, scale: 3}\n"
    values = page.to_form(refined)
    assert values[page.seed] == 11 and values[page.refine_tiled] is True and values[page.refine_tiled_scale] == 3
    assert values[page.frames] == 8 and values[page.steps] == 20
    fields = page.slot_view(STAR, 1)
    assert fields[page.phrase] == "yellow star" and fields[page.lib_pick] == sj.NO_SUBJECT
    assert fields[page.ref_strength] == 1.0


# --- the served app ------------------------------------------------------------------------------------------------


def _progress(job) -> list[tuple[int, int, str]]:
    """Every progress update a submitted job streamed: (index, length, desc)."""
    async def collect():
        return [(p.index, p.length, p.desc) async for u in job if getattr(u, "progress_data", None)
                for p in u.progress_data]

    return asyncio.run(collect())


def test_app_serves_and_renders_a_directed_shot_through_gradio_client(manager, free_port, monkeypatch):
    from gradio_client import Client

    from studio.ui import app

    crossed = []

    def through_a_pickle(key, shot_yaml, form, policy):  # what ZeroGPU does to the arguments and the result
        crossed.append(pickle.loads(pickle.dumps((key, shot_yaml, form, policy))))
        return pickle.loads(pickle.dumps(app._render_job(*crossed[-1])))

    monkeypatch.setattr(app, "render_job", through_a_pickle)
    demo = ui.build_app(manager)
    demo.queue(default_concurrency_limit=1)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                allowed_paths=[str(ui.output_dir())])
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        # the shot file carries the yellow star's box track; cx pans the camera; Tiled VCD doubles the size
        form = dict(model="toyworld", prompt="a yellow star moving right on sky", negative_prompt="", seed=1,
                    steps=3, guidance_scale=7.5, frames=8, width=32, height=32, gamma=0.5, cx=0.25, cy=0.0,
                    refine_tiled=True, refine_tiled_scale=2)
        job = client.submit(shot_yaml=STAR, **form, api_name="/render")
        video, downloads, resolved, status, table = job.result()
        path = video["video"] if isinstance(video, dict) else video
        assert export.read_video(path).shape == (8, 64, 64, 3)
        assert "gamma: 0.5" in resolved and "cx: 0.25" in resolved and "0.95" in resolved  # the track is there
        assert shotlib.loads(resolved).refine.tiled.enabled and "refining" in status and "to 64×64" in status
        assert len(downloads) == 5 and table["data"][0][2] == "a yellow star moving right on sky"
        steps = _progress(job)
        assert [s for s in steps if s[2] == "denoising"][-1] == (3, 3, "denoising")
        refining = [s for s in steps if s[2].startswith("refining")]
        assert refining and refining[-1][2] == "refining: Tiled VCD" and refining[-1][0] == refining[-1][1]
        assert steps.index(refining[0]) > max(i for i, s in enumerate(steps) if s[2] == "denoising")
        assert len(crossed) == 1 and crossed[0][2]["refine_tiled"] is True  # only picklable values crossed
        assert crossed[0][3].web  # with the web policy: the GPU side checks the shot as the event did
        with pytest.raises(Exception, match=r"subjects\[0\]\.phrase"):  # a gr.Error naming the field
            client.predict(shot_yaml=STAR, **{**form, "prompt": "a red square on sand"}, api_name="/render")
        with pytest.raises(Exception, match="shot file"):  # the form's fields left out: the file's own
            client.predict(shot_yaml=BROKEN, api_name="/render")
        heat, strip_ = client.predict(gamma=0.9, api_name="/gamma_preview")
        assert heat and strip_
        saved = client.predict(shot_yaml=STAR, name="from-the-api", **form, api_name="/save_shot")
        assert shotlib.load(saved["path"] if isinstance(saved, dict) else saved).refine.tiled.enabled
    finally:
        demo.close()


def test_launch_refuses_big_uploads_and_serves_only_the_output_folder(tmp_path, free_port):
    import httpx

    from studio.ui.app import CACHE_CLEANUP

    port = free_port()
    app, url, _ = ui.launch(port=port, prevent_thread_lock=True, quiet=True)
    try:
        assert app.get_blocks().delete_cache == CACHE_CLEANUP  # Gradio's cache is cleaned
        big = b"\0" * (21 * 2**20)
        r = httpx.post(f"{url}gradio_api/upload", files={"files": ("big.png", big, "image/png")}, timeout=60)
        assert r.status_code == 413, r.text[:200]
        small = httpx.post(f"{url}gradio_api/upload", files={"files": ("ok.png", b"\0" * 1000, "image/png")},
                           timeout=60)
        assert small.status_code == 200
        inside = ui.output_dir() / "probe.txt"
        inside.write_text("served")
        assert httpx.get(f"{url}gradio_api/file={inside}", timeout=30).text == "served"
        outside = tmp_path / "secret.txt"
        outside.write_text("not served")
        assert httpx.get(f"{url}gradio_api/file={outside}", timeout=30).status_code >= 400
    finally:
        app.get_blocks().close()
