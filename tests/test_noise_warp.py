"""Initial noise warped along the camera path: frames are shifted windows of one canvas, the revealed strip is fresh,
the mix keeps unit variance, β = 0 changes nothing, the frame map carries video offsets to latent frames, and the
warp is refused (naming family and scheduler) where it cannot hold."""

import pytest
import torch

from studio.controls import noise_warp
from studio.controls.camera import frame_targets


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_frame_maps():
    assert noise_warp.identity_map(3) == [[0], [1], [2]]
    assert noise_warp.grouped_map(9, 4) == [[0], [1, 2, 3, 4], [5, 6, 7, 8]]  # Wan: latent k covers 4k-3..4k
    assert noise_warp.grouped_map(1, 4) == [[0]]
    with pytest.raises(ValueError):
        noise_warp.grouped_map(8, 4)


def test_latent_offsets_are_the_mean_of_the_covered_frames():
    video = frame_targets(9, 0.5, -0.25, 8, 16)  # (9, 2): x 0..8, y 0..-2
    lat = noise_warp.latent_offsets(video, noise_warp.grouped_map(9, 4))
    assert lat.shape == (3, 2)
    assert torch.allclose(lat[1], video[1:5].mean(0)) and torch.allclose(lat[2], video[5:9].mean(0))
    assert torch.equal(noise_warp.latent_offsets(video, noise_warp.identity_map(9)), video)
    with pytest.raises(ValueError):
        noise_warp.latent_offsets(video, [[0], [9]])


def test_whole_offsets_round_half_away_from_zero():
    got = noise_warp.whole_offsets(torch.tensor([[0.5, -0.5], [1.49, -2.5], [0.0, 0.2]], dtype=torch.float64))
    assert got.tolist() == [[1, -1], [1, -3], [0, 0]]


@pytest.mark.parametrize("dx, dy", [(2, 0), (-3, 0), (0, 2), (1, -1)])
def test_canvas_windows_are_shifted_copies_with_fresh_strips(dx, dy):
    offsets = torch.tensor([[0, 0], [dx, dy], [2 * dx, 2 * dy]])
    n = noise_warp.canvas_windows((1, 2, 3, 6, 8), offsets, _gen())  # (B, C, K, h, w)
    h, w = 6, 8
    for k in (1, 2):
        sx, sy = k * dx, k * dy  # frame k sees the canvas sx, sy further: its pixel (y, x) is frame 0's (y+sy, x+sx)
        a = n[:, :, k, max(0, -sy):h - max(0, sy), max(0, -sx):w - max(0, sx)]
        b = n[:, :, 0, max(0, sy):h + min(0, sy), max(0, sx):w + min(0, sx)]
        assert torch.equal(a, b)
    # the strip frame 2 reveals is nowhere in frame 0
    if dx > 0:
        strip = n[:, :, 2, :, w - 2 * dx:]
    elif dx < 0:
        strip = n[:, :, 2, :, :-2 * dx]
    else:
        strip = n[:, :, 2, h - 2 * dy:] if dy > 0 else n[:, :, 2, :-2 * dy]
    assert not torch.isin(strip.flatten(), n[:, :, 0].flatten()).any()


def test_beta_zero_changes_nothing_and_draws_nothing():
    noise = torch.randn(1, 4, 8, 6, 6, generator=_gen(1))
    g = _gen(5)
    state = g.get_state()
    out = noise_warp.warp(noise, frame_targets(8, 0.5, 0.0, 6, 6), 0.0, g)
    assert out is noise and torch.equal(g.get_state(), state)


def test_full_warp_moves_frames_with_the_camera():
    noise = torch.randn(1, 4, 8, 8, 16, generator=_gen(1))
    out = noise_warp.warp(noise, frame_targets(8, 0.5, 0.0, 8, 16), 1.0, _gen(2))  # last frame: 8 latent px
    whole = noise_warp.whole_offsets(frame_targets(8, 0.5, 0.0, 8, 16))
    for f in range(8):
        d = int(whole[f, 0])  # content moved d px left: frame f's column x is frame 0's column x + d
        assert torch.equal(out[:, :, f, :, :16 - d], out[:, :, 0, :, d:])


def test_mix_keeps_unit_variance_and_the_prior_correlation_part():
    from studio.controls import noise_prior

    shape = (4, 4, 8, 32, 32)
    eps = noise_prior.sample(shape, 0.5, _gen(3))
    for beta in (0.3, 0.7):
        out = noise_warp.warp(eps, frame_targets(8, 0.0, 0.5, 32, 32), beta, _gen(4))
        assert abs(out.std().item() - 1.0) < 0.02
        # along the camera path (frame 1 is frame 0 moved up by 2 rows) correlation beta + (1 - beta)·0 (the prior's
        # part is at fixed positions, its path correlation near 0); at fixed positions, (1 - beta)·gamma + ~0
        path = torch.corrcoef(torch.stack([out[:, :, 1, :-2].flatten(), out[:, :, 0, 2:].flatten()]))[0, 1]
        fixed = torch.corrcoef(torch.stack([out[:, :, 1].flatten(), out[:, :, 0].flatten()]))[0, 1]
        assert abs(path.item() - beta) < 0.05 and abs(fixed.item() - (1 - beta) * 0.5) < 0.05


