"""The shot file contract: fields, defaults from the preset, and validation messages naming field and value."""

import json
import re
from pathlib import Path

import pytest

from studio import presets, shot
from studio.shot import ShotError

EXAMPLE = """\
model: tiny
prompt: a red circle on grass
negative_prompt: ""
seed: 0
frames: 8
width: 64
height: 64
fps: 8
steps: 20
guidance_scale: 7.5
noise_prior:
  gamma: 0.0
camera:
  cx: 0.0
  cy: 0.0
subjects:
  - phrase: red circle
    subject: null
    reference: null
    boxes:
      0: [0.05, 0.30, 0.35, 0.70]
      7: [0.65, 0.30, 0.95, 0.70]
background:
  reference: null
"""


@pytest.fixture
def example(tmp_path):
    p = tmp_path / "shot.yaml"
    p.write_text(EXAMPLE)
    return p


def resolved(data, *overrides):
    s = shot.from_container(data, list(overrides))
    return shot.resolve(s, presets.load_model_preset(s.model))


def test_example_loads_with_every_field(example):
    s = shot.load(example)
    assert s.prompt == "a red circle on grass" and s.frames == 8 and s.guidance_scale == 7.5
    assert s.noise_prior.gamma == 0.0 and s.camera.cx == 0.0
    assert s.subjects[0].phrase == "red circle" and s.subjects[0].boxes[7] == [0.65, 0.30, 0.95, 0.70]
    assert s.background.reference is None


def test_round_trip_keeps_everything(example, tmp_path):
    s = shot.load(example)
    out = shot.save(s, tmp_path / "again.yaml")
    assert shot.load(out) == s
    assert shot.to_dict(s)["subjects"][0]["boxes"][0] == [0.05, 0.30, 0.35, 0.70]


def test_omitted_fields_take_preset_defaults():
    s = resolved({"model": "zeroscope", "prompt": "a dog running"})
    z = presets.load_model_preset("zeroscope")
    assert (s.width, s.height, s.frames, s.steps) == (576, 320, 24, 40) == (
        z.defaults.width, z.defaults.height, z.defaults.frames, z.defaults.steps)
    t = resolved({"model": "tiny", "prompt": "a dog"})
    assert (t.width, t.height, t.frames) == (64, 64, 8)
    assert resolved({"model": "tiny", "prompt": "a dog", "width": 128}).width == 128


def test_overrides_use_dotted_keys():
    s = resolved({"model": "tiny", "prompt": "a dog"}, "noise_prior.gamma=0.3", "seed=5")
    assert s.noise_prior.gamma == 0.3 and s.seed == 5


BOX = [0.1, 0.3, 0.4, 0.7]

