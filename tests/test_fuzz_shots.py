"""Garbage shot files (hypothesis): random and mutated shot files fed to validation in-process, and a few small
ones through `studio render`. Every outcome is a valid shot or one input error: never a stack trace, a hang or a
partial output.

In-process: mutated shot files (1-3 random edits of valid shots: a field set to a random value of any type, a key
removed or added, a container where a value belongs), random text, random bytes as a file and random `--set`
overrides, each through studio.shot's loaders and engine.prepare (the checks every render, the CLI and the page
run first). A valid outcome must write and read back as itself and resolve again to itself, holding the strings
the file gave (nothing resolved or rewritten); an error must be an input error by the CLI's own rule (ShotError,
ModelLoadError, or a ValueError raised by the studio's code) with a one-line message.

Through the CLI (8 files: 6 drawn, derandomized, and a valid and an invalid one always): mutations of a 2-step
toy-world shot rendered by `studio render` in-process: exit 0 with the MP4 and its sidecar, or exit 2 with one
stderr line and nothing written.

Every run draws the same examples (derandomize=True, no example database), so a failure reproduces.
"""

import contextlib
import io
import json
import math
import tempfile
import time
import traceback
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, example, given, settings, strategies as st

from studio import cli, engine, export, shot as shotlib

ROOT = Path(__file__).resolve().parent.parent


def _small_image() -> str:
    """A real 24x24 PNG for the reference fields (made once per run, in the system's temp folder)."""
    from PIL import Image

    path = Path(tempfile.mkdtemp(prefix="shot-fuzz-")) / "ref.png"
    Image.new("RGB", (24, 24), (200, 40, 40)).save(path)
    return str(path)


IMAGE = _small_image()


def fuzz_settings(n: int):
    return settings(max_examples=n, derandomize=True, database=None, deadline=None, print_blob=True,
                    suppress_health_check=list(HealthCheck))


# --- valid shots to mutate -------------------------------------------------------------------------------------

# a 2-step toy-world shot: what the CLI renders
SMALL = {"model": "toyworld", "prompt": "a yellow star on sky", "seed": 1, "steps": 2, "frames": 4,
         "noise_prior": {"gamma": 0.2}, "camera": {"cx": 0.1},
         "subjects": [{"phrase": "yellow star", "boxes": {0: [0.1, 0.2, 0.5, 0.6], 3: [0.4, 0.2, 0.9, 0.6]}}],
         "refine": {"tiled": {"scale": 2, "strength": 0.5}}}

BASES = [
    yaml.safe_load((ROOT / "presets" / "shots" / "example.yaml").read_text()),
    yaml.safe_load((ROOT / "presets" / "shots" / "toyworld-star.yaml").read_text()),
    {  # every section, on the toy model
        "version": 1, "model": "toyworld", "prompt": "a red circle and a white star on grass", "negative_prompt": "x",
        "seed": 5, "frames": 8, "width": 32, "height": 32, "fps": 8, "steps": 4, "guidance_scale": 7.5,
        "noise_prior": {"gamma": 0.3}, "camera": {"cx": 0.2, "cy": -0.1, "start_step": 1, "shift_steps": 2},
        "subjects": [{"phrase": "red circle", "subject": None, "reference": IMAGE, "reference_strength": 1.5,
                      "boxes": {0: [0.1, 0.2, 0.4, 0.6], "7": [0.5, 0.2, 0.9, 0.6]}},
                     {"phrase": "white star", "boxes": {3: [0.0, 0.0, 0.5, 0.5]}}],
        "background": {"reference": IMAGE, "strength": 0.5},
        "box_control": {"strength": 8.0, "amplify_steps": 2, "suppress": "subject_words", "interpolation": "smooth"},
        "reference_control": {"temporal_attention": True, "refresh_every": 2, "max_tokens": 32, "token_ratio": 8,
                              "unconditional": "plain"},
        "refine": {"face": {"enabled": True, "strength": 0.5, "detector": "boxes", "crop_factor": 2.5, "feather": 3,
                            "steps": 3, "prompt": "a face"},
                   "tiled": {"enabled": True, "strength": 0.3, "scale": 2, "upscaler": "lanczos", "tile": 32,
                             "overlap": 8, "steps": 2}},
    },
    SMALL,
]

