"""PYoCo noise priors: per-frame variance 1 and the closed-form correlations along F (eq. 3-4)."""

from __future__ import annotations

import math

import pytest
import torch

from training.diffusion.noise import video_noise

SHAPE = (64, 4, 6, 16, 16)  # 65,536 samples per frame: correlation std error ~0.004
TOL = 0.02


def frame_stats(noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frame variances (F,) and the frame-by-frame correlation matrix (F, F)."""
    frames = noise.permute(2, 0, 1, 3, 4).reshape(noise.shape[2], -1).double()  # (F, B C H W)
    return frames.var(dim=1), torch.corrcoef(frames)


def expected_corr(prior: str, alpha: float, f: int) -> torch.Tensor:
    idx = torch.arange(f, dtype=torch.float64)
    if prior == "mixed":
        rho = torch.full((f, f), alpha**2 / (1 + alpha**2), dtype=torch.float64)
    else:
        rho = (alpha / math.sqrt(1 + alpha**2)) ** (idx[:, None] - idx[None, :]).abs()
    return rho.fill_diagonal_(1.0)


@pytest.mark.parametrize("prior", ["mixed", "progressive"])
@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_unit_variance_and_closed_form_correlation(prior, alpha):
    noise = video_noise(SHAPE, prior, alpha, torch.Generator().manual_seed(0))
    assert noise.shape == SHAPE
    var, corr = frame_stats(noise)
    assert torch.allclose(var, torch.ones_like(var), atol=TOL), var
    assert torch.allclose(corr, expected_corr(prior, alpha, SHAPE[2]), atol=TOL), corr


@pytest.mark.parametrize("prior", ["iid", "mixed", "progressive"])
def test_alpha_zero_is_iid(prior):
    var, corr = frame_stats(video_noise(SHAPE, prior, 0.0, torch.Generator().manual_seed(1)))
    assert torch.allclose(var, torch.ones_like(var), atol=TOL)
    assert torch.allclose(corr, torch.eye(SHAPE[2], dtype=corr.dtype), atol=TOL), corr


def test_iid_ignores_alpha_and_alpha_inf_freezes_the_video():
    var, corr = frame_stats(video_noise(SHAPE, "iid", 5.0, torch.Generator().manual_seed(2)))
    assert torch.allclose(corr, torch.eye(SHAPE[2], dtype=corr.dtype), atol=TOL)
    for prior in ("mixed", "progressive"):
        frozen = video_noise((2, 4, 5, 8, 8), prior, math.inf, torch.Generator().manual_seed(3))
        assert torch.equal(frozen, frozen[:, :, :1].expand_as(frozen))


def test_seeded_and_validated():
    a = video_noise((1, 4, 3, 8, 8), "progressive", 2.0, torch.Generator().manual_seed(4))
    b = video_noise((1, 4, 3, 8, 8), "progressive", 2.0, torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="'pink'"):
        video_noise((1, 4, 3, 8, 8), "pink", 1.0)
    with pytest.raises(ValueError, match="-1.0"):
        video_noise((1, 4, 3, 8, 8), "mixed", -1.0)
    with pytest.raises(ValueError, match=r"\(B, C, F, H, W\)"):
        video_noise((4, 3, 8, 8), "mixed", 1.0)


@pytest.mark.parametrize("shift", [2.0, 3.0, 0.5])
def test_shifted_timesteps_follow_the_closed_form_cdf(shift):
    """P(t / T <= x) = x / (shift - (shift - 1) x), the inverse of t / T = shift u / (1 + (shift - 1) u)."""
    from training.diffusion.noise import shifted_timesteps

    T, n = 1000, 200_000
    t = shifted_timesteps(n, T, shift, torch.Generator().manual_seed(0), "cpu")
    assert t.dtype == torch.int64 and 0 <= t.min() and t.max() <= T - 1
    for x in (0.1, 0.25, 0.5, 0.75, 0.9):
        expected = x / (shift - (shift - 1) * x)
        assert abs((t < x * T).double().mean().item() - expected) < 0.005  # std error ~0.001


def test_no_shift_draws_exactly_what_uniform_timesteps_drew():
    from training.diffusion.noise import shifted_timesteps

    a = shifted_timesteps(64, 1000, 1.0, torch.Generator().manual_seed(3), "cpu")
    b = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