BAD = [  # (change, field, value): the ShotError's field and value attributes
    ({"noise_prior": {"gamma": 1.0}}, "noise_prior.gamma", 1.0),
    ({"noise_prior": {"gamma": -0.2}}, "noise_prior.gamma", -0.2),
    ({"width": 60}, "width", 60),
    ({"height": 100}, "height", 100),
    ({"width": 512}, "width", 512),  # a multiple of 8, but above the tiny preset's max_size 256
    ({"height": 264}, "height", 264),
    ({"frames": 0}, "frames", 0),
    ({"frames": 500}, "frames", 500),
    ({"seed": -1}, "seed", -1),
    ({"seed": 2**63}, "seed", 2**63),
    ({"fps": 0}, "fps", 0),
    ({"reference_control": {"max_tokens": 0}}, "reference_control.max_tokens", 0),
    ({"reference_control": {"token_ratio": 0}}, "reference_control.token_ratio", 0),
    ({"reference_control": {"unconditional": "zeros"}}, "reference_control.unconditional", "zeros"),
    ({"reference_control": {"refresh_every": 0}}, "reference_control.refresh_every", 0),
    ({"fps": 121}, "fps", 121),
    ({"guidance_scale": -0.5}, "guidance_scale", -0.5),
    ({"guidance_scale": 50.5}, "guidance_scale", 50.5),
    ({"subjects": [{"phrase": "red circle", "boxes": {0: [0.5, 0.3, 0.4, 0.7]}}]}, "subjects[0].boxes.0",
     [0.5, 0.3, 0.4, 0.7]),
    ({"subjects": [{"phrase": "red circle", "boxes": {0: [0.1, 0.7, 0.4, 0.3]}}]}, "subjects[0].boxes.0",
     [0.1, 0.7, 0.4, 0.3]),
    ({"subjects": [{"phrase": "red circle", "boxes": {0: [0.1, 0.3, 1.4, 0.7]}}]}, "subjects[0].boxes.0",
     [0.1, 0.3, 1.4, 0.7]),
    ({"subjects": [{"phrase": "red circle", "boxes": {9: BOX}}]}, "subjects[0].boxes.9", 9),
    ({"subjects": [{"phrase": "red circle", "boxes": {"9": BOX}}]}, "subjects[0].boxes.9", 9),  # JSON's key
    ({"subjects": [{"phrase": "red circle", "boxes": {0: [0.1, 0.3, 0.4]}}]}, "subjects[0].boxes.0", [0.1, 0.3, 0.4]),
    ({"subjects": [{"phrase": "blue dog"}]}, "subjects[0].phrase", "blue dog"),
    ({"camera": {"cx": 3.0}}, "camera.cx", 3.0),
    ({"prompt": "  "}, "prompt", "  "),
    ({"steps": 0}, "steps", 0),
]


@pytest.mark.parametrize("change,field,value", BAD)
def test_bad_values_name_field_and_value(change, field, value):
    data = {"model": "tiny", "prompt": "a red circle on grass", "frames": 8, **change}
    with pytest.raises(ShotError) as e:
        resolved(data)
    assert (e.value.field, e.value.value) == (field, value)
    assert str(e.value).startswith(f"{field}: ") and str(e.value).endswith(f"(got {value!r})")


@pytest.mark.parametrize("data,field,value", [
    ({"prompt": "x", "colour": "red"}, "colour", "colour"),
    ({"prompt": "x", "camera": {"pan": 1}}, "camera.pan", "pan"),
    ({"prompt": "x", "seed": "many"}, "seed", "many"),
    ({"prompt": "x", "frames": "lots"}, "frames", "lots"),
    ({"prompt": "x", "noise_prior": {"gamma": "high"}}, "noise_prior.gamma", "high"),
    ({"prompt": "x", "subjects": [{"phrase": "x", "boxes": {"first": [0, 0, 1, 1]}}]}, "subjects[0].boxes.first",
     "first"),
    # container kinds: a list for a mapping, a value for a mapping, a mapping for a value, ...
    ({"prompt": "x", "subjects": [{"phrase": "x", "boxes": [[0, 0, 1, 1]]}]}, "subjects[0].boxes", [[0, 0, 1, 1]]),
    ({"prompt": "x", "subjects": [{"phrase": "x", "boxes": {0: 0.5}}]}, "subjects[0].boxes.0", 0.5),
    ({"prompt": "x", "noise_prior": 0.5}, "noise_prior", 0.5),
    ({"prompt": "x", "camera": [0.1, 0.2]}, "camera", [0.1, 0.2]),
    ({"prompt": "x", "subjects": {"phrase": "x"}}, "subjects", {"phrase": "x"}),
    ({"prompt": {"text": "x"}}, "prompt", {"text": "x"}),
    ({"prompt": "x", "refine": {"face": True}}, "refine.face", True),
])
def test_unknown_keys_and_wrong_types_name_the_field(data, field, value):
    with pytest.raises(ShotError) as e:
        shot.from_container(data)
    assert (e.value.field, e.value.value) == (field, value)


