"""The studio's event functions as plain Python (values in -> shot -> result), and the app served on a local port
and driven through gradio_client."""

import socket
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
    assert set(values) == set(ui.FORM)
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
])
def test_bad_form_values_are_user_errors_naming_the_field(kw, field):
    with pytest.raises(ui.UserError) as e:
        ui.render_event(**_form(**kw))
    assert field in str(e.value)


def test_render_writes_every_download_and_a_shot_file_that_reproduces_it(manager):
    from studio import engine

    steps = []
    r = ui.render_event(**_toy(), manager=manager, progress=lambda i, n: steps.append((i, n)))
    assert steps[-1] == (4, 4)
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
    assert replay.timings["load"] < 1.0  # an unchanged model: set-up from the pipeline cache, well under a second
    assert "toyworld" in r.status and "set-up" in r.status


def test_cancelled_render_is_a_message_and_writes_nothing(manager):
    import threading

    cancel = threading.Event()
    before = set(ui.output_dir().glob("*.mp4"))
    with pytest.raises(ui.Cancelled, match="cancelled"):
        ui.render_event(**_toy(steps=6), manager=manager, cancel=cancel, progress=lambda i, n: cancel.set())
    assert set(ui.output_dir().glob("*.mp4")) == before


def test_cancel_flags_are_per_session():
    from studio.ui.app import Jobs

    jobs = Jobs()
    assert not jobs.cancel("a")  # nothing running
    first = jobs.start("a")
    other = jobs.start("b")
    assert jobs.cancel("a") and first.is_set() and not other.is_set()
    assert not jobs.start("a").is_set()  # the next job starts uncancelled


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
    assert heat9.mean() > heat0.mean()  # more off-diagonal covariance is brighter
    with pytest.raises(ui.UserError, match="gamma"):
        ui.gamma_preview_event(1.0)


def test_previews_show_the_track_and_the_pan():
    track, pan = ui.preview_event(EXAMPLE, "tiny", "a red circle on grass", 8, 0.5, 0.0)
    assert track.dtype == np.uint8 and track.shape[1] > 8 * 90  # eight frames side by side
    # the red box of subject 0 moves right across the track strip: its leftmost red column per frame grows
    w = (track.shape[1] + 2) // 8 - 2
    red = (track[..., 0] > 200) & (track[..., 1] < 120)
    lefts = [np.nonzero(red[:, f * (w + 2):f * (w + 2) + w].any(0))[0].min() for f in (0, 7)]
    assert lefts[1] > lefts[0] + w // 3
    # with cx > 0 the scene's landmark moves left by half the width over the clip; cx = 0 keeps it still
    _, still = ui.preview_event(EXAMPLE, "tiny", "a red circle on grass", 8, 0.0, 0.0)

    def landmark_x(img, f):
        ys, xs = np.nonzero((img[:, f * (w + 2):f * (w + 2) + w] == 40).all(-1))
        return xs.mean()

    assert landmark_x(pan, 7) == pytest.approx(landmark_x(pan, 0) - w / 2, abs=2)
    assert landmark_x(still, 7) == pytest.approx(landmark_x(still, 0), abs=0.5)
    with pytest.raises(ui.UserError, match="camera.cx"):
        ui.preview_event(EXAMPLE, "tiny", "a red circle on grass", 8, 1.5, 0.0)
    gif, strip_ = ui.camera_preview_event(EXAMPLE, "tiny", "a red circle on grass", 8, 0.5, 0.0)
    assert export.read_video(gif).shape[0] == 8 and gif.startswith(str(ui.output_dir()))


# --- trajectory ---------------------------------------------------------------------------------------------------


def _kw(**kw):
    return {k: v for k, v in _toy(**kw).items() if k != "shot_yaml"}


def test_canvas_boxes_become_normalized_keyframes_and_showing_them_changes_nothing():
    value = tj.canvas_event(STAR, 0, **_kw())
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
    value = tj.canvas_value(ev.resolved(two, **_kw()), 5)
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


