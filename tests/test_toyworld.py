"""The toy world (determinism, masks match pixels, captions match content), its tokenizer (every world word one
token), the trainer's plumbing (reproducible, resumable, exports a loadable folder) and the eval's checks
(they score ~100% on the world's own clips, and fail on wrong content)."""

from pathlib import Path

import numpy as np
import pytest

from studio.toyworld import evaluate, model, world

MODEL = Path(__file__).resolve().parent.parent / "models" / "toyworld"


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


def test_two_subject_masks_handle_occlusion():
    """With two subjects the later one is drawn on top: its mask is its whole shape, the earlier one's mask is
    its shape minus what the later one covers, the two never overlap, and each shows its own colour."""
    occluded = 0
    for seed in range(60):
        clip = world.sample_clip(seed, p_two=1.0, p_pan=0.0)
        (a, b), (ma, mb) = clip.subjects, clip.masks
        assert not (ma & mb).any(), f"seed {seed}: a pixel belongs to one subject"
        for f in range(world.FRAMES):
            cov_a = world.shape_mask(a.shape, *a.path[f], a.radius)
            cov_b = world.shape_mask(b.shape, *b.path[f], b.radius)
            assert np.array_equal(mb[f], cov_b > 0.5), f"seed {seed}: the top subject is never occluded"
            assert np.array_equal(ma[f], cov_a * (1 - cov_b) > 0.5), f"seed {seed}: occluded pixels leave the mask"
            hidden = (cov_a > 0.5) & ~ma[f]
            occluded += int(hidden.sum())
            if a.color != b.color and hidden.any():  # the hidden part shows the top subject's colour
                rgb = clip.frames[f][hidden].astype(np.float32)
                d_a = np.linalg.norm(rgb - world.COLORS[a.color], axis=-1)
                d_b = np.linalg.norm(rgb - world.COLORS[b.color], axis=-1)
                assert (d_b[mb[f][hidden]] < d_a[mb[f][hidden]]).all()
        for k, m in enumerate((ma, mb)):
            for f in np.nonzero(m.any(axis=(1, 2)))[0]:
                ys, xs = np.nonzero(m[f])
                assert clip.boxes[k, f] == pytest.approx([xs.min() / 32, ys.min() / 32, (xs.max() + 1) / 32,
                                                          (ys.max() + 1) / 32])
    assert occluded > 0, "some of these clips have overlapping subjects"


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


def test_shipped_tokenizer_has_every_world_word_as_one_token():
    """The tokenizer in models/toyworld (what renders use), not only the one built in code."""
    from transformers import CLIPTokenizer

    shipped = CLIPTokenizer.from_pretrained(MODEL / "tokenizer")
    built = model.build_tokenizer()
    for w in world.WORDS:
        ids = shipped(w, add_special_tokens=False).input_ids
        assert len(ids) == 1, (w, shipped.convert_ids_to_tokens(ids))
        assert ids == built(w, add_special_tokens=False).input_ids
    caption = "a purple triangle moving up and a white star on sand"
    assert shipped(caption).input_ids == built(caption).input_ids and len(shipped(caption).input_ids) == 11 + 2


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


SMALL = model.ToyArch(vae_channels=(8, 16), unet_channels=(16, 32), text_dim=16, text_layers=1, norm_groups=4)


def _train_config(root, name, **kw):
    from studio.toyworld import train

    fields = dict(work=str(root / name / "work"), out=str(root / name / "out"), vae_steps=2, vae_batch=4, steps=3,
                  batch=2, budget_s=600, log_every=1, ckpt_every=1, export_every=0, threads=1)
    return train.TrainConfig(**{**fields, **kw})


def _checkpoint(cfg) -> dict:
    from studio.toyworld import train

    return train.read_checkpoint(cfg.work)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Small trainer runs (2 VAE + 3 text-to-video steps at a small size): a, b the same run twice; c interrupted
    after 2 steps and resumed to 3."""
    from studio.toyworld import train

    root = tmp_path_factory.mktemp("train")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "ToyArch", lambda: SMALL)
        out = {name: _train_config(root, name) for name in "abc"}
        train.train(out["a"])
        train.train(out["b"])
        out["c"].steps = 2
        train.train(out["c"])
        first = _checkpoint(out["c"])
        out["c_first"] = (first["vae_step"], first["step"])
        out["c"].steps = 3
        train.train(out["c"])
    return out


def _assert_same_weights(x: dict, y: dict) -> None:
    import torch

    for part in ("vae", "unet", "te"):
        assert x[part].keys() == y[part].keys()
        diff = [k for k in x[part] if not torch.equal(x[part][k], y[part][k])]
        assert not diff, f"{part} differs in {diff[:3]}"
    assert all(torch.equal(a, b) for a, b in zip(x["ema"], y["ema"], strict=True))


def test_trainer_is_reproducible_by_seed(runs):
    import torch

    a, b = _checkpoint(runs["a"]), _checkpoint(runs["b"])
    assert (a["vae_step"], a["step"]) == (2, 3)
    _assert_same_weights(a, b)
    fresh = model.build_components(SMALL, seed=0)["unet"].state_dict()
    assert any(not torch.equal(fresh[k], a["unet"][k]) for k in fresh), "training changed the weights"


def test_resumed_run_equals_the_uninterrupted_one(runs):
    assert runs["c_first"] == (2, 2)
    c = _checkpoint(runs["c"])
    assert (c["vae_step"], c["step"]) == (2, 3)
    _assert_same_weights(c, _checkpoint(runs["a"]))


def test_trainer_exports_a_loadable_folder(runs):
    import json

    import torch
    from diffusers import AnimateDiffPipeline

    info = json.loads((Path(runs["c"].out) / "training.json").read_text())
    assert (info["vae_steps"], info["t2v_steps"]) == (2, 3) and info["config"]["lr"] == runs["c"].lr
    pipe = AnimateDiffPipeline.from_pretrained(runs["c"].out, dtype=torch.float32)
    assert pipe.unet.dtype == torch.float32 and len(pipe.tokenizer("a red circle").input_ids) == 3 + 2


def test_init_continues_an_exported_model(runs, tmp_path):
    """--init: the t2v stage starts from an exported folder's weights and step count, a fresh optimizer, no VAE."""
    import json

    import torch
    from safetensors.torch import load_file

    from studio.toyworld import train

    src = Path(runs["a"].out)
    cfg = _train_config(tmp_path, "init", init=str(src), steps=5, warmup=200)
    out = train.train(cfg)
    info = json.loads((out / "training.json").read_text())
    assert (info["vae_steps"], info["t2v_steps"]) == (2, 5) and info["config"]["init"] == str(src)
    ckpt = _checkpoint(cfg)
    assert (ckpt["step"], ckpt["opt_start"], ckpt["init"]) == (5, 3, str(src))
    assert {s["step"].item() for s in ckpt["opt"]["state"].values()} == {2.0}, "a fresh optimizer: 2 steps"
    assert ckpt["opt"]["param_groups"][0]["lr"] == pytest.approx(cfg.lr * 2 / 200), "warm-up restarts"

    def weights(folder, part):
        return load_file(Path(folder) / part / "diffusion_pytorch_model.safetensors")

    old_vae, new_vae = weights(src, "vae"), weights(out, "vae")
    assert all(torch.equal(old_vae[k], new_vae[k]) for k in old_vae), "the VAE stage is taken as done"
    old_unet, new_unet = weights(src, "unet"), weights(out, "unet")
    assert any(not torch.equal(old_unet[k], new_unet[k]) for k in old_unet), "the UNet trained on"
    with pytest.raises(ValueError, match="another run"):  # a work folder of a plain run is not taken over
        train.train(_train_config(tmp_path, "x", work=runs["a"].work, init=str(src)))


