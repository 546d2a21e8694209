"""benchmarks/likeness_ceiling.py's full fine-tune (the probe behind the README's "two-tone is beyond the model"):
it trains the spatial weights and nothing else."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import likeness_ceiling  # noqa: E402

from studio.pipelines import load_pipeline  # noqa: E402
from studio.presets import load_model_preset  # noqa: E402
from studio.toyworld import evaluate  # noqa: E402


def test_full_finetune_moves_every_spatial_weight_and_no_motion_module():
    preset = load_model_preset("toyworld")
    pipe = load_pipeline(preset, "cpu")
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    text = {n: p.detach().clone() for n, p in pipe.text_encoder.named_parameters()}
    photos, masks = evaluate.subject_photos(evaluate.LOOKS["two-tone"], evaluate.LIKENESS_SHAPE)
    loss = likeness_ceiling.full_finetune(pipe, preset, photos, masks, steps=2, lr=1e-3, seed=0, video_weight=0.0)
    assert loss > 0
    after = dict(pipe.unet.named_parameters())
    spatial = [n for n in before if "motion_modules" not in n]
    motion = [n for n in before if "motion_modules" in n]
    assert motion and spatial
    moved = [n for n in spatial if not torch.equal(before[n], after[n])]
    assert len(moved) > 0.9 * len(spatial)  # every weight that gets a gradient (a few unused ones may not)
    assert all(torch.equal(before[n], after[n]) for n in motion)
    assert all(torch.equal(text[n], p) for n, p in pipe.text_encoder.named_parameters())
    assert not any(p.requires_grad for p in pipe.unet.parameters())
