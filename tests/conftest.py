"""Shared fixtures: an isolated studio home (the tiny random model is built there once per session), offline hub."""

import os
import socket

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


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


@pytest.fixture(scope="session")
def free_port():
    """A function giving a TCP port on 127.0.0.1 that was free a moment ago (for a server the test starts)."""
    def pick() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    return pick
