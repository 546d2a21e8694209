"""Face VCD / Tiled VCD: the pure parts (tiles, blending, feathered paste, tracks) on constructed inputs, the shot
fields, and the engine's refinement step on the tiny random model (frame count, size, identity when off)."""

import threading

import numpy as np
import pytest

from studio import engine, refine, shot as shotlib


def _frames(F=4, H=32, W=48, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (F, H, W, 3), dtype=np.uint8)  # (F, H, W, 3)


# --- tiles and blending ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("H,W,tile,overlap", [(64, 64, 32, 8), (96, 64, 32, 16), (40, 72, 32, 8), (32, 32, 32, 8),
                                             (64, 64, 32, 0), (100, 60, 24, 12)])
def test_tile_weights_cover_and_sum_to_one(H, W, tile, overlap):
    acc = np.zeros((H, W))
    for top, left, w in refine.tile_weights(H, W, tile, overlap):
        assert w.shape == (min(tile, H), min(tile, W))
        assert top + w.shape[0] <= H and left + w.shape[1] <= W
        acc[top:top + w.shape[0], left:left + w.shape[1]] += w
    np.testing.assert_allclose(acc, 1.0, atol=1e-12)


def test_tile_starts_overlap_and_flush_end():
    s = refine.tile_starts(64, 32, 8)
    assert s == [0, 16, 32]  # the fewest tiles (3) with ≥ 8 px shared, spread evenly: every overlap 16 px
    s = refine.tile_starts(1024, 512, 32)
    assert s == [0, 256, 512]  # ×2 of a 512 render: 3 tiles a side, not [0, 480, 512]
    for length, tile, overlap in ((96, 32, 8), (100, 24, 12), (1000, 512, 32), (33, 32, 8)):
        s = refine.tile_starts(length, tile, overlap)
        assert s[0] == 0 and s[-1] == length - tile
        assert all(tile - (b - a) >= overlap for a, b in zip(s, s[1:]))  # neighbours share at least `overlap`
        fewer = len(s) - 1  # one tile less cannot cover the length with that overlap
        assert fewer * tile - (fewer - 1) * overlap < length
    assert refine.tile_starts(20, 32, 8) == [0]


def test_default_overlap_is_the_workflows_padding():
    assert refine.default_overlap(512) == 32  # METHODS.md §2.3: 512-px tiles, padding 32
    assert refine.default_overlap(1024) == 64 and refine.default_overlap(256) == 16
    assert refine.default_overlap(32) == 8  # never under the workflow's 8-px mask blur
    assert refine.default_overlap(8) == 4  # at most half a tile


def _fake_v2v(offset):
    """A stand-in re-denoiser: adds `offset` to every pixel and counts its calls."""
    calls = []

    def v2v(frames, strength, p):
        calls.append(frames.shape)
        return np.clip(frames.astype(np.int16) + offset, 0, 255).astype(np.uint8)

    return v2v, calls


def test_tiled_blend_ramps_linearly_between_tiles(monkeypatch):
    """Each tile shifted by its own constant: across every overlap the blend must ramp from one constant to the
    next (steps between neighbouring pixels of at most about diff / overlap; a hard cut would step by the whole
    diff), it must equal the weighted sum of the tiles, and the weights must sum to one (a flat video stays flat
    where one tile covers it)."""
    offsets = [-40, 30, -10, 40, -30, 10, 0, 20, -20, 35, -35, 5]  # tile k: +offsets[k]
    calls = []

    def v2v(frames, strength, p):
        calls.append(frames.shape)
        return (frames.astype(np.int16) + offsets[len(calls) - 1]).astype(np.uint8)

    monkeypatch.setattr(refine, "video_to_video", v2v)
    frames = np.full((3, 32, 48, 3), 100, np.uint8)  # flat: the ×2 upscale is flat 100 too
    cfg = shotlib.TiledRefine(enabled=True, strength=0.2, scale=2, overlap=8)
    out = refine.tiled_vcd(frames, cfg, None, model_size=32).frames.astype(np.float64)
    assert out.shape == (3, 64, 96, 3)
    grid = refine.tile_weights(64, 96, 32, 8)
    assert len(calls) == len(grid) == 12 and all(c == (3, 32, 32, 3) for c in calls)
    total, expected = np.zeros((64, 96)), np.zeros((64, 96))
    for k, (top, left, w) in enumerate(grid):
        total[top:top + 32, left:left + 32] += w
        expected[top:top + 32, left:left + 32] += w * (100 + offsets[k])
    np.testing.assert_allclose(total, 1.0, atol=1e-12)
    assert np.abs(out - expected[None, :, :, None]).max() <= 0.5 + 1e-9  # the blend, rounded
    np.testing.assert_array_equal(out[:, :8, :8], 100 + offsets[0])  # only tile 0 covers this corner
    diff = max(offsets) - min(offsets)
    for axis, length in ((1, 64), (2, 96)):
        starts = refine.tile_starts(length, 32, 8)
        overlap = min(32 - (b - a) for a, b in zip(starts, starts[1:]))
        step = np.abs(np.diff(out, axis=axis)).max()
        assert 0 < step <= diff / overlap + 1, (axis, step, diff / overlap)


