"""Camera pan by latent shift: content moves by the expected latent pixels in the expected direction, the strip
is filled from the same row/column outside the boxes, boxes travel with the content, and a render pans."""

import numpy as np
import pytest
import torch

from studio import engine, shot as shotlib
from studio.controls import camera
from studio.controls.base import Context


def _z(h=6, w=8):
    return torch.arange(2 * h * w, dtype=torch.float32).view(1, 2, h, w)  # (B, C, h, w), every value distinct


def test_shift_left_right_up_down_by_whole_pixels():
    z, keep, g = _z(), torch.ones(6, 8, dtype=torch.bool), torch.Generator().manual_seed(0)
    left = camera.shift_frame(z, 2, 0, keep, g)
    assert torch.equal(left[..., :6], z[..., 2:])  # content moved 2 px left
    right = camera.shift_frame(z, -3, 0, keep, g)
    assert torch.equal(right[..., 3:], z[..., :5])
    up = camera.shift_frame(z, 0, 1, keep, g)
    assert torch.equal(up[:, :, :5], z[:, :, 1:])
    down = camera.shift_frame(z, 0, -2, keep, g)
    assert torch.equal(down[:, :, 2:], z[:, :, :4])


def test_fill_comes_from_the_same_row_outside_the_boxes():
    z = _z()
    keep = torch.ones(6, 8, dtype=torch.bool)
    keep[:, 2:5] = False  # a subject box spanning columns 2..4 of every row
    for seed in range(5):
        out = camera.shift_frame(z, 2, 0, keep, torch.Generator().manual_seed(seed))
        fill = out[..., 6:]  # the vacated strip at the right
        for r in range(6):
            allowed = set(z[0, 0, r, [0, 1, 5, 6, 7]].tolist())
            assert set(fill[0, 0, r].tolist()) <= allowed
            assert len(set(fill[0, 0, r].tolist())) == 2  # without replacement
        # channels move together: the same positions are drawn for every channel
        assert torch.equal(fill[0, 1] - fill[0, 0], torch.full_like(fill[0, 0], 48.0))
    out = camera.shift_frame(z, 0, 1, keep, torch.Generator().manual_seed(0))
    assert set(out[0, 0, 5].tolist()) <= set(z[0, 0, :, :].flatten().tolist())
    for c in range(8):  # columns: the fill of column c comes from column c
        assert out[0, 0, 5, c].item() in z[0, 0, :, c].tolist()


def _run(cx, cy, frames=8, h=8, w=8, steps=10, start=2, n=3, seed=0):
    ctx = Context(frames=frames, latent_h=h, latent_w=w, steps=steps, do_cfg=True,
                  generator=torch.Generator().manual_seed(seed))
    ctx.boxes[0] = torch.tensor([[0.25, 0.25, 0.5, 0.5]] * frames)
    ctl = camera.CameraShift(cx, cy, start, n)
    z = torch.randn(1, 4, frames, h, w, generator=torch.Generator().manual_seed(1))
    lat = z
    for i in range(-1, steps - 1):
        out = ctl.on_step_end(ctx, i, lat)
        lat = lat if out is None else out
    return z, lat, ctx


@pytest.mark.parametrize("cx, cy", [(0.5, 0.0), (-0.5, 0.0), (0.0, 0.25), (0.0, -0.75), (0.5, 0.5)])
def test_schedule_moves_frame_f_in_proportion_to_f(cx, cy):
    z, lat, ctx = _run(cx, cy)
    for f in range(8):
        ex, ey = int(f / 7 * cx * 8), int(f / 7 * cy * 8)  # whole pixels of the target
        # frame f's content, shifted back by the expected amount, matches the original in the overlap
        src = z[0, :, f, max(0, ey):8 + min(0, ey), max(0, ex):8 + min(0, ex)]
        dst = lat[0, :, f, max(0, -ey):8 + min(0, -ey), max(0, -ex):8 + min(0, -ex)]
        assert torch.equal(src, dst), (f, ex, ey)
        assert ctx.boxes[0][f, 0].item() == pytest.approx(0.25 - ex / 8)  # boxes travel with the content
        assert ctx.boxes[0][f, 1].item() == pytest.approx(0.25 - ey / 8)
    assert torch.equal(lat[:, :, 0], z[:, :, 0])  # frame 0 never moves


def test_no_pan_is_identical_and_same_seed_is_reproducible():
    z, lat, _ = _run(0.0, 0.0)
    assert torch.equal(z, lat)
    assert torch.equal(_run(0.5, 0.25, seed=3)[1], _run(0.5, 0.25, seed=3)[1])
    assert not torch.equal(_run(0.5, 0.25, seed=3)[1], _run(0.5, 0.25, seed=4)[1])


def test_pan_changes_a_tiny_render_and_zero_pan_does_not(tiny_shot, manager):
    plain = shotlib.from_container(shotlib.to_dict(tiny_shot))
    plain.subjects = []
    base = engine.render(plain, manager)
    plain.camera.cx = 0.5
    r = engine.render(plain, manager)
    assert r.info["controls"] == ["camera"]
    assert np.abs(r.frames.astype(int) - base.frames.astype(int)).mean() > 0.5
    assert r.shot.camera.start_step == 1 and r.shot.camera.shift_steps == 1  # 20% of 4 steps, resolved
    plain.camera.cx = 0.0
    assert np.array_equal(engine.render(plain, manager).frames, base.frames)


def test_camera_window_is_validated(tiny_shot):
    tiny_shot.camera.start_step = 4
    with pytest.raises(shotlib.ShotError, match="camera.start_step"):
        engine.prepare(tiny_shot)
    tiny_shot.camera.start_step, tiny_shot.camera.shift_steps = 2, 3
    with pytest.raises(shotlib.ShotError, match="camera.shift_steps"):
        engine.prepare(tiny_shot)