ODD_STRINGS = ["", " ", "\n", "${oc.env:HOME}", "${prompt}", "\\${x}", "a" * 5000, "/x" * 3000, "../../etc/passwd",
               "/dev/zero", "/proc/self/environ", "presets", "/", "toyworld", "tiny", "no-such-model", "x.yaml",
               "nan", "inf", "1e309", "0x10", "~", "null", "yes", "on", "\x00", "é\u202e", "[", "{", "'", "red circle",
               "all_words", "boxes", "haar", "cubic", "-1", "007", IMAGE, str(ROOT / "README.md"), str(ROOT)]
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.sampled_from([0, 1, 2, 7, 8, 31, 32, 64, -1, 2**63]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 0.5, 1.0, -0.5, 1e-9, 0.999]),
    st.text(max_size=20), st.sampled_from(ODD_STRINGS))
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=5), st.dictionaries(st.one_of(st.text(max_size=8), st.integers(
    -3, 40)), SCALARS, max_size=3), st.lists(st.lists(SCALARS, max_size=4), max_size=2))


def _near(value):
    """Values of the same kind as `value`, mostly plausible ones."""
    if isinstance(value, bool):
        return st.booleans()
    if isinstance(value, int):
        return st.one_of(st.integers(max(0, value - 3), value + 3), st.integers(-2, 40),
                         st.sampled_from([0, 1, 8, 32, 64, 1000, 1001, 2**63 - 1]))
    if isinstance(value, float):
        return st.one_of(st.floats(0, 1), st.floats(-0.5, 1.5), st.sampled_from([0.0, 1.0, 10.0, 50.0, 101.0]))
    if isinstance(value, str):
        return st.sampled_from(["a red circle", "red circle", "a star", "toyworld", "tiny", "linear", "smooth",
                                "blank", "plain", "auto", "boxes", "cubic", "nearest", "", IMAGE, value.upper()])
    if isinstance(value, list):
        return st.lists(st.floats(-0.2, 1.2), min_size=3, max_size=5)
    return VALUES


def _paths(node, prefix=()):
    """Every path into a nested dict/list (containers and leaves)."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


OPS = ("tweak", "tweak", "tweak", "set", "set", "delete", "add", "wrap")


def _mutate(data, draw, allowed=None, ops=OPS):
    """One random edit of `data` in place: set, delete, add an unknown key, or put a container in a value's place."""
    paths = [p for p in _paths(data) if p and (allowed is None or ".".join(map(str, p)).startswith(allowed))]
    if not paths:
        return
    path = draw(st.sampled_from(paths))
    parent = data
    for k in path[:-1]:
        parent = parent[k]
    key = path[-1]
    op = draw(st.sampled_from(ops))
    if op == "tweak":  # a value of the same kind, near the valid range: probes the bounds
        parent[key] = draw(_near(parent[key]))
    elif op == "set":
        parent[key] = draw(VALUES)
    elif op == "delete" and isinstance(parent, dict):
        del parent[key]
    elif op == "delete":
        parent.pop(key)
    elif op == "add" and isinstance(parent, dict):
        parent[draw(st.sampled_from(["colour", "Prompt", "steps ", 3, "boxes", "subject"]))] = draw(VALUES)
    elif op == "add":
        parent.append(draw(VALUES))
    else:
        parent[key] = draw(st.sampled_from([[parent[key]], {"value": parent[key]}, [], {}]))


@st.composite
def mutated_shots(draw, bases=tuple(range(len(BASES))), allowed=None, edits=(1, 3), ops=OPS):
    import copy

    data = copy.deepcopy(BASES[draw(st.sampled_from(bases))])
    for _ in range(draw(st.integers(*edits))):
        _mutate(data, draw, allowed, ops)
    return data


def _dump(data) -> str:
    return yaml.safe_dump(data, allow_unicode=True, sort_keys=False)


# --- the property ------------------------------------------------------------------------------------------------


HANG_S = 30.0  # an example that takes longer is a hang (they take well under a second, on a loaded machine too)