def test_json_keyframe_keys_load_back():
    """JSON makes keyframe indices strings; such a shot (a sidecar's) loads back equal to the original."""
    s = shot.from_container({"model": "tiny", "prompt": "a red circle", "subjects": [
        {"phrase": "red circle", "boxes": {0: BOX, 7: [0.6, 0.3, 0.9, 0.7]}}]})
    text = json.dumps(shot.to_dict(s))
    assert '"0": [' in text  # the keys really are strings in the JSON
    again = shot.from_container(json.loads(text))
    assert again == s and list(again.subjects[0].boxes) == [0, 7]
    with pytest.raises(ShotError) as e:
        shot.from_container({"prompt": "x", "subjects": [{"phrase": "x", "boxes": {"0": BOX, 0: BOX}}]})
    assert e.value.field == "subjects[0].boxes.0"


def test_overrides_reach_list_items_and_keyframes():
    data = {"model": "tiny", "prompt": "a red circle and a star", "subjects": [{"phrase": "red circle",
                                                                                "boxes": {0: BOX}}]}
    s = shot.from_container(data, ["subjects.0.phrase=star", "subjects.0.boxes.7=[0.6, 0.3, 0.9, 0.7]",
                                   "subjects.0.boxes.0.2=0.5"])
    assert s.subjects[0].phrase == "star"
    assert s.subjects[0].boxes == {0: [0.1, 0.3, 0.5, 0.7], 7: [0.6, 0.3, 0.9, 0.7]}
    s = shot.from_container(data, ["subjects=[{phrase: circle}]", "noise_prior={gamma: 0.25}"])
    assert [x.phrase for x in s.subjects] == ["circle"] and s.noise_prior.gamma == 0.25


@pytest.mark.parametrize("override,field,value", [
    ("subjects.1.phrase=star", "subjects[1]", 1),  # only existing items can be changed
    ("subjects.x.phrase=star", "subjects.x", "x"),
    ("subjects.0.colour=red", "subjects[0].colour", "colour"),
    ("subjects.0.boxes=[[0, 0, 1, 1]]", "subjects[0].boxes", [[0, 0, 1, 1]]),
    ("subjects.0.boxes.first=[0, 0, 1, 1]", "subjects[0].boxes.first", "first"),
    ("subjects=[{phrase: x, boxs: {}}]", "subjects[0].boxs", "boxs"),
    ("noise_prior=3", "noise_prior", 3),
    ("seed.x=1", "seed.x", "x"),
    ("seed=abc", "seed", "abc"),
])
def test_bad_overrides_name_the_field(override, field, value):
    data = {"prompt": "a red circle", "subjects": [{"phrase": "red circle"}]}
    with pytest.raises(ShotError) as e:
        shot.from_container(data, [override])
    assert (e.value.field, e.value.value) == (field, value)


def test_readme_error_example_is_the_real_message():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## The shot file", 1)[1].split("\n## ", 1)[0]
    quoted = re.search(r"\(`(noise_prior\.gamma: [^`]*)`\)", section).group(1)
    with pytest.raises(ShotError) as e:
        resolved({"model": "tiny", "prompt": "x", "noise_prior": {"gamma": 1.5}})
    assert str(e.value) == quoted


def test_bad_override_and_unknown_model():
    with pytest.raises(ShotError, match="--set"):
        shot.from_container({"prompt": "x"}, ["gamma"])
    with pytest.raises(ShotError, match="noise_prior.gama"):
        shot.from_container({"prompt": "x"}, ["noise_prior.gama=0.2"])
    with pytest.raises(ShotError) as e:
        presets.load_model_preset("no-such-model")
    assert e.value.field == "model" and "no-such-model" in str(e.value) and "tiny" in str(e.value)


