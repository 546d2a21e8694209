"""Step caches (diffusers' DiT caches as a machine setting): the setting's syntax and record, the CLI flag, the cache
removed after every render, the UNet families uncached, pyramid attention broadcast kept per guidance half, MagCache's
calibration deterministic, and every cache against every control on tiny-wan: the control's effect is kept, or the
shot is refused at validation naming the control and the cache."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from studio import engine, shot as shotlib, step_caches
from studio.presets import load_model_preset


@pytest.fixture(autouse=True)
def no_cache(monkeypatch):
    monkeypatch.delenv(step_caches.ENV, raising=False)  # and restored after each test


def test_settings_parse_record_and_refuse_bad_names():
    assert step_caches.parse(None).label == step_caches.parse(" none ").label == "none"
    s = step_caches.parse("first_block:threshold=0.1")
    assert s.label == "first_block(threshold=0.1)" and s.get("threshold") == 0.1
    assert step_caches.parse("taylorseer").label == "taylorseer(cache_interval=5, max_order=1, warmup=3)"
    assert step_caches.parse("Pyramid-Broadcast:cross_skip=0").get("cross_skip") == 0
    for bad, words in (("fast", "unknown step cache 'fast'; known: none, first_block"),
                       ("first_block:threshhold=1", "takes key=value parameters among: threshold"),
                       ("taylorseer:cache_interval=2.5", "must be a whole number"),
                       ("sea:threshold=-1", "must be a number >= 0"), ("sea:threshold=nan", "must be a number >= 0"),
                       ("none:x=1", "'none' takes no parameters")):
        with pytest.raises(ValueError, match=words) as e:
            step_caches.parse(bad, "--step-cache")
        assert str(e.value).startswith("--step-cache: ") and "\n" not in str(e.value)


def _wan(**kw):
    return shotlib.from_container({"model": "tiny-wan", "prompt": "a red circle on grass", "frames": 5, "width": 64,
                                   "height": 64, "steps": 6, "seed": 1, **kw})


def test_a_cache_that_breaks_a_control_or_the_family_is_refused_naming_both(monkeypatch):
    monkeypatch.setenv(step_caches.ENV, "first_block")
    with pytest.raises(shotlib.ShotError) as e:
        engine.prepare(_wan(camera={"cy": 0.2}))
    msg = str(e.value)
    assert e.value.field == "camera.cy" and "step cache 'first_block'" in msg and "--step-cache" in msg
    assert "valid with this cache: 0, or another step cache (pyramid_broadcast, taylorseer, sea, mag) or none" in msg
    engine.prepare(_wan(subjects=[{"phrase": "red circle", "boxes": {0: [0, 0, 0.5, 0.5]}}]))  # boxes: fine
    monkeypatch.setenv(step_caches.ENV, "faster")
    with pytest.raises(shotlib.ShotError, match=r"^model: the step cache 'faster' .* does not run on the wan family: "
                                                r"it approximates the unconditional branch") as e:
        engine.prepare(_wan())
    engine.prepare(shotlib.from_container({"model": "tiny", "prompt": "a red circle", "camera": {"cx": 0.3}}))


def test_the_cli_flag_sets_the_cache_and_the_sidecar_records_it(tmp_path, monkeypatch, capsys, manager):
    from studio import cli

    monkeypatch.setattr(engine, "default_manager", lambda: manager)
    shot = tmp_path / "s.yaml"
    shot.write_text("model: tiny-wan\nprompt: a red circle on grass\nframes: 5\nwidth: 32\nheight: 32\nsteps: 6\n")
    assert cli.main(["render", str(shot), "--out", str(tmp_path / "x.mp4"), "--step-cache", "taylorseer"]) == 0
    side = json.loads((tmp_path / "x.json").read_text())
    label = "taylorseer(cache_interval=5, max_order=1, warmup=3)"
    assert side["settings"]["step_cache"] == label and side["render"]["step_cache"]["step_cache"] == label
    done = side["render"]["step_cache"]
    assert done["attention_calls"] == 6 * 2 * 4 and 0 < done["attention_computed"] < done["attention_calls"]
    capsys.readouterr()
    assert cli.main(["render", str(shot), "--out", str(tmp_path / "y.mp4"), "--step-cache", "tea"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("studio: error: --step-cache: unknown step cache 'tea'") and "\n" not in err
    assert not (tmp_path / "y.mp4").exists()


def test_a_cached_render_leaves_the_pipeline_as_it_was(monkeypatch, manager):
    plain = engine.render(_wan(), manager)
    assert plain.settings["step_cache"] == "none" and "step_cache" not in plain.info
    tr = manager.get(plain.preset).transformer
    monkeypatch.setenv(step_caches.ENV, "pyramid_broadcast")
    cached = engine.render(_wan(), manager)
    assert cached.settings["step_cache"].startswith("pyramid_broadcast(")
    assert tr._cache_config is None and not getattr(tr, "_diffusers_hook", None) or not tr._diffusers_hook.hooks
    assert all(not getattr(m, "_diffusers_hook", None) or not m._diffusers_hook.hooks for m in tr.modules())
    monkeypatch.setenv(step_caches.ENV, "none")
    assert np.array_equal(engine.render(_wan(), manager).frames, plain.frames)


def test_the_unet_families_render_uncached_and_record_none(monkeypatch, tiny_shot, manager):
    plain = engine.render(tiny_shot, manager).frames
    monkeypatch.setenv(step_caches.ENV, "sea")
    r = engine.render(tiny_shot, manager)
    assert r.settings["step_cache"] == "none" and np.array_equal(r.frames, plain)


def test_pyramid_broadcast_keeps_a_state_per_guidance_half():
    """diffusers' broadcast keeps one state for both calls of a step: Wan's unconditional call reuses the conditional
    call's attention (its output then equals the conditional one: text reaches Wan only through attn2). Per-call
    states keep each half's own, and a call reusing its own attention from the same input repeats its output."""
    import diffusers

    from studio.families import wan_build

    pipe = wan_build.build_pipeline()
    tr = pipe.transformer
    pipe._current_timestep = torch.tensor(500.0)
    config = diffusers.PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                                       cross_attention_block_skip_range=2,
                                                       current_timestep_callback=lambda: step_caches._timestep(pipe))
    torch.manual_seed(0)
    x, t, cond, uncond = torch.randn(1, 16, 2, 8, 8), torch.tensor([500.0]), torch.randn(1, 512, 32), torch.randn(
        1, 512, 32)

    def calls():
        out = []
        with torch.no_grad():
            for name, text in (("cond", cond), ("uncond", uncond), ("cond", cond), ("uncond", uncond)):
                with tr.cache_context(name):
                    out.append(tr(x, t, text, return_dict=False)[0])
        return out

    tr.enable_cache(config)
    try:
        shared = calls()
    finally:
        tr.disable_cache()
    assert torch.equal(shared[1], shared[0])  # the unconditional call got the conditional attention
    tr.enable_cache(config)
    per_call = step_caches._PerCallStates.install(tr)
    try:
        own = calls()
    finally:
        per_call.remove(tr)
        tr.disable_cache()
    with torch.no_grad():
        a, b = tr(x, t, cond, return_dict=False)[0], tr(x, t, uncond, return_dict=False)[0]
    assert torch.equal(own[0], a) and torch.equal(own[1], b)  # the first call of each half: computed
    assert torch.equal(own[2], own[0]) and torch.equal(own[3], own[1])  # the second: its own half's, reused


