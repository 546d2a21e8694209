"""The Wan family: tiny random Wan renders through the studio, the studio's render equals a direct diffusers call
(on the UNet families too: the family adapters changed nothing there), frame/size rules with the nearest valid
values, UNet-only settings refused by field, the noise prior over latent frames measured statistically, the real
layouts of the Wan presets on the meta device, and the 1.3B layout rendering at full width (slow)."""

import json

import numpy as np
import pytest
import torch

from studio import engine, families, shot as shotlib
from studio.controls import noise_prior
from studio.families import wan_build
from studio.presets import load_model_preset

WAN_PRESETS = ("wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.2-ti2v-5b")


def _shot(**kw):
    return shotlib.from_container({"model": "tiny-wan", "prompt": "a red circle on grass", **kw})


# --- rendering through the studio ---------------------------------------------------------------------------------


def test_tiny_wan_renders_frames_of_the_shot_size_and_a_sidecar(manager, tmp_path):
    files = engine.render_to_files(_shot(frames=13, width=48, height=32, steps=4, noise_prior={"gamma": 0.5}),
                                   tmp_path / "wan.mp4", manager=manager)
    r = files.result
    assert r.frames.shape == (13, 32, 48, 3) and r.frames.dtype == np.uint8 and r.frames.std() > 1.0
    assert r.info["pipeline"] == "WanPipeline" and r.info["latent_shape"] == [1, 16, 4, 4, 6]  # F' = (13-1)/4+1
    side = json.loads(files.sidecar.read_text())
    assert side["model"]["family"] == "wan" and side["shot"]["frames"] == 13
    prior = side["render"]["noise_prior"]  # how γ reached the latent frames
    assert prior["times"] == [0.0, 2.5, 6.5, 10.5] and prior["frames_per_latent"] == 4
    assert prior["step_gamma"] == pytest.approx([0.5 ** 2.5, 0.5 ** 4, 0.5 ** 4])
    again = engine.render(shotlib.from_container(side["shot"]), manager)
    assert np.array_equal(again.frames, r.frames)  # the sidecar reproduces the render bit for bit


def _direct(pipe, shape, gamma, seed, times, frames, size, steps, guidance, prompt):
    """The same render as a plain diffusers call: noise by an AR(1) written out here, given as `latents=`."""
    gen = torch.Generator("cpu").manual_seed(seed)
    z = torch.randn(shape, generator=gen)
    lat = z.clone()
    for f in range(1, shape[2]):
        rho = gamma ** (times[f] - times[f - 1])
        lat[:, :, f] = rho * lat[:, :, f - 1] + (1 - rho ** 2) ** 0.5 * z[:, :, f]
    if gamma == 0:
        lat = z
    with torch.inference_mode():
        out = pipe(prompt=prompt, negative_prompt=None, num_frames=frames, height=size, width=size,
                   num_inference_steps=steps, guidance_scale=guidance, latents=lat, generator=gen,
                   output_type="np").frames
    return (np.clip(np.asarray(out[0]), 0, 1) * 255).round().astype(np.uint8)


