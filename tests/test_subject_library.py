"""The subject library: roundtrips, atomic saves, what is (not) listed, pickle refusal, names, photo import."""

import json

import numpy as np
import pytest
import torch

from studio.subjects import library as L
from studio.subjects.library import SubjectError, SubjectLibrary, UnsafeSubjectError


def photos_and_masks(n: int = 2, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    photos = [rng.integers(0, 256, (24 + i, 32, 3), dtype=np.uint8) for i in range(n)]
    masks = [rng.random(p.shape[:2]) > 0.5 for p in photos]
    return photos, masks


def weights(seed: int = 0) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    prefix = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    lora = {f"{prefix}.lora_A.weight": torch.randn(4, 32, generator=g),
            f"{prefix}.lora_B.weight": torch.randn(32, 4, generator=g)}
    embeds = {"<rex>": torch.randn(32, generator=g), "<rex-2>": torch.randn(2, 32, generator=g)}
    return lora, embeds


def metadata(**over) -> dict:
    meta = {"trigger": "<rex> <rex-2> dog", "class_word": "dog", "base_model": "toyworld", "lora_rank": 4,
            "training": {"steps": 200, "lr": 1e-4}}
    meta.update(over)
    return meta


def save_rex(lib: SubjectLibrary, seed: int = 0, **kw):
    photos, masks = photos_and_masks(seed=seed)
    lora, embeds = weights(seed)
    return lib.save("rex", photos, masks, metadata(), lora=lora, embeds=embeds, **kw)


# --- roundtrip -----------------------------------------------------------------------------------------------


def test_save_list_get_load_roundtrip(tmp_path):
    lib = SubjectLibrary(tmp_path)
    photos, masks = photos_and_masks()
    lora, embeds = weights()
    saved = lib.save("Rex", photos, masks, metadata(), lora=lora, embeds=embeds)
    assert saved.name == "rex" and saved.path == tmp_path / "rex"
    assert [s.name for s in lib.list()] == ["rex"] and lib.exists("rex")
    subject = lib.get("rex")
    assert subject.trigger == "<rex> <rex-2> dog" and subject.class_word == "dog"
    assert subject.base_model == "toyworld" and subject.lora_rank == 4
    assert set(subject.methods) == {"lora", "tokens"} and set(subject.tokens) == {"<rex>", "<rex-2>"}
    assert subject.photos == 2 and subject.masks == 2
    assert subject.metadata["training"] == {"steps": 200, "lr": 1e-4}
    assert subject.metadata["format_version"] == L.FORMAT_VERSION and subject.created
    loaded_lora, loaded_embeds = lib.load_lora("rex"), lib.load_embeds("rex")
    assert loaded_lora.keys() == lora.keys() and all(torch.equal(loaded_lora[k], lora[k]) for k in lora)
    assert loaded_embeds.keys() == embeds.keys() and all(torch.equal(loaded_embeds[k], embeds[k]) for k in embeds)
    assert all(np.array_equal(a, b) for a, b in zip(lib.load_photos("rex"), photos))
    assert all(np.array_equal(a, b) for a, b in zip(lib.load_masks("rex"), masks))
    assert sorted(p.name for p in (tmp_path / "rex" / "photos").iterdir()) == ["000.png", "001.png"]
    assert (tmp_path / "rex" / L.LORA_FILE).is_file() and (tmp_path / "rex" / L.EMBEDS_FILE).is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["rex"]  # no temp folders left behind


def as_format_1(folder) -> None:
    """Rewrite a saved subject folder as format_version 1 wrote it: learned_embeds.safetensors with a key per token."""
    from safetensors.torch import save_file

    lib = SubjectLibrary(folder.parent)
    embeds = lib.load_embeds(folder.name)
    meta = json.loads((folder / L.METADATA_FILE).read_text())
    for key in ("embeds_key", "token_vectors"):
        meta.pop(key)
    meta["format_version"] = 1
    save_file({t: v.contiguous() for t, v in embeds.items()}, str(folder / L.EMBEDS_FILE), metadata={"format": "pt"})
    (folder / L.METADATA_FILE).write_text(json.dumps(meta))


def test_token_file_is_one_key_of_all_vectors_and_format_1_files_still_load(tmp_path):
    from safetensors.torch import load_file

    lib = SubjectLibrary(tmp_path)
    _, embeds = weights()
    save_rex(lib)
    d = load_file(str(tmp_path / "rex" / L.EMBEDS_FILE))
    assert list(d) == ["<rex>"] and d["<rex>"].shape == (3, 32)  # <rex>: 1 vector, <rex-2>: 2, in order
    assert torch.equal(d["<rex>"], torch.cat([embeds["<rex>"][None], embeds["<rex-2>"]]))
    assert lib.get("rex").metadata["token_vectors"] == [1, 2]
    # A subject saved by an earlier studio (format_version 1) is listed and loads the same vectors.
    as_format_1(tmp_path / "rex")
    assert load_file(str(tmp_path / "rex" / L.EMBEDS_FILE)).keys() == {"<rex>", "<rex-2>"}
    assert [s.name for s in lib.list()] == ["rex"] and lib.get("rex").metadata["format_version"] == 1
    loaded = lib.load_embeds("rex")
    assert list(loaded) == ["<rex>", "<rex-2>"] and all(torch.equal(loaded[k], embeds[k]) for k in embeds)


def test_tokens_only_subject_without_masks(tmp_path):
    lib = SubjectLibrary(tmp_path)
    photos, _ = photos_and_masks(1)
    _, embeds = weights()
    subject = lib.save("pip", photos, None, metadata(), embeds=embeds)
    assert subject.methods == ("tokens",) and subject.masks == 0 and subject.lora_path is None
    assert lib.load_masks("pip") == []
    with pytest.raises(SubjectError, match="has no LoRA"):
        lib.load_lora("pip")


def test_default_root_is_in_the_studio_home(tmp_path, monkeypatch):
    # A home of its own: the session's studio home holds the subjects other test files trained.
    monkeypatch.setenv("SHOT_STUDIO_HOME", str(tmp_path))
    assert SubjectLibrary().root == tmp_path / "subjects"
    assert SubjectLibrary().list() == []


# --- atomic saves --------------------------------------------------------------------------------------------


def test_a_save_that_fails_midway_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    lib = SubjectLibrary(tmp_path)
    with pytest.raises(RuntimeError, match="disk full"):
        save_rex(lib)
    assert lib.list() == [] and not lib.exists("rex")
    assert list(tmp_path.iterdir()) == []  # the temp folder is gone too


def test_a_failed_overwrite_keeps_the_previous_version(tmp_path, monkeypatch):
    import safetensors.torch

    lib = SubjectLibrary(tmp_path)
    save_rex(lib, seed=0)
    before = lib.load_lora("rex")
    calls = []

    def fails_on_second_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return real(tensors, filename, metadata=metadata)

    real = safetensors.torch.save_file
    monkeypatch.setattr(safetensors.torch, "save_file", fails_on_second_file)
    with pytest.raises(RuntimeError, match="disk full"):
        save_rex(lib, seed=1, overwrite=True)
    assert [s.name for s in lib.list()] == ["rex"]
    after = lib.load_lora("rex")
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert [p.name for p in tmp_path.iterdir()] == ["rex"]


def test_overwrite_replaces_and_refuses_without_the_flag(tmp_path):
    lib = SubjectLibrary(tmp_path)
    save_rex(lib, seed=0)
    with pytest.raises(ValueError, match="name: subject 'rex' already exists .*overwrite=True"):
        save_rex(lib, seed=1)
    save_rex(lib, seed=1, overwrite=True)
    new_lora, _ = weights(1)
    loaded = lib.load_lora("rex")
    assert all(torch.equal(loaded[k], new_lora[k]) for k in new_lora)
    assert [p.name for p in tmp_path.iterdir()] == ["rex"]  # the old version was moved aside and removed


def test_delete(tmp_path):
    lib = SubjectLibrary(tmp_path)
    save_rex(lib)
    lib.delete("rex")
    assert lib.list() == [] and list(tmp_path.iterdir()) == []
    with pytest.raises(SubjectError, match="no subject 'rex'"):
        lib.delete("rex")


# --- what is listed ------------------------------------------------------------------------------------------


def test_incomplete_and_temp_folders_are_not_listed(tmp_path):
    lib = SubjectLibrary(tmp_path)
    save_rex(lib)
    (tmp_path / "stray" / "photos").mkdir(parents=True)  # no metadata.json
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / L.METADATA_FILE).write_text("{not json")
    (tmp_path / "README.txt").write_text("a file, not a subject")
    import shutil

    shutil.copytree(tmp_path / "rex", tmp_path / ".tmp-rex-abc123")  # complete, but a temp folder
    shutil.copytree(tmp_path / "rex", tmp_path / "nolora")
    (tmp_path / "nolora" / L.LORA_FILE).unlink()  # metadata says lora, the file is gone
    shutil.copytree(tmp_path / "rex", tmp_path / "future")
    meta = json.loads((tmp_path / "future" / L.METADATA_FILE).read_text())
    (tmp_path / "future" / L.METADATA_FILE).write_text(json.dumps({**meta, "format_version": 99}))
    assert [s.name for s in lib.list()] == ["rex"]
    assert not lib.exists("stray") and not lib.exists("nolora")
    with pytest.raises(SubjectError, match="missing pytorch_lora_weights.safetensors"):
        lib.get("nolora")
    with pytest.raises(SubjectError, match=r"subjects\[1\].subject: no subject 'ghost' in .* \(known: rex\)"):
        lib.get("ghost", field="subjects[1].subject")


