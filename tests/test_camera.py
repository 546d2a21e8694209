"""Camera pan by latent shift (MotionBooth): whole-pixel moves in the right direction, fill drawn from the same
row/column outside the subject boxes, frame f moved in proportion to f over a schedule, boxes moved along,
seeded reproducibility, and a render on each family's tiny model that pans (and is untouched at cx = 0). On Wan:
latent frame k moves as the video time it stands at, the boxes of its video frames move with it, and UniPC's stored
history (model_outputs, last_sample) moves with the latents, or the next step would undo the shift."""

import numpy as np
import pytest
import torch

from conftest import changed
from studio.controls import camera
from studio.controls.base import Context, step_end_chain


def _frame(h=6, w=8):
    return torch.arange(2 * h * w, dtype=torch.float32).view(1, 2, h, w)  # (B, C, h, w), every value distinct


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---- shift_frame ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dx", [1, 3, -1, -2])
def test_shift_frame_moves_content_dx_pixels(dx):
    z, keep = _frame(), torch.ones(6, 8, dtype=torch.bool)
    out = camera.shift_frame(z, dx, 0, keep, _gen())
    assert out.shape == z.shape
    if dx > 0:  # content moves left
        assert torch.equal(out[..., :-dx], z[..., dx:])
    else:  # content moves right
        assert torch.equal(out[..., -dx:], z[..., :dx])


@pytest.mark.parametrize("dy", [1, 2, -1, -3])
def test_shift_frame_moves_content_dy_pixels(dy):
    z, keep = _frame(), torch.ones(6, 8, dtype=torch.bool)
    out = camera.shift_frame(z, 0, dy, keep, _gen())
    if dy > 0:  # content moves up
        assert torch.equal(out[:, :, :-dy], z[:, :, dy:])
    else:  # content moves down
        assert torch.equal(out[:, :, -dy:], z[:, :, :dy])


def test_zero_shift_is_identity():
    z = _frame()
    assert torch.equal(camera.shift_frame(z, 0, 0, torch.ones(6, 8, dtype=torch.bool), _gen()), z)


@pytest.mark.parametrize("dx", [2, -2])
def test_x_fill_comes_from_the_same_row_outside_the_box(dx):
    z = _frame()
    z[:, :, 1:5, 2:5] = 1000.0 + torch.arange(2 * 4 * 3, dtype=torch.float32).view(1, 2, 4, 3)  # the subject
    keep = torch.ones(6, 8, dtype=torch.bool)
    keep[1:5, 2:5] = False
    for seed in range(8):
        out = camera.shift_frame(z, dx, 0, keep, _gen(seed))
        strip = out[..., -dx:] if dx > 0 else out[..., :-dx]  # (B, C, h, |dx|) vacated strip
        assert (strip < 1000).all()  # nothing from the subject
        for r in range(6):
            for c in range(2):
                row = set(z[0, c, r, keep[r]].tolist())
                vals = strip[0, c, r].tolist()
                assert set(vals) <= row  # same row, outside the box
                assert len(set(vals)) == abs(dx)  # without replacement
        # channels move together: the same positions are copied in every channel
        assert torch.equal(strip[0, 1] - strip[0, 0], torch.full_like(strip[0, 0], 48.0))


@pytest.mark.parametrize("dy", [2, -1])
def test_y_fill_comes_from_the_same_column_outside_the_box(dy):
    z = _frame()
    z[:, :, 1:4, 3:6] = -1000.0 - torch.arange(2 * 3 * 3, dtype=torch.float32).view(1, 2, 3, 3)
    keep = torch.ones(6, 8, dtype=torch.bool)
    keep[1:4, 3:6] = False
    for seed in range(8):
        out = camera.shift_frame(z, 0, dy, keep, _gen(seed))
        strip = out[:, :, -dy:] if dy > 0 else out[:, :, :-dy]  # (B, C, |dy|, w)
        assert (strip > -1000).all()
        for col in range(8):
            column = set(z[0, 0, keep[:, col], col].tolist())
            assert set(strip[0, 0, :, col].tolist()) <= column


def test_line_fully_covered_by_a_box_falls_back_to_the_whole_row():
    z = _frame()
    keep = torch.ones(6, 8, dtype=torch.bool)
    keep[2] = False  # row 2 is all subject
    out = camera.shift_frame(z, 3, 0, keep, _gen())
    assert set(out[0, 0, 2, -3:].tolist()) <= set(z[0, 0, 2].tolist())