@pytest.mark.parametrize("model, gamma", [("tiny", 0.0), ("toyworld", 0.4), ("tiny-wan", 0.0), ("tiny-wan", 0.6)])
def test_studio_render_is_the_direct_diffusers_call(model, gamma, manager):
    """Bit for bit: the engine adds nothing to a plain shot but the noise prior. On the UNet families this pins the
    layout the engine used before the family adapters: (1, C, F, H/8, W/8) latents from the UNet's channels."""
    s = shotlib.from_container({"model": model, "prompt": "a red circle on grass", "steps": 3, "seed": 5,
                                "noise_prior": {"gamma": gamma}})
    r = engine.render(s, manager)
    pipe = manager.get(r.preset)
    f, size = r.shot.frames, r.shot.width
    if model == "tiny-wan":
        shape = (1, pipe.transformer.config.in_channels, (f - 1) // 4 + 1, size // 8, size // 8)
        times = [0.0] + [4 * k - 1.5 for k in range(1, shape[2])]
    else:
        shape = (1, pipe.unet.config.in_channels, f, size // pipe.vae_scale_factor, size // pipe.vae_scale_factor)
        times = list(range(f))
    assert r.info["latent_shape"] == list(shape)
    direct = _direct(pipe, shape, gamma, 5, times, f, size, 3, r.shot.guidance_scale, s.prompt)
    assert np.array_equal(r.frames, direct)


def test_the_model_gets_the_latent_prior(manager):
    """The transformer's input at the first step is the engine's latent noise (so its statistics, tested below,
    are what the model sees)."""
    s = _shot(frames=17, width=64, height=64, steps=2, noise_prior={"gamma": 0.7}, seed=3)
    pipe = manager.get(load_model_preset("tiny-wan"))
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda m, args, kw: seen.append(kw["hidden_states"].clone()), with_kwargs=True)
    try:
        engine.render(s, manager)
    finally:
        handle.remove()
    times = families.latent_times(17, 4)
    expected = noise_prior.sample((1, 16, 5, 8, 8), 0.7, torch.Generator().manual_seed(3), times=times)
    assert torch.equal(seen[0], expected) and torch.equal(seen[1], expected)  # cond, then uncond: two calls


def test_latent_noise_correlates_as_gamma_at_the_latent_times():
    """Cov(latent i, latent j) = γ^|t_i − t_j|, t = 0, 2.5, 6.5, 10.5, ... (each latent at the centre of its 4 frames,
    latent 0 = frame 0): γ^2.5 between latents 0 and 1, γ⁴ after. Unit variance. Measured on 64k samples a pair."""
    gamma, frames = 0.8, 25
    times = families.latent_times(frames, 4)
    assert times == [0.0, 2.5, 6.5, 10.5, 14.5, 18.5, 22.5]
    x = noise_prior.sample((1, 16, len(times), 64, 64), gamma, torch.Generator().manual_seed(0), times=times)
    v = x[0].permute(1, 0, 2, 3).reshape(len(times), -1).double()  # (F', C·h·w)
    corr = torch.corrcoef(v).numpy()
    expected = noise_prior.covariance(len(times), gamma, times)
    assert np.abs(corr - expected).max() < 0.02, np.round(corr - expected, 3)
    assert np.allclose(v.var(1).numpy(), 1.0, atol=0.03)
    assert corr[0, 1] == pytest.approx(gamma ** 2.5, abs=0.02) and corr[1, 2] == pytest.approx(gamma ** 4, abs=0.02)
    # one latent per frame (the UNet families) is the plain prior, bit for bit
    a = noise_prior.sample((1, 4, 8, 8, 8), gamma, torch.Generator().manual_seed(1))
    b = noise_prior.sample((1, 4, 8, 8, 8), gamma, torch.Generator().manual_seed(1), times=list(range(8)))
    assert torch.equal(a, b)
    # and γ = 0 stays one plain draw
    c = noise_prior.sample((1, 16, 3, 4, 4), 0.0, torch.Generator().manual_seed(2), times=times[:3])
    assert torch.equal(c, torch.randn((1, 16, 3, 4, 4), generator=torch.Generator().manual_seed(2)))


def test_family_adapters_answer_for_their_pipelines(manager):
    """What the engine and (next) the controls ask the family instead of assuming a UNet."""
    from studio.controls.base import Context

    wan_pipe = manager.get(load_model_preset("tiny-wan"))
    unet_pipe = manager.get(load_model_preset("tiny"))
    wan, unet = families.of(wan_pipe), families.of(unet_pipe)
    assert (wan.name, unet.name) == ("wan", "animatediff") and families.denoiser(wan_pipe) is wan_pipe.transformer
    assert (wan.cfg_batched, unet.cfg_batched) == (False, True)
    assert (wan.scheduler_kind(wan_pipe), unet.scheduler_kind(unet_pipe)) == ("flow", "diffusion")
    assert wan.cross_attention_names(wan_pipe.transformer) == ["blocks.0.attn2.processor", "blocks.1.attn2.processor"]
    assert wan.self_attention_names(wan_pipe.transformer) == ["blocks.0.attn1.processor", "blocks.1.attn1.processor"]
    assert wan.temporal_attention_names(wan_pipe.transformer) == []  # attn1 is joint over frames and pixels
    assert unet.temporal_attention_names(unet_pipe.unet) and unet.cross_attention_names(unet_pipe.unet)
    assert (wan.spatial_factor(wan_pipe), wan.temporal_factor(wan_pipe), unet.temporal_factor(unet_pipe)) == (8, 4, 1)
    assert wan.latent_dtype(wan_pipe) == torch.float32 and wan.text_length(wan_pipe) == 512
    assert wan.latent_shape(wan_pipe, 81, 480, 832) == (1, 16, 21, 60, 104)
    assert unet.latent_shape(unet_pipe, 8, 64, 64) == (1, 4, 8, 8, 8)
    assert "callback_on_step_end" in wan.call_kwargs(wan_pipe, None, lambda: None)
    assert "callback" in families.get("zeroscope").call_kwargs(unet_pipe, None, lambda: None)  # the legacy one
    with pytest.raises(TypeError, match="no model family runs"):
        families.of(object())
    ctx = Context(frames=9, latent_h=4, latent_w=4, steps=2, do_cfg=True, generator=torch.Generator())
    assert ctx.cond_slice(6) == slice(3, 6)  # [uncond, cond] in one batch
    ctx.cfg_batched = False
    assert ctx.cond_slice(3) == slice(0, 3)  # a call of its own


# --- rules and refusals -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("model, change, field, nearest", [
    ("wan2.1-t2v-1.3b", {"frames": 80}, "frames", "77 or 81"),
    ("wan2.1-t2v-1.3b", {"frames": 200}, "frames", "161"),
    ("wan2.1-t2v-1.3b", {"frames": 0}, "frames", "1"),
    ("wan2.1-t2v-1.3b", {"width": 840}, "width", "832 or 848"),
    ("wan2.1-t2v-14b", {"height": 2000}, "height", "1280"),
    ("wan2.2-ti2v-5b", {"height": 720}, "height", "704 or 736"),  # 48 channels, x16: sizes multiple of 32
    ("tiny", {"frames": 500}, "frames", "32"),
    ("tiny", {"width": 60}, "width", "56 or 64"),
])
def test_invalid_frames_and_sizes_name_the_nearest_valid_values(model, change, field, nearest):
    with pytest.raises(shotlib.ShotError) as e:
        engine.prepare(shotlib.from_container({"model": model, "prompt": "a cat", **change}))
    assert e.value.field == field and f"nearest valid: {nearest} (got" in str(e.value)
    assert "\n" not in str(e.value)