def test_tiled_strength_zero_is_plain_upscale_and_scale_one_is_identity(monkeypatch):
    monkeypatch.setattr(refine, "video_to_video", lambda *a: pytest.fail("no re-denoise at strength 0"))
    frames = _frames()
    out = refine.tiled_vcd(frames, shotlib.TiledRefine(enabled=True, strength=0.0, scale=2), None, 32).frames
    np.testing.assert_array_equal(out, refine.resize(frames, 96, 64, "cubic"))
    same = refine.tiled_vcd(frames, shotlib.TiledRefine(enabled=True, strength=0.0, scale=1), None, 32).frames
    np.testing.assert_array_equal(same, frames)


# --- face tracks, crop, paste ----------------------------------------------------------------------------------


def test_link_tracks_follows_a_moving_face_and_drops_strays():
    det = [[(10 + 2 * f, 10, 26 + 2 * f, 26)] for f in range(8)]
    det[3].append((40, 40, 50, 50))  # a stray hit in one frame of eight
    tracks = refine.link_tracks(det)
    assert len(tracks) == 1 and sorted(tracks[0]) == list(range(8))


def test_crop_box_is_square_stable_and_covers_the_track():
    track = {f: (10 + 2 * f, 12, 26 + 2 * f, 28) for f in range(8)}
    x0, y0, x1, y1 = refine.crop_box(track, 2.0, 64, 48)
    assert x1 - x0 == y1 - y0 and 0 <= x0 and 0 <= y0 and x1 <= 64 and y1 <= 48
    assert x0 <= 10 and x1 >= 40 and y0 <= 12 and y1 >= 28


def test_paste_leaves_outside_unchanged_and_feathers_inside():
    frames = _frames(F=2, H=32, W=32)
    patch = np.zeros((2, 16, 16, 3), np.uint8)
    out = refine.paste(frames, patch, (8, 8, 24, 24), feather=4)
    outside = np.ones((32, 32), bool)
    outside[8:24, 8:24] = False
    np.testing.assert_array_equal(out[:, outside], frames[:, outside])
    assert (out[:, 12:20, 12:20] == 0).all()  # the interior is the patch
    edge = out[:, 8, 12:20].astype(int)
    assert 0 < np.abs(edge - frames[:, 8, 12:20]).mean() < np.abs(frames[:, 8, 12:20].astype(int)).mean()


class _ListDetector:
    """A stand-in face detector: frame i -> faces[i], counting its calls."""

    def __init__(self, faces):
        self.faces, self.i = faces, -1

    def __call__(self, frame):
        self.i += 1
        return self.faces[self.i]


def test_face_vcd_changes_only_the_crop_and_keeps_frames(monkeypatch):
    v2v, calls = _fake_v2v(-40)
    monkeypatch.setattr(refine, "video_to_video", v2v)
    frames = _frames(F=6, H=48, W=64)
    faces = {f: [(20.0, 14.0, 32.0, 26.0)] for f in range(6)}
    faces[2] = []  # a frame where the detector misses: the track's crop is still refined there
    shot = shotlib.from_container({"prompt": "a face", "refine": {"face": {"enabled": True, "crop_factor": 2.0,
                                                                          "feather": 3}}})
    tracks = refine.face_tracks(frames, shot, _ListDetector(faces))
    r = refine.face_vcd(frames, shot.refine.face, None, model_size=32, tracks=tracks)
    assert r.frames.shape == frames.shape and r.info["tracks"] == 1 and len(calls) == 1
    assert calls[0] == (6, 32, 32, 3)  # the crop, upscaled to the model's size, over all frames
    x0, y0, x1, y1 = r.info["crop_boxes"][0]
    outside = np.ones((48, 64), bool)
    outside[y0:y1, x0:x1] = False
    np.testing.assert_array_equal(r.frames[:, outside], frames[:, outside])
    assert not np.array_equal(r.frames[:, y0:y1, x0:x1], frames[:, y0:y1, x0:x1])


