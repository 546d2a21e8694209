"""Every video says exactly what made it: weight identity and machine settings in the sidecar, shot-file version,
and `studio render --verify`."""

import json
import shutil
import struct

import numpy as np
import pytest

from studio import engine, identity, machine, shot as shotlib, verify
from studio.cli import main
from studio.pipelines import PipelineManager
from studio.presets import models_root
from studio.subjects import apply

TOY = {"model": "toyworld", "prompt": "a red circle on grass", "seed": 5, "steps": 6}


def _render(tmp_path, data, name="v", manager=None):
    out = tmp_path / f"{name}.mp4"
    engine.render_to_files(shotlib.from_container(data), out, manager=manager)
    return out.with_suffix(".json")


def _copied_toyworld(tmp_path):
    """models/toyworld copied to tmp_path/toy, with a preset file naming it."""
    shutil.copytree(models_root() / "toyworld", tmp_path / "toy", ignore=shutil.ignore_patterns("README.md"))
    preset = tmp_path / "toy.yaml"
    preset.write_text(f"name: toycopy\nfamily: animatediff\nbase: {tmp_path / 'toy'}\n"
                      "defaults: {frames: 8, width: 32, height: 32, fps: 8, steps: 20, guidance_scale: 7.5}\n")
    return preset


def _flip_weight(path, key):
    """Change one byte of tensor `key` in a safetensors file (the high byte of its first fp16/fp32 value)."""
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    start = 8 + n + header[key]["data_offsets"][0]
    width = {"F16": 2, "BF16": 2, "F32": 4}[header[key]["dtype"]]
    raw[start + width - 1] ^= 0x40  # the exponent's top bit: a large change of one weight
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("model", ["tiny", "toyworld"])
def test_sidecar_names_every_component_by_hash(tmp_path, manager, model):
    sidecar = json.loads(_render(tmp_path, {**TOY, "model": model, "steps": 2}, manager=manager).read_text())
    assert sidecar["version"] == shotlib.SHOT_VERSION and sidecar["shot"]["version"] == shotlib.SHOT_VERSION
    comps = sidecar["identity"]["components"]
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= set(comps)
    for name in ("unet", "vae", "text_encoder", "tokenizer"):
        assert len(comps[name]["sha256"]) == 64 and comps[name]["files"] >= 2, name
        assert comps[name]["revision"] is None  # local folders
    if model == "toyworld":
        assert comps["unet"]["source"] == "models/toyworld/unet"  # no machine paths in a shared sidecar
        files = identity.folder_files(models_root() / "toyworld" / "unet")
        expected = identity.combined({p.name: identity.file_sha256(p) for p in files})
        assert comps["unet"]["sha256"] == expected
    else:
        assert comps["unet"]["source"].startswith("home:builtin/tiny-")
    assert sidecar["settings"] == machine.record(manager.get(engine.prepare(
        shotlib.from_container({**TOY, "model": model}))[1]))
    assert set(machine.RECORDED) == set(sidecar["settings"])
    assert len(sidecar["frames"]["sha256"]) == 64 and sidecar["frames"]["shape"][0] == 8


def test_file_hashes_are_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"abc")
    first = identity.file_sha256(f)
    calls = []
    real = identity.hashlib.sha256
    monkeypatch.setattr(identity.hashlib, "sha256", lambda *a: calls.append(1) or real(*a))
    assert identity.file_sha256(f) == first and not calls  # cached: no hashing
    f.write_bytes(b"abd")  # same size, new mtime
    assert identity.file_sha256(f) != first and calls
    cache = json.loads((identity._cache_file()).read_text())
    assert cache[str(f.resolve())][2] == identity.file_sha256(f)


def test_variant_files_are_the_ones_a_load_reads(tmp_path):
    for name in ("config.json", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                 "diffusion_pytorch_model.bin", "README.md"):
        (tmp_path / name).write_text(name)
    plain = [p.name for p in identity.folder_files(tmp_path)]
    fp16 = [p.name for p in identity.folder_files(tmp_path, "fp16")]
    assert plain == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert fp16 == ["config.json", "diffusion_pytorch_model.fp16.safetensors"]


def test_hub_snapshot_source_and_revision(tmp_path):
    commit = "a" * 40
    folder = tmp_path / "models--guoyww--animatediff-motion-adapter-v1-5-3" / "snapshots" / commit
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    ident = identity.folder_identity(folder)
    assert ident["source"] == "hub:guoyww/animatediff-motion-adapter-v1-5-3" and ident["revision"] == commit


def test_verify_passes_on_an_unchanged_render(tmp_path, manager, capsys):
    sidecar = _render(tmp_path, TOY, manager=manager)
    assert main(["render", "--verify", str(sidecar)]) == 0
    out = capsys.readouterr().out
    assert "frames match" in out and "DIFFERS" not in out and "components.unet" in out


def test_verify_names_a_changed_weight_file_and_exits_1(tmp_path, capsys):
    preset = _copied_toyworld(tmp_path)
    sidecar = _render(tmp_path, {**TOY, "model": str(preset)}, manager=PipelineManager(device="cpu"))
    _flip_weight(tmp_path / "toy" / "unet" / "diffusion_pytorch_model.safetensors", "conv_out.bias")
    assert main(["render", "--verify", str(sidecar)]) == 1
    lines = capsys.readouterr().out.splitlines()
    differs = [ln.split()[0] for ln in lines if ln.endswith("DIFFERS")]
    assert differs == ["components.unet", "frames"]
    assert "frames differ: max abs difference" in lines[-1] and "components.unet" in lines[-1]


