"""A multistep scheduler's stored history, moved together with the latents when a control edits them between steps.

Multistep solvers keep tensors of earlier steps and use them in the next step: UniPC (Wan's scheduler) keeps
`model_outputs` (its converted predictions, x0 for flow matching) and `last_sample` (the sample the last step
started from), and its corrector recomputes the new sample *from last_sample*. A latent shift (the camera pan)
that moved only the latents would be largely undone by the next step, which mixes the shifted sample with the
unshifted history. So the history is shifted with the same whole pixels and the same fill draws: the stored
tensors are stacked under the latents along the batch (every video of a batch gets the same fill positions,
studio.controls.camera.shift_frame), shifted once, and put back. The solver then sees a consistent trajectory, as
if the content had always been where it is now. Single-step schedulers (DDIM, Euler) store nothing: no change.

Which tensors: every tensor attribute of the scheduler, or item of a list attribute, with the latents' shape
(UniPC: model_outputs[i], last_sample; DPM-Solver++: model_outputs; PNDM: ets, cur_sample), found by shape, so
no scheduler class is named here.

Shapes: B videos, C latent channels, F frames, h×w latent size.
"""

from __future__ import annotations

import torch


class SchedulerHistory:
    """The scheduler's stored tensors shaped like `latents` (B, C, F, h, w): stack them under the latents, unstack
    the edited result and write the history back."""

    def __init__(self, scheduler, latents: torch.Tensor):
        self.scheduler = scheduler
        self.batch = latents.shape[0]
        self.slots: list[tuple[str, int | None]] = []  # (attribute, list index or None)
        if scheduler is None:
            return
        for name, value in vars(scheduler).items():
            if _like(value, latents):
                self.slots.append((name, None))
            elif isinstance(value, list):
                self.slots += [(name, i) for i, v in enumerate(value) if _like(v, latents)]

    def _get(self, slot) -> torch.Tensor:
        name, i = slot
        value = getattr(self.scheduler, name)
        return value if i is None else value[i]

    def stack(self, latents: torch.Tensor) -> torch.Tensor:
        """(B·(1 + S), C, F, h, w): the latents, then each of the S stored tensors (as the latents' dtype)."""
        if not self.slots:
            return latents
        return torch.cat([latents] + [self._get(s).to(latents.dtype) for s in self.slots])

    def unstack(self, z: torch.Tensor) -> torch.Tensor:
        """Write the stored tensors' part of an edited stack back into the scheduler; return the latents' part."""
        for n, slot in enumerate(self.slots, start=1):
            old = self._get(slot)
            new = z[n * self.batch:(n + 1) * self.batch].to(old.dtype)
            name, i = slot
            if i is None:
                setattr(self.scheduler, name, new)
            else:
                getattr(self.scheduler, name)[i] = new
        return z[:self.batch]

    @property
    def names(self) -> list[str]:
        return [name if i is None else f"{name}[{i}]" for name, i in self.slots]


def _like(value, latents: torch.Tensor) -> bool:
    return torch.is_tensor(value) and value.shape == latents.shape
