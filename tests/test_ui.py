"""The minimal studio page: its event functions as plain Python, and the app served and driven by gradio_client."""

import socket

import numpy as np
import pytest

from studio import export, shot as shotlib, ui

EXAMPLE = open("presets/shots/example.yaml").read()


def _form(**kw):
    values = dict(shot_yaml=EXAMPLE, model="tiny", prompt="a red circle on grass", negative_prompt="", seed=3,
                  steps=3.0, guidance_scale=7.5, frames=8.0, gamma=0.2, cx=0.0, cy=0.0)
    values.update(kw)
    return values


def test_form_values_override_the_shot_file_and_keep_its_subjects():
    shot = ui.shot_from_form(**_form(prompt="a red circle on sand", seed=5.0))
    assert (shot.prompt, shot.seed, shot.steps, shot.frames, shot.noise_prior.gamma) == (
        "a red circle on sand", 5, 3, 8, 0.2)
    assert shot.subjects[0].phrase == "red circle" and shot.subjects[0].boxes[7] == [0.65, 0.3, 0.95, 0.7]


@pytest.mark.parametrize("kw, field", [
    ({"gamma": 1.0}, "noise_prior.gamma"),
    ({"frames": 99}, "frames"),
    ({"prompt": "a yellow star on sand"}, "subjects[0].phrase"),
    ({"shot_yaml": "prompt: [oops"}, "shot file"),
    ({"shot_yaml": "colour: red"}, "colour"),
    ({"model": "no-such-model"}, "model"),
])
def test_bad_form_values_are_user_errors_naming_the_field(kw, field):
    with pytest.raises(ui.UserError) as e:
        ui.render_event(**_form(**kw))
    assert field in str(e.value)


def test_render_event_writes_video_sidecar_and_a_shot_file_that_reproduces_it(manager):
    video, sidecar, shot_file, resolved, status = ui.render_event(**_form(), manager=manager)
    assert export.probe_video(video)["frames"] == 8
    assert video.startswith(str(ui.output_dir()))
    again = shotlib.load(shot_file)
    assert shotlib.loads(resolved) == again and again.seed == 3 and again.noise_prior.gamma == 0.2
    from studio import engine

    # the saved shot file renders headless to exactly the frames the form's shot renders to
    assert np.array_equal(engine.render(again, manager).frames,
                          engine.render(ui.shot_from_form(**_form()), manager).frames)
    assert "tiny" in status


def test_gamma_preview_shows_covariance_and_noise_strip():
    heat0, strip0 = ui.gamma_preview_event(0.0)
    heat9, strip9 = ui.gamma_preview_event(0.9)
    assert heat0.dtype == np.uint8 and heat0.ndim == 3 and strip0.dtype == np.uint8
    assert heat9.mean() > heat0.mean()  # more off-diagonal covariance is brighter
    with pytest.raises(ui.UserError, match="gamma"):
        ui.gamma_preview_event(1.0)


def test_load_shot_event_validates(tmp_path):
    good = tmp_path / "s.yaml"
    good.write_text(EXAMPLE)
    assert "red circle" in ui.load_shot_event(str(good))
    bad = tmp_path / "b.yaml"
    bad.write_text("seed: many\n")
    with pytest.raises(ui.UserError, match="seed"):
        ui.load_shot_event(str(bad))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_app_serves_and_renders_through_gradio_client(manager):
    from gradio_client import Client

    demo = ui.build_app(manager)
    demo.queue(default_concurrency_limit=1)
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                allowed_paths=[str(ui.output_dir())])
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        video, sidecar, shot_file, resolved, status = client.predict(
            EXAMPLE, "tiny", "a red circle on grass", "", 1, 2, 7.5, 8, 0.5, 0.25, 0.0, api_name="/render")
        path = video["video"] if isinstance(video, dict) else video
        info = export.probe_video(path)
        assert (info["frames"], info["width"], info["height"]) == (8, 64, 64)
        assert "gamma: 0.5" in resolved and "cx: 0.25" in resolved
        with pytest.raises(Exception, match=r"subjects\[0\]\.phrase"):  # a gr.Error naming the field
            client.predict(EXAMPLE, "tiny", "a star on sand", "", 1, 2, 7.5, 8, 0.5, 0.0, 0.0, api_name="/render")
    finally:
        demo.close()


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
