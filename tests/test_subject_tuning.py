"""Subject tuning and trained subjects in shots, on the tiny random-weight model (plumbing; the semantic check on
the toy-world model is in test_subject_semantic.py)."""

import threading

import numpy as np
import pytest
import torch

from studio import engine, shot as shotlib
from studio.pipelines import PipelineManager, load_pipeline
from studio.presets import load_model_preset
from studio.subjects import apply, losses, tune
from studio.subjects.library import SubjectLibrary


def _photos(n=2, size=64):
    rng = np.random.default_rng(0)
    photos, masks = [], []
    for i in range(n):
        img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
        img[16:48, 16 + i * 4:40 + i * 4] = (230, 40, 40)
        m = np.zeros((size, size), bool)
        m[16:48, 16 + i * 4:40 + i * 4] = True
        photos.append(img)
        masks.append(m)
    return photos, masks


@pytest.fixture(scope="module")
def library():
    """The studio's default library: under the test session's own studio home (conftest)."""
    return SubjectLibrary()


@pytest.fixture(scope="module")
def trained(library):
    """One subject trained with both methods on the tiny model (a few steps)."""
    photos, masks = _photos()
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
    photos, masks = _photos()
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


def test_second_render_loads_no_weights(trained, monkeypatch):
    calls = []
    real = SubjectLibrary.load_lora
    monkeypatch.setattr(SubjectLibrary, "load_lora", lambda self, name: calls.append(name) or real(self, name))
    m = PipelineManager(1, "cpu")
    shot = _shot(subjects=[{"phrase": "dog", "subject": "rex"}])
    first = engine.render(shot, m)
    second = engine.render(shot, m)
    assert calls == ["rex"] and np.array_equal(first.frames, second.frames)
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
    photos, masks = _photos(1)
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


def test_cancel_saves_nothing(tmp_path):
    lib = SubjectLibrary(tmp_path / "lib")
    cancel = threading.Event()
    photos, masks = _photos()

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
                                                 ("preservation", "/nonexistent", "preservation: not a folder")])
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
        return [probs]

    far = losses.stca_loss(maps(0.1), masks, [[2]], 16, 16)
    near = losses.stca_loss(maps(0.9), masks, [[2]], 16, 16)
    assert near < far


def test_two_lora_subjects_with_boxes_act_only_in_their_boxes(trained, library):
    photos, masks = _photos()
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