def test_wan_presets_rules_defaults_and_schedulers():
    for name in WAN_PRESETS:
        p = load_model_preset(name)
        s = engine.prepare(shotlib.from_container({"model": name, "prompt": "a cat"}))[0]  # defaults are valid
        assert p.family == "wan" and (p.frame_step, p.frame_offset) == (4, 1) and p.peak_memory == "not measured"
        assert (s.frames - 1) % 4 == 0 and s.width % p.size_multiple == 0 and s.height % p.size_multiple == 0
        assert s.guidance_scale == 5.0 and s.steps == 50
    assert load_model_preset("wan2.2-ti2v-5b").size_multiple == 32
    assert (load_model_preset("wan2.2-ti2v-5b").defaults.frames, load_model_preset("wan2.2-ti2v-5b").defaults.fps) == (
        121, 24)
    assert load_model_preset("wan2.1-t2v-14b").scheduler == {"flow_shift": 5.0}  # 720p (the repo ships 3.0)
    for name, shift in (("wan2.1-t2v-1.3b", 3.0), ("wan2.2-ti2v-5b", 5.0)):  # the repos' own schedulers
        cfg = wan_build.published(name)["scheduler"]
        assert (cfg["_class_name"], cfg["flow_shift"], cfg["prediction_type"], cfg["use_flow_sigmas"]) == (
            "UniPCMultistepScheduler", shift, "flow_prediction", True)


def test_a_wan_preset_whose_frame_rule_is_not_the_models_is_refused_at_load(tmp_path, manager):
    from studio.pipelines import PipelineManager

    bad = tmp_path / "bad-wan.yaml"
    bad.write_text("name: bad-wan\nfamily: wan\nbase: builtin:tiny-wan\n"
                   "defaults: {frames: 8, width: 32, height: 32, fps: 8, steps: 2, guidance_scale: 5.0}\n"
                   "size_multiple: 16\nmax_size: 128\n")  # frame_step 1: the pipeline would round frames silently
    with pytest.raises(shotlib.ShotError) as e:
        PipelineManager(device="cpu").get(load_model_preset(str(bad)))
    assert e.value.field == "model" and "frame_step: 4 and frame_offset: 1" in str(e.value)


