"""Machine settings (studio.machine.MachineSettings): read from the environment and flags in one place, checked
against the machine with one-line errors, part of the pipeline cache key where they change how a pipeline is built,
recorded in the sidecar where they may change pixels, and on the CPU giving the plain render's frames within a
tolerance (offload exercised with the CPU as its own "GPU": the hooks move weights CPU to CPU)."""

import argparse
import dataclasses

import numpy as np
import pytest
import torch

from studio import cli, engine, machine, shot as shotlib
from studio.machine import MachineSettings
from studio.pipelines import PipelineManager, key_for
from studio.presets import load_model_preset


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # renders here are tiny; two threads on a shared 2-core machine wait on each other
    yield
    torch.set_num_threads(before)


def test_environment_then_flags_with_their_names_in_messages():
    env = {"SHOT_STUDIO_OFFLOAD": "auto", "SHOT_STUDIO_VAE_TILING": "1", "SHOT_STUDIO_DTYPE": "float32",
           "SHOT_STUDIO_ATTENTION": "", "UNRELATED": "x"}
    s = machine.from_env(env)
    assert (s.offload, s.vae_tiling, s.vae_slicing, s.dtype, s.attention) == ("auto", True, False, "float32", "auto")
    assert s.source("offload") == "SHOT_STUDIO_OFFLOAD" and s.source("attention") == "attention"
    parser = argparse.ArgumentParser()
    machine.add_arguments(parser)
    args = parser.parse_args(["--offload", "none", "--no-vae-tiling", "--vae-slicing", "--attention", "math"])
    s = machine.from_args(args, env)
    assert (s.offload, s.vae_tiling, s.vae_slicing, s.dtype, s.attention) == ("none", False, True, "float32", "math")
    assert s.source("offload") == "--offload" and s.source("dtype") == "SHOT_STUDIO_DTYPE"
    assert set(machine.ENV) == {f.name for f in dataclasses.fields(MachineSettings)} - {"origin"}
    with pytest.raises(ValueError, match=r"^SHOT_STUDIO_OFFLOAD: must be one of none, model, sequential, auto "
                                         r"\(got 'lots'\)$"):
        machine.from_env({"SHOT_STUDIO_OFFLOAD": "lots"})
    with pytest.raises(ValueError, match=r"^SHOT_STUDIO_VAE_SLICING: must be 1 or 0"):
        machine.from_env({"SHOT_STUDIO_VAE_SLICING": "maybe"})
    with pytest.raises(ValueError, match=r"^--device: must be auto \| cpu \| cuda \| cuda:N \(got 'gpu'\)$"):
        machine.from_args(parser.parse_args(["--device", "gpu"]), {})


