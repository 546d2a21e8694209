"""Subject tuning and trained subjects in shots, on the tiny random-weight model (plumbing; the semantic check on
the toy-world model is in test_subject_semantic.py)."""

import threading

import numpy as np
import pytest
import torch

from conftest import red_photos, write_tiny_zeroscope
from studio import engine, shot as shotlib
from studio.pipelines import PipelineManager, load_pipeline
from studio.presets import load_model_preset
from studio.subjects import apply, losses, tune
from studio.subjects.library import SubjectLibrary


@pytest.fixture(scope="module")
def library():
    """The studio's default library: under the test session's own studio home (conftest)."""
    return SubjectLibrary()


@pytest.fixture(scope="module")
def trained(library):
    """One subject trained with both methods on the tiny model (a few steps)."""
    photos, masks = red_photos()
    steps = []
    subject, result = tune.add_subject("rex", photos, masks, "tiny",
                                       tune.TuneSettings(method="both", class_word="dog", steps=4, n_tokens=2),
                                       library=library, progress=lambda i, n, loss, left: steps.append((i, n, loss)))
    return subject, result, steps


def _shot(**kw):
    base = {"model": "tiny", "prompt": "a dog on grass", "seed": 3, "frames": 8, "width": 64, "height": 64,
            "steps": 3}
    base.update(kw)
    return shotlib.from_container(base)


def test_files_hold_spatial_lora_and_token_vectors(trained, library):
    subject, result, steps = trained
    assert subject.methods == ("lora", "tokens") and subject.base_model == "tiny"
    assert subject.tokens == ("<rex-1>", "<rex-2>") and subject.trigger == "<rex-1> <rex-2> sks"
    lora = library.load_lora("rex")
    assert lora and all(k.startswith("unet.") for k in lora)
    assert not any("motion_modules" in k for k in lora)
    downs = {k: v for k, v in lora.items() if k.endswith("lora.down.weight")}
    assert downs and all(v.shape[0] == tune.DEFAULTS["tiny"]["rank"] for v in downs.values())
    assert any(".attn1." in k for k in lora) and any(".attn2." in k for k in lora)
    embeds = library.load_embeds("rex")
    pipe = load_pipeline(load_model_preset("tiny"), "cpu")
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    assert list(embeds) == ["<rex-1>", "<rex-2>"] and all(v.shape == (width,) for v in embeds.values())
    assert [s[0] for s in steps] == [1, 2, 3, 4] and all(np.isfinite(s[2]) for s in steps)


def test_training_leaves_motion_modules_and_base_weights_bitwise_alone():
    preset = load_model_preset("tiny")
    pipe = load_pipeline(preset, "cpu")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    photos, masks = red_photos()
    tune.train(pipe, preset, photos, masks, "bob", tune.TuneSettings(class_word="dog", steps=3))
    after = pipe.unet.state_dict()
    motion = [k for k in before if "motion_modules" in k]
    assert motion and all(torch.equal(before[k], after[k]) for k in motion)
    # Spatial weights live on as peft's base_layer: unchanged too.
    for k, v in before.items():
        peft_key = k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(v, after[k] if k in after else after[peft_key]), k


def test_subject_in_a_shot_changes_the_render_the_same_way_in_a_fresh_pipeline(trained):
    m1, m2 = PipelineManager(1, "cpu"), PipelineManager(1, "cpu")
    plain = engine.render(_shot(), m1).frames
    with_rex = _shot(subjects=[{"phrase": "dog", "subject": "rex"}])
    a = engine.render(with_rex, m1)
    b = engine.render(with_rex, m2)
    assert a.info["prompt"] == "a <rex-1> <rex-2> sks dog on grass" and a.info["subjects"] == ["rex"]
    assert np.array_equal(a.frames, b.frames)
    assert np.abs(a.frames.astype(int) - plain).mean() > 0.5
    # The same pipeline renders the plain shot exactly as before: the adapter is switched off, not left on.
    assert np.array_equal(engine.render(_shot(), m1).frames, plain)
    assert a.sidecar()["shot"]["subjects"][0]["subject"] == "rex"
    assert a.sidecar()["shot"]["prompt"] == "a dog on grass"  # the sidecar keeps the user's shot