def check_outcome(load, data=None) -> str:
    """'valid' or 'error' for a loader of a shot; fails the test on anything else."""
    t0 = time.perf_counter()
    try:
        shot = load()
        resolved, preset = engine.prepare(shot)
    except Exception as e:  # noqa: BLE001 - what it is, is the test
        assert time.perf_counter() - t0 < HANG_S, "validation took as long as a hang"
        trace = "".join(traceback.format_exception(e))
        assert cli._is_input_error(e), f"not an input error (a stack trace for the user):\n{trace}"
        message = str(e).strip()
        assert message and "\n" not in message, f"not one line: {message!r}"
        event(f"input error: {type(e).__name__}")
        return "error"
    assert time.perf_counter() - t0 < HANG_S, "validation took as long as a hang"
    # a valid shot writes and reads back as itself and resolves again to itself
    assert shotlib.loads(shotlib.dumps(shot)) == shot
    assert shotlib.from_container(shotlib.to_dict(resolved)) == resolved
    assert engine.prepare(resolved)[0] == resolved
    if isinstance(data, dict):  # holding the strings the file gave, nothing resolved or rewritten
        for name in ("model", "prompt", "negative_prompt"):
            if isinstance(data.get(name), str):
                assert getattr(shot, name) == data[name], name
        for i, s in enumerate(data.get("subjects") or []):
            if isinstance(s, dict) and isinstance(s.get("phrase"), str):
                assert shot.subjects[i].phrase == s["phrase"]
    event("valid shot")
    return "valid"


# --- in-process --------------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
@fuzz_settings(100)
@given(data=mutated_shots())
def test_mutated_shot_files_are_a_valid_shot_or_one_input_error(data):
    check_outcome(lambda: shotlib.loads(_dump(data)), data)
    check_outcome(lambda: shotlib.from_container(data), data)  # the page's and the sidecar's way in


@pytest.mark.timeout(120)
@fuzz_settings(100)
@given(text=st.one_of(st.text(max_size=120),
                      st.text(alphabet=":{}[]-,#&*!|>'\"%@` \n\t$~0123456789.abcdefnprstxyz_", max_size=120),
                      st.builds(lambda a, b: a + b, st.sampled_from([_dump(b) for b in BASES]), st.text(max_size=40))))
def test_random_text_is_a_valid_shot_or_one_input_error(text):
    check_outcome(lambda: shotlib.loads(text))


@pytest.mark.timeout(120)
@fuzz_settings(50)
@given(blob=st.one_of(st.binary(max_size=200), st.builds(lambda b, junk, at: b[:at] + junk + b[at:],
                                                        st.sampled_from([_dump(b).encode() for b in BASES]),
                                                        st.binary(min_size=1, max_size=8), st.integers(0, 400))))
def test_random_bytes_in_a_file_are_a_valid_shot_or_one_input_error(blob, tmp_path_factory):
    path = tmp_path_factory.mktemp("bytes") / "shot.yaml"
    path.write_bytes(blob)
    check_outcome(lambda: shotlib.load(path))


KEYS = ["seed", "prompt", "model", "steps", "frames", "noise_prior.gamma", "noise_prior", "camera.cx", "camera",
        "subjects", "subjects.0", "subjects.0.phrase", "subjects.0.boxes", "subjects.0.boxes.3", "subjects.0.boxes.0.2",
        "subjects.1.phrase", "subjects.x", "refine.tiled.scale", "refine.face", "version", "colour", "a..b", ""]


@pytest.mark.timeout(120)
@fuzz_settings(60)
@given(key=st.one_of(st.sampled_from(KEYS), st.text(max_size=12)),
       value=st.one_of(st.sampled_from(["", "[", "{", "'", "~", "${oc.env:HOME}", "[0, 0, 1, 1]", "{cx: 2}", "1e400",
                                        "[{phrase: x}]", "a" * 3000, "0x10", "nan"]),
                       st.sampled_from(["5", "0.5", "a red circle on grass", "red circle", "[0.1, 0.2, 0.5, 0.6]",
                                        "{gamma: 0.3}", "{cx: 0.2}", "true", "2", "tiny", "1"]),
                       st.text(max_size=30), VALUES.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip())),
       sep=st.sampled_from(["=", "=", " = ", ""]))
def test_random_overrides_are_a_valid_shot_or_one_input_error(key, value, sep):
    text = _dump(BASES[0])
    check_outcome(lambda: shotlib.loads(text, [f"{key}{sep}{value}"]))


