"""The toy world (determinism, masks match pixels, captions match content), its tokenizer (every world word one
token), the trainer's plumbing (reproducible, resumable, exports a loadable folder) and the eval's checks
(they score ~100% on the world's own clips, and fail on wrong content)."""

import numpy as np
import pytest

from studio.toyworld import evaluate, model, world


@pytest.mark.parametrize("seed", [0, 1, 7, 123])
def test_same_seed_same_clip(seed):
    a, b = world.sample_clip(seed), world.sample_clip(seed)
    assert np.array_equal(a.frames, b.frames) and np.array_equal(a.masks, b.masks) and a.caption == b.caption
    assert a.frames.shape == (world.FRAMES, world.SIZE, world.SIZE, 3) and a.frames.dtype == np.uint8
    assert not np.array_equal(a.frames, world.sample_clip(seed + 1000).frames)


def test_masks_cover_pixels_of_the_subject_colour():
    import cv2

    for seed in range(40):
        clip = world.sample_clip(seed, p_two=0.0)
        s = clip.subjects[0]
        empty = world.render_clip(clip.background, [], clip.camera, seed=seed).frames  # the same background alone
        rgb = np.asarray(world.COLORS[s.color], np.float32)
        d_subject = np.linalg.norm(clip.frames.astype(np.float32) - rgb, axis=-1)  # (F, S, S)
        d_background = np.linalg.norm(clip.frames.astype(np.float32) - empty, axis=-1)
        m = clip.masks[0]
        assert m.any(axis=(1, 2)).all(), "every frame shows the subject"
        assert (d_subject[m] <= d_background[m] + 2).mean() > 0.98, f"seed {seed}: mask pixels are mostly subject"
        near = np.stack([cv2.dilate(f.astype(np.uint8), np.ones((5, 5), np.uint8)) for f in m]).astype(bool)
        assert (d_background[~near] < 8).all(), f"seed {seed}: nothing drawn outside the subject mask"
        ys, xs = np.nonzero(m[0])
        x0, y0, x1, y1 = clip.boxes[0, 0]
        assert (x0, y0, x1, y1) == pytest.approx((xs.min() / 32, ys.min() / 32, (xs.max() + 1) / 32,
                                                  (ys.max() + 1) / 32))


def test_captions_match_content():
    seen_bg, seen_motion, two = set(), set(), 0
    for seed in range(300):
        clip = world.sample_clip(seed)
        words = clip.caption.split()
        assert clip.caption.endswith(f"on {clip.background}")
        for s in clip.subjects:
            assert s.phrase in clip.caption
            assert s.color in world.COLORS, "personal looks never appear in training clips"
            if s.motion:  # a named motion is the direction the subject actually travels
                dx, dy = s.path[-1] - s.path[0]
                expect = {"right": dx > 5, "left": dx < -5, "down": dy > 5, "up": dy < -5}[s.motion]
                assert expect and f"moving {s.motion}" in clip.caption
                seen_motion.add(s.motion)
        assert not set(words) & set(world.TRIGGER_WORDS) and not set(words) & set(world.PATTERNS)
        seen_bg.add(clip.background)
        two += len(clip.subjects) == 2
    assert seen_bg == set(world.BACKGROUNDS) and seen_motion == set(world.MOTIONS) and 30 < two < 130


def test_camera_pan_moves_background_against_the_camera():
    rng = np.random.default_rng(0)
    spec = world.SubjectSpec("red", "circle", 5.0, world.make_path("still", 5.0, rng), None)
    clip = world.render_clip("sand", [spec], camera=(2.0, 0.0), seed=3)
    # sand's ripples run along rows; compare columns: frame 1 equals frame 0 shifted 2 px left
    a, b = clip.frames[0, :, 12:30].astype(int), clip.frames[1, :, 10:28].astype(int)
    bg = ~(clip.masks[0, 0][:, 12:30] | clip.masks[0, 1][:, 10:28])
    assert np.abs(a - b)[bg].mean() < 3


def test_personal_looks_render_when_asked():
    clips = [world.sample_clip(s, personal=True) for s in range(200)]
    assert any(s.color in world.PATTERNS for c in clips for s in c.subjects)


def test_every_world_word_is_one_token():
    tok = model.build_tokenizer()
    for w in world.WORDS:
        ids = tok(w, add_special_tokens=False).input_ids
        assert len(ids) == 1, (w, tok.convert_ids_to_tokens(ids))
    ids = tok("a red circle moving right on grass").input_ids
    assert len(ids) == 7 + 2 and tok.decode(ids, skip_special_tokens=True) == "a red circle moving right on grass"
    # any other word still encodes, piece by piece
    assert len(tok("dog", add_special_tokens=False).input_ids) >= 1


def test_tokenizer_survives_save_and_load(tmp_path):
    from transformers import CLIPTokenizer

    tok = model.build_tokenizer()
    tok.save_pretrained(tmp_path)
    again = CLIPTokenizer.from_pretrained(tmp_path)
    for text in ("a yellow star moving up on sky", "a sks triangle far away", ""):
        assert again(text).input_ids == tok(text).input_ids


def test_eval_checks_score_ground_truth_and_reject_wrong_content():
    assert evaluate.score_ground_truth(48, seed=3) == {"colour": 1.0, "background": 1.0, "direction": 1.0}
    p = evaluate.eval_prompts(8, seed=0)[5]
    clip = evaluate.ground_truth_clip(p)
    assert all(v for k, v in evaluate.score_clip(clip.frames, p).items() if k != "seen")
    wrong = {**p, "colour": next(c for c in world.COLORS if c != p["colour"]),
             "background": next(b for b in world.BACKGROUNDS if b != p["background"]),
             "motion": {"left": "right", "right": "left", "up": "down", "down": "up"}[p["motion"]]}
    s = evaluate.score_clip(clip.frames, wrong)
    assert not s["colour"] and not s["background"] and not s["direction"]
    assert evaluate.score_clip(clip.frames[::-1], p)["direction"] is False  # reversed time, reversed motion


def test_eval_prompts_are_held_out_and_balanced():
    ps = evaluate.eval_prompts(48)
    assert all(p["seed"] >= world.EVAL_SEED_OFFSET for p in ps)
    assert {p["colour"] for p in ps} == set(world.COLORS) and {p["motion"] for p in ps} == set(world.MOTIONS)


def test_trainer_is_resumable_and_exports_a_loadable_folder(tmp_path, monkeypatch):
    """Two VAE + two text-to-video steps at a small size, then resume to three; the export loads in diffusers."""
    import json

    import torch
    from diffusers import AnimateDiffPipeline

    from studio.toyworld import train

    small = model.ToyArch(vae_channels=(8, 16), unet_channels=(16, 32), text_dim=16, text_layers=1, norm_groups=4)
    monkeypatch.setattr(train, "ToyArch", lambda: small)
    cfg = train.TrainConfig(work=str(tmp_path / "work"), out=str(tmp_path / "out"), vae_steps=2, vae_batch=4,
                            steps=2, batch=2, budget_s=600, log_every=1, ckpt_every=1, export_every=0, threads=1)
    train.train(cfg)
    state = torch.load(tmp_path / "work" / "checkpoint.pt", weights_only=True)
    assert (state["vae_step"], state["step"]) == (2, 2)
    cfg.steps = 3
    train.train(cfg)
    info = json.loads((tmp_path / "out" / "training.json").read_text())
    assert (info["vae_steps"], info["t2v_steps"]) == (2, 3)
    pipe = AnimateDiffPipeline.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert pipe.unet.dtype == torch.float32 and len(pipe.tokenizer("a red circle").input_ids) == 3 + 2