def test_a_subject_saved_by_an_earlier_studio_renders_the_same(trained, library):
    # format_version 1 kept one key per token in learned_embeds.safetensors; such subjects keep working.
    import shutil

    from test_subject_library import as_format_1

    shutil.copytree(library.get("rex").path, library.root / "rex-old")
    as_format_1(library.root / "rex-old")
    m = PipelineManager(1, "cpu")
    new = engine.render(_shot(subjects=[{"phrase": "dog", "subject": "rex"}]), m)
    old = engine.render(_shot(subjects=[{"phrase": "dog", "subject": "rex-old"}]), m)
    assert library.get("rex-old").metadata["format_version"] == 1
    assert np.array_equal(old.frames, new.frames)
    library.delete("rex-old")


class _SafeOpenSpy:
    """safetensors.safe_open, counting the tensors read through it (reading a header only is free)."""

    def __init__(self, real, reads):
        self.real, self.reads = real, reads

    def __call__(self, *args, **kwargs):
        spy = self

        class Handle:
            def __enter__(self):
                self.f = spy.real(*args, **kwargs).__enter__()
                return self

            def __exit__(self, *exc):
                return self.f.__exit__(*exc)

            def __getattr__(self, name):
                attr = getattr(self.f, name)
                if name in ("get_tensor", "get_slice"):
                    def counted(*a, **k):
                        spy.reads.append((name, a))
                        return attr(*a, **k)
                    return counted
                return attr

        return Handle()


def test_second_render_loads_no_weights(trained, monkeypatch):
    import safetensors
    import safetensors.torch as st

    calls, reads = [], []
    real = SubjectLibrary.load_lora
    monkeypatch.setattr(SubjectLibrary, "load_lora", lambda self, name: calls.append(name) or real(self, name))
    for fn in ("load_file", "load"):  # every way to read weights from disk: a reload per render would show here
        orig = getattr(st, fn)
        monkeypatch.setattr(st, fn, lambda *a, _orig=orig, _fn=fn, **k: reads.append((_fn, a[:1])) or _orig(*a, **k))
    monkeypatch.setattr(safetensors, "safe_open", _SafeOpenSpy(safetensors.safe_open, reads))
    monkeypatch.setattr(st, "safe_open", _SafeOpenSpy(st.safe_open, reads))
    m = PipelineManager(1, "cpu")
    shot = _shot(subjects=[{"phrase": "dog", "subject": "rex"}])
    first = engine.render(shot, m)
    assert calls == ["rex"] and len(reads) >= 2  # the LoRA and the embeddings, read once
    reads.clear()
    second = engine.render(shot, m)
    assert reads == [] and calls == ["rex"] and np.array_equal(first.frames, second.frames)
    m.forget_subject("rex")
    engine.render(shot, m)
    assert calls == ["rex", "rex"]


def test_unknown_subject_and_wrong_base_model_are_field_errors(trained):
    with pytest.raises(shotlib.ShotError, match=r"subjects\[0\]\.subject.*nosuch"):
        engine.render(_shot(subjects=[{"phrase": "dog", "subject": "nosuch"}]), PipelineManager(1, "cpu"))
    shot = shotlib.from_container({"prompt": "a dog on grass", "subjects": [{"phrase": "dog", "subject": "rex"}]})
    with pytest.raises(shotlib.ShotError, match=r"subjects\[0\]\.subject.*trained for base model 'tiny', not "
                                                r"'toyworld'"):
        engine.render(shot, PipelineManager(1, "cpu"))


def test_corrupt_lora_file_is_a_field_error_naming_it_and_the_subject_can_be_removed(library):
    photos, masks = red_photos(1)
    lib = library
    lib.save("bad", photos, masks, {"trigger": "sks", "class_word": "dog", "base_model": "tiny"},
             lora={"unet.x.lora_A.weight": torch.zeros(2, 2)})
    (lib.get("bad").lora_path).write_bytes(b"not a safetensors file")
    with pytest.raises(shotlib.ShotError, match=r"subjects\[0\]\.subject: .*pytorch_lora_weights\.safetensors is "
                                                r"not readable safetensors"):
        engine.render(_shot(subjects=[{"phrase": "dog", "subject": "bad"}]), PipelineManager(1, "cpu"))
    assert "bad" not in lib.names() and not lib.exists("bad")
    lib.delete("bad")
    assert not (lib.root / "bad").exists()


def test_lora_that_does_not_fit_the_model_is_a_field_error(library):
    photos, masks = red_photos(1)
    library.save("misfit", photos, masks, {"trigger": "sks", "class_word": "dog", "base_model": "tiny"},
                 lora={"unet.x.lora.down.weight": torch.zeros(2, 2), "unet.x.lora.up.weight": torch.zeros(2, 2)})
    try:
        with pytest.raises(shotlib.ShotError, match=r"subjects\[0\]\.subject.*cannot load its weights"):
            engine.render(_shot(subjects=[{"phrase": "dog", "subject": "misfit"}]), PipelineManager(1, "cpu"))
    finally:
        library.delete("misfit")


