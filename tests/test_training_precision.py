"""Subject training's precision and memory on the CPU: float32 trainable weights under autocast for half-precision
models (a gradient scaler for float16), gradient checkpointing on for the real presets and giving the same
gradients, the token rows as their own parameter, and a plain render after training identical to one before."""

import numpy as np
import pytest
import torch

from conftest import red_photos, write_tiny_zeroscope
from studio import engine, shot as shotlib
from studio.machine import MachineSettings
from studio.pipelines import PipelineManager, load_pipeline
from studio.presets import ModelPreset, load_model_preset
from studio.subjects import tune
from studio.subjects.trainable import (CHECKPOINTED_LAYERS, TokenRows, checkpointed_layers, gradient_checkpointing,
                                       is_checkpointed, token_rows)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models; two threads on a shared 2-core machine wait on each other
    yield
    torch.set_num_threads(before)


@pytest.fixture
def small_clips(monkeypatch):
    """Preservation clips as the cache gives them (CPU latents), two frames long: the clip path without generating."""
    def clips(pipe, preset, frames, width, height, *a, **k):
        s = pipe.vae_scale_factor
        return torch.randn((2, 4, 2, height // s, width // s), generator=torch.Generator().manual_seed(1)), \
            ["a clip", "another clip"]

    monkeypatch.setattr(tune, "preservation_clips", clips)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_trainable_weights_are_float32_under_autocast(dtype, small_clips, monkeypatch):
    preset = load_model_preset("tiny")
    pipe = tune.load_training_pipeline(preset, MachineSettings(device="cpu", dtype=dtype).checked())
    half = getattr(torch, dtype)
    assert pipe.unet.dtype == half and pipe.text_encoder.dtype == half
    seen = []

    def watch(module, args, kwargs, out):
        trainable = [p for p in module.parameters() if p.requires_grad]
        rows = [p for p in pipe.text_encoder.parameters() if p.requires_grad]
        if torch.is_grad_enabled():  # not the no-grad probe of the layers' sizes
            seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"),
                         {p.dtype for p in trainable + rows}, len(rows)))

    pipe.unet.register_forward_hook(watch, with_kwargs=True)
    steps = []
    real_step = torch.amp.GradScaler.step
    monkeypatch.setattr(torch.amp.GradScaler, "step",
                        lambda self, *a, **k: steps.append(1) or real_step(self, *a, **k))
    photos, masks = red_photos()
    r = tune.train(pipe, preset, photos, masks, "rex",
                   tune.TuneSettings(method="both", class_word="dog", steps=2, n_tokens=2, batch=2))
    assert len(seen) == 4  # 2 steps × (photo batch + preservation clip)
    assert all(on and ac == half and dtypes == {torch.float32} and rows == 1 for on, ac, dtypes, rows in seen)
    assert np.isfinite(r.losses).all()
    assert r.precision == {"device": "cpu", "weights": dtype, "trainable": "float32", "autocast": True,
                           "grad_scaler": dtype == "float16", "checkpointing": False}
    assert len(steps) == (2 if dtype == "float16" else 0)
    # the frozen weights stay in their dtype; the trained rows went back into the table
    assert {p.dtype for p in pipe.unet.parameters() if not p.requires_grad} == {half}
    table = pipe.text_encoder.get_input_embeddings()
    assert isinstance(table, torch.nn.Embedding) and table.weight.dtype == half
    ids = pipe.tokenizer.convert_tokens_to_ids(r.tokens)
    assert torch.allclose(table.weight[ids].float(), torch.stack(list(r.embeds.values())).to(half).float())


def test_float32_models_train_without_autocast_or_scaler(small_clips):
    preset = load_model_preset("tiny")
    pipe = load_pipeline(preset, "cpu")
    r = tune.train(pipe, preset, *red_photos(), "rex", tune.TuneSettings(method="lora", class_word="dog", steps=1))
    assert r.precision["weights"] == "float32" and not r.precision["autocast"] and not r.precision["grad_scaler"]


@pytest.mark.parametrize("name, on", [("animatediff-sd15", True), ("zeroscope", True), ("tiny", False),
                                      ("toyworld", False)])
def test_checkpointing_is_on_for_the_real_presets(name, on):
    assert tune.resolve(tune.TuneSettings(), load_model_preset(name)).checkpointing is on
    assert tune.resolve(tune.TuneSettings(checkpointing=not on), load_model_preset(name)).checkpointing is not on


