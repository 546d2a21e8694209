"""Zero-shot references: encoding, the attention processor alone (region and unconditional pass), and the control
on the tiny model (strength 0 = off, changes when on, restored after, write pass once per refresh)."""

import numpy as np
import pytest
import torch
from PIL import Image

from studio import engine, shot as shotlib
from studio.controls import reference
from studio.controls.base import Context


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("refs")
    yy, xx = np.mgrid[0:96, 0:160]
    wide = np.stack([xx % 256, yy * 2, np.full_like(xx, 200)], -1).astype(np.uint8)  # 160×96, not square
    Image.fromarray(wide).save(d / "wide.png")
    Image.fromarray(np.full((64, 64, 3), (150, 50, 215), np.uint8)).save(d / "purple.png")
    (d / "notes.txt").write_text("not an image")
    (d / "fake.png").write_bytes(b"\x89PNG not really")
    return d


def test_load_image_covers_and_centre_crops(images):
    img = reference.load_image(images / "wide.png", 64, 64)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    # the 160×96 image is scaled to 107×64 and its centre kept: the middle column's red value is the source's middle
    assert abs(int(img[32, 32, 0]) - 80) < 6


def test_encode_reference_gives_a_latent_at_the_shot_size(images, manager, tiny_shot):
    pipe = manager.get(engine.prepare(tiny_shot)[1])
    z = reference.encode_reference(pipe, images / "purple.png", 64, 64)
    assert z.shape == (1, 4, 8, 8) and z.dtype == pipe.vae.dtype


def _ctx(frames=2):
    return Context(frames=frames, latent_h=4, latent_w=4, steps=4, do_cfg=True, generator=torch.Generator())


def test_processor_reads_the_reference_only_inside_its_region_and_only_on_the_cond_pass():
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(0)
    attn = Attention(query_dim=8, heads=2, dim_head=4)
    ctx = _ctx()
    ctx.boxes[0] = torch.tensor([[0.0, 0.0, 0.5, 0.5]] * 2)  # top-left 2×2 of a 4×4 layer
    ctl = reference.ReferenceInjection(ctx, [(torch.zeros(1, 4, 4, 4), 1.0, ("box", 0))])
    proc = reference.RefSelfAttnProcessor(ctl, "layer")
    ctl.bank["layer"] = torch.randn(1, 16, 8)  # (R, N, D) as a write pass would store
    x = torch.randn(4, 16, 8)  # (2 passes · F, N, D)
    plain = AttnProcessor2_0()(attn, x)
    out = proc(attn, x)
    assert torch.allclose(out[:2], plain[:2], atol=1e-6)  # unconditional pass untouched
    inside = torch.tensor([0, 1, 4, 5])
    outside = torch.tensor([i for i in range(16) if i not in (0, 1, 4, 5)])
    assert torch.allclose(out[2:, outside], plain[2:, outside], atol=1e-5)
    assert not torch.allclose(out[2:, inside], plain[2:, inside], atol=1e-3)
    # the background region is the complement
    bg = reference.ReferenceInjection(ctx, [(torch.zeros(1, 4, 4, 4), 1.0, ("outside",))])
    bg.bank["layer"] = ctl.bank["layer"]
    out_bg = reference.RefSelfAttnProcessor(bg, "layer")(attn, x)
    assert torch.allclose(out_bg[2:, inside], plain[2:, inside], atol=1e-5)
    assert not torch.allclose(out_bg[2:, outside], plain[2:, outside], atol=1e-3)


def _shot(tiny_shot, **subject):
    s = shotlib.from_container(shotlib.to_dict(tiny_shot))
    s.subjects = [shotlib.Subject(phrase="red circle", **subject)] if subject else []
    return s