def test_a_list_of_a_missing_root_is_empty(tmp_path):
    assert SubjectLibrary(tmp_path / "nowhere").list() == []


# --- safety --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stray", ["pytorch_lora_weights.bin", "extra/model.pt", "x.ckpt", "y.pkl"])
def test_pickle_files_make_loading_refuse(tmp_path, monkeypatch, stray):
    def no_torch_load(*args, **kwargs):
        raise AssertionError("torch.load must never be called")

    monkeypatch.setattr(torch, "load", no_torch_load)
    lib = SubjectLibrary(tmp_path)
    save_rex(lib)
    path = tmp_path / "rex" / stray
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(UnsafeSubjectError, match=f"pickle files \\({stray}\\).*only loads safetensors"):
        lib.load_lora("rex")
    with pytest.raises(UnsafeSubjectError):
        lib.load_embeds("rex")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "lost token"])
def test_a_subject_with_broken_weights_is_not_listed_but_can_be_removed(tmp_path, caplog, damage):
    from safetensors.torch import save_file

    lib = SubjectLibrary(tmp_path)
    save_rex(lib)
    path = tmp_path / "rex" / (L.EMBEDS_FILE if damage == "lost token" else L.LORA_FILE)
    if damage == "garbage":
        path.write_bytes(b"garbage")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:-16])
    else:
        save_file({"<rex>": torch.zeros(32)}, str(path))  # metadata names <rex> and <rex-2>
    want = {"garbage": f"{L.LORA_FILE} is not readable safetensors", "truncated": f"{L.LORA_FILE} is not readable",
            "lost token": f"{L.EMBEDS_FILE} lacks the tokens <rex-2>"}[damage]
    with caplog.at_level("WARNING", logger="studio.subjects.library"):
        assert lib.list() == [] and not lib.exists("rex")
    assert want in caplog.text
    with pytest.raises(SubjectError, match=f"subjects\\[0\\].subject: subject 'rex': {want}"):
        lib.get("rex", field="subjects[0].subject")
    with pytest.raises(SubjectError, match=want):
        lib.load_lora("rex")
    lib.delete("rex")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["../x", "/abs", "a/b", "", ".", "..", ".hidden", "a\\b", "c:x", "-flag", "a" * 65,
                                  "rex!", "é"])