# --- subjects and background ---------------------------------------------------------------------------------------


def test_subjects_are_bound_to_phrases_with_references(tmp_path):
    ref = _image(tmp_path)
    y = sj.set_subject_event(STAR, 2, "sky", sj.NO_SUBJECT, ref, 0.8, **_kw())
    shot = shotlib.loads(y)
    assert shot.subjects[1].phrase == "sky" and shot.subjects[1].reference_strength == 0.8
    assert shot.subjects[1].reference.startswith(str(ui.output_dir()))  # a copy the app serves and keeps
    assert sj.slot_values(y, 2) == ("sky", sj.NO_SUBJECT, shot.subjects[1].reference, 0.8)
    assert sj.slot_values(y, 3) == ("", sj.NO_SUBJECT, None, 1.0)
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


def test_photos_get_masks_and_a_trained_subject_enters_the_library(tmp_path, manager):
    from studio.subjects.library import SubjectLibrary

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

    lib = SubjectLibrary(tmp_path / "lib")
    seen = []
    subject, result = sj.train_subject(replaced, "dot", "sks circle", "tokens", 2, "tiny", manager=manager,
                                       library=lib, progress=lambda i, n, loss, left: seen.append((i, n, loss)))
    assert [s[:2] for s in seen] == [(1, 2), (2, 2)] and all(np.isfinite(s[2]) for s in seen)
    assert sj.library_rows(lib)[0][:3] == ["dot", "tiny", "tokens"]
    y = sj.set_subject_event(EXAMPLE, 1, "red circle", "dot", None, library=lib,
                             **{**_kw(), "model": "tiny", "prompt": "a red circle on grass"})
    assert shotlib.loads(y).subjects[0].subject == "dot"
    sj.delete_subject_event("dot", manager=manager, library=lib)
    assert sj.library_rows(lib) == []
    with pytest.raises(ui.UserError, match="library subject"):
        sj.delete_subject_event(sj.NO_SUBJECT, library=lib)


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


# --- the served app ------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_app_serves_and_renders_a_directed_shot_through_gradio_client(manager):
    from gradio_client import Client

    demo = ui.build_app(manager)
    demo.queue(default_concurrency_limit=1)
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                allowed_paths=[str(ui.output_dir())])
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        # inputs: shot file, then the form in ui.FORM order: model, prompt, negative, seed, steps, guidance, frames,
        # width, height, gamma, cx, cy. The shot file carries the yellow star's box track; cx pans the camera.
        video, downloads, resolved, status, table = client.predict(
            STAR, "toyworld", "a yellow star moving right on sky", "", 1, 3, 7.5, 8, 32, 32, 0.5, 0.25, 0.0,
            api_name="/render")
        path = video["video"] if isinstance(video, dict) else video
        info = export.probe_video(path)
        assert (info["frames"], info["width"], info["height"]) == (8, 32, 32)
        assert export.read_video(path).shape == (8, 32, 32, 3)
        assert "gamma: 0.5" in resolved and "cx: 0.25" in resolved and "0.95" in resolved  # the track is there
        assert len(downloads) == 5 and table["data"][0][2] == "a yellow star moving right on sky"
        with pytest.raises(Exception, match=r"subjects\[0\]\.phrase"):  # a gr.Error naming the field
            client.predict(STAR, "toyworld", "a red square on sand", "", 1, 3, 7.5, 8, 32, 32, 0.5, 0.0, 0.0,
                           api_name="/render")
        heat, strip_ = client.predict(0.9, api_name="/gamma_preview")
        assert heat and strip_
    finally:
        demo.close()


def test_launch_refuses_big_uploads_and_serves_only_the_output_folder(tmp_path):
    import httpx

    port = _free_port()
    app, url, _ = ui.launch(port=port, prevent_thread_lock=True, quiet=True)
    try:
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
