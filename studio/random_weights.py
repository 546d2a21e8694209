"""Random-weight models of a real preset's exact layout, built from its published configs.

`presets/configs/<layout>/` mirrors the Hugging Face repos a preset loads, configs only (no weights): the folder
itself is the preset's `base` repo (`model_index.json` listing its components as [library, class], one sub-folder
per component: `unet/config.json`, `scheduler/scheduler_config.json`, ...), and a sub-folder named after another
weight reference of the preset is that repo (`motion_adapter/config.json` for AnimateDiff: a single-model repo).
SOURCES.md beside them says where every file came from.

`build_folder(layout, width_factor, seed)` turns that into weights, generically: every component is
`getattr(import_module(library), class)` made from its config with a seeded initialisation (diffusers models and
schedulers with `from_config`, transformers models from their config class), saved with `save_pretrained`; other
components (tokenizers, processors) are their shipped files. A CLIP tokenizer folder without vocab.json/merges.txt
gets CLIP's BPE vocabulary from `presets/configs/clip-bpe/` (the file OpenAI's CLIP and open_clip ship, MIT), so
prompts split into the pieces the real tokenizer makes. The result is cached under the studio home, keyed by the
configs' content, the factor, the seed and the library versions, and the studio then loads it through the same
`from_pretrained` path as the real weights.

A width factor below 1 narrows the same layout (for CPU tests): the fields that `presets/configs/width.json` lists
for the component's class are multiplied by it: channel widths with the group-norm group counts (so each group keeps
its channels) and per-head widths, never head counts or depths. A factor that breaks the layout (a width that is not
a whole number, heads or groups that no longer divide the channels) is refused naming the config field.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import importlib
import json
import logging
import os
import shutil
from pathlib import Path

from studio.shot import ShotError

logger = logging.getLogger(__name__)

BUILDER_VERSION = 1  # bump when the way folders are built changes (a new cache folder)
REFERENCES = ("base", "motion_adapter")  # preset fields whose weights a layout can stand in for
CLIP_BPE = "clip-bpe/bpe_simple_vocab_16e6.txt.gz"
TOKENIZER_FILES = ("vocab.json", "merges.txt")


def configs_root() -> Path:
    from studio.presets import presets_root

    return presets_root() / "configs"


def layouts() -> list[str]:
    """The layouts with published configs (folders of presets/configs holding a model_index.json)."""
    root = configs_root()
    return sorted(p.name for p in root.iterdir() if (p / "model_index.json").is_file()) if root.is_dir() else []


def has_repo(layout: str, reference: str) -> bool:
    """Whether a layout has configs for a preset's weight reference ("base", "motion_adapter")."""
    folder = layout_dir(layout)
    return (folder / "model_index.json").is_file() if reference == "base" else (folder / reference / "config.json"
                                                                                 ).is_file()


def layout_dir(layout: str) -> Path:
    return configs_root() / layout


# --- reading and narrowing the configs ------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def repo_components(repo: Path) -> dict[str, tuple[str, str]]:
    """{component (sub-folder, or "" for a single-model repo): (library, class)} of one repo folder of a layout.
    Components the model_index lists but the layout ships no configs for (a safety checker, say) are left out."""
    if (repo / "model_index.json").is_file():
        index = _read_json(repo / "model_index.json")
        return {name: (v[0], v[1]) for name, v in index.items()
                if not name.startswith("_") and isinstance(v, list) and len(v) == 2 and all(v)
                and (repo / name).is_dir()}
    config = _read_json(repo / "config.json")
    if "_class_name" in config:
        return {"": ("diffusers", config["_class_name"])}
    return {"": ("transformers", config["architectures"][0])}


def _config_file(folder: Path) -> Path | None:
    for name in ("config.json", "scheduler_config.json"):
        if (folder / name).is_file():
            return folder / name
    return None


def _width_rules() -> dict:
    return _read_json(configs_root() / "width.json")


