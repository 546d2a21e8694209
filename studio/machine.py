"""Machine settings: how this machine runs a model, as opposed to what the shot asks for.

Two things live here:
- `RECORDED`: every setting that can change a render's pixels (device, dtype, CPU threads, attention backend, and
  each machine option added later: offload, VAE tiling, step caches, compile). Each entry is one line, a name and
  a function of the pipeline that reads the value in effect. `record(pipe)` reads them all; the engine writes the
  result into every sidecar under "settings", and `studio render --verify` compares it with the sidecar's.
- `differences(recorded, now)`: which of them differ, for --verify and the page.

Adding a machine setting that changes pixels is one line in RECORDED (plus wherever the setting is applied).

- `MachineSettings`: the operator's choices of how to run models (device, dtype, CPU offload, VAE tiling and
  slicing, attention kernels), read in one place from environment variables (`ENV`, for a Space or server) and
  `studio` flags (`add_arguments`, `from_args`; a flag wins over its variable). Never a shot field: a shot renders
  the same picture anywhere, these only say how this machine gets there. `checked()` resolves them against this
  machine and turns what it cannot do into one line naming the flag or variable and what to use instead.

Precedence of the dtype: a preset's `dtype` field is the model's own default (what its weights are published
in); the machine's dtype, when given (not "auto"), wins over it, because it is the operator who knows what the
hardware does well (bfloat16 on recent GPUs, float32 to debug). Subject training uses the machine's dtype, else
the preset's, else bfloat16 where the GPU has it (float16 with a gradient scaler where not), float32 on a CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from studio import step_caches

logger = logging.getLogger(__name__)


def _dtype(pipe) -> str:
    from studio.families import denoiser

    return str(denoiser(pipe).dtype).removeprefix("torch.")


def _threads(pipe) -> int | None:
    """torch's intra-op CPU threads; on a GPU the count does not change the denoiser's pixels (None)."""
    import torch

    return torch.get_num_threads() if str(execution_device(pipe)).startswith("cpu") else None


def _wait_policy(pipe) -> str | None:
    """The OpenMP wait policy of torch's CPU threads (studio.threads: PASSIVE unless OMP_WAIT_POLICY says)."""
    from studio import threads

    return threads.wait_policy() if str(pipe.device).startswith("cpu") else None


def _threads_chosen_by(pipe) -> str | None:
    """How the CPU thread count was chosen: --threads, SHOT_STUDIO_THREADS, OMP_NUM_THREADS or auto (studio.threads)."""
    from studio import threads

    return threads.chosen_by() if str(pipe.device).startswith("cpu") else None


def _attention_backend(pipe) -> str:
    """diffusers' active attention dispatch backend ("native": torch's scaled_dot_product_attention)."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    name, _ = _AttentionBackendRegistry.get_active_backend()
    return str(getattr(name, "value", name))


def _deterministic(pipe) -> bool:
    import torch

    return torch.are_deterministic_algorithms_enabled()


def execution_device(pipe):
    """Where the pipeline computes: its modules' device, or the GPU an offloaded pipeline moves them to."""
    return pipe._execution_device


def _offload(pipe) -> str:
    """none | model | sequential, read from the accelerate hooks diffusers installed."""
    if getattr(pipe, "_all_hooks", None):
        return "model"
    modules = [m for m in getattr(pipe, "components", {}).values() if hasattr(m, "modules")]
    return "sequential" if any(hasattr(m, "_hf_hook") for m in modules) else "none"


def _vae_flag(name: str):
    return lambda pipe: bool(getattr(getattr(pipe, "vae", None), name, False))


def _sdpa_kernels(pipe) -> str:
    """torch's scaled-dot-product-attention kernels allowed in this process, as an ATTENTION name (apply_attention)
    where they are one."""
    import torch

    b = torch.backends.cuda
    flags = {"math": b.math_sdp_enabled(), "flash": b.flash_sdp_enabled(), "efficient": b.mem_efficient_sdp_enabled(),
             "cudnn": b.cudnn_sdp_enabled()}
    on = [name for name, enabled in flags.items() if enabled]
    if len(on) == len(flags):
        return "auto"
    if on == ["math"] or (len(on) == 2 and on[0] == "math"):
        return on[-1]
    return ",".join(on) or "none"


