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


@pytest.mark.parametrize("dx, dy", [(2, 0), (-3, 0), (0, 2), (1, -1), (9, 0)])
def test_shift_fresh_moves_content_and_reveals_fresh_noise(dx, dy):
    x = torch.randn(1, 2, 6, 8, generator=_gen(1))
    out = noise_warp.shift_fresh(x, dx, dy, _gen(2))
    h, w = 6, 8
    revealed = torch.ones(h, w, dtype=torch.bool)
    if abs(dx) < w:  # camera right: content moves left
        kept = out[:, :, max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]
        assert torch.equal(kept, x[:, :, max(0, dy):h + min(0, dy), max(0, dx):w + min(0, dx)])
        revealed[max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)] = False
    assert revealed.any() and not torch.isin(out[:, :, revealed], x).any()  # the strip is new noise


def test_rho_zero_changes_nothing_and_draws_nothing():
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


def test_along_the_path_frames_correlate_as_rho_to_the_distance():
    from studio.controls import noise_prior

    eps = noise_prior.sample((4, 4, 8, 32, 32), 0.0, _gen(3))
    for rho in (0.5, 0.9):
        out = noise_warp.warp(eps, frame_targets(8, 0.0, 0.5, 32, 32), rho, _gen(4))  # frame f: round(16f/7) rows
        assert abs(out.std().item() - 1.0) < 0.02

        def corr(a, b):
            return torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()

        # frame 1 is frame 0 moved up 2 rows; frame 2 moved 5 (16·2/7 = 4.6 -> 5); at fixed pixels no correlation
        assert abs(corr(out[:, :, 1, :-2], out[:, :, 0, 2:]) - rho) < 0.05
        assert abs(corr(out[:, :, 2, :-5], out[:, :, 0, 5:]) - rho ** 2) < 0.05
        assert abs(corr(out[:, :, 1], out[:, :, 0])) < 0.05


def test_the_low_band_stays_each_frames_own():
    from studio.controls import noise_prior

    eps = noise_prior.sample((4, 4, 8, 32, 32), 0.0, _gen(3))
    out = noise_warp.warp(eps, frame_targets(8, 0.5, 0.0, 32, 32), 0.9, _gen(4), above=2.0)
    low = noise_warp.low_pass(out, 2.0)
    assert torch.allclose(low, noise_warp.low_pass(eps, 2.0), atol=1e-5)  # up to 2 cycles per frame: the prior's
    assert abs(out.std().item() - 1.0) < 0.02
    high = out - low  # the fine band follows the camera: frame 1 is frame 0 moved 2 columns left (2.29 -> 2)
    path = torch.corrcoef(torch.stack([high[:, :, 1, :, 4:-6].flatten(), high[:, :, 0, :, 6:-4].flatten()]))[0, 1]
    fixed = torch.corrcoef(torch.stack([high[:, :, 1].flatten(), high[:, :, 0].flatten()]))[0, 1]
    assert path.item() > 0.85 and abs(fixed.item()) < 0.05, (path, fixed)
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