@pytest.fixture
def image(tmp_path):
    from PIL import Image

    path = tmp_path / "ref.png"
    Image.new("RGB", (32, 32), (200, 40, 200)).save(path)
    return str(path)


@pytest.mark.parametrize("change, field, valid", [
    ({"subjects": [{"phrase": "red circle", "subject": "rex"}]}, "subjects[0].subject", "null"),
    ({"reference_control": {"temporal_attention": True}}, "reference_control.temporal_attention", "false"),
])
def test_unet_only_settings_are_refused_on_wan_naming_the_field_and_the_family(change, field, valid, image):
    data = json.loads(json.dumps(change).replace("IMAGE", image))
    with pytest.raises(shotlib.ShotError) as e:
        engine.prepare(_shot(**data))
    msg = str(e.value)
    assert e.value.field == field and "wan family" in msg and f"valid here: {valid}" in msg and "\n" not in msg
    engine.prepare(_shot(noise_prior={"gamma": 0.9}, subjects=[{"phrase": "red circle"}]))  # these are fine
    # the directing controls are ported (issue 18): boxes, references, camera, refinement pass validation
    engine.prepare(_shot(subjects=[{"phrase": "red circle", "reference": image, "boxes": {0: [0.1, 0.1, 0.5, 0.5]}}],
                         background={"reference": image}, camera={"cx": 0.3, "cy": -0.1},
                         refine={"face": {"enabled": True, "detector": "boxes"}, "tiled": {"enabled": True}}))


