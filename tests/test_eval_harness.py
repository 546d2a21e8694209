"""`studio eval`: configurations, prompt-set checks, and an end-to-end run on the embedded toy-world model that writes
the JSON, the markdown table and the PNG plot, then scores the same renders again from their files."""

import json

import numpy as np
import pytest

from studio import cli, evaluation

SET = """
name: mini
model: toyworld
seeds: [0]
defaults: {steps: 4}
configs: [no_control, full]
custom_configs:
  strong: {base: boxes, set: [box_control.strength=20]}
shots:
  - id: star
    prompt: a yellow star on sky
    camera: {cx: 0.5}
    subjects: [{phrase: yellow star, boxes: {0: [0.0, 0.25, 0.45, 0.75], 7: [0.55, 0.25, 1.0, 0.75]}}]
"""


@pytest.fixture
def prompt_set(tmp_path):
    p = tmp_path / "mini.yaml"
    p.write_text(SET)
    return p


def test_configs_keep_what_they_name(prompt_set):
    ps = evaluation.load_prompt_set(prompt_set)
    fields = ps.shots[0].fields
    plain, _ = evaluation.apply_config(fields, "no_control")
    assert "camera" not in plain and plain["subjects"] == [{"phrase": "yellow star"}] and "refine" not in plain
    boxes, _ = evaluation.apply_config(fields, "boxes")
    assert "camera" not in boxes and boxes["subjects"][0]["boxes"] == fields["subjects"][0]["boxes"]
    pan, _ = evaluation.apply_config(fields, "pan")
    assert pan["camera"] == {"cx": 0.5} and "boxes" not in pan["subjects"][0]
    full, _ = evaluation.apply_config(fields, "full")
    assert full == fields
    tiled, _ = evaluation.apply_config(fields, "refine_tiled")
    assert tiled["refine"]["tiled"]["enabled"] is True
    face, _ = evaluation.apply_config(fields, "refine_face")
    assert face["refine"]["face"] == {"enabled": True, "detector": "boxes"}  # a boxed shot: refine its subject
    strong, extra = evaluation.apply_config(fields, "strong", ps)
    assert "camera" not in strong and extra == ["box_control.strength=20"]


def test_means_skip_missing_values_and_markdown_lists_reasons():
    rows = [{"config": "a", "clip_t": None, "box_hit_rate": 1.0, "render_s": 2.0},
            {"config": "a", "clip_t": None, "box_hit_rate": 0.5, "render_s": 4.0},
            {"config": "b", "clip_t": None, "box_hit_rate": None, "render_s": 1.0}]
    m = evaluation.means(rows)
    assert m["a"]["box_hit_rate"] == 0.75 and m["b"]["box_hit_rate"] is None and m["a"]["clip_t"] is None
    res = evaluation.EvalResult(rows, m, {"clip_t": {"no weights": 3}}, {"seconds": 1.0, "prompt_set": "x"})
    md = evaluation.markdown(res)
    assert "| a | 2 |" in md and "Box hit ↑" in md and "CLIP-T" not in md.split("Skipped")[0]
    assert "clip_t (3 of 3): no weights" in md


def test_eval_end_to_end_on_the_toyworld_model(prompt_set, tmp_path, capsys):
    import cv2

    out = tmp_path / "run"
    assert cli.main(["eval", str(prompt_set), "--out", str(out), "--no-progress"]) == 0
    data = json.loads((out / "results.json").read_text())
    assert [r["config"] for r in data["videos"]] == ["no_control", "full"]
    for r in data["videos"]:
        assert 0.0 <= r["box_hit_rate"] <= 1.0 and 0.0 <= r["box_iou"] <= 1.0
        assert r["camera_error"] >= 0 and np.allclose(r["camera_requested"], [-0.5 * 32 / 7, 0.0], atol=1e-3)
        assert 0.0 < r["temporal_consistency_pixel"] <= 1.0 and r["dynamic_degree"] in (0.0, 1.0)
        assert r["clip_t"] is None and r["dino_i"] is None
    assert set(data["means"]) == {"no_control", "full"} and data["means"]["full"]["n"] == 1
    assert "local Hugging Face cache" in next(iter(data["skipped"]["clip_t"]))
    md = (out / "results.md").read_text()
    assert "| no_control | 1 |" in md and "| full | 1 |" in md and "Box hit" in md
    img = cv2.imread(str(out / "results.png"))
    assert img is not None and img.shape[0] > 100 and img.shape[1] > 100
    side = json.loads((out / "videos" / "full" / "star-s0.json").read_text())
    assert side["eval"]["config"] == "full" and side["eval"]["target"]["camera"]["cx"] == 0.5
    assert "| full |" in capsys.readouterr().out
    # the same renders, scored again from their files (no render): the configs come from the sidecars
    again = tmp_path / "again"
    assert cli.main(["eval", "--videos", str(out / "videos"), "--out", str(again)]) == 0
    data2 = json.loads((again / "results.json").read_text())
    assert sorted(r["config"] for r in data2["videos"]) == ["full", "no_control"]
    assert all(r["box_hit_rate"] is not None for r in data2["videos"])
    assert (again / "results.md").is_file() and (again / "results.png").is_file()


@pytest.mark.parametrize("args,needle", [
    (["--configs", "no_control,wat"], "--configs: unknown configuration 'wat'"),
    (["--seeds", "a,b"], "--seeds"),
])
def test_bad_cli_input_names_the_field(prompt_set, tmp_path, capsys, args, needle):
    assert cli.main(["eval", str(prompt_set), "--out", str(tmp_path / "o"), *args]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "o" / "results.json").exists()


def test_missing_video_or_sidecar_names_the_field(tmp_path, capsys):
    assert cli.main(["eval", "--videos", str(tmp_path / "nope.mp4"), "--out", str(tmp_path / "o")]) == 2
    assert "--videos: no such video" in capsys.readouterr().err
    (tmp_path / "v.mp4").write_bytes(b"")
    assert cli.main(["eval", "--videos", str(tmp_path / "v.mp4"), "--out", str(tmp_path / "o")]) == 2
    assert "has no sidecar v.json" in capsys.readouterr().err
    assert cli.main(["eval", "--out", str(tmp_path / "o")]) == 2
    assert "a prompt set (YAML) or --videos" in capsys.readouterr().err


@pytest.mark.parametrize("text,needle", [
    ("seeds: [0]\nshots: [{prompt: ''}]\n", "shots[0].prompt"),
    ("shots: [{prompt: a cat, seed: many}]\n", "shots[0].seed"),
    ("shots: []\n", "shots: must be a non-empty list"),
    ("seeds: [-1]\nshots: [{prompt: a cat}]\n", "seeds:"),
    ("configs: [nope]\nshots: [{prompt: a cat}]\n", "configs: unknown configuration 'nope'"),
    ("shots: [{prompt: a cat, subject_images: [/no/such.png]}]\n", "shots[0].subject_images"),
    ("shotz: []\n", "shotz: unknown prompt-set field"),
])
def test_bad_prompt_sets_name_the_field(tmp_path, text, needle):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ValueError) as e:
        evaluation.load_prompt_set(p)
    assert needle in str(e.value)


def test_shipped_prompt_sets_load():
    for name, configs in (("toyworld", 4), ("animatediff-sd15", 4)):
        ps = evaluation.load_prompt_set(f"presets/evals/{name}.yaml")
        assert len(ps.shots) >= 5 and len(ps.configs) == configs
        assert any(s.fields.get("camera") for s in ps.shots) and any(s.fields.get("subjects") for s in ps.shots)
