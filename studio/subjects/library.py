"""The subject library: one folder per tuned subject, written atomically, read back without pickles.

Layout of `<root>/<name>/` (root: studio_home()/subjects unless given):
    metadata.json                       name, trigger, class_word, base_model, methods, tokens, lora_rank, training,
                                        created, photos, masks, format_version
    photos/000.png ...                  the subject's photos, RGB
    masks/000.png ...                   their subject masks, 0/255 (optional; one per photo when present)
    pytorch_lora_weights.safetensors    LoRA in diffusers' format, when methods has "lora"
                                        (`pipe.load_lora_weights(subject.path, weight_name=LORA_FILE)`)
    learned_embeds.safetensors          the learned token vectors, when methods has "tokens": diffusers'
                                        multi-vector textual-inversion format, one key `<name>` holding the
                                        tokens' vectors in order (N, D) (metadata: embeds_key, and tokens with
                                        token_vectors, the rows of each), so plain diffusers loads it in one call:
                                        `pipe.load_textual_inversion(file, token="<name>")`, then "<name>" in a
                                        prompt stands for all N vectors. Folders of format_version 1 hold
                                        {token: (D,) or (n, D)} instead; they still load.

A save builds the whole folder under a hidden temp name (".tmp-<name>-<random>") and renames it into place, so
a reader sees the old subject or the new one, never half of one; folders starting with "." are never listed.
Only safetensors are read: a subject folder holding pickle files (.bin, .pt, .ckpt, ...) is refused.

Kill safety (a process killed at any point, SIGKILL or power cut alike, as far as the file system keeps renames in
order): writers (save, delete) hold an exclusive lock on the library folder (flock), so hidden folders seen while
the lock is free belong to a writer that died. The next reader or writer that finds any (`recover`) finishes what
the dead one left: an overwrite killed between moving the previous version aside (".old-<name>-*/<name>") and
renaming the new one into place gets the previous version back; build folders (".tmp-*") and folders being
deleted (".del-*") are removed. An overwrite moves the previous version aside, renames the new one in, then
renames the aside folder to ".del-*" before removing it, so an ".old-*" folder always holds a whole subject.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from studio import faults
from studio.subjects.masks import check_image, check_mask, load_mask, save_mask

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: learned_embeds.safetensors in diffusers' one-key multi-vector format (1: {token: vector})
METADATA_FILE = "metadata.json"
LORA_FILE = "pytorch_lora_weights.safetensors"
EMBEDS_FILE = "learned_embeds.safetensors"
METHODS = ("lora", "tokens")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MAX_PHOTO_BYTES = 20 * 2**20
MAX_PHOTOS = 10
MAX_PHOTO_SIDE = 1024  # imported photos are scaled down to this longest side (training crops far smaller)
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
HIDDEN_PREFIXES = (".tmp-", ".old-", ".del-")  # a writer's build, previous-version and being-deleted folders


class SubjectError(ValueError):
    """A subject is missing, incomplete or unsafe to load; the message names it and what is wrong."""


class UnsafeSubjectError(SubjectError):
    """A subject folder holds pickle files, which are never loaded."""


@dataclass
class Subject:
    """A complete subject in the library, as its metadata.json describes it."""

    name: str
    trigger: str  # the prompt words that call the subject up, e.g. "<rex> dog"
    class_word: str  # what the subject is, e.g. "dog"
    base_model: str  # the model preset it was trained for; other models cannot use its weights
    methods: tuple[str, ...]  # "lora" and/or "tokens"
    tokens: tuple[str, ...]  # placeholder token strings with learned embeddings
    photos: int  # how many photos it was trained on
    masks: int  # how many of them have masks (0 or `photos`)
    path: Path
    lora_rank: int | None = None
    created: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)  # the whole metadata.json

    @property
    def lora_path(self) -> Path | None:
        return self.path / LORA_FILE if "lora" in self.methods else None

    @property
    def embeds_path(self) -> Path | None:
        return self.path / EMBEDS_FILE if "tokens" in self.methods else None

    @property
    def photo_paths(self) -> list[Path]:
        return [self.path / "photos" / f"{i:03d}.png" for i in range(self.photos)]

    @property
    def mask_paths(self) -> list[Path]:
        return [self.path / "masks" / f"{i:03d}.png" for i in range(self.masks)]


# --- names, photos, base models ------------------------------------------------------------------------------


def sanitize_name(name: str, field: str = "name") -> str:
    """A subject name as a folder name: lowercase, spaces to '-', then [a-z0-9_-], 1..64 chars, first alphanumeric.

    Anything that could leave the library folder ("../x", "/abs", "a/b", ".", "") is a ValueError, never rewritten.
    """
    if not isinstance(name, str):
        raise ValueError(f"{field}: must be a string (got {name!r})")
    clean = re.sub(r"\s+", "-", name.strip().lower())
    if not clean or "/" in clean or "\\" in clean or clean.startswith(".") or ":" in clean:
        raise ValueError(f"{field}: must be a plain subject name such as 'rex', not a path (got {name!r})")
    if not NAME_PATTERN.fullmatch(clean):
        raise ValueError(f"{field}: must be 1..64 characters of a-z, 0-9, '_' and '-', starting with a letter or "
                         f"digit (got {name!r})")
    return clean


def base_weights(preset) -> dict[str, str | None]:
    """What a model preset's weights are: its base and motion adapter as the pipeline loads them, with the
    checkout's own models written 'models/...' (so moving the checkout keeps them the same) and other local
    folders as absolute paths. Two presets on the same weights share subjects; recorded in metadata at training."""
    from studio.presets import models_root, resolve_local

    def ref(value: str | None) -> str | None:
        if not value:
            return None
        local = Path(resolve_local(value)).expanduser()
        if value.startswith("builtin:") or not local.is_dir():
            return value  # a builtin model or a hub id
        local = local.resolve()
        root = Path(models_root()).resolve()
        return f"models/{local.relative_to(root).as_posix()}" if local.is_relative_to(root) else str(local)

    adapter = preset.motion_adapter if preset.family == "animatediff" else None
    weights = {"base": ref(preset.base), "motion_adapter": ref(adapter), "revision": preset.revision}
    if getattr(preset, "random_weights", False):  # a random-weight build of the layout is other weights
        weights["random_weights"] = {"layout": preset.layout or preset.name, "width_factor": preset.width_factor}
    return weights


def check_base_model(subject: Subject, model, field: str = "subject") -> None:
    """Raise ValueError when a subject was trained for other weights than the model's (a preset, or its name).

    Compares the weights recorded at training (base_weights) when the metadata has them, else (subjects saved before
    that) the preset names."""
    if isinstance(model, str):
        from studio.presets import load_model_preset

        model = load_model_preset(model)
    recorded, current = subject.metadata.get("base_weights"), base_weights(model)
    same = recorded == current if isinstance(recorded, dict) else subject.base_model == model.name
    if same:
        return
    was, now = f"'{subject.base_model}'", f"'{model.name}'"
    if was == now:  # one name, other weights: say which

        def desc(w: dict) -> str:
            rw = w.get("random_weights")
            random = [f"random weights at width {rw.get('width_factor')}"] if isinstance(rw, dict) else []
            return " + ".join([str(v) for v in (w.get("base"), w.get("motion_adapter")) if v] + random)

        was, now = f"{was} ({desc(recorded)})", f"{now} ({desc(current)})"
    raise ValueError(f"{field}: '{subject.name}' was trained for base model {was}, not {now}; train it again for "
                     f"this model or change `model`")


def import_photos(paths: Sequence[str | Path], max_side: int | None = MAX_PHOTO_SIDE) -> list[np.ndarray]:
    """Read a subject's photos as (H, W, 3) uint8 RGB arrays, checking type, size and count.

    EXIF orientation is applied (phone photos), and photos larger than `max_side` are scaled down (None: never).
    """
    if isinstance(paths, (str, Path)) or not 1 <= len(paths) <= MAX_PHOTOS:
        got = paths if isinstance(paths, (str, Path)) else f"{len(paths)} photos"
        raise ValueError(f"photos: need 1..{MAX_PHOTOS} photo files (got {got!r})")
    return [_import_photo(Path(p), f"photos[{i}]", max_side) for i, p in enumerate(paths)]


def _import_photo(path: Path, field: str, max_side: int | None) -> np.ndarray:
    from PIL import Image, ImageOps, UnidentifiedImageError

    if path.suffix.lower() not in PHOTO_SUFFIXES:
        raise ValueError(f"{field}: must be a {', '.join(s[1:] for s in PHOTO_SUFFIXES)} file (got '{path}')")
    if not path.is_file():
        raise ValueError(f"{field}: file not found (got '{path}')")
    size = path.stat().st_size
    if size > MAX_PHOTO_BYTES:
        raise ValueError(f"{field}: {size / 2**20:.1f} MB is over the {MAX_PHOTO_BYTES / 2**20:g} MB limit "
                         f"(got '{path}')")
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"{field}: not a readable image ('{path}': {e})") from None
    if max_side and max(im.size) > max_side:
        scale = max_side / max(im.size)
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.LANCZOS)
        logger.info("scaled %s down to %dx%d", path, im.width, im.height)
    return check_image(np.asarray(im), field)


# --- metadata ------------------------------------------------------------------------------------------------


def _check_metadata(metadata: dict, lora: dict | None, embeds: dict | None) -> dict:
    """The caller's metadata completed and checked against the weights given (ValueError naming the field)."""
    if not isinstance(metadata, dict):
        raise ValueError(f"metadata: must be a dict (got {type(metadata).__name__})")
    meta = dict(metadata)
    for key in ("trigger", "class_word", "base_model"):
        if not isinstance(meta.get(key), str) or not meta[key].strip():
            raise ValueError(f"metadata.{key}: must be a non-empty string (got {meta.get(key)!r})")
    given = [m for m, w in (("lora", lora), ("tokens", embeds)) if w]
    methods = list(meta.get("methods") or given)
    if any(m not in METHODS for m in methods) or len(set(methods)) != len(methods):
        raise ValueError(f"metadata.methods: must list distinct methods of {', '.join(METHODS)} (got {methods!r})")
    if not methods or sorted(methods) != sorted(given):
        raise ValueError(f"metadata.methods: must match the weights given (lora for 'lora', embeds for 'tokens'; "
                         f"got methods {methods!r} with weights for {given!r})")
    tokens = list(meta.get("tokens") or (list(embeds) if embeds else []))
    if embeds and sorted(tokens) != sorted(embeds):
        raise ValueError(f"metadata.tokens: must be the embeddings' tokens {sorted(embeds)!r} (got {tokens!r})")
    rank = meta.get("lora_rank")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"metadata.lora_rank: must be a positive integer or None (got {rank!r})")
    meta.update(methods=methods, tokens=tokens, lora_rank=rank, training=dict(meta.get("training") or {}))
    return meta