@pytest.mark.parametrize("flags, message", [
    (["--device", "cuda"], "--device cuda: torch sees no CUDA GPU on this machine (torch {v}); use cpu"),
    (["--offload", "model"], "--offload model: offloading moves weights between the CPU and a GPU, and this run has "
                             "none (device cpu); use none"),
    (["--offload", "sequential", "--device", "cpu"], "--offload sequential: offloading moves weights between the CPU "
                                                     "and a GPU, and this run has none (device cpu); use none"),
    (["--attention", "efficient"], "--attention efficient: a CUDA kernel, and this run is on the CPU; use auto, math "
                                   "or flash"),
])
def test_what_this_machine_cannot_do_is_one_line_saying_what_to_use(flags, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    shot = tmp_path / "shot.yaml"
    shotlib.save(shotlib.from_container({"model": "tiny", "prompt": "a cat", "frames": 2, "steps": 1}), shot)
    for argv in (["render", str(shot), "--out", str(tmp_path / "x.mp4")], ["ui", "--port", "1"]):
        assert cli.main(argv + flags) == 2
        err = capsys.readouterr().err.strip()
        assert err == "studio: error: " + message.format(v=torch.__version__), err
    assert not (tmp_path / "x.mp4").exists()


def test_a_gpu_without_bfloat16_or_without_that_index(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    s = machine.from_env({"SHOT_STUDIO_DTYPE": "bfloat16"})
    with pytest.raises(ValueError, match=r"^SHOT_STUDIO_DTYPE bfloat16: Tesla T4 has no bfloat16 support; use "
                                         r"float16$"):
        s.checked()
    with pytest.raises(ValueError, match=r"^the model preset's dtype bfloat16: Tesla T4 has no bfloat16 support"):
        machine.model_dtype("bfloat16", MachineSettings(), "cuda")
    with pytest.raises(ValueError, match=r"^device cuda:1: this machine has 1 CUDA device\(s\); use cuda:0..cuda:0$"):
        MachineSettings(device="cuda:1").checked()
    assert MachineSettings().checked().device == "cuda"  # auto
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real(name, *a))
    with pytest.raises(ValueError, match=r"^--offload sequential: needs the accelerate package \(pip install "
                                         r"accelerate\); use none$"):
        MachineSettings(offload="sequential", origin={"offload": "--offload"}).checked()
    # training's own choice on such a GPU: float16 (with a gradient scaler)
    assert machine.training_dtype("auto", MachineSettings(), "cuda") == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert machine.training_dtype("auto", MachineSettings(), "cuda") == torch.bfloat16


def test_dtype_precedence_the_machine_wins_over_the_preset():
    f16, f32, b16 = torch.float16, torch.float32, torch.bfloat16
    assert machine.model_dtype("auto", MachineSettings(), "cpu") == f32
    assert machine.model_dtype("auto", MachineSettings(), "cuda") == f16
    assert machine.model_dtype("float16", MachineSettings(), "cpu") == f16  # the preset's, when the machine says auto
    assert machine.model_dtype("float16", MachineSettings(dtype="bfloat16"), "cpu") == b16
    assert machine.training_dtype("auto", MachineSettings(), "cpu") == f32
    assert machine.training_dtype("float16", MachineSettings(dtype="float32"), "cuda") == f32


def test_auto_offload_by_free_memory():
    gib = machine.GiB
    assert machine.choose_offload(free=40 * gib, total=4 * gib, largest=3 * gib) == "none"
    assert machine.choose_offload(free=9.5 * gib, total=4 * gib, largest=3 * gib) == "model"
    assert machine.choose_offload(free=7 * gib, total=4 * gib, largest=3 * gib) == "sequential"
    assert machine.resolve_offload(None, MachineSettings(offload="auto"), "cpu") == "none"  # never on a CPU


def test_the_cache_key_holds_what_changes_how_a_pipeline_is_built():
    preset = load_model_preset("tiny")
    plain = key_for(preset, "cpu", MachineSettings())
    assert plain == key_for(preset, "cpu")
    assert plain == key_for(preset, "cpu", MachineSettings(attention="math"))  # applied process-wide, not built in
    others = [key_for(preset, "cpu", MachineSettings(**kw)) for kw in
              ({"vae_tiling": True}, {"vae_slicing": True}, {"offload": "model"}, {"dtype": "bfloat16"})]
    assert len({plain, *others}) == 5
    assert others[3].dtype == "bfloat16"


def _shot(**kw):
    base = {"model": "toyworld", "prompt": "a red circle moving right on grass", "seed": 2, "frames": 2, "width": 64,
            "height": 64, "steps": 2}
    return shotlib.from_container({**base, **kw})


@pytest.fixture(scope="module")
def plain_manager():
    return PipelineManager(max_pipelines=1, device="cpu")


@pytest.fixture(scope="module")
def plain(plain_manager):
    """The plain render of _shot() on default settings."""
    return engine.render(_shot(), plain_manager)


def _manager(settings: MachineSettings, model: str = "toyworld", place=False) -> PipelineManager:
    """A fresh manager with these settings; place=True builds the model's pipeline with machine.place on the CPU
    directly (offload modes, which machine.check refuses there for users)."""
    manager = PipelineManager(max_pipelines=1, device="cpu", settings=settings if not place else None)
    if place:
        pipe = manager.get(load_model_preset(model))
        with pipe._studio_hold:
            pipe.remove_all_hooks()
            machine.place(pipe, "cpu", settings)
    return manager


def _render(settings: MachineSettings, shot):
    return engine.render(shot, _manager(settings))


def _frames_close(a, b, max_diff=1):
    return np.abs(a.frames.astype(int) - b.frames.astype(int)).max() <= max_diff


def test_vae_tiling_and_slicing_are_recorded_run_and_keep_the_frames(plain, plain_manager, monkeypatch):
    from diffusers import AutoencoderKL

    calls = []
    tiled = AutoencoderKL.tiled_decode
    monkeypatch.setattr(AutoencoderKL, "tiled_decode", lambda self, *a, **k: calls.append(1) or tiled(self, *a, **k))
    shot = _shot()
    assert (plain.settings["vae_tiling"], plain.settings["vae_slicing"], plain.settings["offload"]) == (
        False, False, "none")
    sliced = _render(MachineSettings(vae_slicing=True), shot)
    assert sliced.settings["vae_slicing"] is True and _frames_close(sliced, plain)
    assert not calls
    tiles = _render(MachineSettings(vae_tiling=True), shot)  # 64 px frames: 3×3 overlapping tiles of 32 px
    assert tiles.settings["vae_tiling"] is True and calls
    # blended seams change pixels (the toy VAE sees little beyond a tile: 9/255 on average where measured), but it
    # is the same picture: far closer to the plain render than another seed's render is (28..31 measured)
    other = engine.render(_shot(seed=3), plain_manager)
    diff = np.abs(tiles.frames.astype(int) - plain.frames.astype(int)).mean()
    assert diff < 0.5 * np.abs(other.frames.astype(int) - plain.frames.astype(int)).mean(), diff


def test_attention_kernel_setting_is_process_wide_recorded_and_close(plain, plain_manager):
    try:
        PipelineManager(device="cpu", settings=MachineSettings(attention="math"))  # applied when made, for all
        assert not torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
        math = engine.render(_shot(), plain_manager)  # the same cached pipeline, now on the math kernel
        assert math.settings["attention"] == "math"
    finally:
        PipelineManager(device="cpu")  # back to torch's default kernels (auto)
    assert plain.settings["attention"] == "auto" and torch.backends.cuda.flash_sdp_enabled()
    assert _frames_close(math, plain)


def test_model_offload_runs_its_hooks_and_keeps_the_frames_with_a_subject_loaded_through_it(plain, monkeypatch):
    """Model offload with the CPU as its own GPU (accelerate's hooks move each model CPU to CPU when it runs); the
    subject's adapter and token rows go in while the hooks are off (machine.offload_paused). Sequential offload has
    no such stand-in (accelerate's hooks break when execution and offload device are one): tests/test_gpu.py."""
    from studio.subjects import tune

    monkeypatch.setattr(tune, "preservation_clips", lambda pipe, preset, frames, w, h, *a, **k: (
        torch.randn((1, 4, 2, h // 2, w // 2), generator=torch.Generator().manual_seed(0)), ["a clip"]))
    rng = np.random.default_rng(0)
    photos = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(2)]
    tune.add_subject("offloaded", photos, None, "toyworld", tune.TuneSettings(method="both", steps=1, n_tokens=1,
                                                                              class_word="circle"), overwrite=True)
    subject = _shot(subjects=[{"phrase": "red circle", "subject": "offloaded"}])
    manager = _manager(MachineSettings(offload="model"), place=True)
    for shot, resident in ((_shot(), plain), (subject, _render(MachineSettings(), subject))):
        off = engine.render(shot, manager)
        assert off.settings["offload"] == "model" and off.settings["device"].startswith("cpu")
        assert off.info.get("subjects") == resident.info.get("subjects") and _frames_close(off, resident)
    assert off.info["subjects"] == ["offloaded"] and not np.array_equal(off.frames, plain.frames)


def test_the_page_and_default_manager_read_the_environment(monkeypatch):
    monkeypatch.setattr(engine, "_default_manager", None)
    monkeypatch.setenv("SHOT_STUDIO_VAE_SLICING", "on")
    monkeypatch.setenv("SHOT_STUDIO_DEVICE", "cpu")
    m = engine.default_manager()
    assert m.settings.vae_slicing is True and m.settings.source("vae_slicing") == "SHOT_STUDIO_VAE_SLICING"
    monkeypatch.setattr(engine, "_default_manager", None)
    monkeypatch.setenv("SHOT_STUDIO_OFFLOAD", "sequential")
    with pytest.raises(ValueError, match="^SHOT_STUDIO_OFFLOAD sequential: offloading moves weights"):
        engine.default_manager()


def test_ci_runs_the_gpu_check_in_cpu_mode():
    """The GPU check cannot rot: CI runs its CPU mode (the same tests and table code at a tiny size)."""
    import os
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    ci = (root / ".ci" / "run").read_text().splitlines()
    assert "bash benchmarks/gpu_check.sh --cpu" in ci
    script = root / "benchmarks" / "gpu_check.sh"
    assert os.access(script, os.X_OK) and "tests/test_gpu.py" in script.read_text()
    assert "pytest.mark.gpu" in (root / "tests" / "test_gpu.py").read_text()
