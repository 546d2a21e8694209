"""Per-render measures (studio.measures): the pan estimate against the toy world's own panning clips, the blob count,
the warnings, and the sidecar's `measures` on a toy-world render (and "not measured" on a model without a detector)."""

import json

import numpy as np
import pytest

from studio import measures
from studio.toyworld import world


def _clip(background, camera, seed, motion="right", colour="red"):
    rng = np.random.default_rng(seed)
    path = world.make_path(motion, 6.0, rng)  # the subject moves on its own, against or across the pan
    return world.render_clip(background, [world.SubjectSpec(colour, "circle", 6.0, path, None)], camera=camera,
                             seed=seed)


@pytest.mark.parametrize("background", ["grass", "sand"])
@pytest.mark.parametrize("camera", [(2.3, 0.0), (-2.3, 0.0), (0.0, 1.5), (0.0, -3.0), (0.0, 0.0)])
def test_content_motion_finds_the_pan_of_world_clips(background, camera):
    clip = _clip(background, camera, seed=int(10 * abs(sum(camera))) + len(background))
    got = measures.content_motion(clip.frames, measures.subject_pixels(clip.frames), max_shift=6).mean(0)
    # the world's camera (x, y) px/frame > 0 pans right / down: content moves the other way
    assert np.abs(got + np.array(camera)).max() < 0.3, (got, camera)


def test_the_subject_would_fool_it_without_the_mask():
    clip = _clip("grass", (0.0, 0.0), seed=3, motion="right")  # still background, subject moving right 2 px/frame
    masked = measures.content_motion(clip.frames, measures.subject_pixels(clip.frames), max_shift=6).mean(0)
    assert np.abs(masked).max() < 0.2, masked


def test_requested_motion_and_ratio():
    want = measures.requested_motion(0.5, -0.25, 8, 32, 64)  # cx > 0 pans right: content moves left
    assert want.tolist() == pytest.approx([-0.5 * 64 / 7, 0.25 * 32 / 7])
    assert measures.pan_ratio(want, want) == pytest.approx(1.0)
    assert measures.pan_ratio(-want / 2, want) == pytest.approx(-0.5)
    assert measures.pan_ratio(np.array([1.0, 0.0]), np.zeros(2)) is None
    assert not measures.requested_motion(0.5, 0.5, 1, 32, 32).any()


def test_blobs_counts_copies_of_a_subject():
    rng = np.random.default_rng(0)
    one = world.SubjectSpec("red", "circle", 5.0, world.make_path("still", 5.0, rng) * 0 + [8, 8], None)
    two = world.SubjectSpec("red", "square", 5.0, world.make_path("still", 5.0, rng) * 0 + [24, 22], None)
    other = world.SubjectSpec("yellow", "star", 5.0, world.make_path("still", 5.0, rng) * 0 + [24, 8], None)
    frames = world.render_clip("grass", [one, other], seed=1).frames
    assert measures.blobs(frames, "red").tolist() == [1] * world.FRAMES
    frames = world.render_clip("grass", [one, two, other], seed=1).frames
    assert measures.blobs(frames, "red").tolist() == [2] * world.FRAMES
    assert measures.blobs(frames, "purple").tolist() == [0] * world.FRAMES
    specks = frames.copy()  # texture specks of a subject's colour (a yellowish sand grain: up to 7 px) are no copy
    specks[:, 2:4, 28:31] = frames[0, 8, 8]  # 6 px
    specks[:, 28:30, 2:6] = frames[0, 8, 8]  # 8 px
    assert measures.blobs(specks, "red").tolist() == [2] * world.FRAMES
    quarter = frames.copy()  # a quarter of a subject left at the frame's edge still counts
    quarter[:, :, 24:] = frames[:, :, 24:].copy()
    quarter[:, :5, 27:] = frames[:, 8:13, 3:8]
    assert measures.blobs(quarter, "red").tolist() == [3] * world.FRAMES


def test_warnings():
    ok = {"status": "measured", "camera": {"requested": [-2.29, 0.0], "achieved": [-2.0, 0.1], "ratio": 0.87,
                                           "took": True},
          "subjects": [{"phrase": "red circle", "box_hit_rate": 1.0, "took": True, "blobs": [1] * 8}]}
    assert measures.warnings(ok) == []
    bad = json.loads(json.dumps(ok))
    bad["camera"].update(achieved=[0.0, 0.0], ratio=0.0, took=False)
    bad["subjects"][0].update(box_hit_rate=0.25, took=False)
    assert measures.warnings(bad) == ["camera pan did not take: 0.0 of 2.3 px/frame requested",
                                      "subjects[0] (red circle) in its box on only 25% of frames"]
    assert measures.warnings({"status": "not measured", "reason": "x"}) == []


def test_toy_world_models_only():
    from studio.presets import load_model_preset

    assert measures.toy_world_model(load_model_preset("toyworld"))
    assert not measures.toy_world_model(load_model_preset("tiny"))
    assert not measures.toy_world_model(load_model_preset("animatediff-sd15"))


def test_sidecar_measures_on_a_toy_render(manager, tmp_path):
    from studio import engine, shot as shotlib

    shot = shotlib.from_container({
        "model": "toyworld", "prompt": "a red circle on grass", "seed": 1, "camera": {"cx": 0.5},
        "subjects": [{"phrase": "red circle", "boxes": {0: [0.3, 0.3, 0.7, 0.7], 7: [0.3, 0.3, 0.7, 0.7]}}]})
    files = engine.render_to_files(shot, tmp_path / "pan.mp4", manager=manager)
    m = json.loads(files.sidecar.read_text())["measures"]
    assert m["status"] == "measured"
    cam = m["camera"]
    assert cam["requested"] == pytest.approx([-0.5 * 32 / 7, 0.0], abs=1e-3)
    assert len(cam["achieved"]) == 2 and cam["ratio"] == pytest.approx(
        measures.pan_ratio(np.array(cam["achieved"]), np.array(cam["requested"])), abs=2e-3)
    assert cam["took"] == (cam["ratio"] >= measures.PAN_TOOK)
    (s,) = m["subjects"]
    assert s["phrase"] == "red circle" and 0.0 <= s["box_hit_rate"] <= 1.0 and len(s["blobs"]) == 8
    # the measures are the frames' own: recomputed from the render they agree
    r = files.result
    assert r.measures["camera"]["achieved"] == cam["achieved"]
    again = measures.content_motion(r.frames, measures.subject_pixels(r.frames), max_shift=6).mean(0)
    assert again.round(3).tolist() == cam["achieved"]
    assert r.timings["measure"] < 0.2 * r.timings["denoise"]


def test_not_measured_without_a_detector(manager, tiny_shot):
    from studio import engine

    tiny_shot.camera.cx = 0.5
    r = engine.render(tiny_shot, manager)
    assert r.measures["status"] == "not measured" and "tiny" in r.measures["reason"]
    assert r.sidecar()["measures"] == r.measures