def test_defaults_and_reproduce_command_are_the_shipped_run():
    """TrainConfig's defaults are the shipped run's settings, and the model card's Reproduce line is the command
    that reruns them (parsed by the CLI back into those settings)."""
    import json
    import shlex

    from studio import cli
    from studio.toyworld import train

    info = json.loads((MODEL / "training.json").read_text())
    shipped = {k: v for k, v in info["config"].items() if k not in ("work", "out")}
    assert {k: getattr(train.TrainConfig(), k) for k in shipped} == shipped
    command = train.reproduce_command(info)
    card = (MODEL / "README.md").read_text()
    assert f"- Reproduce: `mkdir -p runs && {command} > runs/train.log 2>&1`" in card
    argv = shlex.split(command)
    assert argv[:3] == ["studio", "toyworld", "train"]
    cfg = cli.train_config(cli.build_parser().parse_args(argv[1:]))
    assert {k: getattr(cfg, k) for k in train.RESULT_FIELDS} == {**{k: shipped[k] for k in train.RESULT_FIELDS},
                                                                  "steps": info["t2v_steps"]}
    assert cfg.out != "models/toyworld" and cfg.budget_s > info["config"]["budget_s"]


def test_building_components_leaves_the_global_rng_alone():
    import torch

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = model.build_components(SMALL, seed=5)
    assert torch.equal(torch.rand(3), expected)
    b = model.build_components(SMALL, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a["unet"].state_dict().values(), b["unet"].state_dict().values()))


def test_eval_preset_comes_from_the_model_folder(tmp_path):
    from studio.presets import load_model_preset

    preset = load_model_preset(str(evaluate._preset_file(MODEL, tmp_path)))
    shipped = load_model_preset("toyworld")
    assert (preset.defaults.width, preset.defaults.height, preset.size_multiple) == (32, 32, 8)
    assert (preset.defaults.steps, preset.defaults.fps, preset.defaults.guidance_scale) == (
        shipped.defaults.steps, shipped.defaults.fps, shipped.defaults.guidance_scale)
    assert preset.max_frames == 32


def test_eval_pins_and_records_threads(monkeypatch):
    import torch

    before = torch.get_num_threads()
    seen = {}

    def fake(model_dir, n, seed, binding_n, steps, guidance_scale):
        seen["threads"] = torch.get_num_threads()
        return {"model": str(model_dir)}

    monkeypatch.setattr(evaluate, "_evaluate", fake)
    result = evaluate.evaluate(MODEL, n=1, threads=1)
    assert seen["threads"] == 1 and result["threads"] == 1
    assert torch.get_num_threads() == before, "the caller's thread count is restored"


def test_background_prototypes_come_from_the_world():
    protos = evaluate.background_prototypes()
    assert set(protos) == set(world.BACKGROUNDS)
    for bg in world.BACKGROUNDS:
        assert evaluate.classify_background(world.render_clip(bg, [], seed=99).frames) == bg


def test_the_halves_look_is_two_flat_colours_split_at_the_centre_and_never_in_training():
    spec = world.SubjectSpec("halves", "square", 8.0, np.array([[16.0, 16.0]] * world.FRAMES, np.float32), None)
    clip = world.render_clip("grass", [spec], seed=3)
    left, right = clip.frames[0, 12:20, 9:14].reshape(-1, 3), clip.frames[0, 12:20, 18:23].reshape(-1, 3)
    yellow, purple = world.HALVES["halves"]
    assert np.abs(right.astype(int) - yellow).max() <= 2 and np.abs(left.astype(int) - purple).max() <= 2
    assert "halves" not in world.WORDS
    assert not any(s.color in world.HALVES for i in range(300) for s in world.sample_clip(i, personal=True).subjects)