def test_sanitize_rejects_paths_and_odd_names(name):
    with pytest.raises(ValueError) as err:
        L.sanitize_name(name)
    assert str(err.value).startswith("name: ") and repr(name) in str(err.value)


def test_sanitize_normalises_case_and_spaces():
    assert L.sanitize_name("Rex") == "rex"
    assert L.sanitize_name("  My Dog_2 ") == "my-dog_2"


def test_save_rejects_traversal_before_writing(tmp_path):
    lib = SubjectLibrary(tmp_path / "lib")
    photos, masks = photos_and_masks()
    lora, _ = weights()
    with pytest.raises(ValueError, match="name: must be a plain subject name"):
        lib.save("../evil", photos, masks, metadata(), lora=lora)
    assert not (tmp_path / "evil").exists() and not (tmp_path / "lib").exists()


# --- save validation -----------------------------------------------------------------------------------------


def test_save_checks_metadata_and_inputs(tmp_path):
    lib = SubjectLibrary(tmp_path)
    photos, masks = photos_and_masks()
    lora, embeds = weights()
    with pytest.raises(ValueError, match="metadata.base_model: must be a non-empty string"):
        lib.save("rex", photos, masks, metadata(base_model=""), lora=lora)
    with pytest.raises(ValueError, match="metadata.methods: must match the weights given"):
        lib.save("rex", photos, masks, metadata(methods=["lora", "tokens"]), lora=lora)
    with pytest.raises(ValueError, match="metadata.tokens: must be the embeddings' tokens"):
        lib.save("rex", photos, masks, metadata(tokens=["<other>"]), embeds=embeds)
    with pytest.raises(ValueError, match=r"masks: need one mask per photo or none \(got 1 masks for 2 photos\)"):
        lib.save("rex", photos, masks[:1], metadata(), lora=lora)
    with pytest.raises(ValueError, match=r"masks\[1\]: must match the image's"):
        lib.save("rex", photos, [masks[0], masks[0]], metadata(), lora=lora)
    with pytest.raises(ValueError, match=r"photos\[0\]: must be uint8"):
        lib.save("rex", [photos[0].astype(np.float32)], None, metadata(), lora=lora)
    with pytest.raises(ValueError, match=r"embeds\['<rex>'\]: must be a tensor with 1 or 2 dims \(got shape"):
        lib.save("rex", photos, masks, metadata(), embeds={"<rex>": torch.zeros(1, 2, 3)})
    with pytest.raises(ValueError, match="metadata: must be JSON-serializable"):
        lib.save("rex", photos, masks, metadata(training={"when": object()}), lora=lora)
    assert list(tmp_path.iterdir()) == []


