"""Export: the MP4 is h264/yuv420p, decodes to the frames written; GIF, PNG frames, sidecar; atomic writes."""

import json

import numpy as np
import pytest

from studio import export


def _frames(f=8, h=64, w=64, seed=0):
    # smooth colour ramps (not noise) so lossy h264 reproduces them closely
    y, x = np.mgrid[0:h, 0:w]
    out = np.stack([np.stack([(x * 4 + i * 16) % 256, (y * 4) % 256, np.full_like(x, 40 * (i % 6))], -1)
                    for i in range(f)])
    return out.astype(np.uint8)


def test_mp4_is_browser_playable_and_decodes_to_the_frames(tmp_path):
    frames = _frames()
    path = export.write_mp4(frames, tmp_path / "v.mp4", fps=8)
    info = export.probe_video(path)
    assert (info["codec"], info["pix_fmt"]) == ("h264", "yuv420p")
    assert (info["width"], info["height"], info["frames"], info["fps"]) == (64, 64, 8, 8.0)
    back = export.read_video(path)
    assert back.shape == frames.shape
    assert np.abs(back.astype(int) - frames.astype(int)).mean() < 6  # crf 18 on smooth content
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary file left behind"


def test_odd_size_is_padded_to_even_for_yuv420p(tmp_path):
    path = export.write_mp4(_frames(3, 33, 31), tmp_path / "odd.mp4", fps=4)
    info = export.probe_video(path)
    assert (info["width"], info["height"], info["pix_fmt"], info["frames"]) == (32, 34, "yuv420p", 3)


def test_float_frames_are_refused_rather_than_written_black(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        export.write_mp4(_frames().astype(np.float32) / 255, tmp_path / "v.mp4", fps=8)
    with pytest.raises(ValueError, match="shape"):
        export.write_mp4(np.zeros((8, 64, 64), np.uint8), tmp_path / "v.mp4", fps=8)
    assert not list(tmp_path.iterdir())


def test_failed_write_leaves_the_old_file_intact(tmp_path, monkeypatch):
    target = tmp_path / "v.mp4"
    target.write_bytes(b"previous render")

    def boom(*a, **k):
        raise OSError("disk full")

    import moviepy

    monkeypatch.setattr(moviepy.ImageSequenceClip, "write_videofile", boom)
    with pytest.raises(OSError, match="disk full"):
        export.write_mp4(_frames(), target, fps=8)
    assert target.read_bytes() == b"previous render"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.mp4"]


def test_gif_and_png_frames(tmp_path):
    from PIL import Image

    frames = _frames(5)
    gif = export.write_gif(frames, tmp_path / "v.gif", fps=10)
    im = Image.open(gif)
    assert im.n_frames == 5 and im.size == (64, 64)
    pngs = export.write_png_frames(frames, tmp_path / "frames")
    assert [p.name for p in pngs] == [f"frame_{i:04d}.png" for i in range(5)]
    assert np.array_equal(np.asarray(Image.open(pngs[3]).convert("RGB")), frames[3])  # lossless
    # re-exporting fewer frames into the same folder leaves no stale frames
    export.write_png_frames(frames[:2], tmp_path / "frames")
    assert len(list((tmp_path / "frames").glob("frame_*.png"))) == 2


def test_sidecar_beside_video_and_versions(tmp_path):
    path = export.write_sidecar(tmp_path / "shot.mp4", {"seed": 3, "shot": {"prompt": "p"}})
    assert path == tmp_path / "shot.json"
    assert json.loads(path.read_text())["seed"] == 3
    versions = export.package_versions()
    assert {"torch", "diffusers", "transformers", "moviepy", "python"} <= set(versions)


def _hidden(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*"))


def test_output_set_replaces_all_targets_together(tmp_path):
    (tmp_path / "v.mp4").write_bytes(b"old video")
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(3):
        (frames / f"frame_{i:04d}.png").write_bytes(b"old frame")
    (frames / "notes.txt").write_text("the user's")
    outputs = export.OutputSet()
    outputs.file(tmp_path / "v.mp4").write_bytes(b"new video")
    outputs.file(tmp_path / "v.json").write_text("{}")
    staged = outputs.folder(frames)
    for i in range(2):
        (staged / f"frame_{i:04d}.png").write_bytes(b"new frame")
    assert (tmp_path / "v.mp4").read_bytes() == b"old video" and not (tmp_path / "v.json").exists()
    outputs.commit()
    assert (tmp_path / "v.mp4").read_bytes() == b"new video" and (tmp_path / "v.json").read_text() == "{}"
    assert sorted(p.name for p in frames.iterdir()) == ["frame_0000.png", "frame_0001.png", "notes.txt"]
    assert (frames / "frame_0001.png").read_bytes() == b"new frame"
    assert _hidden(tmp_path) == []


def test_output_set_failed_commit_puts_the_previous_files_back(tmp_path, monkeypatch):
    (tmp_path / "v.mp4").write_bytes(b"old video")
    (tmp_path / "v.json").write_text("old sidecar")
    (tmp_path / "frames").mkdir()
    (tmp_path / "frames" / "frame_0000.png").write_bytes(b"old frame")
    outputs = export.OutputSet()
    outputs.file(tmp_path / "v.mp4").write_bytes(b"new video")
    outputs.file(tmp_path / "v.json").write_text("new sidecar")
    (outputs.folder(tmp_path / "frames") / "frame_0000.png").write_bytes(b"new frame")
    real_replace, moves = export.os.replace, []

    def replace(src, dst):
        moves.append(dst)
        if str(dst).endswith("frame_0000.png") and ".new" in str(src):  # the last move into place fails
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(export.os, "replace", replace)
    with pytest.raises(OSError, match="No space"):
        outputs.commit()
    monkeypatch.undo()
    assert len(moves) > 4, "the video and sidecar were already in place when the frame failed"
    assert (tmp_path / "v.mp4").read_bytes() == b"old video" and (tmp_path / "v.json").read_text() == "old sidecar"
    assert (tmp_path / "frames" / "frame_0000.png").read_bytes() == b"old frame"
    assert _hidden(tmp_path) == []


def test_output_set_discard_leaves_nothing(tmp_path):
    outputs = export.OutputSet()
    outputs.file(tmp_path / "v.mp4").write_bytes(b"x")
    (outputs.folder(tmp_path / "frames") / "frame_0000.png").write_bytes(b"x")
    outputs.discard()
    assert list(tmp_path.iterdir()) == []
