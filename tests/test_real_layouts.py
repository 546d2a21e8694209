"""Every feature on the real presets' layouts (SD 1.5 + AnimateDiff v1-5-3, Zeroscope v2 576w): random weights of
their published configs (studio/random_weights.py), at 1/8 width in the default suite and at full width in the
`slow` step, at a reduced size (8 frames, 64 px high, 3 steps) on one CPU thread.

These layouts have what the toy models lack: 8 heads (SD 1.5) or 5/10/20 heads (the UNet3D), two transformer
layers per block, four resolutions, a factor-8 VAE, CLIP's BPE tokenizer (the phrase "shiba inu" is four pieces).
Checks: each control (boxes, camera, references, noise prior) changes the render and a plain render afterwards is
the same bit for bit; controls that are present but off give the plain render; both refinements run; both tuning
methods train, render, and their files load into plain diffusers (the LoRA with load_lora_weights(folder), the ID
tokens with one load_textual_inversion(file, token=...) call) and render there exactly as in the studio.
"""

import dataclasses
import gc
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from studio import engine, random_weights, shot as shotlib
from studio.pipelines import PipelineManager
from studio.presets import ShotDefaults, load_model_preset, with_random_weights

SIZES = {"animatediff-sd15": (64, 64), "zeroscope": (96, 64)}  # (width, height); Zeroscope is wide (576x320)
PROMPT = "a shiba inu running on a beach"
PHRASE = "shiba inu"  # CLIP BPE: shi + ba + in + u
BOXES = {0: [0.05, 0.25, 0.45, 0.75], 7: [0.55, 0.25, 0.95, 0.75]}
CASES = [pytest.param((layout, 0.125), id=f"{layout}-w0.125") for layout in SIZES] + [
    pytest.param((layout, 1.0), id=f"{layout}-full", marks=[pytest.mark.slow, pytest.mark.timeout(3600)])
    for layout in SIZES]


class Layout:
    """One layout at one width: its preset (reduced defaults), a pipeline manager, reference images, photos."""

    def __init__(self, layout: str, width: float, folder):
        w, h = SIZES[layout]
        preset = with_random_weights(load_model_preset(layout), width)
        self.preset = dataclasses.replace(preset, defaults=ShotDefaults(frames=8, width=w, height=h, fps=8, steps=3,
                                                                        guidance_scale=7.5))
        self.name, self.width, self.folder = layout, width, folder
        self.manager = PipelineManager(max_pipelines=1, device="cpu")
        rng = np.random.default_rng(0)
        self.subject_ref = folder / "subject.png"
        Image.fromarray(np.full((64, 64, 3), (150, 50, 215), np.uint8)).save(self.subject_ref)
        self.background_ref = folder / "background.png"
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(self.background_ref)
        self.photos, self.masks = [], []
        for i in range(2):
            img = rng.integers(0, 60, (64, 64, 3), dtype=np.uint8)
            img[16:48, 12 + 4 * i:40 + 4 * i] = (230, 140, 40)
            m = np.zeros((64, 64), bool)
            m[16:48, 12 + 4 * i:40 + 4 * i] = True
            self.photos.append(img)
            self.masks.append(m)
        self.clips = folder / "clips"  # one preservation clip of the user's (the LoRA's video loss on it)
        self.clips.mkdir()
        noise = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        frames = [Image.fromarray(np.roll(noise, 4 * f, 1)) for f in range(8)]
        frames[0].save(self.clips / "walk.gif", save_all=True, append_images=frames[1:], duration=125)
        (self.clips / "walk.txt").write_text("a dog walking")

    @property
    def full(self) -> bool:
        """Full width: the slow step, where each render costs seconds to minutes; fewer renders check the same."""
        return self.width == 1.0

    def shot(self, **fields) -> shotlib.Shot:
        return shotlib.from_container({"model": self.name, "prompt": PROMPT, "seed": 1, **fields})

    def render(self, shot, manager=None):
        return engine.render(shot, manager or self.manager, preset=self.preset)


@pytest.fixture(scope="module", params=CASES)
def lay(request, tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: a shared 2-core machine makes two threads wait on each other
    layout, width = request.param
    obj = Layout(layout, width, tmp_path_factory.mktemp(f"{layout}-{width}"))
    yield obj
    obj.manager.clear()
    torch.set_num_threads(threads)
    if width == 1.0:  # a full-width folder is gigabytes: do not leave it in the session's studio home
        shutil.rmtree(random_weights.build_folder(layout, width), ignore_errors=True)
    gc.collect()


@pytest.fixture(scope="module")
def plain(lay):
    return lay.render(lay.shot())


def _differs(a, b, by: float = 0.2) -> bool:
    return a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).mean() > by