# name -> reader of the value in effect for this pipeline. One line per setting that changes pixels.
RECORDED: dict[str, Callable[[Any], Any]] = {
    "device": lambda pipe: str(execution_device(pipe)),
    "dtype": _dtype,
    "torch_threads": _threads,
    "attention_backend": _attention_backend,
    "deterministic_algorithms": _deterministic,
    "offload": _offload,  # the same kernels in principle; recorded so that --verify can tell when it did matter
    "vae_tiling": _vae_flag("use_tiling"),  # tiles blend at their seams: other pixels
    "vae_slicing": _vae_flag("use_slicing"),  # one image per VAE call: other batch sizes, maybe other kernels
    "attention": _sdpa_kernels,  # the math kernel and the fused ones round differently
    "step_cache": step_caches.recorded,  # --step-cache / SHOT_STUDIO_STEP_CACHE where it runs (wan), else none
}

# Machine settings recorded with a render (sidecar render.machine) that change its speed, not its pixels: not
# compared by --verify, not part of a batch job's hash.
NOTED: dict[str, Callable[[Any], Any]] = {
    "torch_wait_policy": _wait_policy,
    "torch_threads_chosen_by": _threads_chosen_by,
}


def notes(pipe) -> dict[str, Any]:
    """The speed-only machine settings of a render on `pipe` (sidecar render.machine)."""
    return {name: read(pipe) for name, read in NOTED.items()}


def record(pipe) -> dict[str, Any]:
    """The pixel-changing machine settings in effect for a render on `pipe` (sidecar key "settings")."""
    return {name: read(pipe) for name, read in RECORDED.items()}


def differences(recorded: dict | None, now: dict) -> list[tuple[str, Any, Any]]:
    """(setting, recorded value, value now) for each recorded setting whose value differs now. Settings the record
    lacks (a sidecar of an older studio, or a setting added since) are not compared: nothing says what they were."""
    return [(k, v, now.get(k)) for k, v in sorted((recorded or {}).items()) if now.get(k) != v]


# --- machine settings ----------------------------------------------------------------------------------------

DEVICES = "auto | cpu | cuda | cuda:N"
DTYPES = ("auto", "float16", "bfloat16", "float32")
OFFLOAD = ("none", "model", "sequential", "auto")
# torch's SDPA kernels: auto (torch picks among all) | math | flash, efficient, cudnn (each with math where it cannot)
ATTENTION = ("auto", "math", "flash", "efficient", "cudnn")
GiB = 2**30
# `--offload auto` keeps a pipeline resident when the GPU's free memory holds its weights plus this much for a
# render's activations (a native-size SD 1.5 + AnimateDiff render with guidance; gpu_check.sh prints measured
# peaks), offloads whole models when it holds the largest one plus this, and offloads layer by layer otherwise.
AUTO_HEADROOM = 6 * GiB


@dataclass(frozen=True)
class MachineSettings:
    """How this machine runs models: an operator's setting (flags, environment), never a shot's field."""

    device: str = "auto"  # auto: cuda when torch sees a GPU, else cpu | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto: the model preset's `dtype` field | float16 | bfloat16 | float32 (wins over it)
    offload: str = "none"  # none | model (whole models to the GPU in turn) | sequential (layer by layer) | auto
    vae_tiling: bool = False  # decode (and encode) in overlapping tiles: large frames in less memory
    vae_slicing: bool = False  # decode one frame at a time
    attention: str = "auto"  # torch's attention kernels: auto | math | flash | efficient | cudnn (process-wide)
    # where each value came from ("--offload", "SHOT_STUDIO_OFFLOAD"), for messages; not part of the settings
    origin: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def source(self, name: str) -> str:
        return self.origin.get(name, name)

    def replace(self, **changes) -> "MachineSettings":
        return dataclasses.replace(self, **changes)

    def checked(self) -> "MachineSettings":
        """These settings resolved for this machine (device "auto" made concrete), or ValueError: one line naming
        the flag or variable, what this machine lacks, and what to use instead."""
        return check(self)

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "origin"}


# The environment variables of each setting (a Space's or server's operator settings) and the `studio` flags.
ENV = {"device": "SHOT_STUDIO_DEVICE", "dtype": "SHOT_STUDIO_DTYPE", "offload": "SHOT_STUDIO_OFFLOAD",
       "vae_tiling": "SHOT_STUDIO_VAE_TILING", "vae_slicing": "SHOT_STUDIO_VAE_SLICING",
       "attention": "SHOT_STUDIO_ATTENTION"}
