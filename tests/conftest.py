"""Shared fixtures: an isolated studio home (the tiny random model is built there once per session), offline hub."""

import os
import socket

import numpy as np
import pytest

import studio  # first: the OpenMP wait policy of torch's threads is set before torch loads (studio.threads)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # Ray >= 2.60 turns on token auth (~/.ray/auth_token) otherwise
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


studio.threads.apply()  # the tests run on the thread count the CLI and the app choose on this machine


@pytest.fixture(scope="session", autouse=True)
def studio_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("studio-home")
    old = os.environ.get("SHOT_STUDIO_HOME")
    os.environ["SHOT_STUDIO_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("SHOT_STUDIO_HOME", None)
    else:
        os.environ["SHOT_STUDIO_HOME"] = old


@pytest.fixture(scope="session")
def manager():
    """One pipeline manager for the whole run, as the app shares one."""
    from studio.pipelines import PipelineManager

    return PipelineManager(max_pipelines=2, device="cpu")


@pytest.fixture
def tiny_shot():
    """The foundation issue's example shot on the tiny model, shortened for speed."""
    from studio import shot

    return shot.from_container({
        "model": "tiny", "prompt": "a red circle on grass", "seed": 0, "frames": 8, "width": 64, "height": 64,
        "steps": 4, "subjects": [{"phrase": "red circle", "boxes": {0: [0.05, 0.3, 0.35, 0.7],
                                                                   7: [0.65, 0.3, 0.95, 0.7]}}],
    })


# The tiny random models a control test runs on, one per family: frames that fit each model's frame rule (Wan: 4k+1)
TINY_MODELS = {"tiny": 8, "tiny-wan": 9}
# The mean pixel change (0..255) that counts as a control's effect on each: tiny-wan's random VAE barely passes its
# latents through (another seed moves its pixels by 0.5 on average, another prompt by 0.002; tiny: 46 and 2.7).
EFFECT = {"tiny": 0.5, "tiny-wan": 0.005}


@pytest.fixture(params=list(TINY_MODELS))
def model_shot(request):
    """tiny_shot on each family's tiny model: a red circle crossing from left to right over the whole clip."""
    from studio import shot

    frames = TINY_MODELS[request.param]
    return shot.from_container({
        "model": request.param, "prompt": "a red circle on grass", "seed": 0, "frames": frames, "width": 64,
        "height": 64, "steps": 4, "subjects": [{"phrase": "red circle", "boxes": {
            0: [0.05, 0.3, 0.35, 0.7], frames - 1: [0.65, 0.3, 0.95, 0.7]}}],
    })


def changed(a, b, model: str) -> bool:
    """Whether frames b differ from frames a by a control's effect on `model` (EFFECT), not just rounding."""
    import numpy as np

    return float(np.abs(a.astype(int) - b.astype(int)).mean()) > EFFECT[model]


@pytest.fixture(scope="session")
def free_port():
    """A function giving a TCP port on 127.0.0.1 that was free a moment ago (for a server the test starts)."""
    def pick() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    return pick


def write_tiny_zeroscope(folder, defaults: str = "{frames: 8, width: 64, height: 64, fps: 8, steps: 4, "
                                                "guidance_scale: 7.5}", name: str = "tiny-zeroscope"):
    """A tiny random model of the zeroscope layout (UNet3DConditionModel + TextToVideoSDPipeline, saved as a diffusers
    folder) and a preset file for it; returns the preset's path. The global RNG is left as it was."""
    import torch
    from diffusers import TextToVideoSDPipeline, UNet3DConditionModel

    from studio.toyworld.model import TINY_ARCH, build_components

    c = build_components(TINY_ARCH, seed=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet3DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                    layers_per_block=1, cross_attention_dim=16, attention_head_dim=4,
                                    norm_num_groups=4, down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                                    up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"))
    TextToVideoSDPipeline(vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"], unet=unet,
                          scheduler=c["scheduler"]).save_pretrained(folder / "model")
    preset = folder / f"{name}.yaml"
    preset.write_text(f"name: {name}\nfamily: zeroscope\nbase: {folder / 'model'}\ndefaults: {defaults}\n")
    return preset


def red_photos(n=2, size=64):
    """n training photos of a red rectangle (moving 4 px right per photo) on dark noise, and their masks."""
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