def test_the_low_band_stays_each_frames_own():
    from studio.controls import noise_prior

    eps = noise_prior.sample((4, 4, 8, 32, 32), 0.0, _gen(3))
    out = noise_warp.warp(eps, frame_targets(8, 0.5, 0.0, 32, 32), 1.0, _gen(4), above=2.0)
    low = noise_warp.low_pass(out, 2.0)
    assert torch.allclose(low, noise_warp.low_pass(eps, 2.0), atol=1e-5)  # up to 2 cycles per frame: the prior's
    assert abs(out.std().item() - 1.0) < 0.02
    high = out - low  # the fine band follows the camera: frame 1 is frame 0 moved 2 columns left (2.29 -> 2)
    path = torch.corrcoef(torch.stack([high[:, :, 1, :, 4:-6].flatten(), high[:, :, 0, :, 6:-4].flatten()]))[0, 1]
    fixed = torch.corrcoef(torch.stack([high[:, :, 1].flatten(), high[:, :, 0].flatten()]))[0, 1]
    assert path.item() > 0.9 and abs(fixed.item()) < 0.05, (path, fixed)
    x = torch.randn(2000, 4, 16, 16, generator=_gen(6))  # the split is orthogonal: the variances add up
    lo = noise_warp.low_pass(x, 1.0)
    assert abs((lo * (x - lo)).mean().item()) < 1e-6 and abs(lo.var().item() - 9 / 256) < 0.003


def test_unsupported_family_or_scheduler_names_both(tiny_shot):
    from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler

    assert noise_warp.unsupported("animatediff", DDIMScheduler()) is None
    assert noise_warp.unsupported("zeroscope", "DDIMScheduler") is None
    assert noise_warp.unsupported("zeroscope", None) is None  # the model's own: checked at render
    for family, scheduler in [("animatediff", EulerAncestralDiscreteScheduler()),  # fresh noise every step
                              ("animatediff", "PNDMScheduler"),  # multistep: a history of unshifted outputs
                              ("wan", "UniPCMultistepScheduler"), ("wan", None)]:  # frames unknown to the warp
        why = noise_warp.unsupported(family, scheduler)
        name = scheduler if isinstance(scheduler, str) else type(scheduler).__name__ if scheduler else "model's own"
        assert f"'{family}'" in why and name in why, why

    from studio import shot as shotlib

    tiny_shot.camera.cx, tiny_shot.camera.noise_warp = 0.5, 0.5
    noise = torch.randn(1, 4, 8, 8, 8, generator=_gen())
    with pytest.raises(shotlib.ShotError, match=r"camera.noise_warp: .*EulerAncestralDiscreteScheduler.*'animatediff'"):
        noise_warp.for_shot(tiny_shot, "animatediff", EulerAncestralDiscreteScheduler(), noise, _gen())
    assert noise_warp.for_shot(tiny_shot, "animatediff", DDIMScheduler(), noise, _gen()).shape == noise.shape
    tiny_shot.camera.cx = 0.0  # no pan: nothing to warp, nothing refused
    assert noise_warp.for_shot(tiny_shot, "wan", "UniPCMultistepScheduler", noise, _gen()) is noise


def test_noise_level_matches_the_schedulers_own_noising():
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

    ddim = DDIMScheduler(beta_schedule="scaled_linear", steps_offset=1)
    ddim.set_timesteps(10)
    level = noise_warp.noise_level(ddim)
    assert level(-1) == 1.0 and level(9) == 0.0
    for i in range(9):  # DDIM's add_noise of a zero sample is the noise's share
        t = ddim.timesteps[i + 1]
        want = ddim.add_noise(torch.zeros(1), torch.ones(1), t.reshape(1)).item()
        assert level(i) == pytest.approx(want, rel=1e-5)
    euler = EulerDiscreteScheduler()
    euler.set_timesteps(10)
    level = noise_warp.noise_level(euler)
    for i in range(9):
        assert level(i) == pytest.approx(float(euler.sigmas[i + 1]))  # x = x0 + sigma·eps
    flow = FlowMatchEulerDiscreteScheduler()
    flow.set_timesteps(10)
    level = noise_warp.noise_level(flow)
    for i in range(9):
        t = flow.timesteps[i + 1]
        want = flow.scale_noise(torch.zeros(1), t.reshape(1), torch.ones(1)).item()  # (1 - sigma)·x0 + sigma·eps
        assert level(i) == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError):
        noise_warp.noise_level(object())