def test_the_render_runs_on_the_real_layout(lay, plain):
    pipe = lay.manager.get(lay.preset)
    unet = pipe.unet
    assert plain.frames.shape == (8, SIZES[lay.name][1], SIZES[lay.name][0], 3)
    assert plain.info["pipeline"] == ("AnimateDiffPipeline" if lay.name == "animatediff-sd15"
                                      else "TextToVideoSDPipeline")
    assert pipe.vae_scale_factor == 8 and len(unet.config.block_out_channels) == 4
    assert unet.config.block_out_channels[0] == int(320 * lay.width)
    assert len(pipe.tokenizer) == 49408 and pipe.tokenizer.tokenize(PHRASE) == ["shi", "ba</w>", "in", "u</w>"]
    side = plain.sidecar()["model"]
    assert side["random_weights"] is True and side["width_factor"] == lay.width


def test_controls_present_but_off_give_the_plain_render_bit_for_bit(lay, plain):
    off = lay.shot(subjects=[{"phrase": PHRASE, "reference": str(lay.subject_ref), "reference_strength": 0.0}],
                   background={"reference": str(lay.background_ref), "strength": 0.0},
                   camera={"cx": 0.0, "cy": 0.0}, noise_prior={"gamma": 0.0},
                   refine={"face": {"enabled": False}, "tiled": {"enabled": False}})
    assert np.array_equal(lay.render(off).frames, plain.frames)


def test_every_control_changes_the_render_and_the_pipeline_stays_plain(lay, plain):
    from studio.controls.boxes import assign_phrases

    tok = lay.manager.get(lay.preset).tokenizer
    assert assign_phrases(tok, PROMPT, {0: PHRASE}) == {0: [2, 3, 4, 5]}  # BOS a shi ba in u ...
    cases = {
        "boxes": dict(subjects=[{"phrase": PHRASE, "boxes": BOXES}]),
        "camera": dict(camera={"cx": 0.5}),
        "reference": dict(subjects=[{"phrase": PHRASE, "reference": str(lay.subject_ref)}],
                          background={"reference": str(lay.background_ref)}),
        "noise prior": dict(noise_prior={"gamma": 0.6}),
    }
    cases["all"] = dict(subjects=[{"phrase": PHRASE, "boxes": BOXES, "reference": str(lay.subject_ref)}],
                        background={"reference": str(lay.background_ref)}, camera={"cx": 0.5},
                        noise_prior={"gamma": 0.6})
    if lay.full:  # each control alone at 1/8 width; here all of them together
        cases = {"all": cases["all"]}
    for name, fields in cases.items():
        r = lay.render(lay.shot(**fields))
        assert _differs(r.frames, plain.frames), name
    assert r.info["controls"] == ["boxes", "camera", "reference"]
    assert np.array_equal(lay.render(lay.shot()).frames, plain.frames)  # every hook and processor restored


def test_temporal_reference_and_pooled_keys_on_four_resolutions(lay, plain):
    """Reference tokens as an extra frame through the motion modules / temp_attentions, and a key budget that pools
    the 8x8 and 16x16 layers: on four attention resolutions, down to 1x1."""
    r = lay.render(lay.shot(subjects=[{"phrase": PHRASE, "reference": str(lay.subject_ref), "boxes": BOXES}],
                            reference_control={"temporal_attention": True, "token_ratio": 4}))
    assert _differs(r.frames, plain.frames)


