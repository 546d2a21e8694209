"""Subject-training defaults: one table (tune.DEFAULTS) that `studio subject add` and the page's training panel both
read, and the methods a model cannot train refused in one line."""

import numpy as np
import pytest

from studio import cli
from studio.pipelines import load_pipeline
from studio.presets import load_model_preset
from studio.subjects import tune
from studio.ui import subjects as sj

PRESETS = ("toyworld", "tiny", "animatediff-sd15", "zeroscope")


def _cli_settings(model: str) -> tune.TuneSettings:
    """What `studio subject add` trains with when given no training flags (as cmd_subject_add builds it)."""
    args = cli.build_parser().parse_args(["subject", "add", "rex", "--images", "photos", "--model", model])
    assert args.method is None and args.steps is None  # nothing chosen by the CLI itself
    s = tune.TuneSettings(method=args.method, class_word="dog", steps=args.steps, seed=args.seed)
    return tune.resolve(s, load_model_preset(model))


@pytest.mark.parametrize("model", PRESETS)
def test_page_and_cli_start_from_the_same_defaults(model):
    preset = load_model_preset(model)
    table = tune.defaults(preset)
    s = _cli_settings(model)
    panel = sj.training_defaults(model)
    fields = ("method", "steps", "lr", "token_lr", "rank", "flip", "caption", "lr_schedule", "sampling")
    assert {f: getattr(s, f) for f in fields} == {f: table[f] for f in fields}
    assert panel == {"method": table["method"], "steps": table["steps"], "note": tune.method_note(preset)}
    assert "\n" not in panel["note"] and panel["note"]


def test_the_panel_says_when_a_model_cannot_train():
    assert "not available on tiny-wan" in sj.training_defaults("tiny-wan")["note"]


def test_one_table_moves_both(monkeypatch):
    # change the table only: the CLI's resolved settings and the panel's start both follow (no second copy)
    monkeypatch.setitem(tune.DEFAULTS, "tiny", {**tune.DEFAULTS["tiny"], "method": "tokens", "steps": 7,
                                                "why": "tokens: a test"})
    assert (_cli_settings("tiny").method, _cli_settings("tiny").steps) == ("tokens", 7)
    assert sj.training_defaults("tiny") == {"method": "tokens", "steps": 7, "note": "Default for tiny: tokens: a test"}


@pytest.mark.parametrize("method", ["tokens", "both"])
def test_a_method_the_model_cannot_train_is_one_line(method):
    preset = load_model_preset("tiny")
    pipe = load_pipeline(preset, "cpu")
    pipe.text_encoder = None  # a model without a text encoder to extend
    with pytest.raises(ValueError) as e:
        tune.train(pipe, preset, [], None, "rex", tune.TuneSettings(method=method, steps=1))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("method:") and method in msg and "tiny" in msg
    tune.check_method("lora", preset, pipe)  # a LoRA needs no text encoder: accepted


def test_caption_form_and_lora_targets_reach_the_training(monkeypatch):
    from studio.subjects import tune as t

    seen = []
    real = t._encode_text
    monkeypatch.setattr(t, "_encode_text", lambda pipe, caps, dev: seen.extend(caps) or real(pipe, caps, dev))
    preset = load_model_preset("tiny")
    photos = [np.full((64, 64, 3), 200, np.uint8)]
    r = tune.train(load_pipeline(preset, "cpu"), preset, photos, None, "cap",
                   tune.TuneSettings(method="lora", class_word="dog", steps=1, batch=1, video_weight=0.0,
                                     caption="a photo of a {phrase}", lora_targets="cross"))
    assert seen == ["a photo of a sks dog"]
    assert r.lora and all(".attn2." in k for k in r.lora)
    assert tune.resolve(tune.TuneSettings(), load_model_preset("toyworld")).caption == \
        tune.DEFAULTS["toyworld"]["caption"]


def test_unmirrored_photos_stay_unmirrored():
    """flip=False (the toy-world default: a mirrored two-tone star is the other two-tone star) never mirrors a photo;
    flip=True mirrors about half of them, as Magic-Me; a bad value is one line naming the field."""
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.linspace(-1, 1, 3 * 8 * 8).view(3, 8, 8)  # not left-right symmetric
    m = torch.zeros(8, 8)
    m[:, :3] = 1
    kept = [torch.equal(tune.augment(x, m, g, full=False, flip=False)[0], x) for _ in range(40)]
    assert all(kept)
    mirrored = [torch.equal(tune.augment(x, m, g, full=False, flip=True)[0], x.flip(-1)) for _ in range(40)]
    assert 10 <= sum(mirrored) <= 30
    assert tune.defaults(load_model_preset("toyworld"))["flip"] is False
    with pytest.raises(ValueError, match=r"^flip: must be true or false \(got 'no'\)$"):
        tune.resolve(tune.TuneSettings(flip="no"), load_model_preset("toyworld"))


