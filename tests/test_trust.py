"""A served studio is reachable by strangers: what a shot from the web may name (studio.trust), the operator's
settings (studio.settings), and that no error quotes a file, over the web or in the CLI."""

import copy
import inspect
import json
import os
import re
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
import yaml

from studio import cli, shot as shotlib, trust
from studio.settings import Settings, SettingsError, env_name, markdown_table
from studio.ui import events as ev, subjects as sj

ROOT = Path(__file__).resolve().parent.parent
STAR = (ROOT / "presets/shots/toyworld-star.yaml").read_text()
PASSWD = "/etc/passwd"
MARKER = "SECRET-7c1f2e"  # in every file the tests plant outside the studio: no message may contain it
HOSTILE_FIELDS = ("model", "subjects[0].reference", "background.reference", "refine.face.detector_model")


def _png(path: Path, colour=(200, 40, 200)) -> str:
    from PIL import Image

    img = np.zeros((40, 48, 3), np.uint8)
    img[:] = colour
    Image.fromarray(img).save(path)
    return str(path)


@pytest.fixture(scope="module")
def outside(tmp_path_factory):
    """Valid files outside the studio: the CLI may name them, the web may not. Each holds MARKER."""
    d = tmp_path_factory.mktemp("outside")
    preset = d / "preset.yaml"
    preset.write_text(f"name: {MARKER}\ndescription: {MARKER}\nbase: builtin:tiny\n"
                      "defaults: {frames: 8, width: 64, height: 64, fps: 8, steps: 2, guidance_scale: 7.5}\n")
    from studio.refine import haar_cascade_path

    cascade = d / "cascade.xml"
    shutil.copyfile(haar_cascade_path(), cascade)
    with open(cascade, "a") as f:
        f.write(f"<!-- {MARKER} -->\n")
    return {"model": str(preset), "subjects[0].reference": _png(d / "ref.png"),
            "background.reference": _png(d / "bg.png"), "refine.face.detector_model": str(cascade)}


def naming(field: str, path: str, base: str = STAR) -> str:
    """The shot `base` with `field` set to `path`."""
    data = yaml.safe_load(base)
    if field == "model":
        data["model"] = path
    elif field == "subjects[0].reference":
        data["subjects"][0]["reference"] = path
    elif field == "background.reference":
        data["background"] = {"reference": path}
    else:
        data["refine"] = {"face": {"enabled": True, "detector_model": path}}
    return yaml.safe_dump(data)


def _secrets() -> list[str]:
    """Strings that must never appear in a message or an output: MARKER and the first line of /etc/passwd."""
    out = [MARKER]
    if Path(PASSWD).is_file():
        out.append(Path(PASSWD).read_text().splitlines()[0])
    return out


def _clean(text: str) -> None:
    for secret in _secrets():
        assert secret not in text, f"a file's content leaked: {text[:300]}"


# --- every event of the page ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def page(manager):
    from studio.ui.app import Page

    p = Page(manager)
    p.demo = p.build()
    return p


def _files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


def _arguments(page, fn, shot_yaml: str, field: str, path: str) -> dict:
    """Keyword arguments for an event function, as a hostile browser would send them: the shot file, the model
    dropdown and every file input name `path`; the other components send the page's values (the API's None)."""
    import gradio as gr

    names, comps = fn.input_parameter_names, fn.inputs
    assert len(names) == len(comps) and all(names), f"{fn.name}: every input is passed by name"
    api = set(map(id, page.api_form.values()))
    kwargs = {}
    for name, comp in zip(names, comps):
        if comp is page.shot_yaml:
            value = shot_yaml
        elif isinstance(comp, gr.State):
            value = copy.deepcopy(comp.value)
        elif isinstance(comp, (gr.Image, gr.File)):
            value = [path] if getattr(comp, "file_count", "single") == "multiple" else path
        elif type(comp).__name__ == "image_annotator":
            value = {"image": np.zeros((384, 384, 3), np.uint8), "boxes": []}
        elif id(comp) in api:
            value = None
        elif comp is page.model:
            value = path if field == "model" else comp.value
        else:
            value = comp.value
        kwargs[name] = value
    params = inspect.signature(fn.fn).parameters
    if "request" in params:
        kwargs["request"] = types.SimpleNamespace(session_hash="hostile")
    if "progress" in params:
        kwargs["progress"] = lambda *a, **k: None
    return kwargs


