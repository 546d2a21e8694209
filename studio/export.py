"""Frames -> files: browser-playable MP4, GIF, PNG frames, and the JSON sidecar that reproduces a video.

Frames are uint8 (F, H, W, 3). Every write goes to a temporary name beside the target and is renamed over
it at the end, so a failed or cancelled export never leaves a half-written file where the user looks.
`OutputSet` does the same for several outputs together: all of them replace their targets, or none does.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

MP4_PARAMS = ["-pix_fmt", "yuv420p", "-crf", "18", "-movflags", "+faststart"]
VERSIONED_PACKAGES = ("shot-studio", "torch", "diffusers", "transformers", "peft", "gradio", "moviepy",
                      "imageio-ffmpeg", "omegaconf", "numpy", "opencv-python-headless", "opencv-python")


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"frames must be (F, H, W, 3) with F >= 1, got shape {frames.shape}")
    if frames.dtype != np.uint8:  # moviepy writes float frames as black: insist on uint8
        raise ValueError(f"frames must be uint8, got {frames.dtype}")
    return frames


def _even(frames: np.ndarray) -> np.ndarray:
    """yuv420p needs even width and height: pad the last row/column by edge replication if odd."""
    _, h, w, _ = frames.shape
    if h % 2 or w % 2:
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    return frames


@contextmanager
def _atomic(target: Path, suffix: str):
    """Yield a temporary path beside `target`; on success rename it over `target`, on failure remove it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=suffix, dir=target.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are ordinary files
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_mp4(frames: np.ndarray, path: str | Path, fps: int) -> Path:
    """H.264 / yuv420p MP4 through moviepy and imageio-ffmpeg's bundled ffmpeg."""
    from moviepy import ImageSequenceClip

    frames = _even(_check_frames(frames))
    path = Path(path)
    with _atomic(path, ".mp4") as tmp:
        clip = ImageSequenceClip(list(frames), fps=fps)
        try:
            clip.write_videofile(str(tmp), fps=fps, codec="libx264", audio=False, logger=None,
                                 ffmpeg_params=MP4_PARAMS)
        finally:
            clip.close()
    logger.info("wrote %s (%d frames @ %d fps)", path, len(frames), fps)
    return path


def write_gif(frames: np.ndarray, path: str | Path, fps: int) -> Path:
    """Looping GIF (Pillow; each frame quantized to its own palette)."""
    from PIL import Image

    frames = _check_frames(frames)
    path = Path(path)
    images = [Image.fromarray(f) for f in frames]
    with _atomic(path, ".gif") as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], loop=0,
                       duration=max(1, round(1000 / fps)), disposal=2)
    return path


def write_png_frames(frames: np.ndarray, folder: str | Path) -> list[Path]:
    """frame_0000.png, frame_0001.png, ... in `folder` (created; existing frame files are replaced)."""
    import cv2

    frames = _check_frames(frames)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("frame_*.png"):
        old.unlink()
    paths = []
    for i, f in enumerate(frames):
        p = folder / f"frame_{i:04d}.png"
        with _atomic(p, ".png") as tmp:
            if not cv2.imwrite(str(tmp), cv2.cvtColor(f, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 3]):
                raise OSError(f"could not write {p}")
        paths.append(p)
    return paths


def sidecar_path(video: str | Path) -> Path:
    return Path(video).with_suffix(".json")


def write_json(path: str | Path, data: dict) -> Path:
    """Indented JSON, written atomically."""
    path = Path(path)
    with _atomic(path, ".json") as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    return path


def write_sidecar(video: str | Path, data: dict) -> Path:
    """The JSON beside the video (same name, .json)."""
    return write_json(sidecar_path(video), data)


