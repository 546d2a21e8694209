"""Hugging Face ZeroGPU: `spaces.GPU` around the studio's GPU work when the `spaces` package is importable,
a no-op otherwise (locally, on CPU, on a Space with dedicated hardware, where `spaces.GPU` is itself a no-op).

On ZeroGPU a GPU is attached only while a decorated function runs; `duration` is its expected length in seconds
(shorter durations get queue priority).
"""

from __future__ import annotations

import importlib.util
import logging

logger = logging.getLogger(__name__)

RENDER_SECONDS = 120
TRAIN_SECONDS = 600


def zero_gpu_available() -> bool:
    return importlib.util.find_spec("spaces") is not None


def gpu(duration: int):
    """Decorator: `spaces.GPU(duration=duration)` when `spaces` imports, else the function unchanged."""
    if not zero_gpu_available():
        return lambda fn: fn
    try:
        import spaces
    except Exception as e:  # a broken install must not take the studio down; the CPU path still works
        logger.warning("spaces did not import (%s); running without ZeroGPU", e)
        return lambda fn: fn
    return spaces.GPU(duration=duration)