def test_strength_zero_is_off_and_a_reference_changes_the_render(images, tiny_shot, manager):
    plain = engine.render(_shot(tiny_shot), manager).frames
    off = engine.render(_shot(tiny_shot, reference=str(images / "purple.png"), reference_strength=0.0), manager)
    assert off.info["controls"] == ["reference"] and np.array_equal(off.frames, plain)
    on = engine.render(_shot(tiny_shot, reference=str(images / "purple.png")), manager).frames
    assert np.abs(on.astype(int) - plain.astype(int)).mean() > 0.3
    assert np.array_equal(engine.render(_shot(tiny_shot), manager).frames, plain)  # restored


def test_hooks_and_processors_are_removed_after_each_mode(images, tiny_shot, manager):
    s = _shot(tiny_shot, reference=str(images / "purple.png"))
    pipe = manager.get(engine.prepare(s)[1])
    before = {n: type(p) for n, p in pipe.unet.attn_processors.items()}
    for temporal in (False, True):
        s.reference_control.temporal_attention = temporal
        engine.render(s, manager)
        assert {n: type(p) for n, p in pipe.unet.attn_processors.items()} == before
        assert not pipe.unet._forward_pre_hooks and not pipe.unet._forward_hooks


def test_temporal_mode_differs_from_excluded_mode(images, tiny_shot, manager):
    s = _shot(tiny_shot, reference=str(images / "purple.png"))
    s.reference_control.refresh_every = 1
    excluded = engine.render(s, manager).frames
    s.reference_control.temporal_attention = True
    included = engine.render(s, manager).frames
    assert included.shape == excluded.shape and not np.array_equal(included, excluded)


def test_write_pass_runs_once_per_refresh_with_the_conditional_prompt(images, tiny_shot, manager):
    pipe = manager.get(engine.prepare(tiny_shot)[1])
    z = reference.encode_reference(pipe, images / "purple.png", 64, 64)
    seen = {}
    for every in (1, 2):
        ctx = Context(frames=8, latent_h=8, latent_w=8, steps=4, do_cfg=True, generator=torch.Generator())
        ctl = reference.ReferenceInjection(ctx, [(z, 1.0, ("all",))], refresh_every=every)
        from studio.controls.base import applied, step_end_chain

        chain = step_end_chain(ctx, [ctl])
        latents = torch.randn(1, 4, 8, 8, 8, generator=torch.Generator().manual_seed(0))
        for prompt in ("a red circle on grass", "a white star on sky"):
            with torch.inference_mode(), applied(pipe, [ctl], ctx):
                ctl.write_calls = 0
                ctx.step = 0
                pipe(prompt=prompt, num_frames=8, height=64, width=64, num_inference_steps=4, guidance_scale=7.5,
                     latents=latents.clone(), output_type="np",
                     callback_on_step_end=lambda p, i, t, kw: {"latents": chain(i, kw["latents"])},
                     callback_on_step_end_tensor_inputs=["latents"])
                seen[(every, prompt)] = {k: v.clone() for k, v in ctl.bank.items()}
            assert ctl.write_calls == 4 // every
    a, b = seen[(1, "a red circle on grass")], seen[(1, "a white star on sky")]
    deep = [k for k in a if "up_blocks" in k]  # after cross-attention, the stored tokens depend on the prompt
    assert deep and any(not torch.allclose(a[k], b[k]) for k in deep)


@pytest.mark.parametrize("name, problem", [("notes.txt", "must be an image"), ("fake.png", "not a readable image"),
                                           ("missing.png", "image file not found")])
def test_bad_reference_files_are_named(images, tiny_shot, name, problem):
    s = _shot(tiny_shot, reference=str(images / name))
    with pytest.raises(shotlib.ShotError, match=rf"subjects\[0\]\.reference: {problem}"):
        engine.prepare(s)
    s = _shot(tiny_shot)
    s.background.reference = str(images / name)
    with pytest.raises(shotlib.ShotError, match=rf"background\.reference: {problem}"):
        engine.prepare(s)


def test_huge_reference_is_refused(tmp_path, tiny_shot):
    big = tmp_path / "big.png"
    Image.new("RGB", (5000, 10)).save(big)
    s = _shot(tiny_shot, reference=str(big))
    with pytest.raises(shotlib.ShotError, match="at most 4096"):
        engine.prepare(s)
