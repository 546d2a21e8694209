"""`studio subject add | list | remove` on the tiny model: the library changes, bad input is one line + exit 2."""

import numpy as np
import pytest
from PIL import Image

from studio import cli
from studio.subjects.library import SubjectLibrary


def _photo_dir(tmp_path, n=2):
    d = tmp_path / "photos"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        img = rng.integers(0, 50, (96, 96, 3), dtype=np.uint8)
        img[24:72, 30:66] = (240, 200, 20)
        Image.fromarray(img).save(d / f"{i:02d}.png")
    return d


def test_add_list_remove(tmp_path, capsys):
    photos = _photo_dir(tmp_path)
    code = cli.main(["subject", "add", "cli-dog", "--images", str(photos), "--model", "tiny", "--steps", "2",
                     "--phrase", "sks dog", "--method", "both", "--no-progress"])
    assert code == 0
    s = SubjectLibrary().get("cli-dog")
    assert s.base_model == "tiny" and s.class_word == "dog" and s.methods == ("lora", "tokens") and s.photos == 2
    assert s.masks == 2 and all(m.any() for m in SubjectLibrary().load_masks("cli-dog"))
    assert cli.main(["subject", "list"]) == 0
    assert "cli-dog" in capsys.readouterr().out
    assert cli.main(["subject", "remove", "cli-dog"]) == 0
    assert not SubjectLibrary().exists("cli-dog")


@pytest.mark.parametrize("args, needle", [
    (["--images", "NOPE"], "--images: not a folder"),
    (["--images", "PHOTOS", "--steps", "0"], "steps: must be an integer"),
    (["--images", "PHOTOS", "--phrase", "dog"], "--phrase: needs a trigger word"),
    (["--images", "TEXT"], "photos[0]"),
])
def test_bad_input_is_one_line_and_nothing_is_added(tmp_path, capsys, args, needle):
    photos = _photo_dir(tmp_path)
    text = tmp_path / "text"
    text.mkdir()
    (text / "notes.txt").write_text("not a photo")
    args = [{"PHOTOS": str(photos), "TEXT": str(text), "NOPE": str(tmp_path / "nope")}.get(a, a) for a in args]
    code = cli.main(["subject", "add", "bad-one", "--model", "tiny", *args, "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and needle in err and len(err.splitlines()) == 1, err
    assert not SubjectLibrary().exists("bad-one")


def test_remove_unknown_is_an_error(capsys):
    assert cli.main(["subject", "remove", "ghost"]) == 2
    assert "ghost" in capsys.readouterr().err