def test_cancel_saves_nothing(tmp_path):
    lib = SubjectLibrary(tmp_path / "lib")
    cancel = threading.Event()
    photos, masks = red_photos()

    def progress(i, n, loss, left):
        if i == 2:
            cancel.set()

    with pytest.raises(tune.TuneCancelled):
        tune.add_subject("max", photos, masks, "tiny", tune.TuneSettings(class_word="dog", steps=10), library=lib,
                         progress=progress, cancel=cancel)
    assert lib.list() == [] and not lib.exists("max")


@pytest.mark.parametrize("field, value, match", [("method", "dreambooth", "method: must be one of"),
                                                 ("steps", 0, r"steps: must be an integer in 1\.\.100000 \(got 0\)"),
                                                 ("lr", -1.0, r"lr: must be a finite number > 0 \(got -1\.0\)"),
                                                 ("class_word", " ", "class_word"),
                                                 ("preservation", "/nonexistent", "preservation: not a folder"),
                                                 ("lora_targets", "all", "lora_targets: must be one of attention, "
                                                                         "cross"),
                                                 ("caption", "a sks dog", r"caption: must hold \{phrase\} once"),
                                                 ("caption", "{phrase} {x}", "caption: must hold")])
def test_settings_are_checked(field, value, match):
    with pytest.raises(ValueError, match=match):
        tune.resolve(tune.TuneSettings(**{field: value}), load_model_preset("tiny"))


def test_region_loss_ignores_pixels_outside_the_mask():
    eps = torch.randn(2, 4, 1, 8, 8)
    eps_hat = torch.randn(2, 4, 1, 8, 8, requires_grad=True)
    mask = torch.zeros(2, 1, 1, 8, 8, dtype=torch.bool)
    mask[..., 2:5, 3:6] = True
    losses.region_loss(eps_hat, eps, mask).backward()
    g = eps_hat.grad
    assert g[mask.expand_as(g)].abs().min() > 0 and g[~mask.expand_as(g)].abs().max() == 0


def test_stca_loss_falls_when_attention_moves_into_the_mask():
    masks = torch.zeros(1, 16, 16)
    masks[0, 4:12, 4:12] = 1
    inside = losses.latent_mask(masks, 4, 4)[0, 0, 0].flatten()  # (16,) at a 4x4 layer

    def maps(p_in):
        probs = torch.full((1, 16, 5), 0.01)
        probs[0, :, 2] = torch.where(inside, torch.tensor(p_in), torch.tensor(0.05))
        return [probs, probs.clone()]

    far = losses.stca_loss(maps(0.1), masks, [[2]], (4, 4))
    near = losses.stca_loss(maps(0.9), masks, [[2]], (4, 4))
    assert near < far


def test_stca_is_one_bce_of_the_layer_mean_against_the_bilinear_soft_mask():
    g = torch.Generator().manual_seed(0)
    masks = (torch.rand(2, 16, 24, generator=g) > 0.5).float()
    maps = [torch.rand(2, 6, 7, generator=g).softmax(-1) for _ in range(3)]  # 3 layers at a 2x3 grid
    pos = [[2, 3], [4]]
    got = losses.stca_loss(maps, masks, pos, (2, 3))
    mean = torch.stack(maps).mean(0)
    a = torch.stack([mean[0][:, [2, 3]].mean(-1), mean[1][:, 4]])  # (2, 6): raw probabilities, not renormalised
    soft = torch.nn.functional.interpolate(masks[:, None], size=(2, 3), mode="bilinear", align_corners=False)
    assert torch.allclose(got, torch.nn.functional.binary_cross_entropy(a, soft.flatten(1)))
    # An item without phrase tokens is left out of the one BCE.
    only_first = losses.stca_loss(maps, masks, [[2, 3], []], (2, 3))
    assert torch.allclose(only_first, torch.nn.functional.binary_cross_entropy(a[:1], soft.flatten(1)[:1]))


