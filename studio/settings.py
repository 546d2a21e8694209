"""The operator's settings: environment variables, all named SHOT_STUDIO_<FIELD>, one field of `Settings` each.

Read once where they are used (`Settings.from_env()`), parsed by the field's type; a bad value is one line naming
the variable. The README's table of variables is `markdown_table()` (a test keeps the two equal; print it with
`python -m studio.settings`). A new setting is one field here with its help text, then the README table.

SHOT_STUDIO_HOME, SHOT_STUDIO_MODELS and SHOT_STUDIO_PRESETS (folders, read where the folders are resolved) are older
than this table and are not fields here.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Optional, Union, get_args, get_origin, get_type_hints

PREFIX = "SHOT_STUDIO_"
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class SettingsError(ValueError):
    """A SHOT_STUDIO_* variable that does not parse; names the variable and the value."""


def _setting(default, help: str, shown: str | None = None):
    """A Settings field: its default, what it does (the README's table), and the default as the table shows it."""
    return field(default=default, metadata={"help": help, "shown": shown})


@dataclass(frozen=True)
class Settings:
    """What strangers may do on a served studio (the page and its API), and the caps on what they ask for.

    The defaults are for a public Space on one shared GPU. None of these limit the CLI or the user's own files."""

    allow_render: bool = _setting(True, "Strangers may render shots.")
    allow_train: Optional[bool] = _setting(
        None, "Strangers may teach the studio new subjects (photos, masks, training).",
        "off on a Space (`SPACE_ID` set), else on")
    allow_delete: bool = _setting(False, "Strangers may delete subjects from the library.")
    web_models: tuple[str, ...] = _setting(
        ("*",), "Model presets a shot from the web may name, comma-separated: `*` (every shipped preset in "
                "presets/models), preset names, and paths of the operator's own preset files (named by that path).",
        "`*`")
    max_pixel_steps: int = _setting(
        300_000_000, "Cap on a web shot's frames × width × height × steps, plus each refinement pass's frames × "
                     "its pixels × its steps (Zeroscope's default render is 177 M, SD 1.5's 105 M). 0: no cap.",
        "300000000")
    max_refine_scale: int = _setting(2, "Cap on a web shot's `refine.tiled.scale` when Tiled VCD is on.")
    max_train_steps: int = _setting(400, "Cap on the training steps a stranger may ask for (the model's default "
                                         "counts when none is given). 0: no cap.")
    max_train_photos: int = _setting(10, "Cap on the photos of a subject a stranger teaches (the library takes at "
                                         "most 10 in any case). 0: no cap.")
    max_queue: int = _setting(16, "Jobs waiting in the queue at most; more are turned away. 0: no limit.")
    max_disk_mb: int = _setting(4096, "MB kept in the output folder (`$SHOT_STUDIO_HOME/renders`: renders, uploads, "
                                      "previews); past it, the oldest files are removed first. 0: no limit.")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """The settings the environment gives (unset variables take the defaults)."""
        env = os.environ if environ is None else environ
        values = {}
        for f in dataclasses.fields(cls):
            raw = env.get(env_name(f.name))
            if raw is not None and raw.strip() != "":
                values[f.name] = _parse(env_name(f.name), raw.strip(), _hint(f.name))
        if values.get("allow_train") is None:
            values["allow_train"] = not env.get("SPACE_ID")
        return cls(**values)


def env_name(name: str) -> str:
    return PREFIX + name.upper()


def _hint(name: str):
    return get_type_hints(Settings)[name]


def _parse(var: str, raw: str, tp):
    if get_origin(tp) is Union:  # Optional[X]
        tp = next(a for a in get_args(tp) if a is not type(None))
    if tp is bool:
        if raw.lower() in TRUE:
            return True
        if raw.lower() in FALSE:
            return False
        raise SettingsError(f"{var}: must be 1 or 0 (true/false, yes/no, on/off) (got {raw!r})")
    if tp is int:
        try:
            value = int(raw)
        except ValueError:
            raise SettingsError(f"{var}: must be a whole number (got {raw!r})") from None
        if value < 0:
            raise SettingsError(f"{var}: must be 0 or more (got {raw!r})")
        return value
    if get_origin(tp) is tuple:
        return tuple(x.strip() for x in raw.split(",") if x.strip())
    return raw


def _shown(f: dataclasses.Field) -> str:
    if f.metadata.get("shown"):
        return f.metadata["shown"]
    if isinstance(f.default, bool):
        return "on" if f.default else "off"
    return f"`{f.default}`" if not isinstance(f.default, int) else str(f.default)


def machine_rows() -> list[tuple[str, str, str]]:
    """(variable, default, what) of the machine settings (studio.machine, studio.threads): how this machine runs
    models, for the page and a Space; the CLI's flags of the same names win over them."""
    import dataclasses as dc

    from studio import machine, step_caches, threads

    defaults = {f.name: f.default for f in dc.fields(machine.MachineSettings)}
    rows = [(threads.ENV, "`auto`", "torch CPU threads (`--threads`): a whole number, or `auto` (one core left "
                                    "free: 1 thread on 1–2 cores, cores − 1 from 3 on); see \"CPU threads\"")]
    for name, var in machine.ENV.items():
        d = defaults[name]
        shown = ("on" if d else "off") if isinstance(d, bool) else f"`{d}`"
        what = machine.HELP[name].replace("|", ",")  # a bar would split the table's cell
        rows.append((var, shown, f"{what} (`{machine.FLAGS[name]}`); see \"Machine settings\""))
    rows.append((step_caches.ENV, "`none`", "diffusers' step cache for Wan models: NAME or NAME:key=value,... "
                                           "(`--step-cache`); see \"Step caches\""))
    return rows


def markdown_table() -> str:
    """The README's table of every SHOT_STUDIO_* variable: what strangers may do (Settings), then how the machine
    runs models (machine_rows)."""
    rows = ["| variable | default | what it does |", "|---|---|---|"]
    rows += [f"| `{env_name(f.name)}` | {_shown(f)} | {f.metadata['help']} |" for f in dataclasses.fields(Settings)]
    rows += [f"| `{var}` | {shown} | {what} |" for var, shown, what in machine_rows()]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