def test_flip_setting_reaches_the_photo_batch(monkeypatch):
    """The resolved `flip` is what the training's photo batch augments with."""
    seen = []
    real = tune.augment

    def spy(x, m, generator, full, flip=True):
        seen.append(flip)
        return real(x, m, generator, full, flip)

    monkeypatch.setattr(tune, "augment", spy)
    preset = load_model_preset("tiny")
    pipe = load_pipeline(preset, "cpu")
    photos = [np.full((64, 64, 3), 200, np.uint8)]
    for flip in (False, True):
        seen.clear()
        tune.train(pipe, preset, photos, None, "fl", tune.TuneSettings(method="lora", class_word="dog", steps=2,
                                                                       batch=1, video_weight=0.0, flip=flip))
        assert seen and set(seen) == {flip}


def test_lr_schedule_cosine_runs_down_to_zero():
    """lr_schedule: constant keeps the set rates; cosine starts at them, halves at mid-training and ends at 0; a bad
    value is one line naming the field."""
    assert [tune.lr_factor("constant", i, 10) for i in (0, 5, 9)] == [1.0, 1.0, 1.0]
    f = [tune.lr_factor("cosine", i, 10) for i in range(11)]
    assert f[0] == 1.0 and f[5] == pytest.approx(0.5) and f[10] == pytest.approx(0.0)
    assert all(a > b for a, b in zip(f, f[1:]))
    with pytest.raises(ValueError, match=r"^lr_schedule: must be one of constant, cosine \(got 'linear'\)$"):
        tune.resolve(tune.TuneSettings(lr_schedule="linear"), load_model_preset("toyworld"))


def test_lr_schedule_reaches_the_optimizer(monkeypatch):
    """The optimizer's LoRA learning rate at each step follows the resolved schedule."""
    seen = []
    real = tune.train_step

    def spy(c, optimizer, params):
        seen.append(optimizer.param_groups[0]["lr"])
        return real(c, optimizer, params)

    monkeypatch.setattr(tune, "train_step", spy)
    preset = load_model_preset("tiny")
    pipe = load_pipeline(preset, "cpu")
    photos = [np.full((64, 64, 3), 200, np.uint8)]
    for schedule in ("constant", "cosine"):
        seen.clear()
        tune.train(pipe, preset, photos, None, "lr", tune.TuneSettings(
            method="lora", class_word="dog", steps=4, lr=1e-3, batch=1, video_weight=0.0, lr_schedule=schedule))
        want = [1e-3 * tune.lr_factor(schedule, i, 4) for i in range(4)]
        assert seen == pytest.approx(want), schedule


def test_random_draws_are_the_trainers_old_draws():
    """sampling: random draws exactly what the trainer always drew (a seed trains as before)."""
    import torch

    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    d = tune.Draws(g1, False, n_photos=4, n_timesteps=1000, n_clips=8)
    got = [d.photos(4), d.photo_timesteps(4).tolist(), d.clip(), d.clip_timestep().tolist()]
    want = [torch.randint(0, 4, (4,), generator=g2).tolist(), torch.randint(0, 1000, (4,), generator=g2).tolist(),
            int(torch.randint(0, 8, (1,), generator=g2)), torch.randint(0, 1000, (1,), generator=g2).tolist()]
    assert got == want


def test_balanced_draws_cover_photos_clips_and_timesteps_evenly():
    """sampling: balanced gives every photo and clip in turn, one photo timestep per stratum of the schedule and clip
    timesteps spread over it; a bad value is one line naming the field."""
    import torch

    d = tune.Draws(torch.Generator().manual_seed(0), True, n_photos=3, n_timesteps=1000, n_clips=8)
    photos = [d.photos(4) for _ in range(6)]  # 24 draws of 3 photos: each exactly 8 times
    assert sorted(np.bincount(sum(photos, []), minlength=3).tolist()) == [8, 8, 8]
    for _ in range(20):
        t = sorted(d.photo_timesteps(4).tolist())
        assert [v // 250 for v in t] == [0, 1, 2, 3]
    clips = [d.clip() for _ in range(16)]
    assert sorted(clips[:8]) == list(range(8)) and sorted(clips[8:]) == list(range(8))
    ts = [int(d.clip_timestep()) for _ in range(100)]
    assert all(0 <= v < 1000 for v in ts)
    counts = np.bincount([v // 100 for v in ts], minlength=10)
    assert 9 <= counts.min() and counts.max() <= 11, counts  # independent draws land here with p < 0.001
    with pytest.raises(ValueError, match=r"^sampling: must be one of random, balanced \(got 'even'\)$"):
        tune.resolve(tune.TuneSettings(sampling="even"), load_model_preset("toyworld"))


def test_sampling_setting_reaches_the_training(monkeypatch):
    seen = []
    real = tune.Draws.photos

    def spy(self, batch):
        seen.append(self.balanced)
        return real(self, batch)

    monkeypatch.setattr(tune.Draws, "photos", spy)
    preset = load_model_preset("tiny")
    pipe = load_pipeline(preset, "cpu")
    photos = [np.full((64, 64, 3), 200, np.uint8)] * 2
    for sampling in ("random", "balanced"):
        seen.clear()
        tune.train(pipe, preset, photos, None, "sa", tune.TuneSettings(
            method="lora", class_word="dog", steps=2, batch=1, video_weight=0.0, sampling=sampling))
        assert seen and set(seen) == {sampling == "balanced"}