def test_outside_boxes_mask():
    keep = camera.outside_boxes([torch.tensor([0.25, 0.5, 0.5, 1.0])], 8, 8)
    expected = torch.ones(8, 8, dtype=torch.bool)
    expected[4:8, 2:4] = False
    assert torch.equal(keep, expected)
    assert camera.outside_boxes([torch.tensor([-0.5, 0.0, -0.1, 1.0])], 8, 8).all()  # moved out of frame


def test_frame_targets():
    t = camera.frame_targets(5, 0.5, -0.25, 8, 16)  # h = 8, w = 16
    assert t.shape == (5, 2)
    assert torch.allclose(t[:, 0], torch.tensor([0.0, 2, 4, 6, 8], dtype=torch.float64))  # f/4 · 0.5 · 16
    assert torch.allclose(t[:, 1], torch.tensor([0.0, -0.5, -1, -1.5, -2], dtype=torch.float64))  # f/4 · -0.25 · 8
    assert not camera.frame_targets(1, 0.5, 0.5, 8, 8).any()


# ---- CameraShift over a schedule ---------------------------------------------------------------------------------

F, H, W = 8, 8, 16
BOX = [0.25, 0.25, 0.5, 0.5]


def _run(cx, cy, steps=10, start=2, n=3, seed=0):
    ctx = Context(frames=F, latent_h=H, latent_w=W, steps=steps, do_cfg=True, generator=_gen(seed))
    ctx.boxes = {0: torch.tensor([BOX] * F), 1: torch.tensor([[0.6, 0.1, 0.9, 0.3]] * F)}
    ctl = camera.CameraShift(cx, cy, start, n)
    z = torch.randn(1, 4, F, H, W, generator=_gen(100))
    lat = z
    for i in range(-1, steps - 1):
        if i == start - 2:  # before the window: nothing happens
            assert ctl.on_step_end(ctx, i, lat) is None
            continue
        out = ctl.on_step_end(ctx, i, lat)
        lat = lat if out is None else out
    return z, lat, ctx


def _measured_shift(z, lat, f, max_shift=W):
    """The (x, y) shift under which frame f of lat matches frame f of z best on the overlap (content moved by)."""
    best, arg = None, None
    for sy in range(-H + 2, H - 1):
        for sx in range(-max_shift + 2, max_shift - 1):
            src = z[0, :, f, max(0, sy):H + min(0, sy), max(0, sx):W + min(0, sx)]
            dst = lat[0, :, f, max(0, -sy):H + min(0, -sy), max(0, -sx):W + min(0, -sx)]
            err = (src - dst).abs().mean().item()
            if best is None or err < best:
                best, arg = err, (sx, sy)
    assert best == 0.0
    return arg


@pytest.mark.parametrize("cx, cy", [(0.5, 0.0), (-0.5, 0.0), (0.0, 0.5), (0.0, -0.75), (0.4, -0.3)])
def test_schedule_moves_frame_f_in_proportion_to_f(cx, cy):
    z, lat, ctx = _run(cx, cy)
    assert torch.equal(lat[:, :, 0], z[:, :, 0])  # frame 0 never moves
    for f in range(F):
        sx, sy = _measured_shift(z, lat, f)
        ex, ey = f / (F - 1) * cx * W, f / (F - 1) * cy * H
        assert abs(sx - round(ex)) <= 1 and abs(sy - round(ey)) <= 1, (f, sx, sy, ex, ey)
        assert sx * np.sign(cx) >= 0 and sy * np.sign(cy) >= 0  # content moves against the camera
        # the boxes moved by the same whole pixels (content left/up -> box coordinates decrease)
        assert ctx.boxes[0][f].tolist() == pytest.approx([BOX[0] - sx / W, BOX[1] - sy / H,
                                                          BOX[2] - sx / W, BOX[3] - sy / H])
        assert ctx.boxes[1][f, 0].item() == pytest.approx(0.6 - sx / W)
    sx, _ = _measured_shift(z, lat, F - 1)
    assert abs(sx) == round(abs(cx) * W)  # the last frame travels the whole requested fraction


def test_shift_is_spread_over_the_window():
    ctx = Context(frames=F, latent_h=H, latent_w=W, steps=10, do_cfg=False, generator=_gen())
    ctl = camera.CameraShift(1.0, 0.0, 3, 4)
    lat = torch.randn(1, 4, F, H, W, generator=_gen(1))
    chain = step_end_chain(ctx, [ctl])
    lat = chain(-1, lat)
    moved = []
    for i in range(9):
        lat = chain(i, lat)
        moved.append(int(ctl.moved[-1, 0]) if ctl.moved is not None else 0)
    # last frame: 16 px over steps 3..6, 4 px before each of them (calls i = 2..5)
    assert moved == [0, 0, 4, 8, 12, 16, 16, 16, 16]