# --- regressions the fuzzer found ----------------------------------------------------------------------------------


@pytest.mark.parametrize("text, field", [
    ("model: " + "a" * 5000 + "\nprompt: x", "model"),  # OSError: file name too long, from Path.is_file()
    ("prompt: a dog\nsubjects: [{phrase: dog, reference: " + "b" * 5000 + "}]", "subjects[0].reference"),
    ("prompt: a\nbackground: {reference: " + "/x" * 3000 + "}", "background.reference"),
    ("prompt: a\nrefine: {face: {detector_model: " + "c" * 5000 + "}}", "refine.face.detector_model"),
    ("3", "shot"),  # omegaconf asserts without a message on a lone value: IndexError taking its first line
    ("prompt: ${oc.env:HOME}", "prompt"),  # resolved: the environment's value became the prompt
    ("prompt: a\nnegative_prompt: ${prompt}", "negative_prompt"),
])
def test_regression_garbage_that_crashed_or_was_resolved_is_one_input_error(text, field):
    with pytest.raises(shotlib.ShotError) as e:
        engine.prepare(shotlib.loads(text))
    assert e.value.field == field and "\n" not in str(e.value)


@pytest.mark.parametrize("override", ["seed=[", "seed={", "prompt='", "prompt=" + "[" * 3000, "seed=${oc.env:HOME}"])
def test_regression_overrides_that_crashed_or_were_resolved_are_one_input_error(override):
    with pytest.raises(shotlib.ShotError) as e:
        shotlib.loads(_dump(BASES[0]), [override])
    assert e.value.field in ("--set", "seed") and "\n" not in str(e.value)


def test_regression_a_long_model_path_is_not_an_os_error():
    from studio.presets import load_model_preset

    with pytest.raises(shotlib.ShotError, match="model: no such model preset"):
        load_model_preset("m" * 5000)


# --- through the CLI ---------------------------------------------------------------------------------------------

CLI_FIELDS = ("model", "prompt", "seed", "noise_prior", "camera.cx", "camera.cy", "subjects", "refine.tiled.scale",
              "refine.tiled.enabled", "refine.tiled.upscaler", "box_control", "guidance_scale", "version", "colour")


@pytest.mark.timeout(300)
@fuzz_settings(6)
@given(data=st.one_of(mutated_shots(bases=(BASES.index(SMALL),), allowed=CLI_FIELDS, edits=(1, 1), ops=("tweak",)),
                      mutated_shots(bases=(BASES.index(SMALL),), allowed=CLI_FIELDS, edits=(1, 2))))
@example(data=SMALL)  # both ways out, whatever is drawn: a render ...
@example(data={**SMALL, "camera": {"cx": 1.5}})  # ... and an input error
def test_mutated_shot_files_through_studio_render(data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    (folder / "shot.yaml").write_text(_dump(data))
    out = folder / "out" / "shot.mp4"
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(["render", str(folder / "shot.yaml"), "--out", str(out), "--no-progress"])
    written = sorted(p.name for p in out.parent.iterdir()) if out.parent.exists() else []
    event(f"studio render exit {code}")
    if code == 0:
        assert written == ["shot.json", "shot.mp4"]
        sidecar = json.loads(out.with_suffix(".json").read_text())
        frames = sidecar["frames"]["shape"][0]
        assert export.probe_video(str(out))["frames"] == frames == sidecar["shot"]["frames"]
        assert not any(isinstance(v, float) and math.isnan(v) for v in sidecar["shot"]["camera"].values())
    else:
        lines = err.getvalue().strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("studio: error: "), err.getvalue()
        assert written == []  # nothing half-written


@pytest.mark.parametrize("text, override", [("prompt: a\n\"x\\ny\": 1", None), ("prompt: a", "0\n0=")])
def test_regression_a_field_name_with_a_line_break_is_still_one_line(text, override):
    with pytest.raises(shotlib.ShotError) as e:
        shotlib.loads(text, [override] if override else None)
    # one line; an unknown key that does not look like a field name is not quoted (issue 13: no file text shown)
    assert "\n" not in str(e.value) and ("unknown field" in str(e.value) or "not a field name" in str(e.value))
