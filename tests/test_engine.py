"""The engine end to end on the tiny random model: shapes, determinism, the noise prior's visible effect,
the pipeline cache, progress and cancellation, and the load errors a user without weights sees."""

import json
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


def test_progress_reports_every_step_and_cancel_stops(model_shot, manager):
    """On each family, with box control on: progress per step, cancel between steps, the controls restored."""
    from studio import families

    tiny_shot = model_shot
    seen = []
    engine.render(tiny_shot, manager, progress=lambda i, n: seen.append((i, n)))
    assert seen == [(i, 4) for i in range(1, 5)]
    denoiser = families.denoiser(manager.get(engine.prepare(tiny_shot)[1]))
    before = (dict(denoiser.attn_processors), dict(denoiser._forward_pre_hooks), dict(denoiser._forward_hooks))

    cancel = threading.Event()

    def progress(i, n):
        if i == 2:
            cancel.set()

    with pytest.raises(engine.RenderCancelled):
        engine.render(tiny_shot, manager, progress=progress, cancel=cancel)
    assert (dict(denoiser.attn_processors), dict(denoiser._forward_pre_hooks), dict(denoiser._forward_hooks)) == before


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


def test_a_written_sidecar_loads_back_as_the_shot(tiny_shot, manager, tmp_path):
    """JSON turns keyframe indices into strings; the sidecar's shot still loads back and renders the same video."""
    files = engine.render_to_files(tiny_shot, tmp_path / "shot.mp4", manager=manager)
    side = json.loads(json.dumps(json.loads(files.sidecar.read_text())))
    assert set(side["shot"]["subjects"][0]["boxes"]) == {"0", "7"}
    again = shotlib.from_container(side["shot"])
    assert again == files.result.shot
    assert np.array_equal(engine.render(again, manager).frames, files.result.frames)


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_failed_export_keeps_the_previous_outputs(tiny_shot, manager, tmp_path, monkeypatch):
    import dataclasses

    from studio import export

    kw = dict(frames_dir=tmp_path / "frames", gif=tmp_path / "shot.gif", manager=manager)
    first = engine.render_to_files(tiny_shot, tmp_path / "shot.mp4", **kw).result
    before = _snapshot(tmp_path)
    assert {"shot.mp4", "shot.json", "shot.gif", "frames/frame_0007.png"} <= set(before)
    other = dataclasses.replace(first, frames=255 - first.frames)  # another video, so a partial replacement shows
    monkeypatch.setattr(engine, "render", lambda *a, **k: other)

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    for failing, flag in (("write_gif", "--gif"), ("write_png_frames", "--frames-dir"), ("write_json", "--out")):
        with monkeypatch.context() as m:
            m.setattr(export, failing, boom)
            with pytest.raises(shotlib.ShotError) as e:
                engine.render_to_files(tiny_shot, tmp_path / "shot.mp4", **kw)
        assert e.value.field == flag and "No space left on device" in str(e.value)
        assert _snapshot(tmp_path) == before, f"{failing}: the previous render's files must be left as they were"
    engine.render_to_files(tiny_shot, tmp_path / "shot.mp4", **kw)  # and with nothing failing, all are replaced
    after = _snapshot(tmp_path)
    assert set(after) == set(before) and all(after[k] != before[k] for k in after)


def test_output_paths_are_checked_before_rendering(tiny_shot, manager, tmp_path, monkeypatch):
    def no_render(*a, **k):
        raise AssertionError("rendered before the output paths were checked")

    monkeypatch.setattr(engine, "render", no_render)
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "a-folder.mp4").mkdir()
    cases = [
        (dict(out=tmp_path / "x.mp4", frames_dir=tmp_path / "a-file"), "--frames-dir"),
        (dict(out=tmp_path / "x.mp4", gif=tmp_path / "a-file" / "x.gif"), "--gif"),
        (dict(out=tmp_path / "a-folder.mp4"), "--out"),
        (dict(out=tmp_path / "a-file" / "x.mp4"), "--out"),
        (dict(out=tmp_path / "x.mp4", gif=tmp_path / "x.json"), "--gif"),  # would overwrite the sidecar
        (dict(out=tmp_path / "x.avi"), "--out"),
    ]
    for kw, flag in cases:
        with pytest.raises(shotlib.ShotError) as e:
            engine.render_to_files(tiny_shot, manager=manager, **kw)
        assert e.value.field == flag, (kw, e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "a-folder.mp4"]