FLAGS = {name: "--" + name.replace("_", "-") for name in ENV}
HELP = {
    "device": f"where models run: {DEVICES} (default auto: cuda when torch sees a GPU)",
    "dtype": "weights' dtype: auto (the model preset's `dtype`), float16, bfloat16, float32; wins over the preset",
    "offload": "keep weights on the CPU and move them to the GPU when used: none, model (whole models in turn), "
               "sequential (layer by layer: least memory, slowest), auto (by free GPU memory)",
    "vae_tiling": "VAE in overlapping tiles (large frames in less memory; changes pixels slightly)",
    "vae_slicing": "VAE one frame at a time (less memory)",
    "attention": "attention kernels: auto (torch picks), math, flash, efficient, cudnn (the last two CUDA only)",
}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def _parse(name: str, raw, source: str):
    if name in ("vae_tiling", "vae_slicing"):
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        raise ValueError(f"{source}: must be 1 or 0 (true/false, on/off) (got {raw!r})")
    value = str(raw).strip().lower()
    choices = {"dtype": DTYPES, "offload": OFFLOAD, "attention": ATTENTION}.get(name)
    if choices is not None and value not in choices:
        raise ValueError(f"{source}: must be one of {', '.join(choices)} (got {raw!r})")
    if name == "device" and not (value in ("auto", "cpu", "cuda") or
                                 (value.startswith("cuda:") and value[5:].isdigit())):
        raise ValueError(f"{source}: must be {DEVICES} (got {raw!r})")
    return value


def from_env(environ: Mapping[str, str] | None = None, base: MachineSettings | None = None) -> MachineSettings:
    """The settings the environment gives (SHOT_STUDIO_*; unset or empty: the default), over `base`."""
    environ = os.environ if environ is None else environ
    values, origin = {}, dict(base.origin) if base else {}
    for name, var in ENV.items():
        raw = environ.get(var)
        if raw is not None and raw.strip() != "":
            values[name], origin[name] = _parse(name, raw, var), var
    return dataclasses.replace(base or MachineSettings(), origin=origin, **values)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The machine-setting flags of a `studio` command; unset flags leave the environment's value."""
    group = parser.add_argument_group("machine settings", "how this machine runs models (never part of a shot); "
                                                          "a flag wins over its environment variable")
    for name, flag in FLAGS.items():
        text = f"{HELP[name]} [{ENV[name]}]"
        if name in ("vae_tiling", "vae_slicing"):
            group.add_argument(flag, dest=f"machine_{name}", action=argparse.BooleanOptionalAction, default=None,
                               help=text)
        else:
            group.add_argument(flag, dest=f"machine_{name}", default=None, metavar=name.upper(), help=text)


def from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> MachineSettings:
    """The environment's settings with the command's flags over them (not yet checked against the machine)."""
    settings = from_env(environ)
    values, origin = {}, dict(settings.origin)
    for name, flag in FLAGS.items():
        raw = getattr(args, f"machine_{name}", None)
        if raw is not None:
            values[name], origin[name] = _parse(name, raw, flag), flag
    return dataclasses.replace(settings, origin=origin, **values)


def check(settings: MachineSettings) -> MachineSettings:
    """See MachineSettings.checked."""
    import torch

    s = settings
    cuda = torch.cuda.is_available()
    device = s.device
    if device == "auto":
        device = "cuda" if cuda else "cpu"
    if device.startswith("cuda"):
        if not cuda:
            raise ValueError(f"{s.source('device')} {s.device}: torch sees no CUDA GPU on this machine "
                             f"(torch {torch.__version__}); use cpu")
        index = int(device[5:]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"{s.source('device')} {s.device}: this machine has {torch.cuda.device_count()} CUDA "
                             f"device(s); use cuda:0..cuda:{torch.cuda.device_count() - 1}")
    on_cpu = device == "cpu"
    if s.offload in ("model", "sequential"):
        if on_cpu:
            raise ValueError(f"{s.source('offload')} {s.offload}: offloading moves weights between the CPU and a "
                             f"GPU, and this run has none (device {device}); use none")
        import importlib.util

        if importlib.util.find_spec("accelerate") is None:
            raise ValueError(f"{s.source('offload')} {s.offload}: needs the accelerate package "
                             f"(pip install accelerate); use none")
    if s.attention in ("efficient", "cudnn") and on_cpu:
        raise ValueError(f"{s.source('attention')} {s.attention}: a CUDA kernel, and this run is on the CPU; use "
                         f"auto, math or flash")
    if s.dtype != "auto":
        check_dtype(s.dtype, device, s.source("dtype"))
    return dataclasses.replace(s, device=device)


def check_dtype(name: str, device: str, source: str) -> None:
    """ValueError (one line) when this machine cannot compute in that dtype on that device."""
    import torch

    if name == "bfloat16" and device.startswith("cuda") and not torch.cuda.is_bf16_supported():
        raise ValueError(f"{source} bfloat16: {torch.cuda.get_device_name(device)} has no bfloat16 support; use "
                         f"float16")