def test_both_refinements_run(lay, plain):
    w, h = SIZES[lay.name]
    if lay.full:  # both passes in one render; their pixel-level checks run at 1/8 width
        both = lay.render(lay.shot(subjects=[{"phrase": PHRASE, "boxes": BOXES}],
                                   refine={"face": {"enabled": True, "detector": "boxes", "crop_factor": 1.0},
                                           "tiled": {"enabled": True, "scale": 2, "tile": 128, "overlap": 16}}))
        up = np.asarray([np.asarray(Image.fromarray(f).resize((2 * w, 2 * h), Image.BICUBIC)) for f in plain.frames])
        assert both.frames.shape == (8, 2 * h, 2 * w, 3) and both.info["refine"]["face"]["tracks"] == 1
        assert np.abs(both.frames.astype(int) - up).mean() > 0.5
        return
    face = lay.render(lay.shot(subjects=[{"phrase": PHRASE, "boxes": BOXES}],
                               refine={"face": {"enabled": True, "detector": "boxes", "crop_factor": 1.0}}))
    boxed = lay.render(lay.shot(subjects=[{"phrase": PHRASE, "boxes": BOXES}]))
    info = face.info["refine"]["face"]
    assert info["tracks"] == 1 and _differs(face.frames, boxed.frames, 0.05)
    x0, y0, x1, y1 = info["crop_boxes"][0]
    outside = np.ones((h, w), bool)
    outside[y0:y1, x0:x1] = False
    assert outside.any() and np.array_equal(face.frames[:, outside], boxed.frames[:, outside])
    tiled = lay.render(lay.shot(refine={"tiled": {"enabled": True, "scale": 2, "tile": 64, "overlap": 16}}))
    assert tiled.frames.shape == (8, 2 * h, 2 * w, 3) and tiled.info["refine"]["tiled"]["tiles"] >= 4
    up = np.asarray([np.asarray(Image.fromarray(f).resize((2 * w, 2 * h), Image.BICUBIC)) for f in plain.frames])
    assert np.abs(tiled.frames.astype(int) - up).mean() > 0.5  # re-denoised, not only upscaled


# --- tuned subjects -------------------------------------------------------------------------------------------


def _plain_diffusers(lay):
    """The layout's pipeline as plain diffusers loads it from the built folder (no studio code on the path but
    the preset's scheduler)."""
    import diffusers

    from studio.pipelines import build_scheduler

    folder = random_weights.build_folder(lay.name, lay.width)
    if lay.name == "animatediff-sd15":
        adapter = diffusers.MotionAdapter.from_pretrained(str(folder / "motion_adapter"))
        pipe = diffusers.AnimateDiffPipeline.from_pretrained(str(folder / "base"), motion_adapter=adapter)
    else:
        pipe = diffusers.TextToVideoSDPipeline.from_pretrained(str(folder / "base"))
    pipe.scheduler = build_scheduler(pipe.scheduler, lay.preset)
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.unet, pipe.text_encoder, pipe.vae):  # as the studio's: torch's CPU linear takes another
        module.requires_grad_(False)  # kernel for weights that require grad (the last bits differ; pipelines.py)
    return pipe


def _diffusers_render(pipe, prompt: str, lay) -> np.ndarray:
    """What the studio's engine does for a plain shot, in plain diffusers: the seed's noise (γ = 0) as latents."""
    from studio.controls import noise_prior

    w, h = SIZES[lay.name]
    g = torch.Generator("cpu").manual_seed(1)
    latents = noise_prior.sample((1, pipe.unet.config.in_channels, 8, h // 8, w // 8), 0.0, g)
    with torch.inference_mode():
        out = pipe(prompt=prompt, num_frames=8, height=h, width=w, num_inference_steps=3, guidance_scale=7.5,
                   latents=latents, generator=g, output_type="np").frames
    video = np.asarray(out[0])
    return (np.clip(video, 0.0, 1.0) * 255.0).round().astype(np.uint8)


@pytest.fixture(scope="module")
def library(lay):
    """The studio's library (renders read it), with subject names of this layout and width; removed after."""
    from studio.subjects.library import SubjectLibrary

    lay.manager.clear()  # training loads a pipeline of its own: at full width, one at a time
    gc.collect()
    lib = SubjectLibrary()
    lib.prefix = f"{lay.name[:2]}{round(lay.width * 1000)}-"
    yield lib
    for name in lib.names():
        if name.startswith(lib.prefix):
            lib.delete(name)


def _load_lora_in_diffusers(pipe, subject, lay) -> None:
    """The subject's LoRA into a plain diffusers pipeline, as README says."""
    if lay.name != "zeroscope":
        pipe.load_lora_weights(str(subject.path))  # the subject's folder
        return
    # diffusers 0.42 has no LoRA loader for UNet3DConditionModel (README): the file is diffusers' format, and
    # diffusers' converter and peft load it, as the studio does.
    with pytest.raises(AttributeError, match="load_lora_adapter"):
        pipe.load_lora_weights(str(subject.path))
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    from studio.subjects.tune import LORA_TARGETS

    state = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v
                                             for k, v in load_file(str(subject.lora_path)).items()})
    inject_adapter_in_model(LoraConfig(r=subject.lora_rank, lora_alpha=subject.lora_rank,
                                       target_modules=LORA_TARGETS), pipe.unet)
    assert not set_peft_model_state_dict(pipe.unet, state).unexpected_keys


