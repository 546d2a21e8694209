"""What subject training moves, and how a step computes on any device (studio.subjects.tune runs the steps).

- `add_lora`: a LoRA on the UNet's spatial attention, its weights float32 whatever the UNet's dtype.
- `TokenRows`: the text encoder's embedding table with the subject's new rows as a separate float32 parameter;
  the table itself stays frozen in the model's dtype (no optimizer state for the whole vocabulary, no restoring
  of the other rows after each step).
- `Precision`: the frozen weights in their dtype (float16 / bfloat16 on a GPU, float32 on a CPU), the forward
  under autocast in that dtype when it is half precision, float16's loss scaled by a GradScaler (bfloat16 has
  float32's range and needs none); the optimizer steps float32 master weights.
- `gradient_checkpointing`: every layer of the UNet's blocks (resnets, spatial attention, motion or temporal
  modules) recomputed in the backward pass instead of kept: a 16-frame clip through the full UNet fits on one GPU.
  diffusers' own switch covers only the resnets of UNetMotionModel and nothing of Zeroscope's UNet3DConditionModel.

Symbols: B batch, L text tokens, D text width, n new tokens.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

# The layers of a UNet block that gradient checkpointing wraps, one by one (diffusers' names across UNet2D, UNet3D
# and UNetMotion blocks).
CHECKPOINTED_LAYERS = ("resnets", "attentions", "motion_modules", "temp_convs", "temp_attentions")


def add_lora(unet, targets: str, rank: int, adapter: str, generator: torch.Generator) -> list[torch.nn.Parameter]:
    """A rank-r LoRA (alpha = r) on the modules matching `targets`; A ~ N(0, 1/r) from `generator` (drawn on the CPU,
    copied to the device), B = 0. Returns its parameters, float32 on the UNet's device."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    from studio.subjects.apply import keep_global_rng

    # peft directly (diffusers' add_adapter is missing on Zeroscope's UNet3DConditionModel); its init draws from the
    # global RNG: kept out of it, and redrawn from ours
    with keep_global_rng(unet):
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                           target_modules=targets), unet, adapter_name=adapter)
    params = []
    for mod in unet.modules():
        if isinstance(mod, LoraLayer) and adapter in mod.lora_A:
            for lin in (mod.lora_A[adapter], mod.lora_B[adapter]):
                lin.float()  # peft made them in the base layer's dtype; the optimizer needs float32 masters
                params.append(lin.weight)
            a = mod.lora_A[adapter].weight
            with torch.no_grad():
                a.copy_(torch.randn(a.shape, generator=generator) / rank)  # peft's "gaussian": N(0, 1/r)
                mod.lora_B[adapter].weight.zero_()
    for p in params:
        p.requires_grad_(True)
    return params


class TokenRows(torch.nn.Module):
    """An embedding table whose rows `ids` come from `rows` (n, D), a float32 parameter, instead of the table.

    Installed as the text encoder's input embedding while training; `weight` is the table's, so code that reads the
    table sees the model's own."""

    def __init__(self, table: torch.nn.Embedding, ids: list[int], init: torch.Tensor):
        super().__init__()
        self.table = table
        self.register_buffer("ids", torch.tensor(ids, device=table.weight.device), persistent=False)  # (n,)
        self.rows = torch.nn.Parameter(init.detach().to(table.weight.device, torch.float32).clone())  # (n, D)

    @property
    def weight(self) -> torch.Tensor:
        return self.table.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.table(input_ids)  # (B, L, D) in the table's dtype
        hit = input_ids[..., None] == self.ids  # (B, L, n)
        new = hit.to(self.rows.dtype) @ self.rows  # (B, L, D): the new rows where they are used, 0 elsewhere
        return torch.where(hit.any(-1, keepdim=True), new.to(out.dtype), out)


@contextlib.contextmanager
def token_rows(text_encoder, ids: list[int], init: torch.Tensor):
    """Train the rows `ids` of the text encoder's embedding table: yields the TokenRows module (its `rows` are the
    parameter); afterwards the table is the encoder's embedding again, with the trained rows written into it."""
    table = text_encoder.get_input_embeddings()
    rows = TokenRows(table, ids, init)
    text_encoder.set_input_embeddings(rows)
    try:
        yield rows
    finally:
        text_encoder.set_input_embeddings(table)
        with torch.no_grad():
            table.weight[rows.ids] = rows.rows.to(table.weight.dtype)


def _blocks(unet) -> list:
    mid = [unet.mid_block] if getattr(unet, "mid_block", None) is not None else []
    return [*unet.down_blocks, *mid, *unet.up_blocks]


def checkpointed_layers(unet) -> list[torch.nn.Module]:
    """The layers gradient_checkpointing wraps."""
    return [layer for block in _blocks(unet) for name in CHECKPOINTED_LAYERS for layer in getattr(block, name, None)
            or []]


def _recomputed(forward):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


@contextlib.contextmanager
def gradient_checkpointing(unet, enabled: bool = True):
    """Recompute each UNet layer's activations in the backward pass (torch.utils.checkpoint, non-reentrant: the
    autocast state and RNG are replayed) while the block runs; the layers are their plain selves afterwards."""
    layers = checkpointed_layers(unet) if enabled else []
    for layer in layers:
        layer.forward = _recomputed(layer.forward)  # an instance attribute over the class's forward
    try:
        yield len(layers)
    finally:
        for layer in layers:
            del layer.forward


def is_checkpointed(layer: torch.nn.Module) -> bool:
    return "forward" in layer.__dict__


@dataclass
class Precision:
    """How the steps compute on the pipeline's device (see the module docstring)."""

    device: torch.device
    dtype: torch.dtype  # the frozen weights'
    scaler: "torch.amp.GradScaler | None" = None

    @classmethod
    def of(cls, unet) -> "Precision":
        device, dtype = unet.device, unet.dtype
        scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
        return cls(device, dtype, scaler)

    @property
    def autocast(self) -> bool:
        return self.dtype in (torch.float16, torch.bfloat16)

    def forward(self):
        """The context of a step's forward pass."""
        if not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def step(self, loss: torch.Tensor, optimizer, params: list[torch.Tensor], max_norm: float = 1.0) -> None:
        """Backward, gradients clipped to `max_norm` (after unscaling), one optimizer step (skipped by the scaler
        when float16 gradients overflowed)."""
        if self.scaler is None:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, max_norm)
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        self.scaler.step(optimizer)
        self.scaler.update()

    def record(self, checkpointing: bool) -> dict:
        """For the subject's metadata: how it was trained."""
        return {"device": str(self.device), "weights": str(self.dtype).removeprefix("torch."),
                "trainable": "float32", "autocast": self.autocast, "grad_scaler": self.scaler is not None,
                "checkpointing": checkpointing}
