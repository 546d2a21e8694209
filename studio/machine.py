"""Machine settings: how this machine runs a model, as opposed to what the shot asks for.

Two things live here:
- `RECORDED`: every setting that can change a render's pixels (device, dtype, CPU threads, attention backend, and
  each machine option added later: offload, VAE tiling, step caches, compile). Each entry is one line, a name and
  a function of the pipeline that reads the value in effect. `record(pipe)` reads them all; the engine writes the
  result into every sidecar under "settings", and `studio render --verify` compares it with the sidecar's.
- `differences(recorded, now)`: which of them differ, for --verify and the page.

Adding a machine setting that changes pixels is one line in RECORDED (plus wherever the setting is applied).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from studio import step_caches

logger = logging.getLogger(__name__)


def _dtype(pipe) -> str:
    from studio.families import denoiser

    return str(denoiser(pipe).dtype).removeprefix("torch.")


def _threads(pipe) -> int | None:
    """torch's intra-op CPU threads; on a GPU the count does not change the denoiser's pixels (None)."""
    import torch

    return torch.get_num_threads() if str(pipe.device).startswith("cpu") else None


def _attention_backend(pipe) -> str:
    """diffusers' active attention dispatch backend ("native": torch's scaled_dot_product_attention)."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    name, _ = _AttentionBackendRegistry.get_active_backend()
    return str(getattr(name, "value", name))


def _deterministic(pipe) -> bool:
    import torch

    return torch.are_deterministic_algorithms_enabled()


# name -> reader of the value in effect for this pipeline. One line per setting that changes pixels.
RECORDED: dict[str, Callable[[Any], Any]] = {
    "device": lambda pipe: str(pipe.device),
    "dtype": _dtype,
    "torch_threads": _threads,
    "attention_backend": _attention_backend,
    "deterministic_algorithms": _deterministic,
    "step_cache": step_caches.recorded,  # --step-cache / SHOT_STUDIO_STEP_CACHE where it runs (wan), else none
}


def record(pipe) -> dict[str, Any]:
    """The pixel-changing machine settings in effect for a render on `pipe` (sidecar key "settings")."""
    return {name: read(pipe) for name, read in RECORDED.items()}


def differences(recorded: dict | None, now: dict) -> list[tuple[str, Any, Any]]:
    """(setting, recorded value, value now) for each recorded setting whose value differs now. Settings the record
    lacks (a sidecar of an older studio, or a setting added since) are not compared: nothing says what they were."""
    return [(k, v, now.get(k)) for k, v in sorted((recorded or {}).items()) if now.get(k) != v]