def test_yaml_errors_are_shot_errors(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("prompt: [unclosed\n")
    with pytest.raises(ShotError, match="YAML"):
        shot.load(p)
    with pytest.raises(ShotError, match="not found"):
        shot.load(tmp_path / "missing.yaml")
    p.write_text("- just\n- a list\n")
    with pytest.raises(ShotError, match="mapping"):
        shot.load(p)


def test_phrase_matching_is_whole_word_and_case_insensitive():
    assert shot.phrase_in_prompt("Red Circle", "A red  circle on grass")
    assert not shot.phrase_in_prompt("red circ", "a red circle on grass")
    assert not shot.phrase_in_prompt("circle red", "a red circle on grass")


def test_every_shipped_preset_loads():
    names = presets.list_model_presets()
    assert {"tiny", "animatediff-sd15", "zeroscope"} <= set(names)
    for name in names:
        p = presets.load_model_preset(name)
        assert p.name == name and p.defaults.width % p.size_multiple == 0
    for name in presets.list_shot_presets():
        s = shot.load(presets.shot_preset_path(name))
        shot.resolve(s, presets.load_model_preset(s.model))


def test_subject_errors_name_the_subject():
    with pytest.raises(ShotError) as e:
        shot.from_container({"prompt": "x", "subjects": [{"phrase": "x"}, "red"]})
    assert e.value.field == "subjects[1]"
    with pytest.raises(ShotError) as e:
        shot.from_container({"prompt": "x", "subjects": [{"phrase": "x", "boxs": {}}]})
    assert e.value.field == "subjects[0].boxs" and "unknown" in str(e.value)
    with pytest.raises(ShotError) as e:
        shot.from_container({"prompt": "x", "subjects": [{"subject": "rex"}]})
    assert e.value.field == "subjects[0].phrase"


@pytest.mark.parametrize("prompt, phrases, bad", [
    ("a red circle and a red circle on grass", ["red circle", "red circle"], None),
    ("a red circle on grass", ["red circle", "red circle"], 1),
    ("a red circle and a circle on grass", ["circle", "red circle"], None),  # longer phrases choose first
    ("a red circle on grass", ["circle", "red circle"], 0),
])
def test_subjects_sharing_a_phrase_need_an_occurrence_each(prompt, phrases, bad):
    box = {0: [0.1, 0.1, 0.5, 0.5]}
    s = shot.from_container({"model": "tiny", "prompt": prompt,
                           "subjects": [{"phrase": p, "boxes": box} for p in phrases]})
    if bad is None:
        shot.resolve(s, presets.load_model_preset("tiny"))
        return
    with pytest.raises(ShotError) as e:
        shot.resolve(s, presets.load_model_preset("tiny"))
    assert e.value.field == f"subjects[{bad}].phrase" and "occurrence of its own" in str(e.value)
    s.subjects[bad].boxes = {}  # without boxes a subject needs no tokens of its own
    shot.resolve(s, presets.load_model_preset("tiny"))


def test_pan_defaults_warp_and_window_where_the_family_allows():
    # A pan on a UNet family warps its noise, fills fresh and shifts from 10% of the steps for 30% (2..7 of 20:
    # benchmarks/pan_hold.py); without a warp (asked for, or Wan's family) MotionBooth's 20%/20% window and row fill.
    c = resolved({"model": "toyworld", "prompt": "a red circle on grass", "steps": 20, "camera": {"cx": 0.5}}).camera
    assert (c.noise_warp, c.fill, c.start_step, c.shift_steps) == (shot.CAMERA_NOISE_WARP, "fresh", 2, 6)
    c = resolved({"model": "toyworld", "prompt": "x", "steps": 20, "camera": {"cx": 0.5, "noise_warp": 0.0}}).camera
    assert (c.noise_warp, c.fill, c.start_step, c.shift_steps) == (0.0, "row", 4, 4)
    c = resolved({"model": "tiny-wan", "prompt": "x", "steps": 20, "camera": {"cy": -0.5}}).camera
    assert (c.noise_warp, c.fill, c.start_step, c.shift_steps) == (0.0, "row", 4, 4)
    c = resolved({"model": "toyworld", "prompt": "x", "steps": 20, "camera": {"cx": 0.5, "start_step": 5}}).camera
    assert (c.start_step, c.shift_steps) == (5, 6)  # a set field is kept
    c = resolved({"model": "toyworld", "prompt": "x", "steps": 20}).camera  # no pan: nothing warped
    assert (c.noise_warp, c.fill, c.start_step, c.shift_steps) == (0.0, "row", 4, 4)
