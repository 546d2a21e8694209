"""The GPU path without a GPU: one subject-training step and one controlled render (boxes + camera pan + reference
image) with the model on a fake device (tests/fake_device.py: values on the CPU, any op mixing a CPU tensor with a
device tensor fails as on CUDA). Each result must equal the plain CPU run's, so the device path computes the same
thing rather than merely not crashing."""

import numpy as np
import pytest
import torch
from PIL import Image

from fake_device import DEVICE, FakeDevice, MixedDevices, OnDevice, move, move_pipeline
from studio import engine, shot as shotlib
from studio.pipelines import PipelineManager, load_pipeline
from studio.presets import load_model_preset
from studio.subjects import tune
from conftest import red_photos


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: the stand-in's per-op Python overhead dominates, and two threads on a shared 2-core machine
    wait on each other (minutes instead of seconds)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_the_fake_device_refuses_what_cuda_refuses_and_keeps_values():
    x = torch.arange(6.0).view(2, 3)
    with FakeDevice():
        d = x.to(DEVICE)
        assert isinstance(d, OnDevice) and d.device == DEVICE
        assert torch.equal((d * 2 + torch.tensor(1.0)).cpu(), x * 2 + 1)  # a 0-dim CPU tensor is a scalar
        assert torch.equal(d[torch.tensor([1])].cpu(), x[1:])  # CPU indices into a device tensor
        with pytest.raises(MixedDevices):
            d + x
        with pytest.raises(MixedDevices):
            torch.randn(3, generator=torch.Generator().manual_seed(0), device=d.device)
        with pytest.raises(MixedDevices):
            x[torch.tensor([1]).to(DEVICE)]
        lin = move(torch.nn.Linear(3, 2))
        assert lin.weight.device == DEVICE and isinstance(lin.weight, torch.nn.Parameter)
        lin(d).sum().backward()
        assert lin.weight.grad.device == DEVICE


def _train_one_step(on_device: bool, monkeypatch):
    preset = load_model_preset("tiny")
    pipe = load_pipeline(preset, "cpu")
    h, w = preset.defaults.height // pipe.vae_scale_factor, preset.defaults.width // pipe.vae_scale_factor
    clips = torch.randn((2, 4, 2, h, w), generator=torch.Generator().manual_seed(1))  # as cached: on the CPU
    monkeypatch.setattr(tune, "preservation_clips", lambda *a, **k: (clips, ["a clip", "another clip"]))
    photos, masks = red_photos()
    # both methods, STCA, preservation clip, Magic-Me's noise offset and full-image rate: every tensor of a step;
    # checkpointing on, as on the real models
    s = tune.TuneSettings(method="both", class_word="dog", steps=1, n_tokens=2, batch=2, full_image_rate=0.5,
                          checkpointing=True)
    if not on_device:
        return tune.train(pipe, preset, photos, masks, "rex", s)
    with FakeDevice():
        move_pipeline(pipe)
        return tune.train(pipe, preset, photos, masks, "rex", s)


def test_a_training_step_on_a_device_equals_the_cpu_step(monkeypatch):
    cpu = _train_one_step(False, monkeypatch)
    dev = _train_one_step(True, monkeypatch)
    assert np.allclose(dev.losses, cpu.losses, rtol=1e-4)
    assert cpu.lora.keys() == dev.lora.keys() and all(type(v) is torch.Tensor for v in dev.lora.values())
    for k, v in cpu.lora.items():
        assert torch.allclose(dev.lora[k], v, atol=1e-5), k
    for k, v in cpu.embeds.items():
        assert torch.allclose(dev.embeds[k], v, atol=1e-5), k


def _controlled_shot(tmp_path):
    ref = tmp_path / "purple.png"
    Image.fromarray(np.full((64, 64, 3), (150, 50, 215), np.uint8)).save(ref)
    return shotlib.from_container({
        "model": "tiny", "prompt": "a red circle and a white square on grass", "seed": 1, "frames": 3,
        "width": 64, "height": 64, "steps": 2, "noise_prior": {"gamma": 0.3},
        "camera": {"cx": 0.25, "start_step": 0, "shift_steps": 1},
        "subjects": [{"phrase": "red circle", "reference": str(ref), "boxes": {0: [0.1, 0.2, 0.5, 0.8],
                                                                             2: [0.5, 0.2, 0.9, 0.8]}},
                     {"phrase": "white square", "boxes": {0: [0.6, 0.1, 0.9, 0.5]}}],
        "background": {"reference": str(ref), "strength": 0.5},
    })


def test_a_controlled_render_on_a_device_equals_the_cpu_render(tmp_path):
    shot = _controlled_shot(tmp_path)
    cpu = engine.render(shot, PipelineManager(max_pipelines=1, device="cpu"))
    assert set(cpu.info["controls"]) >= {"boxes", "camera", "reference"}, cpu.info["controls"]
    manager = PipelineManager(max_pipelines=1, device="cpu")
    pipe = manager.get(load_model_preset("tiny"))
    with FakeDevice():
        move_pipeline(pipe)
        dev = engine.render(shot, manager)
    assert dev.settings["device"] == "meta" and dev.info["controls"] == cpu.info["controls"]
    assert np.abs(dev.frames.astype(int) - cpu.frames.astype(int)).max() <= 1


def test_a_resident_animatediff_pipeline_keeps_its_copied_motion_adapter_off_the_device():
    """AnimateDiffPipeline keeps the MotionAdapter it copied into the UNet; placing the pipeline on a device leaves
    that copy on the CPU (0.78 GiB of float16 on SD 1.5's GPU otherwise)."""
    from diffusers import AnimateDiffPipeline, MotionAdapter, UNet2DConditionModel

    from studio import machine
    from studio.toyworld.model import TINY_ARCH, build_components

    c = build_components(TINY_ARCH, seed=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=16,
                                    attention_head_dim=2, norm_num_groups=4, sample_size=8,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
        adapter = MotionAdapter(block_out_channels=(16, 32), motion_layers_per_block=1, motion_num_attention_heads=2,
                                motion_norm_num_groups=4, use_motion_mid_block=False)
    pipe = AnimateDiffPipeline(vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"], unet=unet,
                               motion_adapter=adapter, scheduler=c["scheduler"])
    with FakeDevice():
        machine.place(pipe, "meta", machine.MachineSettings())
        assert pipe.unet.device == DEVICE and pipe.vae.device == DEVICE and pipe.text_encoder.device == DEVICE
        # (pipe.device prefers a component off the CPU, but counts "meta" as off the GPU too: not asked here)
        assert pipe.motion_adapter.device.type == "cpu"