def test_subject_tuning_and_the_cli_refuse_wan_in_one_line(tmp_path, capsys):
    from studio import cli
    from studio.subjects import tune

    with pytest.raises(ValueError, match=r"^model: subject tuning is not available on the wan family"):
        tune.resolve(tune.TuneSettings(), load_model_preset("tiny-wan"))
    shot = tmp_path / "subject.yaml"
    shot.write_text("model: tiny-wan\nprompt: a red circle\nsubjects: [{phrase: red circle, subject: rex}]\n")
    assert cli.main(["render", str(shot), "--out", str(tmp_path / "x.mp4")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("studio: error: subjects[0].subject:") and "wan family" in err
    assert not (tmp_path / "x.mp4").exists()


# --- the real layouts -------------------------------------------------------------------------------------------


def _meta_pipeline(name):
    from diffusers import UniPCMultistepScheduler, WanPipeline

    spec = wan_build.published(name)
    parts = wan_build.on_meta(spec)
    scheduler = UniPCMultistepScheduler.from_config({k: v for k, v in spec["scheduler"].items() if k[0] != "_"})
    return WanPipeline(tokenizer=None, scheduler=scheduler, expand_timesteps=spec["model_index"]["expand_timesteps"],
                       **parts), parts


@pytest.mark.parametrize("name, billions, vae_millions, decode", [
    ("wan2.1-t2v-1.3b", 1.42, 127, True), ("wan2.1-t2v-14b", 14.29, 127, False), ("wan2.2-ti2v-5b", 5.00, 705, True)])
def test_published_layouts_on_meta_fit_their_presets(name, billions, vae_millions, decode):
    """Each Wan preset's published transformer, VAE and UMT5-xxl encoder, built on the meta device: parameter
    counts of the published models, the preset's rules are the model's, and a step and a decode at the preset's
    default size give the shapes the studio expects (no memory, no weights)."""
    pipe, parts = _meta_pipeline(name)
    count = {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()}
    assert count["transformer"] / 1e9 == pytest.approx(billions, abs=0.01)
    assert count["vae"] / 1e6 == pytest.approx(vae_millions, abs=1)
    assert count["text_encoder"] / 1e9 == pytest.approx(5.68, abs=0.01)  # UMT5-xxl's encoder
    preset, family = load_model_preset(name), families.get("wan")
    family.check_pipeline(pipe, preset)  # frames 4k+1 and the size multiple are this model's
    d = preset.defaults
    shape = family.latent_shape(pipe, d.frames, d.height, d.width)
    s = family.spatial_factor(pipe)
    assert shape == (1, parts["vae"].config.z_dim, (d.frames - 1) // 4 + 1, d.height // s, d.width // s)
    x = torch.empty(shape, device="meta")
    tokens = shape[2] * (shape[3] // 2) * (shape[4] // 2)
    t = torch.empty((1, tokens) if pipe.config.expand_timesteps else (1,), device="meta")  # 5B: per-token steps
    with torch.no_grad():
        out = parts["transformer"](x, t, torch.empty((1, 512, 4096), device="meta"), return_dict=False)[0]
        assert tuple(out.shape) == shape
        if decode:
            video = parts["vae"].decode(x).sample
            assert tuple(video.shape) == (1, 3, d.frames, d.height, d.width)


def test_local_tokenizer_is_umt5_like():
    tok = wan_build.build_tokenizer()
    ids = tok("a red zebra").input_ids
    assert ids[-1] == tok.eos_token_id == 1 and tok.pad_token_id == 0  # </s> appended, no BOS, <pad> = 0
    pieces = tok.convert_ids_to_tokens(ids)
    assert pieces[:2] == ["▁a", "▁red"] and len(pieces) > 4  # known words whole, others in several pieces
    enc = tok("a red zebra", return_offsets_mapping=True)
    assert enc["offset_mapping"][1] == (2, 5)  # offsets map pieces back to the prompt (phrase -> tokens)
    assert wan_build.tokenizer_vocab() == wan_build.tokenizer_vocab()  # deterministic


@pytest.mark.slow
def test_the_real_1_3b_layout_renders_through_the_studio(tmp_path):
    """The published Wan 2.1 1.3B transformer (30 layers, 1536 wide) and Wan 2.1 VAE at full width, random weights,
    with the UMT5-xxl encoder cut to one layer, saved and rendered through the studio's load path at 64×64, 5 frames."""
    from studio.pipelines import PipelineManager

    spec = wan_build.reduced(wan_build.published("wan2.1-t2v-1.3b"), text_layers=1)
    folder = wan_build.save_random_model(tmp_path / "model", spec, seed=0, dtype=torch.bfloat16)
    preset = tmp_path / "wan13.yaml"
    preset.write_text(f"name: wan13-random\nfamily: wan\nbase: {folder}\ndtype: float32\n"
                      "defaults: {frames: 5, width: 64, height: 64, fps: 16, steps: 2, guidance_scale: 5.0}\n"
                      "size_multiple: 16\nmax_size: 1280\nmax_frames: 161\nframe_step: 4\nframe_offset: 1\n")
    manager = PipelineManager(max_pipelines=1, device="cpu")
    r = engine.render(shotlib.from_container({"model": str(preset), "prompt": "a red circle on grass",
                                              "noise_prior": {"gamma": 0.5}}), manager)
    assert r.frames.shape == (5, 64, 64, 3) and r.info["latent_shape"] == [1, 16, 2, 8, 8]
    pipe = manager.get(r.preset)
    assert sum(p.numel() for p in pipe.transformer.parameters()) / 1e9 == pytest.approx(1.42, abs=0.01)
    assert len(families.get("wan").cross_attention_names(pipe.transformer)) == 30


# --- the page ---------------------------------------------------------------------------------------------------


def test_slider_rules_and_snapping_follow_the_model():
    from studio.ui import events as ev

    assert ev.preset_rules_event("wan2.1-t2v-1.3b") == {"frames": {"minimum": 1, "maximum": 161, "step": 4},
                                                         "size": {"minimum": 16, "maximum": 1280, "step": 16}}
    assert ev.preset_rules_event("wan2.2-ti2v-5b")["size"] == {"minimum": 32, "maximum": 1280, "step": 32}
    assert ev.preset_rules_event("toyworld")["frames"] == {"minimum": 1, "maximum": 32, "step": 1}
    assert ev.snap_event("wan2.1-t2v-1.3b", frames=80, width=840, height=470) == {
        "frames": 81, "width": 848, "height": 464}  # a tie (840: 832 | 848) goes to the larger
    assert ev.snap_event("wan2.1-t2v-1.3b", frames=78.0, width=2000) == {"frames": 77, "width": 1280, "height": None}
    assert ev.snap_event("wan2.2-ti2v-5b", width=700) == {"frames": None, "width": 704, "height": None}
    assert ev.snap_event("toyworld", frames=10, width=36) == {"frames": 10, "width": 40, "height": None}


def test_gamma_preview_shows_the_latent_frames_the_model_gets():
    from studio.ui import events as ev

    heat_wan, strip_wan = ev.gamma_preview_event(0.8, model="wan2.1-t2v-1.3b", frames=17)
    assert strip_wan.shape == (64, 5 * 64 + 4 * 4, 3)  # 17 frames = 5 latent frames, 32 px each shown twice as large
    _, strip_unet = ev.gamma_preview_event(0.8, model="toyworld", frames=17)
    assert strip_unet.shape == (64, 17 * 64 + 16 * 4, 3)  # one noise frame per video frame
    heat_plain, _ = ev.gamma_preview_event(0.8, frames=5)  # 5 frames one apart: stronger neighbours than latents
    assert heat_plain.shape == heat_wan.shape and heat_plain.mean() > heat_wan.mean()
    caption = ev.gamma_caption_event(0.8, model="wan2.1-t2v-1.3b", frames=17)
    assert "17 frames = 5 latent frames" in caption and "γ^2.5 = 0.57" in caption and "γ^4 = 0.41" in caption
    assert ev.gamma_caption_event(0.8, model="toyworld", frames=8).startswith("8 frames, one noise frame each")
    _, default = ev.gamma_preview_event(0.5)  # the public endpoint's old call: 8 frames
    assert default.shape == (64, 8 * 64 + 7 * 4, 3)


def test_the_page_gives_the_sliders_the_models_grid(manager):
    import gradio as gr

    from studio.ui.app import Page

    page = Page(manager)
    page.build()
    assert all(isinstance(c, gr.Slider) for c in (page.frames, page.width, page.height))
    assert page.width.step == 8 and page.frames.step == 1  # the opening shot's toy model
    rules = page.slider_rules("wan2.2-ti2v-5b")
    assert rules[page.frames]["step"] == 4 and rules[page.width] == {"minimum": 32, "step": 32,
                                                                     "__type__": "update"}
    snapped = page.snap("wan2.2-ti2v-5b", frames=81, width=700, height=704)
    assert snapped[page.width] == 704 and snapped[page.frames] == snapped[page.height] == gr.skip()  # valid: kept


# --- a hook for training on Wan: attn2's probabilities ----------------------------------------------------------


def test_cross_attention_capture_keeps_probabilities_and_the_plain_output_with_gradients():
    """For an attn2 attention loss (STCA) when training a Wan model: the captured probabilities (B, N, 512) sum to one
    over the text tokens, the layer's output is the stock processor's, gradients reach the projections, and the
    original processors come back."""
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    from studio.controls.wan_attention import capture_cross_attention

    tr = wan_build.build_pipeline().transformer
    attn = tr.blocks[0].attn2
    x, text = torch.randn(1, 12, 24), torch.randn(1, 512, 24)
    stock = WanAttnProcessor()(attn, x, text)
    store: list = []
    orig = capture_cross_attention(tr, store)
    try:
        out = attn(x, text)
        assert torch.allclose(out, stock, atol=1e-5)
        probs = store[0]
        assert probs.shape == (1, 12, 512) and torch.allclose(probs.sum(-1), torch.ones(1, 12), atol=1e-5)
        probs[:, :, 3].mean().backward()
        assert attn.to_q.weight.grad is not None and attn.to_k.weight.grad.abs().sum() > 0
        store.clear()
        with torch.no_grad():
            tr(torch.randn(1, 16, 2, 4, 4), torch.tensor([500.0]), torch.randn(1, 512, 32))
        assert len(store) == 2  # one per attn2 layer
    finally:
        tr.set_attn_processor(dict(orig))
    assert all(type(p).__name__ == "WanAttnProcessor" for p in tr.attn_processors.values())


def test_the_batch_command_takes_the_step_cache_too():
    from studio import cli

    args = cli.build_parser().parse_args(["batch", "a.yaml", "--out", "d", "--step-cache", "sea:threshold=0.5"])
    assert args.step_cache == "sea:threshold=0.5"
