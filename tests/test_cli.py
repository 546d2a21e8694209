"""The `studio` CLI: exit codes, one-line errors, nothing half-written at --out, overrides, presets."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from studio import cli

EXAMPLE = "presets/shots/example.yaml"


def test_render_example_on_tiny_writes_mp4_and_sidecar(tmp_path, capsys):
    out = tmp_path / "example.mp4"
    code = cli.main(["render", EXAMPLE, "--out", str(out), "--set", "model=tiny", "--set", "steps=3",
                     "--set", "noise_prior.gamma=0.4", "--frames-dir", str(tmp_path / "frames"), "--no-progress"])
    assert code == 0
    from studio import export

    info = export.probe_video(out)
    assert (info["codec"], info["pix_fmt"], info["frames"]) == ("h264", "yuv420p", 8)
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["shot"]["noise_prior"]["gamma"] == 0.4 and side["shot"]["steps"] == 3
    assert side["shot"]["subjects"][0]["boxes"] == {"0": [0.05, 0.3, 0.35, 0.7], "7": [0.65, 0.3, 0.95, 0.7]}
    assert "example.mp4" in capsys.readouterr().out


@pytest.mark.parametrize("override, field", [
    ("noise_prior.gamma=1.5", "noise_prior.gamma"),
    ("width=60", "width"),
    ("frames=100", "frames"),
    ("seed=abc", "seed"),
    ("colour=red", "colour"),
    ("model=no-such-preset", "model"),
    ("noise_prior=3", "noise_prior"),
    ("subjects.0.boxes=[[0, 0, 1, 1]]", "subjects[0].boxes"),
    ("subjects.3.phrase=star", "subjects[3]"),
    ("subjects.0.phrase=star", "subjects[0].phrase"),  # a valid override, but "star" is not in the prompt
    ("seed=[1, 2", "--set"),  # not valid YAML
])
def test_bad_input_exits_2_with_one_line_naming_the_field(tmp_path, capsys, override, field):
    out = tmp_path / "bad.mp4"
    code = cli.main(["render", EXAMPLE, "--out", str(out), "--set", "model=tiny", "--set", override])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and field in err and "Traceback" not in err
    assert not list(tmp_path.iterdir()), "nothing may be written on bad input"


def test_missing_shot_file_and_bad_yaml(tmp_path, capsys):
    assert cli.main(["render", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o.mp4")]) == 2
    assert "nope.yaml" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("prompt: [unclosed\n")
    assert cli.main(["render", str(bad), "--out", str(tmp_path / "o.mp4")]) == 2
    assert "bad.yaml" in capsys.readouterr().err
    assert not (tmp_path / "o.mp4").exists()


def test_out_must_be_mp4(tmp_path, capsys):
    assert cli.main(["render", EXAMPLE, "--out", str(tmp_path / "o.avi"), "--set", "model=tiny"]) == 2
    assert "--out" in capsys.readouterr().err


def test_presets_lists_models_and_shots(capsys):
    assert cli.main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in ("tiny", "animatediff-sd15", "zeroscope", "example"):
        assert name in out


def test_console_script_is_installed_and_exits_2_on_bad_input(tmp_path):
    """The installed `studio` entry point in a subprocess: status code and a single stderr line."""
    script = Path(sys.executable).parent / "studio"
    assert script.is_file(), "pip install -e . installs the studio console script beside python"
    p = subprocess.run([str(script), "render", EXAMPLE, "--out", str(tmp_path / "x.mp4"),
                        "--set", "noise_prior.gamma=-0.1"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().startswith("studio: error:") and "noise_prior.gamma" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not (tmp_path / "x.mp4").exists()


def test_missing_hub_weights_are_one_stderr_line(tmp_path):
    """animatediff-sd15 with an empty offline cache: library warnings go to the log, the error is one line."""
    script = Path(sys.executable).parent / "studio"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "SHOT_STUDIO_HOME": str(tmp_path)}
    p = subprocess.run([str(script), "render", EXAMPLE, "--out", str(tmp_path / "x.mp4"), "--set",
                        "model=animatediff-sd15", "--set", "steps=2", "--set", "width=256", "--set", "height=256"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("studio: error: model 'guoyww/animatediff-motion-adapter-v1-5-3'")
    assert "hf download" in lines[0] and not (tmp_path / "x.mp4").exists()


def test_set_reaches_a_subject_in_the_list(tmp_path, capsys):
    out = tmp_path / "star.mp4"
    code = cli.main(["render", EXAMPLE, "--out", str(out), "--set", "model=tiny", "--set", "steps=2",
                     "--set", "prompt=a red star on grass", "--set", "subjects.0.phrase=star",
                     "--set", "subjects.0.boxes.3=[0.3, 0.3, 0.6, 0.7]", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["shot"]["subjects"][0]["phrase"] == "star"
    assert side["shot"]["subjects"][0]["boxes"]["3"] == [0.3, 0.3, 0.6, 0.7]


def test_bad_boxes_in_a_shot_file_exit_2(tmp_path, capsys):
    shot = tmp_path / "boxes.yaml"
    shot.write_text("model: tiny\nprompt: a red circle\nsubjects:\n  - phrase: red circle\n    boxes: [[0, 0, 1, 1]]\n")
    assert cli.main(["render", str(shot), "--out", str(tmp_path / "o.mp4")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "subjects[0].boxes" in err and "[[0, 0, 1, 1]]" in err


def test_unwritable_outputs_exit_2_before_rendering(tmp_path, capsys, monkeypatch):
    from studio import engine

    def no_render(*a, **k):
        raise AssertionError("rendered before the output paths were checked")

    monkeypatch.setattr(engine, "render", no_render)
    (tmp_path / "taken").write_text("a file")
    for flag, value in (("--frames-dir", tmp_path / "taken"), ("--gif", tmp_path / "taken" / "x.gif")):
        code = cli.main(["render", EXAMPLE, "--out", str(tmp_path / "o.mp4"), "--set", "model=tiny", flag, str(value)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and err.startswith(f"studio: error: {flag}:"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_write_failure_exits_2_with_one_line(tmp_path, capsys, monkeypatch):
    from studio import export

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "write_gif", full)
    code = cli.main(["render", EXAMPLE, "--out", str(tmp_path / "o.mp4"), "--gif", str(tmp_path / "o.gif"),
                     "--set", "model=tiny", "--set", "steps=2", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--gif" in err and "No space left" in err, err
    assert list(tmp_path.iterdir()) == [], "nothing may be written when one output fails"


def test_only_the_studios_own_value_errors_are_input_errors(tmp_path, capsys, monkeypatch):
    from studio import engine
    from studio.pipelines import ModelLoadError

    # the studio's own boundary check: exit 2, one line
    assert cli.main(["eval"]) == 2
    assert "give a prompt set" in capsys.readouterr().err
    # a ValueError from inside a library is a fault: it keeps its traceback
    monkeypatch.setattr(engine, "render_to_files", lambda *a, **k: np.zeros(3).reshape(2))
    with pytest.raises(ValueError, match="reshape"):
        cli.main(["render", EXAMPLE, "--out", str(tmp_path / "o.mp4"), "--set", "model=tiny"])

    def multi_line(*a, **k):
        raise ModelLoadError("first line of the reason\nsecond line\nthird line")

    monkeypatch.setattr(engine, "render_to_files", multi_line)
    assert cli.main(["render", EXAMPLE, "--out", str(tmp_path / "o.mp4"), "--set", "model=tiny"]) == 2
    assert capsys.readouterr().err == "studio: error: first line of the reason\n"


def test_toyworld_eval_has_threads(monkeypatch, tmp_path):
    from studio.pipelines import ModelLoadError
    from studio.toyworld import evaluate

    seen = []

    def fake(model, n, seed, threads):
        seen.append(threads)
        raise ModelLoadError("stop before rendering")

    monkeypatch.setattr(evaluate, "evaluate", fake)
    assert cli.main(["toyworld", "eval", "--model", str(tmp_path)]) == 2
    assert cli.main(["toyworld", "eval", "--model", str(tmp_path), "--threads", "1"]) == 2
    assert seen == [2, 1]  # the render-time gate is measured on 2 threads unless told otherwise


def test_train_flags_cover_every_setting():
    import dataclasses

    from studio.toyworld.train import TrainConfig

    args = cli.build_parser().parse_args(["toyworld", "train"])
    assert cli.train_config(args) == TrainConfig()
    assert TrainConfig().out != "models/toyworld", "the default must not overwrite the shipped model"
    flags = {f.name: cli.TRAIN_FLAG_NAMES.get(f.name, "--" + f.name.replace("_", "-"))
             for f in dataclasses.fields(TrainConfig)}
    argv = ["toyworld", "train", "--init", "models/toyworld"]
    for f in dataclasses.fields(TrainConfig):
        if isinstance(f.default, (int, float)) and not isinstance(f.default, bool):
            argv += [flags[f.name], str(f.default * 2)]
    cfg = cli.train_config(cli.build_parser().parse_args(argv))
    assert cfg.init == "models/toyworld" and cfg.lr == 2 * TrainConfig().lr and cfg.export_every == 1000
    assert cfg.budget_s == 2 * TrainConfig().budget_s