def test_mag_ratios_are_calibrated_once_and_deterministically(manager):
    pipe = manager.get(load_model_preset("tiny-wan"))
    shot = engine.prepare(_wan())[0]
    first = step_caches.mag_ratios(pipe, shot)
    assert len(first) == 6 and first[0] == 1.0 and all(r > 0 for r in first)
    step_caches._MAG_RATIOS.clear()
    assert step_caches.mag_ratios(pipe, shot) == first


# --- every cache against every control ------------------------------------------------------------------------

# Parameters at which each cache skips attention on the tiny random model (whose residuals change more per step
# than a trained model's, so the trained-model defaults would rarely skip there).
CACHES = {"first_block": "first_block:threshold=0.3", "pyramid_broadcast": "pyramid_broadcast",
          "taylorseer": "taylorseer:cache_interval=3,warmup=2", "sea": "sea:threshold=1", "mag": "mag:threshold=0.3"}


@pytest.fixture(scope="module")
def control_shots(tmp_path_factory):
    ref = tmp_path_factory.mktemp("cache-refs") / "purple.png"
    Image.new("RGB", (32, 32), (150, 50, 215)).save(ref)
    # A box edit of the size that matters (strength 100, amplified at every step: 13% of a seed change in the
    # latents). At the default strength the random model's answer to a box is 0.6% of a seed change, below every
    # cache's own approximation error, and no cache could be shown to keep or lose it.
    box = {"subjects": [{"phrase": "red circle", "boxes": {0: [0.0, 0.0, 0.5, 0.5], 4: [0.5, 0.5, 1.0, 1.0]}}],
           "box_control": {"strength": 100.0, "amplify_steps": 6}}
    return {"plain": {}, "boxes": box, "reference": {"subjects": [{"phrase": "red circle", "reference": str(ref)}]},
            "camera": {"camera": {"cx": 0.5, "start_step": 1, "shift_steps": 2}}}


def _latents(manager, monkeypatch, shot):
    """The final latents of an engine render (the VAE replaced by a stub: these tests read latents)."""
    pipe = manager.get(load_model_preset("tiny-wan"))
    seen = []

    def decode(z, return_dict=True, **kw):
        seen.append(z.clone())
        B, C, F, h, w = z.shape
        return (torch.zeros(B, 3, 4 * (F - 1) + 1, 8 * h, 8 * w),)

    with monkeypatch.context() as m:
        m.setattr(pipe.vae, "decode", decode)
        r = engine.render(shot, manager)
    return seen[-1], r


@pytest.fixture(scope="module")
def uncached(manager, control_shots):
    with pytest.MonkeyPatch.context() as m:
        m.delenv(step_caches.ENV, raising=False)
        return {k: _latents(manager, m, _wan(**v))[0] for k, v in control_shots.items()}


@pytest.mark.parametrize("cache", list(CACHES))
def test_each_cache_keeps_every_controls_effect_or_is_refused(cache, manager, monkeypatch, control_shots, uncached):
    monkeypatch.setenv(step_caches.ENV, CACHES[cache])
    plain, r = _latents(manager, monkeypatch, _wan())
    done = r.info["step_cache"]
    assert done["attention_computed"] < done["attention_calls"]  # the cache did skip work
    for control, fields in control_shots.items():
        if control == "plain":
            continue
        shot = _wan(**fields)
        if control in step_caches.CACHES[cache].refuses:
            with pytest.raises(shotlib.ShotError, match=rf"camera\.cx: .*step cache '{cache}'"):
                engine.prepare(shot)
            continue
        z, r = _latents(manager, monkeypatch, shot)
        want = (uncached[control] - uncached["plain"]).flatten()  # the control's effect, uncached
        got = (z - plain).flatten()  # and with the cache
        cos = torch.nn.functional.cosine_similarity(want, got, 0).item()
        assert cos > 0.95 and 0.8 < (got.norm() / want.norm()).item() < 1.25, (control, cos)
        assert r.info["step_cache"]["attention_computed"] < r.info["step_cache"]["attention_calls"]