@pytest.mark.parametrize("latent, layers, want", [
    ((40, 72), {"down_blocks.0": 0, "down_blocks.1": 1, "down_blocks.2": 2, "up_blocks.1": 2, "up_blocks.2": 1,
                "up_blocks.3": 0}, ["down_blocks.2", "up_blocks.1"]),  # Zeroscope at 320x576: the 10x18 layers
    ((16, 16), {"down_blocks.0": 0, "down_blocks.1": 1, "mid_block": 2, "up_blocks.1": 1}, ["mid_block"]),  # toy
    ((8, 8), {"down_blocks.0": 0, "mid_block": 1, "up_blocks.1": 0}, ["mid_block"]),  # tiny: no 2x2 layer
    ((32, 32), {"a": 1, "b": 3}, ["a"]),  # a tie: the finer level
])
def test_stca_reads_the_layers_at_a_quarter_of_the_latent_side(latent, layers, want):
    from studio.controls.base import Context

    h, w = latent
    ctx = Context(frames=1, latent_h=h, latent_w=w, steps=1, do_cfg=False, generator=torch.Generator())
    tokens = {n: -(-h // 2**k) * -(-w // 2**k) for n, k in layers.items()}
    names, grid = losses.stca_layers(tokens, ctx)
    k = layers[want[0]]
    assert names == want and grid == (-(-h // 2**k), -(-w // 2**k))


def test_two_lora_subjects_with_boxes_act_only_in_their_boxes(trained, library):
    photos, masks = red_photos()
    if not library.exists("kit"):
        tune.add_subject("kit", photos, masks, "tiny", tune.TuneSettings(class_word="cat", steps=2, seed=1),
                         library=library)
    boxes_dog, boxes_cat = {0: [0.0, 0.0, 0.5, 1.0]}, {0: [0.5, 0.0, 1.0, 1.0]}
    shot = _shot(prompt="a dog and a cat on grass",
                 subjects=[{"phrase": "dog", "subject": "rex", "boxes": boxes_dog},
                           {"phrase": "cat", "subject": "kit", "boxes": boxes_cat}])
    m = PipelineManager(1, "cpu")
    r = engine.render(shot, m)
    assert "regional_lora" in r.info["controls"]
    # The hook itself: outside every box an image-token projection returns exactly the base layer's output.
    pipe = m.get(load_model_preset("tiny"))
    from peft.tuners.lora import LoraLayer

    mod = next(mm for n, mm in pipe.unet.named_modules()
                     if isinstance(mm, LoraLayer) and n.endswith("attn1.to_q") and "subject_rex" in mm.lora_A)
    resolved, preset = engine.prepare(shot)
    ctx = engine.compose.context(apply.plan(resolved, preset)[0].shot, 8, 8)
    ctrl = apply.RegionalLora(ctx, [("subject_rex", 0), ("subject_kit", 1)])
    x = torch.randn(8, 64, mod.in_features)  # 8 frames of an 8x8 layer
    base = mod.base_layer(x)
    out = ctrl._hook(False)(mod, (x,), base.clone())
    cols = torch.arange(64) % 8
    left, right = cols < 4, cols >= 4
    d = (out - base).abs().sum(-1)  # (8, 64)
    # rex (left box) and kit (right box): each changes only its own half; with both, every token changes.
    only_rex = apply.RegionalLora(ctx, [("subject_rex", 0)])._hook(False)(mod, (x,), base.clone())
    assert (only_rex - base).abs().sum(-1)[:, right].max() == 0
    assert (only_rex - base).abs().sum(-1)[:, left].min() > 0
    assert d.min() > 0
    # The masks are built once per layer size and batch while the boxes stay, not at every LoRA layer call.
    assert ctrl.builds == 1
    ctrl._hook(False)(mod, (x,), base.clone())
    ctx.step += 1  # a new step, the boxes unmoved
    ctrl._hook(False)(mod, (x,), base.clone())
    assert ctrl.builds == 1
    ctx.boxes[0] = ctx.boxes[0] + 0.01  # the camera moved them
    ctx.step += 1
    ctrl._hook(False)(mod, (x,), base.clone())
    assert ctrl.builds == 2


# --- prompts: each subject's words before its own occurrence of its phrase -------------------------------------


def test_two_subjects_sharing_a_class_word_take_its_occurrences_in_order(trained, library):
    from studio.controls.boxes import assign_phrases

    photos, masks = red_photos()
    if not library.exists("kit"):
        tune.add_subject("kit", photos, masks, "tiny", tune.TuneSettings(class_word="cat", steps=2, seed=1),
                         library=library)
    preset = load_model_preset("tiny")
    pipe = load_pipeline(preset, "cpu")
    rex_words, kit_words = library.get("rex").trigger, library.get("kit").trigger
    cases = [
        # (subjects, prompt after planning)
        ([("dog", "rex"), ("dog", "kit")], f"a {rex_words} dog chases a {kit_words} dog"),
        ([("dog", "kit"), ("dog", "rex")], f"a {kit_words} dog chases a {rex_words} dog"),
        ([("dog", None), ("dog", "rex")], f"a dog chases a {rex_words} dog"),  # a plain subject keeps the first
    ]
    for subjects, want in cases:
        shot = _shot(prompt="a dog chases a dog",
                     subjects=[{"phrase": p, **({"subject": n} if n else {})} for p, n in subjects])
        planned = apply.plan(shot, preset)[0].shot
        assert planned.prompt == want
        # The box control's token assignment finds each subject's words where plan put them.
        tokens = assign_phrases(pipe.tokenizer, planned.prompt, {k: s.phrase for k, s in enumerate(planned.subjects)})
        assert tokens[0][-1] < tokens[1][0]
    # A phrase inside a longer one gets an occurrence of its own; a subject without one is a field error.
    spans = apply.phrase_spans("a black dog and a dog", {0: "dog", 1: "black dog"})
    assert spans == {0: (18, 21), 1: (2, 11)}
    with pytest.raises(shotlib.ShotError, match=r"subjects\[1\]\.phrase.*already taken by subjects\[0\]"):
        apply.phrase_spans("a dog on grass", {0: "dog", 1: "dog"})


# --- base model identity ---------------------------------------------------------------------------------------


def test_two_presets_on_the_same_weights_share_subjects(trained, tmp_path):
    other = tmp_path / "tiny-again.yaml"
    other.write_text("name: tiny-again\nfamily: animatediff\nbase: builtin:tiny\n"
                     "defaults: {frames: 8, width: 64, height: 64, fps: 8, steps: 3, guidance_scale: 7.5}\n")
    subject = trained[0]
    assert subject.metadata["base_weights"] == {"base": "builtin:tiny", "motion_adapter": None, "revision": None}
    r = engine.render(_shot(model=str(other), subjects=[{"phrase": "dog", "subject": "rex"}]),
                      PipelineManager(1, "cpu"))
    assert r.info["subjects"] == ["rex"]


# --- Zeroscope's layout: UNet3DConditionModel + TextToVideoSDPipeline ------------------------------------------


@pytest.fixture(scope="module")
def zeroscope(tmp_path_factory):
    """A tiny random model of the zeroscope layout and its preset (3 steps)."""
    return str(write_tiny_zeroscope(tmp_path_factory.mktemp("zeroscope"),
                                    "{frames: 8, width: 64, height: 64, fps: 8, steps: 3, guidance_scale: 7.5}"))


def test_lora_trains_and_renders_on_the_zeroscope_layout(zeroscope, library, monkeypatch):
    from studio.controls.base import TEMPORAL_MARKERS

    chosen = []
    real = losses.stca_layers
    monkeypatch.setattr(losses, "stca_layers", lambda tokens, ctx: chosen.append((set(tokens), real(tokens, ctx)))
                        or chosen[-1][1])
    photos, masks = red_photos()
    subject, result = tune.add_subject("zed", photos, masks, zeroscope,
                                       tune.TuneSettings(method="both", class_word="dog", steps=2, n_tokens=1),
                                       library=library)
    assert subject.methods == ("lora", "tokens") and np.isfinite(result.losses).all()
    lora = library.load_lora("zed")
    assert lora and not any(m in k for k in lora for m in TEMPORAL_MARKERS)
    # STCA read spatial cross-attention only (UNet3D's temp_attentions.*.attn2 / transformer_in.*.attn2 are
    # temporal self-attention), at the level nearest a quarter of the latent side: the mid block here.
    (candidates, (names, grid)), = chosen
    assert candidates == {"down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor",
                          "mid_block.attentions.0.transformer_blocks.0.attn2.processor",
                          "up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor",
                          "up_blocks.1.attentions.1.transformer_blocks.0.attn2.processor"}
    assert names == ["mid_block.attentions.0.transformer_blocks.0.attn2.processor"] and grid == (4, 4)
    tune.add_subject("zoe", photos, masks, zeroscope,
                     tune.TuneSettings(class_word="cat", steps=1, video_weight=0.0, seed=1), library=library)
    m = PipelineManager(1, "cpu")
    base = {"model": zeroscope, "seed": 3, "steps": 3}
    plain = engine.render(shotlib.from_container({**base, "prompt": "a dog and a cat"}), m).frames
    one = engine.render(shotlib.from_container({**base, "prompt": "a dog and a cat",
                                                "subjects": [{"phrase": "dog", "subject": "zed"}]}), m)
    assert one.info["pipeline"] == "TextToVideoSDPipeline" and one.info["subjects"] == ["zed"]
    assert np.abs(one.frames.astype(int) - plain).mean() > 0.1
    two = engine.render(shotlib.from_container({
        **base, "prompt": "a dog and a cat",
        "subjects": [{"phrase": "dog", "subject": "zed", "boxes": {0: [0.0, 0.0, 0.5, 1.0]}},
                     {"phrase": "cat", "subject": "zoe", "boxes": {0: [0.5, 0.0, 1.0, 1.0]}}]}), m)
    assert "regional_lora" in two.info["controls"]
    # The adapters are off again: the plain shot renders as before on the same pipeline.
    assert np.array_equal(engine.render(shotlib.from_container({**base, "prompt": "a dog and a cat"}), m).frames,
                          plain)
    # A fresh pipeline renders the subject identically (weights loaded from the files through peft).
    again = engine.render(shotlib.from_container({**base, "prompt": "a dog and a cat",
                                                  "subjects": [{"phrase": "dog", "subject": "zed"}]}),
                          PipelineManager(1, "cpu"))
    assert np.array_equal(again.frames, one.frames)


# --- photos ----------------------------------------------------------------------------------------------------


def test_photos_on_a_non_square_model_are_whole_and_padded_with_mask_zero():
    photo = np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8)
    mask = np.ones((48, 48), bool)
    img, m, valid = tune.fit_photo(photo, mask, 96, 64)  # a square photo: the centre 64x64, 16 px each side
    assert img.shape == (64, 96, 3) and m.shape == valid.shape == (64, 96)
    assert (img[:, :16] == 0).all() and (img[:, 80:] == 0).all() and not m[:, :16].any() and not m[:, 80:].any()
    assert m[:, 16:80].all() and valid[:, 16:80].all() and not valid[:, :16].any()
    small = np.asarray(__import__("PIL.Image", fromlist=["Image"]).fromarray(img[:, 16:80]).resize((48, 48)))
    assert np.abs(small.astype(int) - photo).mean() < 40  # the whole photo, not a crop of it
    wide = np.zeros((30, 120, 3), np.uint8)  # wider than the frame: fits its width, padded above and below
    _, mw, vw = tune.fit_photo(wide, None, 96, 64)
    assert vw[32].all() and not vw[0].any() and mw.sum() == vw.sum()


def test_training_on_a_non_square_size(tmp_path, monkeypatch):
    preset_file = tmp_path / "tiny-wide.yaml"
    preset_file.write_text("name: tiny-wide\nfamily: animatediff\nbase: builtin:tiny\n"
                           "defaults: {frames: 8, width: 96, height: 64, fps: 8, steps: 3, guidance_scale: 7.5}\n")
    preset = load_model_preset(str(preset_file))
    pipe = load_pipeline(preset, "cpu")
    photos, masks = red_photos()
    seen = []
    real = losses.stca_loss
    monkeypatch.setattr(losses, "stca_loss", lambda maps, m, pos, grid, frames=1: seen.append((m.clone(), grid))
                        or real(maps, m, pos, grid, frames))
    result = tune.train(pipe, preset, photos, masks, "wide",
                        tune.TuneSettings(class_word="dog", steps=2, video_weight=0.0))
    assert np.isfinite(result.losses).all() and result.lora
    assert len(seen) == 2 and all(m.shape[-2:] == (64, 96) and grid == (4, 6) for m, grid in seen)
    assert all(m[:, :, :16].sum() == 0 and m[:, :, 80:].sum() == 0 and m.sum() > 0 for m, _ in seen)  # pad: 0


def test_tiny_photos_are_refused_naming_the_photo_before_any_weights_load(tmp_path, monkeypatch, caplog):
    import studio.pipelines as P

    monkeypatch.setattr(P, "load_pipeline", lambda *a, **k: pytest.fail("loaded weights for a refused photo"))
    lib = SubjectLibrary(tmp_path / "lib")
    photos, masks = red_photos(2)
    tiny = [photos[0], photos[1][:12, :12].copy()]
    with pytest.raises(ValueError, match=r"photos\[1\] \(b\.png\): 12x12 is too small to teach tiny a subject .*"
                                         r"at least 16 px"):
        tune.add_subject("wee", tiny, None, "tiny", tune.TuneSettings(), library=lib, photo_names=["a.png", "b.png"])
    with pytest.raises(ValueError, match=r"masks\[0\]: must match the image's"):
        tune.add_subject("wee", photos, [masks[0][:10], masks[1]], "tiny", tune.TuneSettings(), library=lib)
    # Below the model's native size (64x64) but above the floor: trains, with a warning.
    with caplog.at_level("WARNING", logger="studio.subjects.tune"):
        tune.check_photos([photos[0][:40, :40]], None, load_model_preset("tiny"))
    assert "photos[0]: 40x40 is below tiny's 64x64" in caplog.text
    assert not (tmp_path / "lib").exists()


def test_one_photo_trains_with_a_warning(tmp_path, caplog):
    photos, masks = red_photos(1)
    with caplog.at_level("WARNING", logger="studio.subjects.tune"):
        subject, _ = tune.add_subject("solo", photos, masks, "tiny",
                                      tune.TuneSettings(class_word="dog", steps=1, video_weight=0.0),
                                      library=SubjectLibrary(tmp_path))
    assert subject.photos == 1
    assert "subject solo: one photo only" in caplog.text


# --- the methods' details --------------------------------------------------------------------------------------


def test_magic_me_captions_full_image_rate_and_noise_offset(monkeypatch):
    g = torch.Generator().manual_seed(0)
    x, m = torch.zeros(3, 16, 16), torch.ones(2, 16, 16)
    prefixes = {tune.augment(x, m, g, True)[2] for _ in range(200)}
    assert prefixes == {"", "far away", "very small", "close up", "zoomed in"}
    preset = load_model_preset("tiny")
    s = tune.resolve(tune.TuneSettings(method="tokens"), preset)
    assert (s.full_image_rate, s.noise_offset) == (0.05, 0.1)
    s = tune.resolve(tune.TuneSettings(method="lora"), preset)
    assert (s.full_image_rate, s.noise_offset) == (0.0, 0.0)
    with pytest.raises(ValueError, match=r"full_image_rate: must be a number in 0\.\.1 \(got 2\)"):
        tune.resolve(tune.TuneSettings(full_image_rate=2), preset)
    # With full_image_rate 1 every photo's loss covers the whole photo, not only the subject.
    pipe = load_pipeline(preset, "cpu")
    regions = []
    real = losses.region_loss
    monkeypatch.setattr(losses, "region_loss", lambda p, t, lm: regions.append(lm) or real(p, t, lm))
    photos, masks = red_photos(1)
    for rate in (0.0, 1.0):
        tune.train(pipe if rate == 0 else load_pipeline(preset, "cpu"), preset, photos, masks, f"r{int(rate)}",
                   tune.TuneSettings(method="tokens", class_word="dog", steps=1, full_image_rate=rate, augment=False))
    assert not regions[0].all() and regions[1].all()


def test_prediction_types():
    class Sched:
        def __init__(self, kind):
            self.config = type("C", (), {"prediction_type": kind})()

    assert tune.check_prediction_type(Sched("epsilon")) == "epsilon"
    assert tune.check_prediction_type(Sched("v_prediction")) == "v_prediction"
    with pytest.raises(ValueError, match="model: its scheduler predicts 'sample'"):
        tune.check_prediction_type(Sched("sample"))
    z0, eps, a = torch.randn(2, 4, 1, 2, 2), torch.randn(2, 4, 1, 2, 2), torch.tensor(0.7)
    assert torch.equal(tune.diffusion_target("epsilon", z0, eps, a), eps)
    v = tune.diffusion_target("v_prediction", z0, eps, a)
    assert torch.allclose(v, a.sqrt() * eps - (1 - a).sqrt() * z0)


def test_training_and_loading_leave_the_global_rng_alone(trained, library):
    preset = load_model_preset("tiny")
    pipe = load_pipeline(preset, "cpu")
    photos, masks = red_photos()
    before = torch.get_rng_state()
    tune.train(pipe, preset, photos, masks, "rng", tune.TuneSettings(method="both", class_word="dog", steps=1,
                                                                     n_tokens=1))
    apply.load(load_pipeline(preset, "cpu"), [(0, library.get("rex"))])
    assert torch.equal(torch.get_rng_state(), before)


def test_the_files_load_with_plain_diffusers(trained, library):
    # What README says: the LoRA through load_lora_weights(folder), the tokens in one load_textual_inversion call
    # whose token then stands for all the subject's vectors, in order.
    pipe = load_pipeline(load_model_preset("tiny"), "cpu")
    subject = library.get("rex")
    pipe.load_lora_weights(str(subject.path), adapter_name="rex")
    pipe.load_textual_inversion(str(subject.embeds_path), token="<rex>")
    assert "rex" in pipe.unet.peft_config
    assert pipe.maybe_convert_prompt("<rex> dog", pipe.tokenizer) == "<rex> <rex>_1 dog"
    rows = pipe.text_encoder.get_input_embeddings().weight
    embeds = library.load_embeds("rex")
    for t, want in zip(["<rex>", "<rex>_1"], embeds.values()):
        assert torch.equal(rows[pipe.tokenizer.convert_tokens_to_ids(t)], want)


# --- preservation clips ----------------------------------------------------------------------------------------


class _FakePipe:
    """Stands in for the frozen model making preservation clips: zero latents, and a hook per call."""

    def __init__(self, on_call=None):
        self.calls, self.on_call = 0, on_call

    def __call__(self, prompt, num_frames, width, height, **kw):
        self.calls += 1
        if self.on_call:
            self.on_call(self.calls)
        return type("Out", (), {"frames": torch.zeros(1, 4, num_frames, height // 8, width // 8)})()


def test_preservation_clips_report_progress_can_be_cancelled_and_cache_atomically(tmp_path):
    import threading

    preset = load_model_preset("tiny")
    seen = []
    lat, caps = tune.preservation_clips(_FakePipe(), preset, 2, 16, 16, cache_root=tmp_path,
                                        progress=lambda i, n, left: seen.append((i, n)))
    assert seen == [(i, 8) for i in range(1, 9)] and lat.shape == (8, 4, 2, 2, 2) and len(caps) == 8
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp folder left
    again = _FakePipe()
    tune.preservation_clips(again, preset, 2, 16, 16, cache_root=tmp_path)
    assert again.calls == 0  # from the cache
    # Cancelled after the first clip: TuneCancelled, nothing cached, no temp folder.
    cancel = threading.Event()
    with pytest.raises(tune.TuneCancelled, match="preservation clip 2/8"):
        tune.preservation_clips(_FakePipe(lambda n: cancel.set()), preset, 3, 16, 16, cache_root=tmp_path / "c",
                                cancel=cancel)
    assert not (tmp_path / "c").exists() or list((tmp_path / "c").iterdir()) == []
    # Another run finishing first: its cache stays, ours goes, no temp folder left behind.
    root = tmp_path / "race"

    def other_run_finishes(n):
        if n == 8:
            tune.preservation_clips(_FakePipe(), preset, 4, 16, 16, cache_root=root)

    tune.preservation_clips(_FakePipe(other_run_finishes), preset, 4, 16, 16, cache_root=root)
    (folder,) = list(root.iterdir())
    assert not folder.name.startswith(".") and (folder / "clips.safetensors").is_file()


def test_training_reports_the_clips_and_times_its_eta_from_the_first_step(monkeypatch):
    import time as real_time

    preset = load_model_preset("tiny")
    pipe = load_pipeline(preset, "cpu")
    clock = {"offset": 0.0}
    monkeypatch.setattr(tune, "time", type("T", (), {"perf_counter": staticmethod(
        lambda: real_time.perf_counter() + clock["offset"])}))

    def slow_clips(pipe, preset, frames, width, height, folder, cache_root, progress, cancel):
        for i in range(1, 9):  # eight clips that take "1000 s" in all: set-up the ETA must not count
            progress(i, 8, 125.0 * (8 - i))
        clock["offset"] += 1000.0
        return torch.zeros(8, 4, frames, height // 8, width // 8), ["a clip"] * 8

    monkeypatch.setattr(tune, "preservation_clips", slow_clips)
    calls = []

    def progress(i, n, loss, left, stage):
        calls.append((stage, i, n, left))

    photos, masks = red_photos()
    tune.train(pipe, preset, photos, masks, "eta", tune.TuneSettings(class_word="dog", steps=2), progress)
    stages = [c[0] for c in calls]
    assert stages == ["preservation"] * 8 + ["training"] * 2
    first = calls[8]
    assert first[1:3] == (1, 2) and first[3] < 500  # one step's time, not the clips'
    plain = []
    tune.train(load_pipeline(preset, "cpu"), preset, photos, masks, "eta2",
               tune.TuneSettings(class_word="dog", steps=1), lambda i, n, loss, left: plain.append(i))
    assert plain == [1]  # a four-argument callback hears the steps only