def test_no_pan_is_bit_identical_and_seeded():
    z, lat, ctx = _run(0.0, 0.0)
    assert torch.equal(z, lat)
    assert ctx.boxes[0][3].tolist() == pytest.approx(BOX)
    a, b, c = _run(0.5, 0.25, seed=3)[1], _run(0.5, 0.25, seed=3)[1], _run(0.5, 0.25, seed=4)[1]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_fill_in_a_schedule_avoids_the_subject():
    ctx = Context(frames=F, latent_h=H, latent_w=W, steps=4, do_cfg=False, generator=_gen())
    ctx.boxes = {0: torch.tensor([[0.5, 0.0, 0.75, 1.0]] * F)}  # a full-height box: columns 8..11
    z = torch.randn(1, 4, F, H, W, generator=_gen(1))
    z[:, :, :, :, 8:12] = 99.0  # the subject's tokens
    out = camera.CameraShift(-0.5, 0.0, 0, 1).on_step_end(ctx, -1, z)  # pan left: content moves right
    for f in range(1, F):
        n = int(f / (F - 1) * 0.5 * W + 1e-6)
        assert not (out[:, :, f, :, :n] == 99.0).any()  # the strip opened at the left holds no subject token
        assert (out[:, :, f, :, 8 + n:12 + n] == 99.0).all()  # the subject itself moved right by n


@pytest.mark.parametrize("dx", [2, -3])
def test_fresh_fill_copies_no_token_and_keeps_the_row_level(dx):
    z = torch.randn(1, 4, 6, 8, generator=_gen(5)) + torch.arange(6.0).view(1, 1, 6, 1) * 10  # rows at 0, 10, ...
    z[:, :, 1:5, 2:5] = 1000.0  # the subject, outside every box (no boxes): row fill could copy it
    keep = torch.ones(6, 8, dtype=torch.bool)
    out = camera.shift_frame(z, dx, 0, keep, _gen(), fill="fresh")
    strip = out[..., -dx:] if dx > 0 else out[..., :-dx]  # (B, C, h, |dx|)
    assert not torch.isin(strip, z).any()  # nothing copied
    assert (strip < 500).all()  # the subject's tokens are a minority of each row: its median is background
    rows = strip.mean((0, 1, 3))
    assert torch.allclose(rows, torch.arange(6.0) * 10, atol=3.0)  # each row keeps its level


def test_with_a_noise_level_the_noise_stays_and_the_content_moves():
    """With a warped initial noise the shift moves latents - s·eps and puts s·eps back where it was."""
    ctx = Context(frames=F, latent_h=H, latent_w=W, steps=4, do_cfg=False, generator=_gen())
    eps = torch.randn(1, 4, F, H, W, generator=_gen(1))  # the initial (warped) noise
    signal = torch.randn(1, 4, F, H, W, generator=_gen(2))
    s = 0.6
    for fill in ("row", "fresh"):
        ctl = camera.CameraShift(0.5, 0.0, 1, 1, fill=fill, noise_level=lambda i: 1.0 if i < 0 else s)
        assert ctl.on_step_end(ctx, -1, eps) is None  # before step 0: keeps the initial noise, no shift yet
        out = ctl.on_step_end(ctx, 0, signal + s * eps)
        assert torch.equal(out[:, :, 0], (signal + s * eps)[:, :, 0])  # frame 0 never moves
        content = out - s * eps
        for f in range(1, F):
            d = int(f / (F - 1) * 0.5 * W + 1e-6)
            assert torch.allclose(content[:, :, f, :, :W - d], signal[:, :, f, :, d:], atol=1e-5)
            if fill == "fresh":  # the strip's content is each row's median level; its noise is eps there
                level = signal[:, :, f].median(-1, keepdim=True).values.expand(-1, -1, -1, d)
                assert torch.allclose(content[:, :, f, :, W - d:], level, atol=1e-5)
        ctl.close()
    with pytest.raises(RuntimeError):  # without the i = -1 call there is no initial noise to keep
        camera.CameraShift(0.5, 0.0, 1, 1, noise_level=lambda i: 0.5).on_step_end(ctx, 0, eps)


