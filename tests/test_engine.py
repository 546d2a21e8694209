"""The engine end to end on the tiny random model: shapes, determinism, the noise prior's visible effect,
the pipeline cache, progress and cancellation, and the load errors a user without weights sees."""

import threading

import numpy as np
import pytest

from studio import engine, shot as shotlib
from studio.pipelines import ModelLoadError


def test_tiny_renders_uint8_frames_of_the_shot_size(tiny_shot, manager):
    r = engine.render(tiny_shot, manager)
    assert r.frames.shape == (8, 64, 64, 3) and r.frames.dtype == np.uint8
    assert r.frames.std() > 1.0, "a constant image is not a render"
    assert r.info["latent_shape"] == [1, 4, 8, 8, 8]  # (B, C, F, h, w): the tiny VAE downsamples by 8
    assert r.shot.fps == 8 and r.shot.guidance_scale == 7.5  # omitted fields resolved from the preset


def test_same_seed_is_bit_identical_and_another_seed_is_not(tiny_shot, manager):
    a = engine.render(tiny_shot, manager).frames
    b = engine.render(tiny_shot, manager).frames
    assert np.array_equal(a, b)
    tiny_shot.seed = 1
    c = engine.render(tiny_shot, manager).frames
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 1.0


def _flicker(frames: np.ndarray) -> float:
    """Mean absolute change between consecutive frames."""
    f = frames.astype(np.float32)
    return float(np.abs(f[1:] - f[:-1]).mean())


def test_higher_gamma_gives_steadier_frames(tiny_shot, manager):
    flicker = {}
    for gamma in (0.0, 0.5, 0.95):
        tiny_shot.noise_prior.gamma = gamma
        flicker[gamma] = np.mean([_flicker(engine.render(tiny_shot, manager).frames)
                                  for tiny_shot.seed in (0, 1)])
    assert flicker[0.95] < 0.6 * flicker[0.0], flicker
    assert flicker[0.95] < flicker[0.5] < flicker[0.0], flicker


def test_pipeline_is_cached_not_reloaded(tiny_shot, manager):
    engine.render(tiny_shot, manager)
    loads = manager.loads
    tiny_shot.prompt, tiny_shot.seed, tiny_shot.steps = "a yellow star on sand", 5, 2
    r = engine.render(tiny_shot.__class__(**{**tiny_shot.__dict__, "subjects": []}), manager)
    assert manager.loads == loads
    assert r.info["pipeline_loads"] == loads
    assert r.timings["load"] < 0.5, "a cached pipeline must not cost a load"


def test_progress_reports_every_step_and_cancel_stops(tiny_shot, manager):
    seen = []
    engine.render(tiny_shot, manager, progress=lambda i, n: seen.append((i, n)))
    assert seen == [(i, 4) for i in range(1, 5)]

    cancel = threading.Event()

    def progress(i, n):
        if i == 2:
            cancel.set()

    with pytest.raises(engine.RenderCancelled):
        engine.render(tiny_shot, manager, progress=progress, cancel=cancel)


def test_sidecar_records_the_resolved_shot_model_and_versions(tiny_shot, manager):
    tiny_shot.noise_prior.gamma = 0.3
    side = engine.render(tiny_shot, manager).sidecar()
    again = shotlib.from_container(side["shot"])
    assert again == engine.prepare(tiny_shot)[0]  # the sidecar's shot reproduces this render
    assert side["shot"]["noise_prior"]["gamma"] == 0.3 and side["shot"]["steps"] == 4
    assert side["model"]["preset"] == "tiny" and side["seed"] == 0
    assert {"torch", "diffusers"} <= set(side["versions"]) and side["timings"]["total"] > 0


def test_render_to_files_writes_video_and_sidecar(tiny_shot, manager, tmp_path):
    from studio import export

    files = engine.render_to_files(tiny_shot, tmp_path / "shot.mp4", frames_dir=tmp_path / "frames",
                                   gif=tmp_path / "shot.gif", manager=manager)
    assert export.probe_video(files.video)["frames"] == 8
    assert files.sidecar == tmp_path / "shot.json" and files.sidecar.exists()
    assert len(list((tmp_path / "frames").glob("*.png"))) == 8 and files.gif.exists()


def test_missing_hub_model_names_the_id_and_how_to_provide_it(tmp_path, manager, monkeypatch):
    preset = tmp_path / "nowhere.yaml"
    preset.write_text("name: nowhere\nfamily: animatediff\nbase: shot-studio-test/no-such-model\n"
                      "motion_adapter: shot-studio-test/no-such-adapter\n"
                      "defaults: {frames: 8, width: 64, height: 64, fps: 8, steps: 2, guidance_scale: 7.5}\n")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    s = shotlib.from_container({"model": str(preset), "prompt": "a red circle"})
    with pytest.raises(ModelLoadError) as e:
        engine.render(s, manager)
    msg = str(e.value)
    assert "shot-studio-test/no-such-adapter" in msg or "shot-studio-test/no-such-model" in msg
    assert "HF_HOME" in msg and "hf download" in msg


def test_missing_local_model_folder_is_a_clear_error(tmp_path, manager):
    preset = tmp_path / "local.yaml"
    preset.write_text(f"name: local\nfamily: animatediff\nbase: {tmp_path / 'missing-folder'}\n"
                      "defaults: {frames: 8, width: 64, height: 64, fps: 8, steps: 2, guidance_scale: 7.5}\n")
    with pytest.raises((ModelLoadError, shotlib.ShotError), match="missing-folder"):
        engine.render(shotlib.from_container({"model": str(preset), "prompt": "x"}), manager)


@pytest.mark.real_weights
def test_animatediff_sd15_real_weights_render(manager):
    """Needs the SD 1.5 and AnimateDiff weights in the Hugging Face cache (run with -m real_weights)."""
    from huggingface_hub import try_to_load_from_cache

    if try_to_load_from_cache("guoyww/animatediff-motion-adapter-v1-5-3", "config.json") is None:
        pytest.skip("AnimateDiff motion adapter not in the local Hugging Face cache")
    s = shotlib.from_container({"model": "animatediff-sd15", "prompt": "a corgi running on grass", "frames": 8,
                                "width": 256, "height": 256, "steps": 4})
    r = engine.render(s, manager)
    assert r.frames.shape == (8, 256, 256, 3)
