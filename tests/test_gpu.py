"""Training and controlled renders on a GPU, in float16 and bfloat16, under each offload mode (`-m gpu`; run by
benchmarks/gpu_check.sh). SHOT_STUDIO_CHECK_DEVICE picks the device (default cuda); gpu_check.sh --cpu runs the same
tests on the CPU, where the offload modes do not exist (skipped) and the half-precision ones run as CPU autocast.

Small random-weight models (the `tiny` preset and a tiny Zeroscope layout): these check correctness on the device;
benchmarks/gpu_check.py times the real architectures."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import red_photos, write_tiny_zeroscope
from studio import engine, shot as shotlib
from studio.machine import MachineSettings
from studio.pipelines import PipelineManager
from studio.presets import load_model_preset
from studio.subjects import tune

DEVICE = os.environ.get("SHOT_STUDIO_CHECK_DEVICE", "cuda")
ON_GPU = DEVICE.startswith("cuda")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(ON_GPU and not torch.cuda.is_available(), reason="no CUDA device")]
DTYPES = ["float16", "bfloat16"]


def _skip_unsupported(dtype: str, offload: str = "none"):
    if ON_GPU and dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    if not ON_GPU and offload != "none":
        pytest.skip("offloading needs a GPU")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{name: model preset path}: the tiny AnimateDiff and a tiny Zeroscope layout."""
    folder = tmp_path_factory.mktemp("gpu-models")
    return {"tiny": "tiny", "tiny-zeroscope": str(write_tiny_zeroscope(folder))}


@pytest.fixture(scope="module")
def clip_cache(tmp_path_factory):
    """Preservation clips, generated on the device once per model (by the first training test's dtype): two
    prompts instead of eight, the same path at a quarter of the cost."""
    prompts = dict(tune.PRESERVATION_PROMPTS)
    tune.PRESERVATION_PROMPTS["default"] = prompts["default"][:2]
    yield tmp_path_factory.mktemp("clips")
    tune.PRESERVATION_PROMPTS.update(prompts)