def _fmt(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def narrow(config: dict, cls_name: str, factor: float, where: str, field: str = "width_factor") -> dict:
    """A copy of `config` with the class's width fields × factor (see width.json); ShotError(field, factor, ...) naming
    `where.<config field>` when the factor breaks the layout."""
    if factor == 1:
        return dict(config)
    rules = _width_rules().get(cls_name)
    if rules is None:
        raise ShotError(field, factor, f"{where} ({cls_name}) has no width rules in presets/configs/width.json, so "
                                       f"it can only be built at width_factor 1")
    out = dict(config)
    for key in rules.get("scale", []):
        if out.get(key) is None:
            continue
        values = out[key] if isinstance(out[key], list) else [out[key]]
        scaled = []
        for v in values:
            w = v * factor
            if abs(w - round(w)) > 1e-6 or round(w) < 1:
                raise ShotError(field, factor, f"breaks the layout: {where}.{key} {v} × {_fmt(factor)} = {w:g} is "
                                               f"not a whole number of channels")
            scaled.append(int(round(w)))
        out[key] = scaled if isinstance(out[key], list) else scaled[0]
    for num_key, den_key in rules.get("divide", []):
        num, den = out.get(num_key), out.get(den_key)
        if num is None or den is None:
            continue
        nums = num if isinstance(num, list) else [num]
        dens = den if isinstance(den, list) else [den] * len(nums)
        for n, d in zip(nums, dens):
            if n % d:
                raise ShotError(field, factor, f"breaks the layout: {where}.{den_key} {d} does not divide "
                                               f"{where}.{num_key} {n} (× {_fmt(factor)})")
    return out


def check(layout: str, factor: float, field: str = "width_factor", switch: str = "random_weights") -> None:
    """Refuse (ShotError naming `switch` or `field`) a layout without configs or a factor that breaks it, before
    anything is built."""
    if not has_repo(layout, "base"):
        known = ", ".join(layouts()) or "none"
        raise ShotError(switch, layout, f"no published configs for this model under presets/configs/ "
                                        f"(models with configs: {known})")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor <= 1:
        raise ShotError(field, factor, "must be a number in (0, 1]: the layout at full width (1) or narrower")
    for ref, repo in repos(layout).items():
        for comp, (_, cls_name) in repo_components(repo).items():
            path = _config_file(repo / comp)
            if path is not None and not path.name.startswith("scheduler"):
                narrow(_read_json(path), cls_name, factor, comp or ref, field)


def repos(layout: str) -> dict[str, Path]:
    """{weight reference: its configs folder} of a layout: "base" is the layout's folder, others its sub-folders."""
    folder = layout_dir(layout)
    return {r: folder if r == "base" else folder / r for r in REFERENCES if has_repo(layout, r)}


# --- building ------------------------------------------------------------------------------------------------


def folder_tag(layout: str, factor: float, seed: int) -> str:
    """Hash of everything a built folder depends on: the layout's files, the BPE vocabulary, the width rules, the
    factor, the seed, the builder and the library versions."""
    import diffusers
    import transformers

    h = hashlib.sha256()
    folder = layout_dir(layout)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(path.relative_to(folder).as_posix().encode() + b"\0" + path.read_bytes())
    for extra in (configs_root() / CLIP_BPE, configs_root() / "width.json"):
        if extra.is_file():
            h.update(extra.read_bytes())
    h.update(repr((factor, seed, BUILDER_VERSION, diffusers.__version__, transformers.__version__)).encode())
    return h.hexdigest()[:12]


def build_folder(layout: str, factor: float = 1.0, seed: int = 0, field: str = "width_factor") -> Path:
    """The folder of a random-weight model of `layout` at `factor` (built on first use, then cached): one sub-folder
    per weight reference of the layout (base/, motion_adapter/), each loadable with from_pretrained."""
    from studio.pipelines import studio_home

    check(layout, factor, field)
    name = f"{layout}-w{_fmt(factor)}-s{seed}-{folder_tag(layout, factor, seed)}"
    folder = studio_home() / "random" / name
    if (folder / "complete").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    logger.info("building random weights of %s at width %s in %s", layout, _fmt(factor), folder)
    try:
        with _quiet():
            for ref, repo in repos(layout).items():
                _build_repo(ref, repo, tmp / ref, factor, seed)
        (tmp / "complete").write_text(json.dumps({"layout": layout, "width_factor": factor, "seed": seed}) + "\n")
        if folder.exists():
            shutil.rmtree(tmp)  # another process built it meanwhile; identical by construction
        else:
            tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


@contextlib.contextmanager
def _quiet():
    """No progress bars from transformers' save_pretrained while building (restored after)."""
    from transformers.utils import logging as tf_logging

    was = tf_logging.is_progress_bar_enabled()
    tf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            tf_logging.enable_progress_bar()


def _build_repo(ref: str, repo: Path, out: Path, factor: float, seed: int) -> None:
    comps = repo_components(repo)
    out.mkdir(parents=True)
    for comp, (lib, cls_name) in comps.items():
        _build_component(repo / comp, out / comp if comp else out, lib, cls_name, factor, seed, f"{ref}/{comp}",
                         comp or ref)
    if (repo / "model_index.json").is_file():  # only the components built here
        index = _read_json(repo / "model_index.json")
        index = {k: v for k, v in index.items() if k.startswith("_") or not isinstance(v, list) or k in comps}
        (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def component_seed(seed: int, name: str) -> int:
    """Each component's own seed, so that adding or reordering components changes no other component's weights."""
    return int(hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()[:8], 16)


def _build_component(src: Path, out: Path, lib: str, cls_name: str, factor: float, seed: int, name: str,
                     where: str) -> None:
    import torch

    cls = getattr(importlib.import_module(lib), cls_name)
    out.mkdir(parents=True, exist_ok=True)
    kind = _kind(cls)
    if kind == "files":  # tokenizers, processors: their files as published
        for f in src.iterdir():
            if f.is_file():
                shutil.copy2(f, out / f.name)
        if "CLIPTokenizer" in cls_name and not all((out / f).is_file() for f in TOKENIZER_FILES):
            write_clip_bpe(out)
        return
    config = _read_json(_config_file(src))
    if kind == "scheduler":
        cls.from_config(config).save_pretrained(str(out))
        return
    config = narrow(config, cls_name, factor, where)
    with torch.random.fork_rng(devices=[]):  # initialisers draw from the global RNG: seed it, restore it after
        torch.manual_seed(component_seed(seed, name))
        if kind == "diffusers":
            model = cls.from_config(config)
        else:
            clean = {k: v for k, v in config.items() if k not in ("_name_or_path", "architectures")}
            model = cls(cls.config_class.from_dict(clean))
    model.save_pretrained(str(out), safe_serialization=True)  # float32, as initialised


def _kind(cls) -> str:
    from diffusers import ModelMixin, SchedulerMixin

    if isinstance(cls, type) and issubclass(cls, ModelMixin):
        return "diffusers"
    if isinstance(cls, type) and issubclass(cls, SchedulerMixin):
        return "scheduler"
    try:
        from transformers import PreTrainedModel

        if isinstance(cls, type) and issubclass(cls, PreTrainedModel):
            return "transformers"
    except ImportError:
        pass
    return "files"


# --- CLIP's BPE vocabulary -----------------------------------------------------------------------------------


def _bytes_to_unicode() -> list[str]:
    """CLIP's (and GPT-2's) printable stand-ins for the 256 byte values, in CLIP's vocabulary order."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def clip_bpe() -> tuple[dict[str, int], list[str]]:
    """(vocab token -> id, merge lines) of CLIP's tokenizer from the shipped bpe_simple_vocab_16e6.txt.gz, built as
    CLIP's SimpleTokenizer builds it: 256 byte symbols, the same with the end-of-word mark, the first 48894 merges,
    then <|startoftext|> and <|endoftext|> (49408 tokens, the vocab_size of SD 1.5's and Zeroscope's text encoders)."""
    lines = gzip.decompress((configs_root() / CLIP_BPE).read_bytes()).decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    symbols = _bytes_to_unicode()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_clip_bpe(folder: Path) -> None:
    """vocab.json and merges.txt of CLIP's tokenizer (the files Hugging Face's CLIP repos ship) into folder."""
    vocab, merges = clip_bpe()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
