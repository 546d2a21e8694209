"""The `studio` CLI: exit codes, one-line errors, nothing half-written at --out, overrides, presets."""

import json
import subprocess
import sys

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
    """The real entry point in a subprocess: status code and a single stderr line."""
    p = subprocess.run([sys.executable, "-m", "studio.cli", "render", EXAMPLE, "--out", str(tmp_path / "x.mp4"),
                        "--set", "noise_prior.gamma=-0.1"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().startswith("studio: error:") and "noise_prior.gamma" in p.stderr
    assert not (tmp_path / "x.mp4").exists()
