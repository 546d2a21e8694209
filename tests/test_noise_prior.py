import numpy as np
import pytest
import torch

from studio.controls import noise_prior


def test_covariance_is_gamma_power_of_distance():
    c = noise_prior.covariance(5, 0.5)
    assert c.shape == (5, 5)
    assert np.allclose(np.diag(c), 1.0)
    assert c[0, 3] == pytest.approx(0.125) and c[4, 2] == pytest.approx(0.25)
    assert np.allclose(noise_prior.covariance(4, 0.0), np.eye(4))


@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.7, 0.95])
def test_empirical_correlation_matches_gamma_power(gamma):
    gen = torch.Generator().manual_seed(1)
    x = noise_prior.sample((1, 4, 6, 64, 64), gamma, gen)  # 16384 samples per frame
    v = x.permute(2, 0, 1, 3, 4).reshape(6, -1).numpy()  # (F, samples)
    emp = np.corrcoef(v)
    n = v.shape[1]
    for i in range(6):
        assert v[i].var() == pytest.approx(1.0, abs=0.05)
        for j in range(6):
            expected = gamma ** abs(i - j)
            # standard error of a correlation estimate ~ (1 - r^2) / sqrt(n); allow 5 of them
            assert abs(emp[i, j] - expected) < 5 * (1 - expected**2) / np.sqrt(n) + 1e-6, (i, j, emp[i, j])


def test_gamma_zero_is_plain_gaussian_draw():
    shape = (1, 4, 8, 8, 8)
    a = noise_prior.sample(shape, 0.0, torch.Generator().manual_seed(7))
    b = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_same_generator_seed_same_noise_and_gamma_changes_it():
    shape = (1, 4, 8, 8, 8)
    a = noise_prior.sample(shape, 0.5, torch.Generator().manual_seed(3))
    b = noise_prior.sample(shape, 0.5, torch.Generator().manual_seed(3))
    c = noise_prior.sample(shape, 0.6, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[:, :, 0], c[:, :, 0])  # the first frame is the shared z_0


@pytest.mark.parametrize("gamma", [-0.1, 1.0, 1.5])
def test_gamma_outside_unit_interval_is_rejected(gamma):
    with pytest.raises(ValueError, match="gamma"):
        noise_prior.sample((1, 4, 2, 2, 2), gamma, torch.Generator())


def test_preview_is_pure_and_shaped_for_display():
    cov, frames = noise_prior.preview(0.8, frames=6, size=12, seed=2)
    cov2, frames2 = noise_prior.preview(0.8, frames=6, size=12, seed=2)
    assert cov.shape == (6, 6) and frames.shape == (6, 12, 12)
    assert np.array_equal(frames, frames2)
    assert frames.min() >= 0 and frames.max() <= 1
    # neighbouring preview frames look alike at high gamma, unlike at gamma 0
    _, f0 = noise_prior.preview(0.0, frames=6, size=12, seed=2)
    assert np.abs(np.diff(frames, axis=0)).mean() < 0.6 * np.abs(np.diff(f0, axis=0)).mean()