def test_face_vcd_without_faces_or_at_strength_zero_is_identity(monkeypatch):
    monkeypatch.setattr(refine, "video_to_video", lambda *a: pytest.fail("nothing to re-denoise"))
    frames = _frames()
    np.testing.assert_array_equal(refine.face_vcd(frames, shotlib.FaceRefine(enabled=True), None, 32, []).frames,
                                  frames)
    cfg0 = shotlib.FaceRefine(enabled=True, strength=0.0)
    np.testing.assert_array_equal(refine.face_vcd(frames, cfg0, None, 32, [{0: (0, 0, 9, 9)}]).frames, frames)


def test_run_finds_faces_with_the_detector_and_counts_their_steps(monkeypatch):
    """refine.run on a face shot: the detector sees every frame, its track is refined, progress counts its steps."""
    v2v, calls = _fake_v2v(-40)
    monkeypatch.setattr(refine, "video_to_video", v2v)
    frames = _frames(F=5, H=48, W=64)
    det = _ListDetector([[(20.0, 14.0, 32.0, 26.0)]] * 5)
    shot = shotlib.from_container({"prompt": "a face", "steps": 5, "width": 64, "height": 48,
                                   "refine": {"face": {"enabled": True}}})
    r = refine.run(frames, shot, shot.prompt, None, model_size=32, multiple=8, detector=det)
    assert det.i == 4 and len(calls) == 1 and r.info["face"]["tracks"] == 1 and r.info["face"]["detector"] == "auto"
    assert refine.planned_steps(shot, shot.refine.face, 0.8) == 4 and r.info["output_size"] == [64, 48]
    boxes = shotlib.from_container({"prompt": "a red circle", "frames": 5, "width": 64, "height": 48, "subjects": [
        {"phrase": "red circle", "boxes": {0: [0.0, 0.0, 0.5, 0.5], 4: [0.5, 0.5, 1.0, 1.0]}}],
        "refine": {"face": {"enabled": True, "detector": "boxes"}}})
    tracks = refine.face_tracks(frames, boxes, detector=lambda f: pytest.fail("boxes need no detector"))
    assert len(tracks) == 1 and tracks[0][0] == (0.0, 0.0, 32.0, 24.0) and tracks[0][4] == (32.0, 24.0, 64.0, 48.0)


def test_schedule_runs_at_least_one_step():
    assert refine.schedule_steps(20, 0.2) == (20, 4)
    assert refine.schedule_steps(4, 0.2) == (5, 1)
    assert refine.schedule_steps(4, 1.0) == (4, 4)


# --- shot fields ------------------------------------------------------------------------------------------------


def test_shot_without_refine_loads_with_refine_off():
    s = shotlib.from_container({"prompt": "a red circle on grass"})
    assert not s.refine.face.enabled and not s.refine.tiled.enabled
    assert s.refine.face.strength == 0.8 and s.refine.tiled.strength == 0.2 and s.refine.tiled.scale == 2
    back = shotlib.from_container(shotlib.to_dict(s))
    assert back == s


@pytest.mark.parametrize("override,field", [
    ("refine.face.strength=1.5", "refine.face.strength"), ("refine.tiled.strength=-0.1", "refine.tiled.strength"),
    ("refine.tiled.scale=5", "refine.tiled.scale"), ("refine.face.detector=dlib", "refine.face.detector"),
    ("refine.tiled.upscaler=magic", "refine.tiled.upscaler"), ("refine.tiled.tile=30", "refine.tiled.tile"),
    ("refine.tiled.overlap=40", "refine.tiled.overlap"), ("refine.face.feather=100", "refine.face.feather"),
    ("refine.face.detector_model=/no/such.onnx", "refine.face.detector_model"),
])
def test_bad_refine_settings_name_the_field(override, field):
    s = shotlib.from_container({"model": "tiny", "prompt": "a cat"}, [override])
    with pytest.raises(shotlib.ShotError) as e:
        engine.prepare(s)
    assert e.value.field == field and field in str(e.value)


def test_unknown_refine_key_names_the_field():
    with pytest.raises(shotlib.ShotError, match=r"refine\.tiled\.sclae"):
        shotlib.from_container({"refine": {"tiled": {"sclae": 2}}})