@pytest.mark.parametrize("where", ["passwd", "outside"])
def test_every_event_of_the_page_refuses_a_shot_naming_server_files(page, outside, where, monkeypatch):
    """Every event handler of the page (from the Blocks), called as the browser can call it, with a shot naming a
    server file as model, reference, background and detector model: a refusal naming the field, no file content,
    nothing written. "outside" names valid files (a preset, images, a cascade) that the CLI accepts."""
    import gradio as gr

    monkeypatch.delenv("SPACE_ID", raising=False)
    fns = list(page.demo.fns.values())
    assert len(fns) > 40 and {"render", "save_shot", "upload_image", "load_shot"} <= {fn.api_name for fn in fns}
    handlers = {}  # one call per handler: the same function on the same inputs, wired to several triggers, is one
    for fn in fns:
        handlers.setdefault((inspect.unwrap(fn.fn), tuple(map(id, fn.inputs))), fn)
    fns = list(handlers.values())
    before = _files(ev.output_dir())
    refused = 0
    for field in HOSTILE_FIELDS:
        path = PASSWD if where == "passwd" else outside[field]
        shot_yaml = naming(field, path)
        for fn in fns:
            kwargs = _arguments(page, fn, shot_yaml, field, path)
            try:
                out = fn.fn(**kwargs)
                out = list(out) if inspect.isgenerator(out) else out
            except gr.Error as e:
                _clean(e.message)
                assert len(e.message.splitlines()) == 1, e.message
                if page.shot_yaml in fn.inputs:
                    assert e.message.startswith(f"{field}: over the web"), (fn.name, e.message)
                elif any(isinstance(c, (gr.Image, gr.File)) for c in fn.inputs) and fn.name != "train":
                    assert "must be uploaded" in e.message, (fn.name, e.message)
                refused += 1
                continue
            assert page.shot_yaml not in fn.inputs, f"{fn.name} took a shot naming {field}: {path}"
            assert not any(isinstance(c, (gr.Image, gr.File)) for c in fn.inputs), f"{fn.name} took {path}"
            _clean(repr(out))
    assert refused >= 4 * 25
    assert _files(ev.output_dir()) == before  # nothing rendered, copied or written
    if where == "outside":  # the same shots are fine from the CLI and the user's own files
        for field in HOSTILE_FIELDS:
            assert ev.resolved(naming(field, outside[field]), model=None) is not None


def test_the_checks_hold_where_the_work_leaves_the_event(outside, monkeypatch):
    """A training thread and a GPU worker get the caller's policy explicitly, not from the context."""
    from studio.ui import app

    policy = app.web_trust()
    with pytest.raises(ev.UserError, match="^model: over the web"):
        app._render_job("render-x", naming("model", outside["model"]), {}, policy)
    fake = [{"photo": "p.png", "mask": "m.png", "backend": "test"}]
    with pytest.raises(ev.UserError, match="^model: over the web"):
        app._train_job("train-x", dict(photo_set=fake, name="x", phrase="sks star", method="lora", steps=None,
                                       model=PASSWD), policy)