def model_dtype(preset_dtype: str, settings: MachineSettings, device: str, family: str = "animatediff"):
    """The torch dtype a pipeline is loaded in: the machine's dtype when given, else the preset's (auto: the
    family's choice: float16 on CUDA for the UNets, bfloat16 for Wan; float32 on the CPU)."""
    import torch

    name, source = (settings.dtype, settings.source("dtype")) if settings.dtype != "auto" else \
        (preset_dtype, "the model preset's dtype")
    if name == "auto":
        from studio import families

        name = families.get(family).auto_dtype("cuda" if device.startswith("cuda") else device)
    check_dtype(name, device, source)
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def training_dtype(preset_dtype: str, settings: MachineSettings, device: str):
    """The dtype subject training loads its frozen weights in (trainable weights are float32 regardless): the
    machine's dtype, else the preset's, else bfloat16 on a GPU that has it (float16, with a gradient scaler, on
    one that has not), float32 on the CPU."""
    import torch

    if settings.dtype != "auto" or preset_dtype != "auto" or not device.startswith("cuda"):
        return model_dtype(preset_dtype, settings, device)
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def choose_offload(free: int, total: int, largest: int, headroom: int = AUTO_HEADROOM) -> str:
    """`--offload auto`'s choice for a pipeline of `total` weight bytes (its largest model `largest`) on a GPU with
    `free` bytes free: none when everything fits with room for a render, model when the largest model does,
    sequential otherwise."""
    if free >= total + headroom:
        return "none"
    if free >= largest + headroom:
        return "model"
    return "sequential"


def weight_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def resolve_offload(pipe, settings: MachineSettings, device: str) -> str:
    """The offload mode for this pipeline: the setting, or auto's choice by the GPU's free memory now."""
    if settings.offload != "auto":
        return settings.offload
    if not device.startswith("cuda"):
        return "none"
    import torch

    free, _ = torch.cuda.mem_get_info(torch.device(device))
    sizes = [weight_bytes(m) for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    mode = choose_offload(free, sum(sizes), max(sizes, default=0))
    logger.info("offload auto: %s (%.1f GiB free, weights %.1f GiB)", mode, free / GiB, sum(sizes) / GiB)
    return mode


def place(pipe, device: str, settings: MachineSettings):
    """Apply the memory settings to a freshly loaded pipeline and put it on `device` (or offload it there)."""
    if settings.vae_tiling:
        pipe.vae.enable_tiling()  # diffusers 0.42: on the VAE, no longer on the pipeline
    if settings.vae_slicing:
        pipe.vae.enable_slicing()
    mode = resolve_offload(pipe, settings, device)
    if mode == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif mode == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.to(device)
        park(pipe)
    return pipe


# Components a pipeline keeps but never runs: AnimateDiff's motion adapter, whose weights UNetMotionModel copied
# when the pipeline was built (SD 1.5's v1-5-3: 417 M parameters, 0.78 GiB in float16). `pipe.to(device)` would put
# that copy on the GPU too; it stays on the CPU (its config is still read, e.g. by FreeNoise).
PARKED = ("motion_adapter",)


def park(pipe) -> None:
    for name in PARKED:
        module = getattr(pipe, name, None)
        if hasattr(module, "to") and hasattr(module, "parameters"):
            module.to("cpu")


@contextlib.contextmanager
def offload_paused(pipe):
    """An offloaded pipeline's accelerate hooks removed while the block runs (sequential offload keeps weights on
    the meta device, where adding adapters or token rows cannot reach them), the same offload again after, as
    diffusers' own LoRA loader does."""
    mode = _offload(pipe)
    if mode == "none":
        yield
        return
    device = pipe._offload_device
    pipe.remove_all_hooks()
    try:
        yield
    finally:
        if mode == "model":
            pipe.enable_model_cpu_offload(device=device)
        else:
            pipe.enable_sequential_cpu_offload(device=device)


def apply_attention(settings: MachineSettings) -> None:
    """Allow only the chosen scaled-dot-product-attention kernel, process-wide (like torch's thread count): every
    attention call goes through torch's SDPA, the UNets' processors and the studio's controls alike. The math kernel
    stays allowed beside a fused one, for the calls that one cannot take (the controls' additive masks on flash,
    float32 on flash and cudnn): a choice never leaves a call without a kernel."""
    import torch

    b = torch.backends.cuda
    flags = {"math": b.enable_math_sdp, "flash": b.enable_flash_sdp, "efficient": b.enable_mem_efficient_sdp,
             "cudnn": b.enable_cudnn_sdp}
    for name, enable in flags.items():
        enable(settings.attention == "auto" or name in ("math", settings.attention))