def test_frame_map_moves_a_latent_frame_by_its_video_frames_mean():
    from studio.controls.noise_warp import grouped_map

    ctx = Context(frames=3, latent_h=H, latent_w=W, steps=2, do_cfg=False, generator=_gen())
    ctl = camera.CameraShift(0.5, 0.0, 0, 1, frame_map=grouped_map(9, 4))  # 9 video frames in 3 latent frames
    ctl.on_step_end(ctx, -1, torch.randn(1, 4, 3, H, W, generator=_gen(1)))
    # video frame v moves v/8·8 = v px; latent frame 1 covers 1..4 (mean 2.5 -> 2), latent frame 2 5..8 (6.5 -> 6)
    assert ctl.moved[:, 0].tolist() == [0, 2, 6]


def test_invalid_window():
    with pytest.raises(ValueError):
        camera.CameraShift(0.5, 0.0, 0, 0)
    with pytest.raises(ValueError):
        camera.CameraShift(0.5, 0.0, -1, 2)


# ---- tiny random model -------------------------------------------------------------------------------------------

def _render(pipe, latents, cx):
    ctx = Context(frames=8, latent_h=8, latent_w=8, steps=4, do_cfg=True, generator=_gen(7))
    ctx.boxes = {0: torch.tensor([[0.1, 0.3, 0.4, 0.7]] * 8)}
    chain = step_end_chain(ctx, [camera.CameraShift(cx, 0.0, 1, 2)])

    def on_step_end(p, i, t, kw):
        return {"latents": chain(i, kw["latents"])}

    out = pipe(prompt="a red circle on grass", num_frames=8, height=64, width=64, num_inference_steps=4,
               guidance_scale=7.5, latents=chain(-1, latents.clone()), generator=_gen(1), output_type="np",
               callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["latents"]).frames
    return np.asarray(out[0]), ctx


def test_pan_changes_a_tiny_render_and_zero_pan_does_not(manager):
    from studio.presets import load_model_preset

    pipe = manager.get(load_model_preset("tiny"))
    latents = torch.randn(1, 4, 8, 8, 8, generator=_gen(0))  # (B, C, F, h, w) for 64×64 on tiny
    plain = pipe(prompt="a red circle on grass", num_frames=8, height=64, width=64, num_inference_steps=4,
                 guidance_scale=7.5, latents=latents.clone(), generator=_gen(1), output_type="np").frames
    plain = np.asarray(plain[0])
    still, _ = _render(pipe, latents, 0.0)
    assert np.array_equal(still, plain)
    panned, ctx = _render(pipe, latents, 0.5)
    assert panned.shape == plain.shape
    assert np.abs(panned - plain)[1:].mean() > 1e-3  # later frames change
    assert ctx.boxes[0][7, 0].item() == pytest.approx(0.1 - 4 / 8)  # the last frame's box moved 4 of 8 px left
    assert ctx.boxes[0][0, 0].item() == pytest.approx(0.1)


def test_engine_pans_a_shot_and_resolves_the_window(model_shot, manager):
    import numpy as np

    from studio import engine, shot as shotlib

    plain = shotlib.from_container(shotlib.to_dict(model_shot))
    plain.subjects = []
    base = engine.render(plain, manager).frames
    plain.camera.cx = -0.5
    r = engine.render(plain, manager)
    assert r.info["controls"] == ["camera"]
    c = r.shot.camera  # recorded: with a noise warp (UNets) from 10% of 4 steps for 30%, else 20% for 20%
    assert (c.start_step, c.shift_steps) == ((0, 1) if c.noise_warp else (1, 1)), c
    assert changed(base, r.frames, plain.model)
    plain.camera.cx = 0.0
    assert np.array_equal(engine.render(plain, manager).frames, base)


def test_camera_window_is_validated(tiny_shot):
    from studio import engine, shot as shotlib

    tiny_shot.camera.start_step = 4
    with pytest.raises(shotlib.ShotError, match="camera.start_step"):
        engine.prepare(tiny_shot)
    tiny_shot.camera.start_step, tiny_shot.camera.shift_steps = 2, 3
    with pytest.raises(shotlib.ShotError, match="camera.shift_steps"):
        engine.prepare(tiny_shot)


# ---- Wan: latent frames standing for several video frames, and UniPC's history ----------------------------------

def _wan_ctx(boxes=((0.25, 0.25, 0.5, 0.75),), steps=6):
    ctx = Context(frames=9, latent_h=8, latent_w=12, steps=steps, do_cfg=True, generator=_gen(0), latent_frames=3,
                  cfg_batched=False, temporal=4)
    ctx.boxes = {k: torch.tensor([list(b)] * 9) for k, b in enumerate(boxes)}
    return ctx