def test_verify_reports_other_settings_but_matches_frames(tmp_path, manager, capsys):
    sidecar = _render(tmp_path, TOY, manager=manager)
    data = json.loads(sidecar.read_text())
    data["settings"]["torch_threads"] = 97  # as if rendered with other threads
    del data["frames"]["sha256"]  # an older sidecar: the MP4 is compared (through the same encoder)
    sidecar.write_text(json.dumps(data))
    assert main(["render", "--verify", str(sidecar)]) == 0
    out = capsys.readouterr().out
    assert [ln.split()[0] for ln in out.splitlines() if ln.endswith("DIFFERS")] == ["settings.torch_threads"]
    assert "frames match (mp4)" in out


def test_a_subject_retrained_under_the_same_name_is_detected(tmp_path, manager):
    from studio.subjects import tune
    from studio.subjects.library import SubjectLibrary

    lib = SubjectLibrary(tmp_path / "lib")
    rng = np.random.default_rng(0)
    photos = [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(2)]
    masks = [np.ones((64, 64), bool)] * 2

    def train(seed):
        tune.add_subject("rex", photos, masks, "tiny", tune.TuneSettings(class_word="dog", steps=2, seed=seed,
                                                                              video_weight=0),
                         library=lib, overwrite=True)

    train(0)
    shot = shotlib.from_container({"model": "tiny", "prompt": "a dog", "steps": 2, "subjects": [
        {"phrase": "dog", "subject": "rex"}]})
    _, records = apply.plan(shot, engine.prepare(shot)[1], lib)
    recorded = {"subjects": {"rex": identity.subject_identity(records[0][1])}}
    assert recorded["subjects"]["rex"]["files"]["pytorch_lora_weights.safetensors"]
    assert identity.differences(recorded, identity.on_disk(recorded, library=lib)) == []
    train(1)
    assert [d[0] for d in identity.differences(recorded, identity.on_disk(recorded, library=lib))] == ["subjects.rex"]


def test_a_render_records_the_subjects_and_inputs_it_used(tmp_path, manager):
    from PIL import Image

    ref = tmp_path / "ref.png"
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(ref)
    r = engine.render(shotlib.from_container({**TOY, "steps": 2, "background": {"reference": str(ref)}}), manager)
    from studio.ui import events

    assert r.identity["inputs"] == {"background.reference": identity.file_sha256(ref)}
    entry = {"identity": r.identity, "shot_yaml": shotlib.dumps(r.shot)}  # the page's History keeps these
    assert events.weights_state(entry) == "as rendered"
    Image.fromarray(np.full((32, 32, 3), 10, np.uint8)).save(ref)
    now = identity.on_disk(r.identity, r.shot)
    assert [d[0] for d in identity.differences(r.identity, now)] == ["inputs.background.reference"]
    assert events.weights_state(entry) == "changed: inputs.background.reference"
    assert events.weights_state({}) == "not recorded"


@pytest.mark.parametrize("text, problem", [
    ("not json {", "not a JSON sidecar"),
    ('{"seed": 3}', "has no shot"),
    ('{"version": 2, "shot": {"prompt": "x"}}', "newer than this Shot Studio"),
    ('{"shot": {"prompt": "a red circle", "background": {"reference": "/nonexistent/gone.png"}}}',
     "background.reference: image file not found"),
    ('{"shot": {"prompt": "a red circle", "subjects": [{"phrase": "red circle", "subject": "gone"}]}}',
     "subjects[0].subject"),
])
def test_verify_bad_input_is_one_line_exit_2(tmp_path, capsys, text, problem):
    sidecar = tmp_path / "s.json"
    sidecar.write_text(text)
    assert main(["render", "--verify", str(sidecar)]) == 2
    err = capsys.readouterr().err.strip()
    assert problem in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert main(["render", "--verify", str(tmp_path / "missing.json")]) == 2
    assert "sidecar file not found" in capsys.readouterr().err


def test_verify_takes_only_the_sidecar(tmp_path, capsys):
    assert main(["render", "x.yaml", "--verify", str(tmp_path / "s.json")]) == 2
    assert "--verify: give only the sidecar" in capsys.readouterr().err
    assert main(["render", "x.yaml"]) == 2
    assert "--out: required" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["version: 2\nprompt: x\n", "version: 0\nprompt: x\n", "version: two\n"])
def test_a_shot_of_an_unknown_version_is_refused(text):
    with pytest.raises(shotlib.ShotError) as e:
        shotlib.loads(text)
    assert e.value.field == "version"


def test_shot_files_carry_the_version_and_old_files_read_as_1(tmp_path):
    assert shotlib.loads("prompt: x").version == 1  # written before versions existed
    assert shotlib.dumps(shotlib.loads("prompt: x")).startswith("version: 1\n")
    with pytest.raises(shotlib.ShotError, match="newer than this Shot Studio"):
        shotlib.loads("prompt: x", ["version=2"])


def test_machine_settings_differences_ignore_what_was_not_recorded():
    now = {"device": "cpu", "torch_threads": 2, "offload": "none"}
    assert machine.differences({"device": "cpu", "torch_threads": 1}, now) == [("torch_threads", 1, 2)]
    assert machine.differences(None, now) == []