class OutputSet:
    """Several outputs written under temporary names beside their targets, then moved into place together.

        outputs = OutputSet()
        write_mp4(frames, outputs.file("out/x.mp4"), fps)       # writes a hidden temporary file in out/
        write_png_frames(frames, outputs.folder("out/frames"))  # a hidden temporary folder beside out/frames
        outputs.commit()                                        # or outputs.discard() after a failure

    Nothing where the user looks changes before commit(). commit() moves each previous target aside, moves the
    new file in, and deletes the previous ones only when every move succeeded; if one fails, the previous files
    are put back. A folder's previous frame files (`replace` glob) are replaced as a whole, other files kept.
    """

    def __init__(self):
        self._files: list[tuple[Path, Path]] = []  # (temporary file, target)
        self._folders: list[tuple[Path, Path, str]] = []  # (temporary folder, target folder, glob it replaces)

    def file(self, target: str | Path) -> Path:
        target = Path(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=f".new{target.suffix}", dir=target.parent)
        os.close(fd)
        self._files.append((Path(tmp), target))
        return Path(tmp)

    def folder(self, target: str | Path, replace: str = "frame_*.png") -> Path:
        target = Path(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".new", dir=target.parent))
        self._folders.append((tmp, target, replace))
        return tmp

    def _moves(self) -> list[tuple[Path, Path]]:
        """(new, target) file moves, and the folders to create, in commit order."""
        moves = list(self._files)
        for tmp, target, _ in self._folders:
            moves += [(f, target / f.name) for f in sorted(tmp.iterdir())]
        return moves

    def commit(self) -> None:
        created: list[Path] = []  # target folders made here
        aside: list[tuple[Path, Path]] = []  # (previous file, where it was)
        placed: list[Path] = []
        try:
            for _, target, replace in self._folders:
                if not target.is_dir():
                    target.mkdir(parents=True)
                    created.append(target)
                for old in sorted(target.glob(replace)):  # previous frames go, even those with no new namesake
                    aside.append((self._aside(old), old))
            for new, target in self._moves():
                if target.exists():
                    aside.append((self._aside(target), target))
                os.replace(new, target)
                placed.append(target)
        except BaseException:
            for target in reversed(placed):
                target.unlink(missing_ok=True)
            for old, target in reversed(aside):
                os.replace(old, target)
            for folder in reversed(created):
                shutil.rmtree(folder, ignore_errors=True)
            self.discard()
            raise
        for old, _ in aside:
            old.unlink(missing_ok=True)
        self.discard()

    @staticmethod
    def _aside(path: Path) -> Path:
        """Move a previous output to a hidden name beside it; returns that name."""
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".old{path.suffix}", dir=path.parent)
        os.close(fd)
        os.replace(path, tmp)
        return Path(tmp)

    def discard(self) -> None:
        """Remove whatever is still staged (after commit, only the emptied temporary folders)."""
        for tmp, _ in self._files:
            tmp.unlink(missing_ok=True)
        for tmp, _, _ in self._folders:
            shutil.rmtree(tmp, ignore_errors=True)
        self._files, self._folders = [], []


def package_versions() -> dict[str, str]:
    """Versions of the packages a render depends on (those installed), plus the ffmpeg binary used."""
    out = {}
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    import platform

    out["python"] = platform.python_version()
    return out


def read_video(path: str | Path) -> np.ndarray:
    """Decode a video to uint8 frames (F, H, W, 3)."""
    from moviepy import VideoFileClip

    clip = VideoFileClip(str(path), audio=False)
    try:
        return np.stack(list(clip.iter_frames(dtype="uint8")))
    finally:
        clip.close()


def probe_video(path: str | Path) -> dict:
    """Codec, pixel format, size, fps and frame count of a video, as ffmpeg reports them."""
    import re
    import subprocess

    import imageio_ffmpeg

    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(path), "-map", "0:v:0", "-f", "null", "-"]
    text = subprocess.run(cmd, capture_output=True, text=True, check=False).stderr
    m = re.search(r"Video: (\w+)[^,]*, (\w+)[^,]*(?:\([^)]*\))?, (\d+)x(\d+)", text)
    if not m:
        raise ValueError(f"not a readable video: {path}")
    fps = re.search(r"([\d.]+) fps", text)
    frames = re.findall(r"frame=\s*(\d+)", text)
    return {"codec": m.group(1), "pix_fmt": m.group(2), "width": int(m.group(3)), "height": int(m.group(4)),
            "fps": float(fps.group(1)) if fps else None, "frames": int(frames[-1]) if frames else None}