def test_latent_frames_move_as_the_video_time_they_stand_at_and_carry_their_frames_boxes():
    t = camera.frame_targets(3, 0.5, -0.25, 8, 12, times=[0.0, 2.5, 6.5], span=8)  # 9 frames: t_k / 8
    assert torch.allclose(t, torch.tensor([[0.0, 0.0], [2.5 / 8 * 6, -2.5 / 8 * 2], [6.5 / 8 * 6, -6.5 / 8 * 2]],
                                          dtype=torch.float64))
    ctx = _wan_ctx()
    z = torch.randn(1, 16, 3, 8, 12, generator=_gen(1))
    out = camera.CameraShift(0.5, 0.0, 0, 1).on_step_end(ctx, -1, z)
    moved = [0, 1, 4]  # whole latent pixels: int(1.875), int(4.875)
    for k, n in enumerate(moved):
        assert torch.equal(out[:, :, k, :, :12 - n], z[:, :, k, :, n:])
    xs = ctx.boxes[0][:, 0].tolist()  # every video frame of latent frame k moved with it
    assert xs == pytest.approx([0.25] + [0.25 - 1 / 12] * 4 + [0.25 - 4 / 12] * 4)


def test_the_stored_history_of_a_multistep_scheduler_moves_with_the_latents():
    from diffusers import UniPCMultistepScheduler

    from studio.controls.history import SchedulerHistory

    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    sched.set_timesteps(6)
    z = torch.randn(1, 16, 3, 8, 12, generator=_gen(2))
    sched.model_outputs = [z.clone(), z.clone()]
    sched.last_sample = z.clone()
    assert SchedulerHistory(sched, z).names == ["model_outputs[0]", "model_outputs[1]", "last_sample"]
    ctx = _wan_ctx()
    out = camera.CameraShift(0.5, 0.3, 0, 1, scheduler=sched).on_step_end(ctx, -1, z)
    assert not torch.equal(out, z)
    for stored in (*sched.model_outputs, sched.last_sample):  # the same shift and the same fill draws
        assert torch.equal(stored, out)
    assert SchedulerHistory(None, z).stack(z) is z  # a single-step scheduler (or none) stores nothing


@pytest.mark.parametrize("with_history", [True, False])
def test_a_wan_pan_moves_content_by_the_expected_latent_pixels_through_unipc(with_history):
    """Through WanPipeline and its UniPC scheduler, with a transformer that predicts zero velocity (so denoising keeps
    the sample): the output is the initial noise with latent frame k moved int(t_k/(F−1)·cx·w) latent pixels and the
    strips filled from the same rows outside the box. Without shifting UniPC's history its corrector, which works
    from the stored last sample, smears the shift."""
    from studio.families import wan_build

    pipe = wan_build.build_pipeline()
    pipe.transformer.register_forward_hook(lambda m, a, kw, out: (torch.zeros_like(out[0]),), with_kwargs=True)
    z = torch.randn(1, 16, 3, 8, 12, generator=_gen(0))
    z[:, :, :, :, 3:6] = 50.0  # the subject's columns (box x 0.25..0.5 of 12): must never be copied into a strip
    ctx = _wan_ctx(boxes=((0.25, 0.0, 0.5, 1.0),))
    cam = camera.CameraShift(0.5, 0.0, 1, 3, scheduler=pipe.scheduler if with_history else None)
    chain = step_end_chain(ctx, [cam])
    emb = torch.randn(1, 512, 32, generator=_gen(3))
    out = pipe(prompt_embeds=emb, negative_prompt_embeds=emb, num_frames=9, height=64, width=96,
               num_inference_steps=6, guidance_scale=5.0, latents=chain(-1, z.clone()), output_type="latent",
               callback_on_step_end=lambda p, i, t, kw: {"latents": chain(i, kw["latents"])},
               callback_on_step_end_tensor_inputs=["latents"]).frames
    kept = [torch.allclose(out[:, :, k, :, :12 - n], z[:, :, k, :, n:], atol=1e-4) for k, n in enumerate([0, 1, 4])]
    if not with_history:
        assert kept[0] and not kept[1] and not kept[2]
        return
    assert all(kept)
    for k, n in ((1, 1), (2, 4)):
        strip = out[0, :, k, :, 12 - n:]  # (C, h, n): filled from the same row, outside the subject's columns
        assert (strip.abs() < 50).all()
        for r in range(8):
            row = {round(v, 4) for v in z[0, 0, k, r, [0, 1, 2, 6, 7, 8, 9, 10, 11]].tolist()}
            assert {round(v, 4) for v in strip[0, r].tolist()} <= row