def _tokens_prompt(pipe, subject, key: str) -> str:
    """The subject's token file into a plain diffusers pipeline in one call; the prompt with its one token."""
    n = len(subject.tokens)
    pipe.load_textual_inversion(str(subject.embeds_path), token=key)  # one call: all its vectors
    prompt = f"a {key} shiba inu running on a beach"
    expanded = " ".join([key] + [f"{key}_{i}" for i in range(1, n)])
    assert pipe.maybe_convert_prompt(prompt, pipe.tokenizer) == f"a {expanded} shiba inu running on a beach"
    return prompt


def test_lora_subject_trains_renders_and_loads_into_plain_diffusers(lay, plain, library):
    if lay.full:
        pytest.skip("at full width both methods train in one subject (test_both_methods_...)")
    from studio.subjects import tune

    rex = library.prefix + "rex"
    subject, result = tune.add_subject(
        rex, lay.photos, lay.masks, lay.preset,
        tune.TuneSettings(method="lora", class_word="dog", trigger="sks", steps=2, rank=4,
                          preservation=str(lay.clips)),
        library=library)
    assert subject.methods == ("lora",) and np.isfinite(result.losses).all() and len(result.losses) == 2
    shot = lay.shot(subjects=[{"phrase": PHRASE, "subject": rex}])
    m = PipelineManager(1, "cpu")
    r = engine.render(shot, m, preset=lay.preset)
    assert r.info["prompt"] == "a sks shiba inu running on a beach"
    assert _differs(r.frames, lay.render(lay.shot(prompt=r.info["prompt"]), m).frames, 0.01)  # the LoRA acts
    assert np.array_equal(engine.render(lay.shot(), m, preset=lay.preset).frames, plain.frames)  # then off again
    m.clear()
    pipe = _plain_diffusers(lay)
    _load_lora_in_diffusers(pipe, subject, lay)
    assert np.array_equal(_diffusers_render(pipe, r.info["prompt"], lay), r.frames)


def test_id_tokens_train_render_and_load_in_one_diffusers_call(lay, plain, library):
    if lay.full:
        pytest.skip("at full width both methods train in one subject (test_both_methods_...)")
    from studio.subjects import tune

    pip = library.prefix + "pip"
    subject, result = tune.add_subject(pip, lay.photos, lay.masks, lay.preset,
                                       tune.TuneSettings(method="tokens", class_word="dog", steps=2, n_tokens=4),
                                       library=library)
    tokens = [f"<{pip}-{i}>" for i in range(1, 5)]
    assert list(subject.tokens) == tokens
    m = PipelineManager(1, "cpu")
    r = engine.render(lay.shot(subjects=[{"phrase": PHRASE, "subject": pip}]), m, preset=lay.preset)
    assert r.info["prompt"] == f"a {' '.join(tokens)} shiba inu running on a beach"
    assert _differs(r.frames, plain.frames, 0.01)
    m.clear()
    pipe = _plain_diffusers(lay)
    assert np.array_equal(_diffusers_render(pipe, _tokens_prompt(pipe, subject, "<pip>"), lay), r.frames)


def test_both_methods_at_full_width_render_and_load_into_plain_diffusers(lay, library):
    """At full width (the slow step) one subject with both methods, to load the networks fewer times: it trains,
    renders, and loads into plain diffusers (the LoRA from the folder, the tokens in one call), rendering the same."""
    if not lay.full:
        pytest.skip("at 1/8 width each method has a test of its own")
    from studio.subjects import tune

    both = library.prefix + "both"
    subject, result = tune.add_subject(
        both, lay.photos, lay.masks, lay.preset,
        tune.TuneSettings(method="both", class_word="dog", trigger="sks", steps=2, rank=4, n_tokens=2,
                          preservation=str(lay.clips)),
        library=library)
    assert subject.methods == ("lora", "tokens") and np.isfinite(result.losses).all()
    m = PipelineManager(1, "cpu")
    r = engine.render(lay.shot(subjects=[{"phrase": PHRASE, "subject": both}]), m, preset=lay.preset)
    assert r.info["prompt"] == f"a <{both}-1> <{both}-2> sks shiba inu running on a beach"
    m.clear()
    gc.collect()
    pipe = _plain_diffusers(lay)
    _load_lora_in_diffusers(pipe, subject, lay)
    prompt = _tokens_prompt(pipe, subject, "<both>").replace("<both> ", "<both> sks ")
    assert np.array_equal(_diffusers_render(pipe, prompt, lay), r.frames)