@pytest.mark.parametrize("model", ["tiny", "tiny-zeroscope"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_training_steps(models, model, dtype, clip_cache):
    _skip_unsupported(dtype)
    preset = load_model_preset(models[model])
    settings = MachineSettings(device=DEVICE, dtype=dtype).checked()
    pipe = tune.load_training_pipeline(preset, settings)
    assert pipe.unet.device.type == torch.device(DEVICE).type and str(pipe.unet.dtype) == f"torch.{dtype}"
    seen = []

    def watch(module, args, out):
        if torch.is_grad_enabled():  # training's calls, not the clips' generation or the layer-size probe
            seen.append((torch.is_autocast_enabled(module.device.type),
                         {p.dtype for p in module.parameters() if p.requires_grad}))

    pipe.unet.register_forward_hook(watch)
    photos, masks = red_photos()
    s = tune.TuneSettings(method="both", class_word="dog", steps=3, n_tokens=2, batch=2, checkpointing=True)
    r = tune.train(pipe, preset, photos, masks, "rex", s, cache_root=clip_cache)
    assert np.isfinite(r.losses).all() and len(r.losses) == 3
    assert r.precision["trainable"] == "float32" and r.precision["weights"] == dtype
    assert r.precision["grad_scaler"] is (dtype == "float16") and r.precision["checkpointing"] is True
    assert len(seen) == 6  # 3 steps × (photo batch + preservation clip); the clips' generation ran without grad
    assert all(autocast and dtypes == {torch.float32} for autocast, dtypes in seen)
    assert all(torch.isfinite(v).all() for v in [*r.lora.values(), *r.embeds.values()])


def _controlled_shot(model: str, folder) -> shotlib.Shot:
    ref = folder / "purple.png"
    Image.fromarray(np.full((64, 64, 3), (150, 50, 215), np.uint8)).save(ref)
    return shotlib.from_container({
        "model": model, "prompt": "a red circle and a white square on grass", "seed": 1, "frames": 4,
        "width": 64, "height": 64, "steps": 3, "noise_prior": {"gamma": 0.3},
        "camera": {"cx": 0.25, "start_step": 0, "shift_steps": 2},
        "subjects": [{"phrase": "red circle", "reference": str(ref), "boxes": {0: [0.1, 0.2, 0.5, 0.8],
                                                                             3: [0.5, 0.2, 0.9, 0.8]}},
                     {"phrase": "white square", "boxes": {0: [0.6, 0.1, 0.9, 0.5]}}],
    })


@pytest.mark.parametrize("model", ["tiny", "tiny-zeroscope"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offload", ["model", "sequential"])
def test_controlled_render_offloaded_equals_resident(models, model, dtype, offload, tmp_path):
    _skip_unsupported(dtype, offload)
    shot = _controlled_shot(models[model], tmp_path)
    resident = engine.render(shot, PipelineManager(1, settings=MachineSettings(device=DEVICE, dtype=dtype)))
    off = engine.render(shot, PipelineManager(1, settings=MachineSettings(device=DEVICE, dtype=dtype,
                                                                            offload=offload)))
    assert off.settings["offload"] == offload and off.settings["device"].startswith("cuda")
    assert off.settings["dtype"] == resident.settings["dtype"] == dtype
    assert set(resident.info["controls"]) >= {"boxes", "camera", "reference"}
    assert np.abs(off.frames.astype(int) - resident.frames.astype(int)).max() <= 2


@pytest.mark.parametrize("model", ["tiny", "tiny-zeroscope"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_controlled_render_in_half_precision_is_close_to_float32(models, model, dtype, tmp_path):
    _skip_unsupported(dtype)
    shot = _controlled_shot(models[model], tmp_path)
    half = engine.render(shot, PipelineManager(1, settings=MachineSettings(device=DEVICE, dtype=dtype)))
    full = engine.render(shot, PipelineManager(1, settings=MachineSettings(device=DEVICE, dtype="float32")))
    assert half.settings["dtype"] == dtype and half.frames.shape == full.frames.shape
    diff = np.abs(half.frames.astype(int) - full.frames.astype(int))
    assert diff.mean() < 8, diff.mean()  # random weights amplify rounding; the same picture, not the same bits


def test_auto_offload_keeps_a_small_model_resident_and_records_it():
    r = engine.render(shotlib.from_container({"model": "tiny", "prompt": "a dog", "frames": 2, "width": 64,
                                              "height": 64, "steps": 2}),
                      PipelineManager(1, settings=MachineSettings(device=DEVICE, offload="auto")))
    assert r.settings["offload"] == "none" and r.settings["device"].startswith(DEVICE)


def test_a_trained_subject_renders_offloaded_and_training_leaves_the_renderer_alone():
    offload = "sequential" if ON_GPU else "none"
    manager = PipelineManager(1, settings=MachineSettings(device=DEVICE, offload=offload))
    plain = shotlib.from_container({"model": "tiny", "prompt": "a dog on grass", "seed": 3, "frames": 4,
                                    "width": 64, "height": 64, "steps": 3})
    before = engine.render(plain, manager)
    photos, masks = red_photos()
    tune.add_subject("gpudog", photos, masks, "tiny", tune.TuneSettings(method="both", steps=2, n_tokens=1),
                     manager=manager, overwrite=True)
    assert np.array_equal(engine.render(plain, manager).frames, before.frames)
    with_subject = shotlib.from_container({**shotlib.to_dict(plain), "subjects": [
        {"phrase": "dog", "subject": "gpudog", "boxes": {0: [0.1, 0.1, 0.6, 0.9]}}]})
    r = engine.render(with_subject, manager)
    assert r.settings["offload"] == offload and r.info["subjects"] == ["gpudog"]
    assert not np.array_equal(r.frames, before.frames)
    assert np.array_equal(engine.render(plain, manager).frames, before.frames)
