"""Weight identity: which exact files made a render, by content hash.

Every render's sidecar gets an "identity" section:

    {"components": {name: {"source", "revision", "sha256", "files"}},   # unet/transformer, motion adapter, VAE,
                                                                           # text encoder, tokenizer, scheduler
     "subjects":   {name: {"created", "files": {file: sha256}}},        # each trained subject's LoRA / token file
     "inputs":     {field: sha256}}                                     # reference images named by the shot

- `sha256` of a component is the SHA-256 of the lines "<file name>\\t<file sha256>\\n" over the files it loads from
  (weights and configs, sorted by name); "revision" is the Hugging Face hub commit the files came from (the snapshot
  folder's name), None for local folders.
- File hashes are computed once per file and cached by (real path, size, mtime) in memory and in
  <studio home>/cache/file-hashes.json, so a warm render only stats its files.
- A component built in memory (no folder: tests, scripts) is hashed over its state dict instead ("source": "memory").

`differences(recorded, now)` names what changed between two identity sections (for --verify and the page).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CHUNK = 1 << 20
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".gguf")
SKIPPED = {"README.md", ".gitattributes"}
_SNAPSHOT = re.compile(r"[\\/]models--(.+?)--(.+?)[\\/]snapshots[\\/]([0-9a-f]{40})(?:[\\/](.*))?$")
_lock = threading.Lock()
_memory: dict[str, tuple[int, int, str]] = {}  # real path -> (size, mtime_ns, sha256)
_loaded_from: Path | None = None  # the cache file _memory was filled from


def _cache_file() -> Path:
    from studio.pipelines import studio_home

    return studio_home() / "cache" / "file-hashes.json"


def _load_cache() -> None:
    """Fill the in-memory cache from the cache file (once per studio home)."""
    global _loaded_from
    path = _cache_file()
    if _loaded_from == path:
        return
    _loaded_from = path
    try:
        data = json.loads(path.read_text())
        _memory.update({k: (int(v[0]), int(v[1]), str(v[2])) for k, v in data.items()})
    except (OSError, ValueError, TypeError, IndexError, AttributeError):
        pass  # no cache yet, or an unreadable one: hashes are recomputed


def _save_cache() -> None:
    path = _cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({k: list(v) for k, v in _memory.items()}))
        tmp.replace(path)
    except OSError as e:  # the cache only saves time
        logger.warning("could not write the file-hash cache (%s)", e.strerror or e)


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, cached by (real path, size, mtime): computed once per version of a file."""
    real = os.path.realpath(path)
    st = os.stat(real)
    with _lock:
        _load_cache()
        hit = _memory.get(real)
        if hit is not None and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            return hit[2]
    h = hashlib.sha256()
    with open(real, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    with _lock:
        _memory[real] = (st.st_size, st.st_mtime_ns, digest)
        _save_cache()
    return digest


def combined(hashes: dict[str, str]) -> str:
    """One SHA-256 over named hashes (sorted by name)."""
    h = hashlib.sha256()
    for name in sorted(hashes):
        h.update(f"{name}\t{hashes[name]}\n".encode())
    return h.hexdigest()


def _is_variant_file(name: str, variant: str | None) -> bool:
    """Whether a weight file is the one from_pretrained reads for `variant` ('x.fp16.safetensors' for fp16; the
    plain 'x.safetensors' and shards 'x-00001-of-00002.safetensors' without one)."""
    stem = name.split(".", 1)
    infix = stem[1].rsplit(".", 1)[0] if len(stem) == 2 and "." in stem[1] else None
    if variant:
        return infix is not None and infix.split("-")[0] == variant
    return infix is None


def folder_files(folder: Path, variant: str | None = None) -> list[Path]:
    """The files of a component folder that determine it: configs, tokenizer files, and the weights a load reads
    (safetensors in preference to pickles, the variant's files when it has them)."""
    files = [p for p in sorted(folder.iterdir()) if p.is_file() and p.name not in SKIPPED]
    weights = [p for p in files if p.name.endswith(WEIGHT_SUFFIXES)]
    others = [p for p in files if p not in weights]
    if any(p.suffix == ".safetensors" for p in weights):
        weights = [p for p in weights if p.suffix == ".safetensors"]
    chosen = [p for p in weights if _is_variant_file(p.name, variant)]
    return others + (chosen or weights)


def folder_identity(folder: str | Path, variant: str | None = None) -> dict[str, Any]:
    """{"source", "revision", "sha256", "files"} of a component folder."""
    folder = Path(folder)
    hashes = {p.name: file_sha256(p) for p in folder_files(folder, variant)}
    m = _SNAPSHOT.search(str(folder))
    out = {"source": display_source(folder), "revision": m.group(3) if m else None, "sha256": combined(hashes),
           "files": len(hashes)}
    if variant:
        out["variant"] = variant
    return out


def display_source(folder: Path) -> str:
    """Where a component came from, without the machine's own paths where there is a better name:
    'hub:owner/name/unet' for the Hugging Face cache, 'models/...' for the checkout's models, 'home:...' for models
    built in the studio home; other folders as they are."""
    from studio.pipelines import studio_home
    from studio.presets import models_root

    m = _SNAPSHOT.search(str(folder))
    if m:
        return f"hub:{m.group(1)}/{m.group(2)}" + (f"/{m.group(4)}" if m.group(4) else "")
    real = folder.resolve()
    for prefix, root in (("models", models_root()), ("home:", studio_home())):
        try:
            rel = real.relative_to(Path(root).resolve()).as_posix()
        except ValueError:
            continue
        return f"models/{rel}" if prefix == "models" else f"home:{rel}"
    return str(folder)


def source_path(source: str, revision: str | None) -> Path | None:
    """The folder a recorded source names (the inverse of display_source); None for in-memory components."""
    from studio.pipelines import studio_home
    from studio.presets import models_root

    if source.startswith("hub:"):
        from huggingface_hub.constants import HF_HUB_CACHE

        owner, name, *sub = source[4:].split("/")
        if revision is None:
            return None
        return Path(HF_HUB_CACHE, f"models--{owner}--{name}", "snapshots", revision, *sub)
    if source.startswith("models/"):
        return Path(models_root(), source[len("models/"):])
    if source.startswith("home:"):
        return Path(studio_home(), source[len("home:"):])
    return Path(source) if Path(source).is_absolute() else None


def memory_identity(module) -> dict[str, Any]:
    """The identity of a component built in memory: a hash of its state dict (names, shapes, dtypes, values)."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}\t{tuple(t.shape)}\t{t.dtype}\n".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return {"source": "memory", "revision": None, "sha256": h.hexdigest(), "files": 0}


def _source_folder(component) -> Path | None:
    """The folder a diffusers model or a transformers model/tokenizer was loaded from, if any."""
    ref = getattr(getattr(component, "config", None), "_name_or_path", None)
    ref = ref or getattr(component, "name_or_path", None)
    if isinstance(ref, str) and ref and Path(ref).is_dir():
        return Path(ref)
    return None


def scheduler_identity(scheduler) -> dict[str, Any]:
    """A scheduler has no weights: its class and config (after the preset's overrides) are what it is."""
    config = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
    text = json.dumps([type(scheduler).__name__, config], sort_keys=True, default=str)
    return {"source": type(scheduler).__name__, "revision": None, "sha256": hashlib.sha256(text.encode()).hexdigest(),
            "files": 0}


def pipeline_identity(pipe, variant: str | None = None) -> dict[str, dict]:
    """{component name: identity} of every component of a pipeline (computed from its files; see module doc)."""
    out: dict[str, dict] = {}
    for name, comp in pipe.components.items():
        if comp is None:
            continue
        if name == "scheduler":
            out[name] = scheduler_identity(comp)
            continue
        folder = _source_folder(comp)
        if folder is not None:
            out[name] = folder_identity(folder, variant)
        elif hasattr(comp, "state_dict"):
            out[name] = memory_identity(comp)
    return out


def of_pipeline(pipe, variant: str | None = None) -> dict[str, dict]:
    """The pipeline's component identity, computed once per pipeline object (at load, before any subject's adapter
    is added) and kept on it."""
    ident = pipe.__dict__.get("_studio_identity")
    if ident is None:
        ident = pipeline_identity(pipe, variant)
        pipe._studio_identity = ident
    return ident


def subject_identity(record) -> dict[str, Any]:
    """A trained subject: when it was made and the hash of each weight file (LoRA, tokens)."""
    files = {p.name: file_sha256(p) for p in (record.lora_path, record.embeds_path) if p is not None}
    return {"created": record.created, "files": files}


def image_identity(path: str | Path) -> str:
    return file_sha256(path)


def on_disk(recorded: dict, shot=None, library=None) -> dict:
    """The identity a render recorded, recomputed from what is on disk now: the same component folders, the library's
    subjects of those names, the shot's input files. Something gone is absent. Cheap: file hashes are cached."""
    now: dict[str, dict] = {"components": {}, "subjects": {}, "inputs": {}}
    for name, entry in (recorded.get("components") or {}).items():
        folder = source_path(entry.get("source", ""), entry.get("revision"))
        if entry.get("source") == "memory" or entry.get("files", 0) == 0:
            now["components"][name] = entry  # in memory or a scheduler config: nothing on disk to compare
        elif folder is not None and folder.is_dir():
            now["components"][name] = folder_identity(folder, entry.get("variant"))
    if recorded.get("subjects"):
        from studio.subjects.library import SubjectLibrary

        library = library or SubjectLibrary()
        for name in recorded["subjects"]:
            try:
                now["subjects"][name] = subject_identity(library.get(name))
            except (ValueError, OSError):
                pass  # removed or broken: absent
    if shot is not None and recorded.get("inputs"):
        from studio.engine import input_files

        for name, path in input_files(shot).items():
            if Path(path).is_file():
                now["inputs"][name] = file_sha256(path)
    return now


def differences(recorded: dict | None, now: dict) -> list[tuple[str, str, str]]:
    """(what, recorded, now) for each component, subject or input whose hash differs, named like
    'components.unet', 'subjects.rex', 'inputs.subjects[0].reference'. Nothing recorded: nothing compared."""
    if not recorded:
        return []
    out = []
    for section in ("components", "subjects", "inputs"):
        old, new = recorded.get(section) or {}, now.get(section) or {}
        for key in sorted(set(old) | set(new)):
            a, b = digest(old.get(key)), digest(new.get(key))
            if a != b:
                out.append((f"{section}.{key}", a or "absent", b or "absent"))
    return out


def digest(entry) -> str | None:
    """A short comparable digest of one identity entry (a component, a subject or an input hash)."""
    if entry is None:
        return None
    if isinstance(entry, str):
        return entry[:12]
    if "sha256" in entry:
        return (entry["sha256"] or "")[:12]
    return combined({**entry.get("files", {}), "created": entry.get("created", "")})[:12]