def test_a_reference_must_be_uploaded_over_the_web_and_may_be_any_file_from_the_cli(tmp_path, manager, monkeypatch):
    from gradio.utils import get_upload_folder

    from studio import engine

    from studio.ui.app import guarded

    ref = _png(tmp_path / "purple.png")
    shot = naming("subjects[0].reference", ref, base="model: toyworld\nprompt: a red circle on grass\nsteps: 2\n"
                                                       "subjects: [{phrase: red circle}]\n")
    resolve = guarded(ev.resolved)
    message = _refusal(ev.resolved, shot)
    missing = str(tmp_path / "none.png")
    gone = _refusal(ev.resolved, shot.replace(ref, missing))
    assert message.replace(ref, "X") == gone.replace(missing, "X")  # the same words whether or not it exists
    assert message.startswith("subjects[0].reference: over the web an image must be one uploaded")
    # a link in the uploads folder to a file outside is outside: compared by resolved real path
    link = ev._subdir("uploads") / "link-to-outside.png"
    link.unlink(missing_ok=True)
    link.symlink_to(ref)
    assert _refusal(ev.resolved, shot.replace(ref, str(link))).startswith("subjects[0].reference: over the web")
    link.unlink()
    # an outside file handed to the upload endpoint as if uploaded is refused; an upload is accepted
    assert _refusal(ev.upload_image_event, ref).startswith("image: over the web a file must be uploaded")
    arrived = Path(get_upload_folder(), "test-trust", "purple.png")
    arrived.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ref, arrived)
    handle = guarded(ev.upload_image_event)(str(arrived))
    assert Path(handle).parent == ev.output_dir() / "uploads"
    assert resolve(shot.replace(ref, handle)).subjects[0].reference == handle
    # from the CLI the outside file is accepted: it renders (on the session's pipelines)
    monkeypatch.setattr(engine, "_default_manager", manager)
    shot_file = tmp_path / "shot.yaml"
    shot_file.write_text(shot)
    assert cli.main(["render", str(shot_file), "--out", str(tmp_path / "out.mp4"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "out.json").read_text())["shot"]["subjects"][0]["reference"] == ref


def test_web_names_are_names(outside):
    policy = trust.web(images=(ev.output_dir(),))
    with trust.using(policy):
        for bad in ("../rex", "/tmp/rex", ".rex", "a/b"):
            with pytest.raises(shotlib.ShotError, match=r"^subjects\[0\]\.subject: over the web"):
                shotlib.loads("prompt: a star\nsubjects: [{phrase: star, subject: '%s'}]" % bad)
        shotlib.loads("prompt: a star\nsubjects: [{phrase: star, subject: rex}]")
        shot = shotlib.loads(naming("refine.face.detector_model", "haarcascade_frontalface_alt.xml"))
        named = shotlib.resolve(shot, _preset("toyworld")).refine.face.detector_model
        assert named == "haarcascade_frontalface_alt.xml"
        with pytest.raises(shotlib.ShotError, match="^model: over the web.*toyworld"):
            shotlib.loads(naming("model", "presets/models/toyworld.yaml"))
    # the operator's allow-list: shipped names it keeps, and its own preset files by path
    allowed = trust.web(settings=Settings(web_models=("toyworld", outside["model"])))
    with trust.using(allowed):
        assert shotlib.loads(naming("model", outside["model"])).model == outside["model"]
        with pytest.raises(shotlib.ShotError, match="^model: .*SHOT_STUDIO_WEB_MODELS"):
            shotlib.loads(naming("model", "tiny"))


def _preset(name):
    from studio.presets import load_model_preset

    return load_model_preset(name)


# --- caps and permissions ---------------------------------------------------------------------------------------


def _guarded(fn):
    from studio.ui.app import guarded

    return guarded(fn)


def _refusal(fn, *args, **kwargs) -> str:
    """The one-line message the page shows when `fn`, run as an event of the page, refuses its input."""
    import gradio as gr

    with pytest.raises(gr.Error) as e:
        _guarded(fn)(*args, **kwargs)
    assert len(e.value.message.splitlines()) == 1
    return e.value.message


def test_caps_refuse_an_oversized_web_shot_naming_the_cap_and_its_variable(monkeypatch):
    monkeypatch.setenv("SHOT_STUDIO_MAX_PIXEL_STEPS", "100000")
    before = _files(ev.output_dir())
    assert _refusal(ev.render_event, STAR) == (  # 8 frames × 32 × 32 × 20 steps
        "frames×width×height×steps: 163,840 pixel-steps (render 163,840) is over this studio's cap of 100,000 "
        "(SHOT_STUDIO_MAX_PIXEL_STEPS)")
    assert _guarded(ev.resolved)(STAR, steps=12).steps == 12  # 98,304: within the cap
    tiled = _refusal(ev.resolved, STAR, steps=12, refine_tiled=True, refine_tiled_strength=1.0)
    assert "(render 98,304 + Tiled VCD 393,216)" in tiled  # the refinement's pixels and steps count
    monkeypatch.setenv("SHOT_STUDIO_MAX_PIXEL_STEPS", "0")
    assert _refusal(ev.resolved, STAR, refine_tiled=True, refine_tiled_scale=3) == (
        "refine.tiled.scale: over this studio's cap of 2 (SHOT_STUDIO_MAX_REFINE_SCALE) (got 3)")
    assert _guarded(ev.resolved)(STAR, refine_tiled=False, refine_tiled_scale=3)  # only when it runs
    assert _files(ev.output_dir()) == before
    monkeypatch.setenv("SHOT_STUDIO_MAX_PIXEL_STEPS", "100000")
    assert ev.resolved(STAR, refine_tiled=True, refine_tiled_scale=4).steps == 20  # the CLI's shots: no caps


def test_readme_cap_example_is_the_real_message():
    readme = (ROOT / "README.md").read_text()
    quoted = re.search(r"\(`(frames×width×height×steps: [^`]*)`\)", readme, re.S).group(1)
    with trust.using(trust.web(settings=Settings())), pytest.raises(ev.UserError) as e:
        ev.resolved("model: animatediff-sd15\nprompt: a dog\nframes: 32\nwidth: 512\nheight: 512\nsteps: 50\n")
    assert str(e.value) == " ".join(quoted.split())


def test_what_strangers_may_do_is_the_operators(monkeypatch, manager, tmp_path):
    from studio.ui.app import Page

    monkeypatch.setenv("SHOT_STUDIO_ALLOW_RENDER", "0")
    assert _refusal(ev.render_event, STAR) == \
        "render: rendering is switched off on this studio (SHOT_STUDIO_ALLOW_RENDER)"
    assert ev.render_ready(STAR).prompt  # the CLI's and the user's own shots are not the operator's to stop
    # on a Space, strangers may not train unless the operator says so; never delete unless the operator says so
    monkeypatch.setenv("SPACE_ID", "someone/studio")
    photos = [str(tmp_path / "a.png")]
    assert _refusal(sj.photos_event, photos, "sks star") == \
        "train: teaching new subjects is switched off on this studio (SHOT_STUDIO_ALLOW_TRAIN)"
    assert _refusal(sj.delete_subject_event, "rex") == \
        "delete: deleting library subjects is switched off on this studio (SHOT_STUDIO_ALLOW_DELETE)"
    page = Page(manager)
    page.build()
    assert not page.teach.visible and not page.delete_lib.visible  # the page does not offer them
    # allowed, with caps on photos and steps
    monkeypatch.setenv("SHOT_STUDIO_ALLOW_TRAIN", "1")
    monkeypatch.setenv("SHOT_STUDIO_MAX_TRAIN_PHOTOS", "1")
    monkeypatch.setenv("SHOT_STUDIO_MAX_TRAIN_STEPS", "50")
    assert _refusal(sj.photos_event, photos * 2, "sks star") == \
        "photos: 2 photos; this studio takes at most 1 (SHOT_STUDIO_MAX_TRAIN_PHOTOS)"
    fake = [{"photo": "p.png", "mask": "m.png", "backend": "test"}]
    assert _refusal(sj.train_subject, fake, "x", "sks star", "lora", None, "toyworld") == \
        "steps: 80 training steps; this studio trains at most 50 (SHOT_STUDIO_MAX_TRAIN_STEPS)"  # the default's
    assert _refusal(sj.train_subject, fake, "x", "sks star", "lora", 10, PASSWD).startswith("model: over the web")
    monkeypatch.setenv("SHOT_STUDIO_ALLOW_DELETE", "yes")
    assert "no subject 'nobody-here'" in _refusal(sj.delete_subject_event, "nobody-here")  # it reaches the library


def test_output_names_cannot_be_guessed(tmp_path):
    import hashlib

    folder = ev.output_dir()
    a, b = ev._unique_stem(folder, 3), ev._unique_stem(folder, 3)
    assert a != b and re.fullmatch(r"\d{8}-\d{6}-3-[0-9a-f]{24}", a)
    ref = _png(tmp_path / "r.png")
    stored = Path(ev.store_image(ref, "image"))
    data = Path(ref).read_bytes()
    assert stored.stem == ev.private_name(data) and ev.store_image(ref, "image") == str(stored)  # one file
    assert hashlib.sha256(data).hexdigest()[:16] not in stored.stem and len(stored.stem) == 32
    saved = Path(ev.save_shot_event(STAR, "my-shot"))
    assert saved.name == "my-shot.yaml" and re.fullmatch(r"[0-9a-f]{24}", saved.parent.name)


def test_the_output_folder_keeps_its_cap_oldest_first(tmp_path, monkeypatch):
    monkeypatch.setenv("SHOT_STUDIO_HOME", str(tmp_path))
    monkeypatch.setenv("SHOT_STUDIO_MAX_DISK_MB", "1")
    root = ev.output_dir()
    files = []
    for i in range(5):  # 5 × 300 kB, oldest first
        p = root / f"sub{i}" / f"f{i}.bin"
        p.parent.mkdir()
        p.write_bytes(b"\0" * 300_000)
        os.utime(p, (1000 + i, 1000 + i))
        files.append(p)
    assert ev.keep_disk({files[0]}) == 2  # the kept one stays though oldest; then the oldest others go
    assert [p.exists() for p in files] == [True, False, False, True, True]
    assert not (root / "sub1").exists()  # emptied folders go too
    monkeypatch.setenv("SHOT_STUDIO_MAX_DISK_MB", "0")
    assert ev.keep_disk() == 0


# --- the served studio ------------------------------------------------------------------------------------------


def readme_shot() -> str:
    readme = (ROOT / "README.md").read_text()
    return re.search(r'shot = """\n(.*?)"""', readme, re.S).group(1)


def test_render_endpoint_renders_the_shot_it_is_given(manager, free_port, monkeypatch):
    """The README's example against `studio ui`: shot_yaml alone renders that shot (its sidecar says so); the
    issue's /etc/passwd call is a refusal without the file; History is per session; the queue has its cap."""
    from gradio_client import Client, handle_file

    from studio import ui

    monkeypatch.setenv("SHOT_STUDIO_MAX_QUEUE", "5")
    app, url, _ = ui.launch(port=free_port(), prevent_thread_lock=True, quiet=True, manager=manager)
    try:
        assert app.get_blocks()._queue.max_size == 5
        text = readme_shot()
        given = shotlib.loads(text)
        assert given.prompt != shotlib.loads(ev.default_shot_yaml()).prompt  # not the page's opening shot
        client = Client(url, verbose=False)
        video, downloads, resolved, status, table = client.predict(shot_yaml=text, api_name="/render")
        sidecar = json.loads(Path(downloads[4]["path"] if isinstance(downloads[4], dict) else downloads[4])
                             .read_text())
        shot = sidecar["shot"]
        assert (shot["model"], shot["prompt"], shot["seed"], shot["steps"], shot["noise_prior"]["gamma"],
                shot["camera"]["cx"], shot["negative_prompt"]) == (
            "toyworld", "a purple circle moving left on grass", 3, 12, 0.5, -0.2, "")
        assert shot["subjects"][0]["boxes"]["7"] == [0.1, 0.3, 0.45, 0.7]
        assert "seed 3" in status and re.search(r"-3-[0-9a-f]{24}\.json$", str(downloads[4]))
        # the call: a refusal naming the field, without the file
        with pytest.raises(Exception) as e:
            client.predict(shot_yaml=f"model: {PASSWD}\nprompt: a red circle\n", model=None, prompt=None,
                           api_name="/render")
        assert "model: over the web" in str(e.value)
        _clean(str(e.value))
        # an image goes up through /upload_image, and the name it returns is what a shot names
        png = _png(Path(ev.output_dir().parent / "upload-me.png"))
        handle = client.predict(image=handle_file(png), api_name="/upload_image")
        assert Path(handle).parent == ev.output_dir() / "uploads"
        with_ref = naming("background.reference", handle, base=text)
        saved = client.predict(shot_yaml=with_ref, name="with-ref", api_name="/save_shot")
        assert shotlib.load(saved["path"] if isinstance(saved, dict) else saved).background.reference == handle
        # another browser session: its History is its own
        other = Client(url, verbose=False)
        *_, table2 = other.predict(shot_yaml=text, steps=2, api_name="/render")
        assert len(table["data"]) == 1 and len(table2["data"]) == 1
    finally:
        app.get_blocks().close()


# --- settings ---------------------------------------------------------------------------------------------------


def test_settings_are_shot_studio_variables_and_the_readme_table_is_the_code():
    from studio.settings import machine_rows

    names = [env_name(f) for f in Settings.__dataclass_fields__] + [row[0] for row in machine_rows()]
    assert all(n.startswith("SHOT_STUDIO_") for n in names) and len(set(names)) == len(names)
    assert {"SHOT_STUDIO_THREADS", "SHOT_STUDIO_OFFLOAD", "SHOT_STUDIO_DTYPE"} <= set(names)  # one table of them all
    assert not {"SHOT_STUDIO_HOME", "SHOT_STUDIO_MODELS", "SHOT_STUDIO_PRESETS"} & set(names)
    assert markdown_table() in (ROOT / "README.md").read_text(), "paste `python -m studio.settings` into README.md"
    assert len(markdown_table().splitlines()) == len(names) + 2
    s = Settings.from_env({"SHOT_STUDIO_MAX_QUEUE": "3", "SHOT_STUDIO_ALLOW_DELETE": "on",
                           "SHOT_STUDIO_WEB_MODELS": "toyworld, /srv/mine.yaml"})
    assert (s.max_queue, s.allow_delete, s.web_models, s.allow_train) == (3, True, ("toyworld", "/srv/mine.yaml"),
                                                                         True)
    assert Settings.from_env({"SPACE_ID": "a/b"}).allow_train is False  # a Space: training off unless allowed
    assert Settings.from_env({"SPACE_ID": "a/b", "SHOT_STUDIO_ALLOW_TRAIN": "1"}).allow_train is True
    for var, value in (("SHOT_STUDIO_MAX_QUEUE", "many"), ("SHOT_STUDIO_ALLOW_RENDER", "maybe"),
                       ("SHOT_STUDIO_MAX_DISK_MB", "-1")):
        with pytest.raises(SettingsError, match=f"^{var}: .*got '{value}'"):
            Settings.from_env({var: value})


def test_a_bad_setting_stops_the_studio_with_one_line(monkeypatch, capsys):
    monkeypatch.setenv("SHOT_STUDIO_MAX_QUEUE", "lots")
    assert cli.main(["ui", "--port", "1"]) == 2
    assert capsys.readouterr().err.strip() == \
        "studio: error: SHOT_STUDIO_MAX_QUEUE: must be a whole number (got 'lots')"


# --- the CLI never quotes a file ----------------------------------------------------------------------------------


@pytest.mark.parametrize("content", [
    f"root:x:0:0:{MARKER}:/root:/bin/bash\ndaemon:x:1:1::/usr/sbin:/usr/sbin/nologin\n",  # /etc/passwd-like
    f"{MARKER}: 1\n",  # a mapping with a key that is not a field
    f"password: {MARKER}\n",  # a field-like key: named, its value not
    f"name: x\nbase: y\nmax_frames: {MARKER}\n",  # a preset-like file with a bad value
    f"key: [{MARKER}\n",  # not YAML
    "\x89PNG\r\n\x1a\n\0\0\xff" + MARKER,  # binary
], ids=["passwd", "key", "field", "value", "yaml", "binary"])
def test_the_cli_never_quotes_a_file(tmp_path, capsys, content):
    secret = tmp_path / "secret.txt"
    secret.write_bytes(content.encode("utf-8", "surrogateescape"))
    for shot_file in (secret, tmp_path / "shot.yaml"):  # the file as the shot, then as the shot's model preset
        (tmp_path / "shot.yaml").write_text(f"model: {secret}\nprompt: a red circle\n")
        assert cli.main(["render", str(shot_file), "--out", str(tmp_path / "o.mp4")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and MARKER not in err, err
        if shot_file != secret:
            assert err.startswith("studio: error: model: not a preset YAML"), err
    assert not (tmp_path / "o.mp4").exists()