def _preset_file(tmp_path, **fields):
    text = "name: tiny-sched\nfamily: animatediff\nbase: builtin:tiny\n" \
           "defaults: {frames: 8, width: 64, height: 64, fps: 8, steps: 2, guidance_scale: 7.5}\nmax_size: 256\n"
    text += "".join(f"{k}: {v}\n" for k, v in fields.items())
    path = tmp_path / "tiny-sched.yaml"
    path.write_text(text)
    return str(path)


def test_scheduler_class_replaces_the_shipped_scheduler(tmp_path):
    import diffusers

    from studio.pipelines import PipelineManager, key_for
    from studio.presets import load_model_preset

    manager = PipelineManager(max_pipelines=2, device="cpu")
    plain = load_model_preset(_preset_file(tmp_path))
    assert type(manager.get(plain).scheduler) is diffusers.DDIMScheduler  # what the tiny folder ships
    euler = load_model_preset(_preset_file(tmp_path, scheduler_class="EulerDiscreteScheduler",
                                           scheduler="{timestep_spacing: trailing}"))
    pipe = manager.get(euler)
    assert type(pipe.scheduler) is diffusers.EulerDiscreteScheduler
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    assert pipe.scheduler.config.beta_end == 0.012  # the rest of the shipped config is kept
    assert key_for(euler, "cpu") != key_for(plain, "cpu") and manager.loads == 2
    r = engine.render(shotlib.from_container({"model": _preset_file(tmp_path, scheduler_class="EulerDiscreteScheduler",
                                                                    scheduler="{timestep_spacing: trailing}"),
                                              "prompt": "a red circle"}), manager)
    assert r.frames.shape == (8, 64, 64, 3) and manager.loads == 2  # same key: the cached pipeline
    assert r.sidecar()["model"]["scheduler_class"] == "EulerDiscreteScheduler"  # the sidecar names it


def test_animatediff_sd15_preset_runs_ddim_from_sd15s_pndm_config():
    """Without weights: SD 1.5 ships PNDMScheduler; the preset turns its config into the card's DDIM."""
    import diffusers

    from studio.pipelines import build_scheduler
    from studio.presets import load_model_preset

    preset = load_model_preset("animatediff-sd15")
    shipped = diffusers.PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                      skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    s = build_scheduler(shipped, preset)
    assert type(s) is diffusers.DDIMScheduler
    assert (s.config.beta_schedule, s.config.clip_sample, s.config.timestep_spacing, s.config.steps_offset) == (
        "linear", False, "linspace", 1)
    assert load_model_preset("zeroscope").scheduler_class is None  # keeps what the repo ships


@pytest.mark.parametrize("name", ["NoSuchScheduler", "AutoencoderKL"])
def test_bad_scheduler_class_is_refused_before_loading(tmp_path, name):
    from studio.pipelines import PipelineManager
    from studio.presets import load_model_preset

    manager = PipelineManager(device="cpu")
    with pytest.raises(shotlib.ShotError) as e:
        manager.get(load_model_preset(_preset_file(tmp_path, scheduler_class=name)))
    assert e.value.field == "model" and name in str(e.value) and "scheduler_class" in str(e.value)
    assert manager.loads == 0
    with pytest.raises(shotlib.ShotError, match="scheduler_class"):
        load_model_preset(_preset_file(tmp_path, scheduler_class="'DDIM Scheduler'"))


def test_only_missing_weights_are_load_errors(tmp_path, manager, monkeypatch):
    import diffusers

    bad_id = tmp_path / "bad-id.yaml"
    bad_id.write_text("name: bad\nfamily: animatediff\nbase: 'not a valid id!!'\n")
    with pytest.raises(ModelLoadError, match="neither a local folder nor a Hugging Face id"):
        engine.render(shotlib.from_container({"model": str(bad_id), "prompt": "x"}), manager)

    def fault(*a, **k):
        raise ValueError("a fault inside diffusers, not a missing model")

    monkeypatch.setattr(diffusers.AnimateDiffPipeline, "from_pretrained", fault)
    local = tmp_path / "local.yaml"
    local.write_text(f"name: local\nfamily: animatediff\nbase: {tmp_path}\n")
    with pytest.raises(ValueError, match="a fault inside diffusers"):
        engine.render(shotlib.from_container({"model": str(local), "prompt": "x"}), manager)


def test_load_error_reason_is_trimmed_at_a_word():
    from studio.pipelines import trim_words

    text = " ".join(f"word{i}" for i in range(60))
    cut = trim_words(text, 200)
    assert len(cut) <= 200 and cut.endswith("…") and text.startswith(cut[:-1]) and text[len(cut) - 1] == " "
    assert trim_words("short reason") == "short reason"
    path = "/a/very/long/path/" + "x" * 300
    assert trim_words(f"no file {path}", 200).startswith(f"no file {path[:100]}")  # a long word is cut inside
