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


NO_WEIGHTS = ["--clip-model", "studio-tests/no-such-clip", "--dino-model", "studio-tests/no-such-dino"]  # never cached


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


def test_every_metric_has_a_definition_and_a_source():
    defs = evaluation._definitions()
    for key, _, _ in evaluation.METRICS:
        assert defs[key]["definition"] and defs[key]["source"], key


def test_eval_end_to_end_on_the_toyworld_model(prompt_set, tmp_path, capsys):
    import cv2

    out = tmp_path / "run"
    assert cli.main(["eval", str(prompt_set), "--out", str(out), "--no-progress", *NO_WEIGHTS]) == 0
    data = json.loads((out / "results.json").read_text())
    assert [r["config"] for r in data["videos"]] == ["no_control", "full"]
    for r in data["videos"]:
        assert 0.0 <= r["box_hit_rate"] <= 1.0 and 0.0 <= r["box_iou"] <= 1.0
        assert r["camera_error"] >= 0 and np.allclose(r["camera_requested"], [-0.5 * 32 / 7, 0.0], atol=1e-3)
        assert 0.0 < r["temporal_consistency_pixel"] <= 1.0 and r["dynamic_degree"] in (0.0, 1.0)
        assert r["clip_t"] is None and r["dino_i"] is None
    assert set(data["means"]) == {"no_control", "full"} and data["means"]["full"]["n"] == 1
    reason = next(iter(data["skipped"]["clip_t"]))
    assert "'studio-tests/no-such-clip' are not in the local Hugging Face cache" in reason
    bookkeeping = {"config", "shot", "seed", "video", "size"}
    for r in data["videos"]:  # every value written is defined, with its source
        for key in set(r) - bookkeeping:
            assert data["definitions"][key]["definition"] and data["definitions"][key]["source"], key
    md = (out / "results.md").read_text()
    assert "| no_control | 1 |" in md and "| full | 1 |" in md and "Box hit" in md
    img = cv2.imread(str(out / "results.png"))
    assert img is not None and img.shape[0] > 100 and img.shape[1] > 100
    side = json.loads((out / "videos" / "full" / "star-s0.json").read_text())
    assert side["eval"]["config"] == "full" and side["eval"]["target"]["camera"]["cx"] == 0.5
    assert "| full |" in capsys.readouterr().out
    # the same renders, scored again from their files (no render): the configs come from the sidecars
    again = tmp_path / "again"
    assert cli.main(["eval", "--videos", str(out / "videos"), "--out", str(again), *NO_WEIGHTS]) == 0
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


def test_a_bad_config_shot_pair_stops_the_run_before_any_render(tmp_path, capsys, monkeypatch):
    """A configuration that cannot render one of the shots (face refine on the subjects' boxes, on a shot without
    boxes) is refused before the first render, naming the configuration, the shot and the field."""
    from studio import engine

    p = tmp_path / "two.yaml"
    p.write_text(SET.replace("custom_configs:\n", "custom_configs:\n  box_face: {base: full, set: "
                             "[refine.face.enabled=true, refine.face.detector=boxes]}\n")
                 + "  - id: pan-only\n    prompt: a white circle on sand\n    camera: {cx: 0.5}\n")
    monkeypatch.setattr(engine, "render_to_files", lambda *a, **k: pytest.fail("rendered before checking"))
    out = tmp_path / "o"
    assert cli.main(["eval", str(p), "--out", str(out), "--configs", "no_control,box_face", *NO_WEIGHTS]) == 2
    err = capsys.readouterr().err
    assert "nothing was rendered: 1 of the 4 (configuration, shot) pairs cannot render" in err
    assert "box_face x pan-only: refine.face.detector: needs a subject with boxes" in err
    assert "star" not in err.split("cannot render")[1] and " | " not in err and not out.exists()
    ps = evaluation.load_prompt_set(p)
    with pytest.raises(evaluation.InvalidJobs) as e:
        evaluation.plan_jobs(ps, ["box_face", "full"], ["steps=0"])  # the override breaks every job, targets too
    assert [x[:2] for x in e.value.errors] == [("all configurations", "star"), ("all configurations", "pan-only")]
    assert str(e.value).count("steps: ") == 1  # the same problem told once, naming all its pairs
    assert ("4 of the 4 (configuration, shot) pairs cannot render: all configurations x star, all configurations x "
            "pan-only: the shot as written (the scoring target): steps: ") in str(e.value)
    jobs = evaluation.plan_jobs(ps, ["no_control", "full"])
    assert [(j.config, j.ps_shot.id) for j in jobs] == [("no_control", "star"), ("no_control", "pan-only"),
                                                        ("full", "star"), ("full", "pan-only")]
    assert jobs[0].shot.subjects[0].boxes == {} and jobs[0].target.subjects[0].boxes  # scored against as written


