"""`studio render --verify SIDECAR.json`: render a sidecar's shot again and say whether the video is the same.

The report is one table: every recorded component, subject and input by content hash, every recorded machine
setting, then the frames (their SHA-256; where that differs, the largest pixel difference against the video the
sidecar describes). Exit 0 when the frames match, 1 when they do not, 2 for a sidecar that cannot be verified
(not JSON, no shot, files it names that are gone: one line naming what is missing).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from studio import engine, identity, machine, shot as shotlib

logger = logging.getLogger(__name__)


@dataclass
class Verification:
    rows: list[tuple[str, str, str, bool]] = field(default_factory=list)  # (what, recorded, now, same)
    frames_match: bool = False
    max_abs_diff: int | None = None  # 0..255; None when nothing could be compared
    compared_with: str = ""  # how the frames were compared

    @property
    def changed(self) -> list[str]:
        return [what for what, _, _, same in self.rows if not same]


def read_sidecar(path: str | Path) -> dict:
    """The sidecar's JSON; ShotError naming --verify if it is not a readable sidecar with a shot."""
    path = Path(path)
    if not path.is_file():
        raise shotlib.ShotError("--verify", str(path), "sidecar file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        raise shotlib.ShotError("--verify", str(path), "not a JSON sidecar") from None
    if not isinstance(data, dict) or not isinstance(data.get("shot"), dict):
        raise shotlib.ShotError("--verify", str(path), "the sidecar has no shot (a render's .json has a 'shot' "
                                                       "mapping)")
    shotlib.check_version(data.get("version"))
    return data


def _short(value) -> str:
    return "not recorded" if value is None else str(value)


def verify(path: str | Path, manager=None) -> Verification:
    """Re-render the sidecar's shot on this machine and compare identity, settings and frames with the record."""
    data = read_sidecar(path)
    shot = shotlib.from_container(data["shot"])
    result = engine.render(shot, manager)
    out = Verification()
    recorded_id = data.get("identity") or {}
    for section in ("components", "subjects", "inputs"):
        old, new = recorded_id.get(section) or {}, result.identity.get(section) or {}
        for name in sorted(set(old) | set(new)):
            a, b = identity.digest(old.get(name)), identity.digest(new.get(name))
            # a sidecar of an older studio recorded no identity: nothing to compare
            out.rows.append((f"{section}.{name}", a or ("absent" if recorded_id else "not recorded"), b or "absent",
                             a == b or not recorded_id))
    recorded_settings = data.get("settings") or {}
    differ = {k for k, _, _ in machine.differences(recorded_settings, result.settings)}
    for k in sorted(set(recorded_settings) | set(result.settings)):
        out.rows.append((f"settings.{k}", _short(recorded_settings.get(k)), _short(result.settings.get(k)),
                         k not in differ))
    _compare_frames(out, data, Path(path), result.frames)
    return out


def _compare_frames(out: Verification, data: dict, sidecar: Path, frames: np.ndarray) -> None:
    """Frames: equal SHA-256 is a match; otherwise (or with no hash recorded) the largest pixel difference against
    the PNG frames or the MP4 beside the sidecar (the MP4 through the same encoder, so compression cancels)."""
    new = engine.frames_record(frames)
    rec = data.get("frames") or {}
    if rec.get("sha256") == new["sha256"]:
        out.frames_match, out.max_abs_diff, out.compared_with = True, 0, "frame hashes"
        out.rows.append(("frames", rec["sha256"][:12], new["sha256"][:12], True))
        return
    old = _recorded_frames(data, sidecar)
    if old is None:
        out.compared_with = "frame hashes (no frames beside the sidecar)"
    else:
        kind, old_frames = old
        if kind == "mp4":
            frames = _through_mp4(frames, int(data["shot"].get("fps") or 8))
        out.compared_with = kind
        if old_frames.shape != frames.shape:
            out.max_abs_diff = None
        else:
            out.max_abs_diff = int(np.abs(old_frames.astype(np.int16) - frames.astype(np.int16)).max())
            out.frames_match = not rec.get("sha256") and out.max_abs_diff == 0
    out.rows.append(("frames", (rec.get("sha256") or "not recorded")[:12], new["sha256"][:12], out.frames_match))


def _recorded_frames(data: dict, sidecar: Path) -> tuple[str, np.ndarray] | None:
    """The recorded video's frames: its PNG frames folder if the sidecar names one that exists, else its MP4."""
    from studio import export

    files = data.get("files") or {}
    folder = files.get("frames_dir")
    if folder and Path(folder).is_dir():
        import cv2

        paths = sorted(Path(folder).glob("frame_*.png"))
        if paths:
            return "PNG frames", np.stack([cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in paths])
    video = sidecar.with_name(files["video"]) if files.get("video") else sidecar.with_suffix(".mp4")
    if video.is_file():
        try:
            return "mp4", export.read_video(video)
        except (OSError, ValueError) as e:
            logger.warning("could not decode %s (%s)", video.name, e)
    return None


def _through_mp4(frames: np.ndarray, fps: int) -> np.ndarray:
    """The frames as they come back from an MP4 written the way renders are written."""
    import tempfile

    from studio import export

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "v.mp4"
        export.write_mp4(frames, path, fps)
        return export.read_video(path)


def format_report(v: Verification, sidecar: str | Path) -> str:
    """The table --verify prints."""
    rows = [("what", "recorded", "now", "")] + [(w, a, b, "same" if s else "DIFFERS") for w, a, b, s in v.rows]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"verify {sidecar}"]
    lines += ["  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3] for r in rows]
    if v.frames_match:
        verdict = f"frames match ({v.compared_with})"
    elif v.max_abs_diff is None:
        verdict = f"frames differ ({v.compared_with})"
    else:
        verdict = f"frames differ: max abs difference {v.max_abs_diff} of 255 (against the {v.compared_with})"
    changed = [w for w in v.changed if w != "frames"]
    if changed:
        verdict += "; changed since the render: " + ", ".join(changed)
    return "\n".join(lines + [verdict])