def _subject_from_folder(folder: Path) -> Subject:
    """Read a subject folder; SubjectError saying what is missing when it is not a complete subject."""
    try:
        meta = json.loads((folder / METADATA_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SubjectError(f"subject '{folder.name}': no valid {METADATA_FILE} ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("format_version"), int):
        raise SubjectError(f"subject '{folder.name}': {METADATA_FILE} has no format_version")
    if meta["format_version"] > FORMAT_VERSION:
        raise SubjectError(f"subject '{folder.name}': format_version {meta['format_version']} is newer than this "
                           f"studio's ({FORMAT_VERSION}); update the studio")
    try:
        photos, masks = int(meta["photos"]), int(meta.get("masks", 0))
        subject = Subject(name=folder.name, trigger=str(meta["trigger"]), class_word=str(meta["class_word"]),
                          base_model=str(meta["base_model"]), methods=tuple(meta["methods"]),
                          tokens=tuple(meta.get("tokens") or ()), photos=photos, masks=masks, path=folder,
                          lora_rank=meta.get("lora_rank"), created=str(meta.get("created", "")), metadata=meta)
    except (KeyError, TypeError, ValueError) as e:
        raise SubjectError(f"subject '{folder.name}': {METADATA_FILE} lacks or garbles {e}") from None
    if photos < 1 or masks not in (0, photos) or not set(subject.methods) <= set(METHODS) or not subject.methods:
        raise SubjectError(f"subject '{folder.name}': {METADATA_FILE} has inconsistent photos, masks or methods")
    missing = [p.relative_to(folder).as_posix() for p in _expected_files(subject) if not p.is_file()]
    if missing:
        raise SubjectError(f"subject '{folder.name}': incomplete, missing {', '.join(missing[:4])}")
    _check_weight_headers(subject)
    return subject


def _check_weight_headers(subject: Subject) -> None:
    """Read the weight files' safetensors headers (a few KB, no tensor data): a file that is not safetensors, is
    cut short, holds no tensors, or lacks a learned token is a SubjectError naming it."""
    from safetensors import SafetensorError, safe_open

    for path in (subject.lora_path, subject.embeds_path):
        if path is None:
            continue
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                keys = set(f.keys())
            key = subject.metadata.get("embeds_key")
            rows = _rows(_header_shape(path, key)) if path == subject.embeds_path and key in keys else 0
        except (SafetensorError, OSError, ValueError) as e:
            raise SubjectError(f"subject '{subject.name}': {path.name} is not readable safetensors ({e})") from None
        lacking = []
        if path == subject.embeds_path and "embeds_key" in subject.metadata:  # one key, the tokens' rows in order
            ends = np.cumsum(_token_vectors(subject))
            lacking = [t for t, end in zip(subject.tokens, ends) if end > rows]
        elif path == subject.embeds_path:  # format_version 1: a key per token
            lacking = sorted(set(subject.tokens) - keys)
        if not keys or lacking:
            what = f"lacks the tokens {', '.join(lacking[:4])}" if lacking else "holds no tensors"
            raise SubjectError(f"subject '{subject.name}': {path.name} {what}")


def _header_shape(path: Path, key: str) -> list[int]:
    """A tensor's shape from a safetensors file's JSON header (no tensor data read): 8 bytes of header length, then
    the header."""
    import struct

    with open(path, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        if size > 100_000_000:
            raise ValueError("header too large")
        return list(json.loads(f.read(size))[key]["shape"])


def _rows(shape) -> int:
    return 1 if len(shape) == 1 else int(shape[0])


def _token_vectors(subject: Subject) -> list[int]:
    """How many vectors (rows of the embeds key) each of the subject's tokens has (format_version >= 2)."""
    rows = subject.metadata.get("token_vectors")
    if not (isinstance(rows, list) and len(rows) == len(subject.tokens)
            and all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in rows)):
        raise SubjectError(f"subject '{subject.name}': {METADATA_FILE} lacks or garbles token_vectors")
    return rows


def pack_embeds(embeds: dict, tokens: list[str]) -> tuple[torch.Tensor, list[int]]:
    """{token: (D,) or (n, D)} -> the tokens' vectors stacked in `tokens` order (N, D) and each token's row count."""
    import torch

    parts = [embeds[t] if embeds[t].dim() == 2 else embeds[t][None] for t in tokens]
    widths = {p.shape[1] for p in parts}
    if len(widths) != 1:
        raise ValueError(f"embeds: every token's vectors must have one width (got {sorted(widths)})")
    return torch.cat(parts).contiguous(), [p.shape[0] for p in parts]


def unpack_embeds(packed: torch.Tensor, tokens: list[str], rows: list[int]) -> dict:
    """The inverse of pack_embeds: a token with one row gets a (D,) vector, others (n, D)."""
    out, start = {}, 0
    for t, n in zip(tokens, rows):
        block = packed[start:start + n]
        out[t] = block[0].clone() if n == 1 else block.clone()
        start += n
    return out


def _expected_files(subject: Subject) -> list[Path]:
    weights = [p for p in (subject.lora_path, subject.embeds_path) if p is not None]
    return weights + subject.photo_paths + subject.mask_paths


# --- the library ---------------------------------------------------------------------------------------------


class SubjectLibrary:
    """Tuned subjects on disk under `root` (default studio_home()/subjects); see the module docstring."""

    def __init__(self, root: str | Path | None = None):
        if root is None:
            from studio.pipelines import studio_home

            root = studio_home() / "subjects"
        self.root = Path(root)

    # --- reading

    def list(self) -> list[Subject]:
        """Complete subjects, by name; temp folders, folders without valid metadata and subjects whose weight files
        are not readable safetensors are skipped (logged; `delete` still removes them by name)."""
        if not self.root.is_dir():
            return []
        self.recover(wait=False)
        subjects = []
        for folder in sorted(self.root.iterdir()):
            if not folder.is_dir() or not NAME_PATTERN.fullmatch(folder.name):
                continue  # hidden temp/aside folders start with "."; stray files and odd names are not subjects
            try:
                subjects.append(_subject_from_folder(folder))
            except SubjectError as e:
                logger.warning("skipping %s: %s", folder, e)
        return subjects

    def names(self) -> list[str]:
        return [s.name for s in self.list()]

    def exists(self, name: str) -> bool:
        """Whether a complete subject of that name is in the library."""
        folder = self.root / sanitize_name(name)
        self.recover(wait=False)
        if not folder.is_dir():
            return False
        try:
            _subject_from_folder(folder)
        except SubjectError:
            return False
        return True

    def get(self, name: str, field: str = "name") -> Subject:
        """The subject called `name`; SubjectError (a ValueError) naming `field` when there is no complete one."""
        folder = self.root / sanitize_name(name, field)
        self.recover(wait=False)
        if not folder.is_dir():
            known = ", ".join(self.names()) or "none"
            raise SubjectError(f"{field}: no subject '{name}' in {self.root} (known: {known})")
        try:
            return _subject_from_folder(folder)
        except SubjectError as e:
            raise SubjectError(f"{field}: {e}") from None

    def load_lora(self, name: str) -> dict[str, torch.Tensor]:
        """The subject's LoRA state dict (diffusers format keys), from safetensors only."""
        subject = self._loadable(name)
        if subject.lora_path is None:
            raise SubjectError(f"subject '{subject.name}' has no LoRA (methods: {', '.join(subject.methods)})")
        return _load_safetensors(subject.lora_path)

    def load_embeds(self, name: str) -> dict[str, torch.Tensor]:
        """The subject's learned token embeddings, token -> (D,) or (n, D), from safetensors only."""
        subject = self._loadable(name)
        if subject.embeds_path is None:
            raise SubjectError(f"subject '{subject.name}' has no learned tokens (methods: "
                               f"{', '.join(subject.methods)})")
        embeds = _load_safetensors(subject.embeds_path)
        key = subject.metadata.get("embeds_key")
        if key is not None:  # format_version 2: one key, the tokens' vectors in order
            packed = embeds[key] if embeds[key].dim() == 2 else embeds[key][None]
            return unpack_embeds(packed, list(subject.tokens), _token_vectors(subject))
        order = [t for t in subject.tokens if t in embeds] + [t for t in embeds if t not in subject.tokens]
        return {token: embeds[token] for token in order}  # safetensors sorts keys; keep the saved token order

    def load_photos(self, name: str) -> list[np.ndarray]:
        """The subject's photos, (H, W, 3) uint8 each."""
        from PIL import Image

        photos = []
        for path in self.get(name).photo_paths:
            with Image.open(path) as im:
                photos.append(np.asarray(im.convert("RGB")))
        return photos

    def load_masks(self, name: str) -> list[np.ndarray]:
        """The subject's masks, (H, W) bool each (empty when it was saved without masks)."""
        return [load_mask(p) for p in self.get(name).mask_paths]

    def _loadable(self, name: str) -> Subject:
        subject = self.get(name)
        pickles = sorted(p.relative_to(subject.path).as_posix() for p in subject.path.rglob("*")
                         if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise UnsafeSubjectError(f"subject '{subject.name}' holds pickle files ({', '.join(pickles[:4])}), which "
                                     f"can run code when loaded; the studio only loads safetensors. Remove them "
                                     f"from {subject.path} or save the subject again")
        return subject

    # --- writing

    def save(self, name: str, photos: Sequence[np.ndarray], masks: Sequence[np.ndarray] | None,
             metadata: dict[str, Any], lora: dict[str, torch.Tensor] | None = None,
             embeds: dict[str, torch.Tensor] | None = None, overwrite: bool = False) -> Subject:
        """Write a subject atomically: built in a hidden temp folder, then renamed into place.

        Args:
            name: the subject's name (sanitize_name rules).
            photos: 1..MAX_PHOTOS (H, W, 3) uint8 RGB photos.
            masks: None/empty, or one (H, W) mask per photo.
            metadata: trigger, class_word, base_model (required); methods, tokens, lora_rank, training (optional;
                methods and tokens default to the weights given). name, created, photos, masks and
                format_version are filled in here.
            lora: LoRA state dict in diffusers' format (keys are the caller's), stored as safetensors.
            embeds: token -> (D,) or (n, D) embedding, stored as safetensors in one key `<name>` (see the module).
            overwrite: replace an existing subject of that name; otherwise that is a ValueError.
        """
        # 1. Check inputs
        name = sanitize_name(name)
        photos, masks = _check_photos(photos, masks)
        meta = _check_metadata(metadata, lora, embeds)
        lora, embeds = _check_tensors("lora", lora), _check_tensors("embeds", embeds, (1, 2))
        meta.update(name=name, photos=len(photos), masks=len(masks), format_version=FORMAT_VERSION,
                    created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        if embeds:  # diffusers' multi-vector format: one key, loadable with one load_textual_inversion call
            packed, rows = pack_embeds(embeds, meta["tokens"])
            meta.update(embeds_key=f"<{name}>", token_vectors=rows)
            embeds = {meta["embeds_key"]: packed}
        text = _metadata_json(meta)
        final = self.root / name
        self.root.mkdir(parents=True, exist_ok=True)
        with self._writing():
            if final.exists() and not overwrite:
                raise ValueError(f"name: subject '{name}' already exists in {self.root}; "
                                 f"pass overwrite=True to replace it")
            # 2. Build the folder under a temp name; any failure removes it and leaves the library as it was
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=self.root))
            faults.point("save-tmp-made")
            try:
                _write_folder(tmp, photos, masks, lora, embeds, text)
                faults.point("save-built")
                # 3. Swap it into place
                self._replace(tmp, final, overwrite)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            logger.info("saved subject '%s' (%s) in %s", name, ", ".join(meta["methods"]), final)
            return _subject_from_folder(final)

    def delete(self, name: str) -> None:
        """Remove a subject (renamed aside first, so it disappears from listings at once)."""
        folder = self.root / sanitize_name(name)
        with self._writing():
            if not folder.is_dir():
                raise SubjectError(f"name: no subject '{name}' in {self.root}")
            aside = Path(tempfile.mkdtemp(prefix=f".del-{folder.name}-", dir=self.root))
            os.replace(folder, aside / folder.name)
            faults.point("delete-moved")
            _remove(aside, "delete-half-removed")
        logger.info("deleted subject '%s'", folder.name)

    def _replace(self, tmp: Path, final: Path, overwrite: bool) -> None:
        """Rename `tmp` to `final`; an existing `final` is moved aside first and removed after."""
        if not final.exists():
            os.replace(tmp, final)  # fails, rather than merges, if another writer got there first
            return
        if not overwrite:
            raise ValueError(f"name: subject '{final.name}' already exists in {self.root}; pass overwrite=True")
        aside = Path(tempfile.mkdtemp(prefix=f".old-{final.name}-", dir=self.root))
        faults.point("swap-aside-made")
        os.replace(final, aside / final.name)
        faults.point("swap-old-moved")
        try:
            os.replace(tmp, final)
        except BaseException:
            os.replace(aside / final.name, final)  # put the previous version back
            shutil.rmtree(aside, ignore_errors=True)
            raise
        faults.point("swap-new-in-place")
        _remove(aside, "swap-old-half-removed")

    # --- recovery after a killed writer

    @contextmanager
    def _writing(self):
        """Hold the library's write lock (blocking), after finishing what a killed writer left (`recover`)."""
        with _locked(self.root, wait=True):
            self._recover_locked()
            yield

    def recover(self, wait: bool = True) -> list[str]:
        """Finish what writers killed mid-way left in the library (see the module docstring); what was done, one
        line each. With wait=False, a library another writer holds is left alone (that writer is alive)."""
        if not self.root.is_dir() or not _leftovers(self.root):
            return []
        with _locked(self.root, wait=wait) as held:
            return self._recover_locked() if held else []

    def _recover_locked(self) -> list[str]:
        done = []
        for entry in _leftovers(self.root):
            if entry.name.startswith(".old-"):
                inside = [p for p in entry.iterdir() if NAME_PATTERN.fullmatch(p.name)]
                final = self.root / inside[0].name if inside else None
                if final is not None and not final.exists():  # killed between moving it aside and the new one in
                    os.replace(inside[0], final)
                    done.append(f"restored the previous version of subject '{final.name}' (its overwrite was cut "
                                f"short)")
            elif entry.name.startswith(".tmp-"):
                done.append(f"removed an unfinished save ({entry.name})")
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
        for line in done:
            logger.warning("subject library %s: %s", self.root, line)
        return done


def _leftovers(root: Path) -> list[Path]:
    """The hidden build, previous-version and being-deleted folders in a library folder."""
    try:
        return sorted(p for p in root.iterdir() if p.name.startswith(HIDDEN_PREFIXES))
    except OSError:
        return []


@contextmanager
def _locked(root: Path, wait: bool):
    """An exclusive flock on the library folder itself (no lock file to list); yields whether it is held. Without
    fcntl (Windows) there is no lock: yields True."""
    try:
        import fcntl
    except ImportError:
        yield True
        return
    root.mkdir(parents=True, exist_ok=True)  # a library not written yet (a delete there finds no subject)
    fd = os.open(root, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        except OSError as e:  # a file system without flock (some network mounts): no lock, as without fcntl
            logger.debug("no lock on %s: %s", root, e)
        yield True
    finally:
        os.close(fd)  # releases the lock


def _remove(aside: Path, point: str) -> None:
    """Remove a folder that holds what is no longer wanted: renamed ".del-*" first (if not already), so a kill
    while removing it leaves nothing that recovery would put back."""
    doomed = aside
    if not aside.name.startswith(".del-"):
        doomed = aside.with_name(".del-" + aside.name.split("-", 1)[1])
        os.replace(aside, doomed)
    files = sorted(p for p in doomed.rglob("*") if p.is_file())
    for f in files[: len(files) // 2]:
        f.unlink()
    faults.point(point)
    shutil.rmtree(doomed, ignore_errors=True)


# --- helpers for save ----------------------------------------------------------------------------------------


def _check_photos(photos: Sequence[np.ndarray], masks: Sequence[np.ndarray] | None) -> tuple[list, list]:
    if not isinstance(photos, (list, tuple)) or not 1 <= len(photos) <= MAX_PHOTOS:
        got = f"{len(photos)} photos" if isinstance(photos, (list, tuple)) else type(photos).__name__
        raise ValueError(f"photos: need 1..{MAX_PHOTOS} photos (got {got})")
    photos = [check_image(p, f"photos[{i}]") for i, p in enumerate(photos)]
    masks = list(masks or [])
    if masks and len(masks) != len(photos):
        raise ValueError(f"masks: need one mask per photo or none (got {len(masks)} masks for {len(photos)} photos)")
    masks = [check_mask(m, p.shape[:2], f"masks[{i}]") for i, (m, p) in enumerate(zip(masks, photos))]
    return photos, masks


def _check_tensors(field: str, tensors: dict | None, dims: tuple[int, ...] | None = None) -> dict | None:
    """CPU, contiguous copies of a str -> tensor dict, as safetensors needs them (None stays None)."""
    if tensors is None:
        return None
    import torch

    if not isinstance(tensors, dict) or not tensors:
        raise ValueError(f"{field}: must be a non-empty dict of name -> tensor (got {tensors!r:.80})")
    out = {}
    for key, value in tensors.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"{field}: keys must be non-empty strings (got {key!r})")
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{field}[{key!r}]: must be a torch.Tensor (got {type(value).__name__})")
        if dims is not None and value.dim() not in dims:
            want = " or ".join(map(str, dims))
            raise ValueError(f"{field}[{key!r}]: must be a tensor with {want} dims (got shape {tuple(value.shape)})")
        out[key] = value.detach().to("cpu").contiguous().clone()  # clone: safetensors refuses shared storage
    return out


def _metadata_json(meta: dict) -> str:
    try:
        return json.dumps(meta, indent=2, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise ValueError(f"metadata: must be JSON-serializable ({e})") from None


def _write_folder(folder: Path, photos: list[np.ndarray], masks: list[np.ndarray], lora: dict | None,
                  embeds: dict | None, metadata_text: str) -> None:
    """Write a subject's files into `folder`; metadata.json last, so it marks a complete folder."""
    from PIL import Image
    from safetensors.torch import save_file

    (folder / "photos").mkdir()
    for i, photo in enumerate(photos):
        Image.fromarray(photo).save(folder / "photos" / f"{i:03d}.png", format="PNG")
    if masks:
        (folder / "masks").mkdir()
        for i, mask in enumerate(masks):
            save_mask(mask, folder / "masks" / f"{i:03d}.png")
    faults.point("save-photos-written")
    if lora:
        save_file(lora, str(folder / LORA_FILE), metadata={"format": "pt"})
    if embeds:
        save_file(embeds, str(folder / EMBEDS_FILE), metadata={"format": "pt"})
    faults.point("save-weights-written")
    (folder / METADATA_FILE).write_text(metadata_text, encoding="utf-8")


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as e:
        raise SubjectError(f"subject file {path} is not readable safetensors ({e})") from None