class _ColourEncoder:
    """A stand-in CLIP/DINO: an image's embedding is its unit mean colour (so cosines are known by hand)."""

    kind = "clip"

    def images(self, images):
        e = np.array([np.asarray(i, np.float64).reshape(-1, 3).mean(0) for i in images])
        return e / np.linalg.norm(e, axis=1, keepdims=True)

    def text(self, prompt):
        return np.array([1.0, 0.0, 0.0])


def test_image_metrics_score_each_subject_with_its_own_images(tmp_path):
    """R-CLIP / R-DINO crop each subject's box and compare it with that subject's images, then average; CLIP-I /
    DINO-I also average per subject. Left half red (the red square's box), right half yellow (the star's)."""
    from PIL import Image

    from studio import engine, shot as shotlib

    red, yellow = np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = yellow[..., :2] = 255
    Image.fromarray(red).save(tmp_path / "red.png")
    Image.fromarray(yellow).save(tmp_path / "yellow.png")
    p = tmp_path / "two.yaml"
    p.write_text(f"""
model: toyworld
shots:
  - id: two
    prompt: a red square and a yellow star on sky
    subjects:
      - {{phrase: red square, boxes: {{0: [0.0, 0.0, 0.5, 1.0]}}}}
      - {{phrase: yellow star, boxes: {{0: [0.5, 0.0, 1.0, 1.0]}}}}
    subject_images: {{yellow star: [{tmp_path / 'yellow.png'}], 0: [{tmp_path / 'red.png'}]}}
""")
    ps = evaluation.load_prompt_set(p)
    target, _ = engine.prepare(shotlib.from_container(ps.shots[0].fields))
    images = evaluation.subject_image_sets(target, ps.shots[0].subject_images)
    assert sorted(images) == [0, 1] and images[0][0][0, 0].tolist() == [255, 0, 0]
    frames = np.zeros((target.frames, 32, 32, 3), np.uint8)
    frames[:, :, :16, 0] = 255
    frames[:, :, 16:, :2] = 255
    scorer = evaluation.Scorer()
    scorer._enc.update(clip=_ColourEncoder(), dino=_ColourEncoder())
    row = scorer.score(frames, target, 8, images)
    assert row["r_clip"] == pytest.approx(1.0) and row["r_dino"] == pytest.approx(1.0)  # each crop is its colour
    whole = np.array([255, 127.5, 0]) / np.linalg.norm([255, 127.5, 0])  # the frame's mean colour
    want = np.mean([whole @ (np.array([1, 0, 0])), whole @ (np.array([1, 1, 0]) / np.sqrt(2))])
    assert row["clip_i"] == pytest.approx(want) and row["dino_i"] == pytest.approx(want)
    only_red = scorer.score(frames, target, 8, {0: images[0]})  # a subject without images is left out
    assert only_red["r_clip"] == pytest.approx(1.0)
    none = scorer.score(frames, target, 8, {})
    assert none["r_clip"] is None and none["clip_i"] is None and "no subject images" in str(scorer.notes["r_clip"])


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
    ("shots: [{prompt: a red square and a yellow star, subjects: [{phrase: red square}, {phrase: yellow star}], "
     "subject_images: [a.png]}]\n", "shots[0].subject_images: the shot has 2 subjects"),
    ("shots: [{prompt: a red square, subjects: [{phrase: red square}], subject_images: {blue dog: [a.png]}}]\n",
     "shots[0].subject_images.blue dog: no such subject"),
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