def test_lora_keeps_any_tensor_rank(tmp_path):
    lib = SubjectLibrary(tmp_path)
    photos, _ = photos_and_masks(1)
    lora = {"a.alpha": torch.tensor(8.0), "conv.lora_down.weight": torch.ones(4, 8, 3, 3)}
    lib.save("conv", photos, None, metadata(), lora=lora)
    loaded = lib.load_lora("conv")
    assert all(torch.equal(loaded[k], lora[k]) for k in lora)


def test_inconsistent_metadata_is_not_listed(tmp_path):
    lib = SubjectLibrary(tmp_path)
    save_rex(lib)
    meta_path = tmp_path / "rex" / L.METADATA_FILE
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "masks": 1}))  # 2 photos, 1 mask
    assert lib.list() == []
    with pytest.raises(SubjectError, match="inconsistent photos, masks or methods"):
        lib.get("rex")


def _preset(name: str, base: str, **kw):
    from studio.presets import ModelPreset

    return ModelPreset(name=name, base=base, **kw)


def test_base_model_is_compared_by_the_weights_recorded_at_training(tmp_path, monkeypatch):
    lib = SubjectLibrary(tmp_path / "lib")
    photos, masks = photos_and_masks()
    lora, _ = weights()
    trained_on = _preset("sd15", "org/sd15", motion_adapter="org/motion-v3")
    subject = lib.save("rex", photos, masks, metadata(base_model="sd15", base_weights=L.base_weights(trained_on)),
                       lora=lora)
    # Another preset name on the same weights shares the subject; other weights (base or adapter) do not.
    L.check_base_model(subject, _preset("sd15-fast", "org/sd15", motion_adapter="org/motion-v3", dtype="float16"))
    for other, now in ((_preset("sd15", "org/other", motion_adapter="org/motion-v3"), "org/other + org/motion-v3"),
                       (_preset("sd15", "org/sd15", motion_adapter="org/motion-v2"), "org/sd15 + org/motion-v2")):
        with pytest.raises(ValueError) as err:
            L.check_base_model(subject, other, field="subjects[0].subject")
        assert str(err.value) == (f"subjects[0].subject: 'rex' was trained for base model 'sd15' (org/sd15 + "
                                  f"org/motion-v3), not 'sd15' ({now}); train it again for this model or change "
                                  f"`model`")
    with pytest.raises(ValueError, match=r"trained for base model 'sd15', not 'other'; train it again"):
        L.check_base_model(subject, _preset("other", "org/other"))
    # The checkout's own models are recorded as 'models/...', however the preset names the folder.
    monkeypatch.setenv("SHOT_STUDIO_MODELS", str(tmp_path / "models"))
    (tmp_path / "models" / "toy").mkdir(parents=True)
    assert L.base_weights(_preset("a", "models/toy"))["base"] == "models/toy"
    assert L.base_weights(_preset("b", str(tmp_path / "models" / "toy")))["base"] == "models/toy"
    assert L.base_weights(_preset("c", "org/x", family="zeroscope", motion_adapter="org/m"))["motion_adapter"] is None