def test_checkpointing_is_on_for_another_real_model_of_a_family():
    for family in ("animatediff", "zeroscope"):
        preset = ModelPreset(name="someone-elses-finetune", family=family, base="x")
        assert tune.resolve(tune.TuneSettings(), preset).checkpointing is True


def _lora_grads(pipe, checkpointing: bool) -> dict:
    """Gradients of one ε-loss of a 4-frame clip with respect to a fresh LoRA (same draws each call)."""
    from studio.subjects.trainable import add_lora

    unet = pipe.unet
    gen = torch.Generator().manual_seed(0)
    params = add_lora(unet, tune.LORA_TARGETS, 4, "probe", gen)
    try:
        for p in params:  # B = 0 would give A no gradient
            torch.nn.init.normal_(p, generator=gen)
        x = torch.randn((1, 4, 4, 8, 8), generator=gen)
        text = torch.randn((4 if type(unet).__name__ == "UNetMotionModel" else 1, 77, unet.config.cross_attention_dim),
                           generator=gen)
        with gradient_checkpointing(unet, checkpointing) as n:
            assert n == (len(checkpointed_layers(unet)) if checkpointing else 0)
            loss = unet(x, torch.tensor([500]), encoder_hidden_states=text).sample.square().mean()
            loss.backward()
        assert not any(is_checkpointed(m) for m in checkpointed_layers(unet))
        return {i: p.grad.clone() for i, p in enumerate(params)}
    finally:
        from studio.subjects.apply import _delete_adapter

        _delete_adapter(unet, "probe")


def test_checkpointing_wraps_every_block_layer_and_gives_the_same_gradients(tmp_path, monkeypatch):
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    for preset in (load_model_preset("tiny"), load_model_preset(str(write_tiny_zeroscope(tmp_path)))):
        pipe = load_pipeline(preset, "cpu")
        pipe.unet.requires_grad_(False)
        layers = checkpointed_layers(pipe.unet)
        kinds = {name for b in [*pipe.unet.down_blocks, pipe.unet.mid_block, *pipe.unet.up_blocks]
                 for name in CHECKPOINTED_LAYERS if getattr(b, name, None)}
        assert kinds >= ({"resnets", "attentions", "motion_modules"} if preset.family == "animatediff"
                         else {"resnets", "attentions", "temp_convs", "temp_attentions"})
        calls.clear()
        plain = _lora_grads(pipe, False)
        assert not calls
        recomputed = _lora_grads(pipe, True)
        assert len(calls) == len(layers)
        for i, g in plain.items():
            assert torch.allclose(recomputed[i], g, rtol=1e-4, atol=1e-6), i


def test_token_rows_replace_only_their_ids_and_only_they_get_gradients():
    table = torch.nn.Embedding(10, 3).half()
    table.requires_grad_(False)
    init = torch.randn(2, 3)
    te = torch.nn.Module()
    te.emb = table
    te.get_input_embeddings = lambda: te.emb
    te.set_input_embeddings = lambda m: setattr(te, "emb", m)
    with token_rows(te, [7, 9], init) as rows:
        assert isinstance(te.emb, TokenRows) and te.emb.weight is table.weight and rows.rows.dtype == torch.float32
        ids = torch.tensor([[1, 7, 2, 9, 9]])
        out = te.emb(ids)  # (1, 5, 3)
        assert out.dtype == torch.float16
        assert torch.equal(out[0, [0, 2]], table(ids)[0, [0, 2]])
        assert torch.equal(out[0, 1], init[0].half()) and torch.equal(out[0, 3], init[1].half())
        out.float().sum().backward()
        assert torch.equal(rows.rows.grad, torch.tensor([[1.0] * 3, [2.0] * 3]))
        with torch.no_grad():
            rows.rows += 1
    assert te.emb is table and torch.equal(table.weight[[7, 9]], (init + 1).half())


def test_a_plain_render_after_training_is_identical_to_one_before(small_clips):
    """Training loads a pipeline of its own (its cost: a second copy of the weights), so the renderer's cached
    pipeline renders exactly as before."""
    manager = PipelineManager(1, device="cpu")
    shot = shotlib.from_container({"model": "tiny", "prompt": "a dog on grass", "seed": 3, "frames": 2,
                                   "width": 64, "height": 64, "steps": 2})
    before = engine.render(shot, manager)
    tune.add_subject("precise", *red_photos(), "tiny", tune.TuneSettings(method="both", steps=1, n_tokens=1),
                     manager=manager, overwrite=True)
    after = engine.render(shot, manager)
    assert after.info["pipeline_loads"] == before.info["pipeline_loads"]  # the same cached pipeline
    assert np.array_equal(after.frames, before.frames)