def test_face_refine_without_a_detector_is_a_clear_error(monkeypatch):
    """An OpenCV without Haar cascades (OpenCV 5 wheels): `detector: auto` is refused with the remedy."""
    monkeypatch.setattr(refine, "haar_cascade_path", lambda: None)
    s = shotlib.from_container({"model": "tiny", "prompt": "a cat", "refine": {"face": {"enabled": True}}})
    with pytest.raises(shotlib.ShotError, match=r"refine\.face\.detector.*no face detector.*<5.*detector: boxes"):
        engine.prepare(s)


# --- through the engine on the tiny model -----------------------------------------------------------------------


def _shot(model="tiny", **refine_cfg):
    return shotlib.from_container({
        "model": model, "prompt": "a red circle on grass", "seed": 3, "frames": 4 if model == "tiny" else 5,
        "width": 32, "height": 32, "steps": 3,
        "subjects": [{"phrase": "red circle", "boxes": {0: [0.0, 0.0, 0.4, 0.4], 3: [0.1, 0.0, 0.5, 0.4]}}],
        "refine": refine_cfg})


_PLAIN: dict = {}


def _plain(manager, model="tiny"):
    if model not in _PLAIN:
        _PLAIN[model] = engine.render(_shot(model), manager)
    return _PLAIN[model]


@pytest.fixture(scope="module")
def plain(manager):
    return _plain(manager)


def test_engine_refine_off_is_the_plain_render(manager, plain):
    off = engine.render(_shot(face={"enabled": False}, tiled={"enabled": False, "scale": 3}), manager)
    np.testing.assert_array_equal(plain.frames, off.frames)
    assert "refine" not in off.info and "refine" not in off.timings
    zero = engine.render(_shot(tiled={"enabled": True, "strength": 0.0, "scale": 1}), manager)
    np.testing.assert_array_equal(plain.frames, zero.frames)


@pytest.mark.parametrize("model", ["tiny", "tiny-wan"])  # Wan: WanVideoToVideoPipeline
def test_engine_face_and_tiled_refine_on_tiny(manager, model, tmp_path):
    plain = _plain(manager, model)
    steps = []
    files = engine.render_to_files(_shot(model, face={"enabled": True, "detector": "boxes", "crop_factor": 1.0,
                                                     "size": 32},
                                        tiled={"enabled": True, "scale": 2, "tile": 48, "overlap": 16}),
                                  tmp_path / "r.mp4", manager=manager, progress=lambda i, n: steps.append((i, n)))
    r = files.result
    assert r.frames.shape == (len(plain.frames), 64, 64, 3)
    info = r.info["refine"]
    assert info["output_size"] == [64, 64] and info["tiled"]["tiles"] == 4 and info["face"]["tracks"] == 1
    assert steps[-1][0] == steps[-1][1] > 0 and "refine" in r.timings
    import json

    from studio import export

    side = json.loads(files.sidecar.read_text())
    assert side["shot"]["refine"]["tiled"]["enabled"] is True and side["render"]["refine"]["output_size"] == [64, 64]
    assert (export.probe_video(files.video)["width"], export.probe_video(files.video)["height"]) == (64, 64)
    # face only: pixels outside the crop box are the plain render's
    face = engine.render(_shot(model, face={"enabled": True, "detector": "boxes", "crop_factor": 1.0, "size": 32}),
                         manager)
    x0, y0, x1, y1 = face.info["refine"]["face"]["crop_boxes"][0]
    outside = np.ones((32, 32), bool)
    outside[y0:y1, x0:x1] = False
    assert outside.any()
    np.testing.assert_array_equal(face.frames[:, outside], plain.frames[:, outside])
    assert not np.array_equal(face.frames, plain.frames)
    again = engine.render(_shot(model, face={"enabled": True, "detector": "boxes", "crop_factor": 1.0,
                                             "size": 32}), manager)
    np.testing.assert_array_equal(face.frames, again.frames)  # seeded: reproducible


def test_engine_refine_cancel(manager):
    cancel = threading.Event()

    def progress(i, n):
        if n == 1 and i == 1:  # the refine pass's first step (the render has 3)
            cancel.set()

    with pytest.raises(engine.RenderCancelled):
        engine.render(_shot(tiled={"enabled": True, "scale": 1, "strength": 0.2, "tile": 32}), manager,
                      progress=progress, cancel=cancel)