def test_base_model_of_older_subjects_is_compared_by_name(tmp_path):
    subject = save_rex(SubjectLibrary(tmp_path))  # metadata without base_weights
    L.check_base_model(subject, _preset("toyworld", "anything"))
    with pytest.raises(ValueError) as err:
        L.check_base_model(subject, "tiny", field="subjects[0].subject")  # a preset by name
    assert str(err.value) == ("subjects[0].subject: 'rex' was trained for base model 'toyworld', not 'tiny'; train "
                              "it again for this model or change `model`")


# --- photo import --------------------------------------------------------------------------------------------


def test_import_photos_converts_to_rgb(tmp_path):
    from PIL import Image

    Image.new("RGBA", (40, 30), (10, 20, 30, 128)).save(tmp_path / "a.png")
    Image.new("L", (20, 20), 99).save(tmp_path / "b.JPG")
    Image.new("RGB", (3000, 1500), (1, 2, 3)).save(tmp_path / "c.webp")
    a, b, c = L.import_photos([tmp_path / "a.png", tmp_path / "b.JPG", str(tmp_path / "c.webp")])
    assert a.shape == (30, 40, 3) and a.dtype == np.uint8 and tuple(a[0, 0]) == (10, 20, 30)
    assert b.shape == (20, 20, 3)
    assert c.shape == (512, 1024, 3)  # scaled down to MAX_PHOTO_SIDE


def test_import_photos_rejects_bad_files(tmp_path, monkeypatch):
    from PIL import Image

    Image.new("RGB", (16, 16)).save(tmp_path / "ok.png")
    (tmp_path / "fake.png").write_bytes(b"not an image")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match=r"photos\[1\]: must be a png, jpg, jpeg, webp file \(got '.*notes.txt'\)"):
        L.import_photos([tmp_path / "ok.png", tmp_path / "notes.txt"])
    with pytest.raises(ValueError, match=r"photos\[0\]: not a readable image \('.*fake.png'"):
        L.import_photos([tmp_path / "fake.png"])
    with pytest.raises(ValueError, match=r"photos\[0\]: file not found \(got '.*missing.jpg'\)"):
        L.import_photos([tmp_path / "missing.jpg"])
    with pytest.raises(ValueError, match=r"photos: need 1..10 photo files \(got '0 photos'\)"):
        L.import_photos([])
    with pytest.raises(ValueError, match="photos: need 1..10"):
        L.import_photos([tmp_path / "ok.png"] * 11)
    monkeypatch.setattr(L, "MAX_PHOTO_BYTES", 10)
    with pytest.raises(ValueError, match=r"photos\[0\]: 0.0 MB is over the .* MB limit \(got '.*ok.png'\)"):
        L.import_photos([tmp_path / "ok.png"])