def test_refine_on_the_zeroscope_layout(tmp_path, manager):
    """VideoToVideoSDPipeline (the legacy step callback) runs both passes on a tiny UNet3D model."""
    from conftest import write_tiny_zeroscope

    preset = write_tiny_zeroscope(tmp_path, "{frames: 4, width: 32, height: 32, fps: 8, steps: 3, guidance_scale: 7.5}",
                                  name="tz")
    s = shotlib.from_container({"model": str(preset), "prompt": "a red circle on grass",
                                "subjects": [{"phrase": "red circle", "boxes": {0: [0, 0, 0.5, 0.5]}}],
                                "refine": {"tiled": {"enabled": True, "scale": 1},
                                           "face": {"enabled": True, "detector": "boxes", "crop_factor": 1.0}}})
    steps = []
    r = engine.render(s, manager, progress=lambda i, n: steps.append((i, n)))
    assert r.info["pipeline"] == "TextToVideoSDPipeline" and r.frames.shape == (4, 32, 32, 3)
    assert r.info["refine"]["face"]["crop_boxes"] == [[0, 0, 16, 16]] and r.info["refine"]["tiled"]["tiles"] == 1
    # refinement progress: the face pass runs int(3 · 0.8) = 2 steps, the tile int(5 · 0.2) = 1 (schedule lengthened)
    assert steps[-3:] == [(1, 3), (2, 3), (3, 3)]


def test_haar_finds_a_drawn_face():
    """OpenCV's bundled frontal-face cascade (the default detector) finds a plain drawn face (oval, two eyes,
    mouth) in every frame. The project pins opencv-python-headless<5, whose wheels ship the cascades: a missing
    cascade is a broken install, so this fails rather than skips."""
    import cv2

    assert refine.haar_cascade_path() is not None, f"OpenCV {cv2.__version__} ships no Haar cascades (pinned <5)"
    assert refine.face_detector_backend("auto", None) == "haar"
    img = np.full((128, 128, 3), 200, np.uint8)
    cv2.ellipse(img, (64, 64), (30, 40), 0, 0, 360, (180, 140, 120), -1)
    for x in (52, 76):
        cv2.circle(img, (x, 55), 4, (20, 20, 20), -1)
    cv2.ellipse(img, (64, 82), (10, 4), 0, 0, 360, (90, 30, 30), -1)
    detect = refine.make_detector("auto", None)
    tracks = refine.link_tracks([detect(img) for _ in range(4)])
    assert len(tracks) == 1 and sorted(tracks[0]) == [0, 1, 2, 3]
    x0, y0, x1, y1 = tracks[0][0]
    assert x0 < 64 < x1 and y0 < 64 < y1
    assert refine.make_detector("auto", None)(np.full((128, 128, 3), 200, np.uint8)) == []  # a blank frame: none


# --- through the engine on the embedded toy-world model --------------------------------------------------------


def _toy(**refine_cfg):
    return shotlib.from_container({
        "model": "toyworld", "prompt": "a yellow star on sky", "seed": 1, "steps": 3, "frames": 4,
        "subjects": [{"phrase": "yellow star", "boxes": {0: [0.05, 0.1, 0.45, 0.5], 3: [0.15, 0.1, 0.55, 0.5]}}],
        "refine": refine_cfg})


def test_refine_on_the_toyworld_model(manager):
    """Face VCD (the subject's box track) and Tiled VCD through the engine on the embedded model (AnimateDiff
    layout; 4 frames of 32x32, 3 steps): frame count and size, and for face the pixels outside the crop unchanged."""
    plain = engine.render(_toy(), manager)
    assert plain.frames.shape == (4, 32, 32, 3)
    face = engine.render(_toy(face={"enabled": True, "detector": "boxes", "crop_factor": 1.2}), manager)
    assert face.frames.shape == (4, 32, 32, 3) and face.info["refine"]["face"]["tracks"] == 1
    x0, y0, x1, y1 = face.info["refine"]["face"]["crop_boxes"][0]
    assert face.info["refine"]["face"]["crop_size"] == 32 and x1 - x0 == y1 - y0 < 32
    outside = np.ones((32, 32), bool)
    outside[y0:y1, x0:x1] = False
    np.testing.assert_array_equal(face.frames[:, outside], plain.frames[:, outside])
    assert not np.array_equal(face.frames[:, y0:y1, x0:x1], plain.frames[:, y0:y1, x0:x1])
    both = engine.render(_toy(face={"enabled": True, "detector": "boxes"},
                              tiled={"enabled": True, "scale": 2, "tile": 48, "overlap": 16}), manager)  # 2x2 tiles
    info = both.info["refine"]
    assert both.frames.shape == (4, 64, 64, 3) and info["output_size"] == [64, 64] and info["tiled"]["tiles"] == 4
