"""JVID mixture pieces: P_V breakpoints, seeded step choice, entropy-reduced noise, latent smoothing."""

from __future__ import annotations

import pytest
import torch

from training.diffusion.jvid import choose_video_steps, entropy_reduced_noise, p_video, smooth_latents

TABLE6 = {"256": (0.1, 0.6, 0.2, 0.1), "128": (0.4, 0.7, 0.4, 0.1), "64": (0.2, 0.7, 0.3, 0.3)}


@pytest.mark.parametrize("res", sorted(TABLE6))
def test_p_video_breakpoints(res):
    t_v, t_e, p_e, p_f = TABLE6[res]
    assert p_video(0.0, t_v, t_e, p_e, p_f) == 1.0
    assert p_video(t_v, t_v, t_e, p_e, p_f) == 1.0
    assert p_video(t_e, t_v, t_e, p_e, p_f) == pytest.approx(p_e)
    assert p_video(1.0, t_v, t_e, p_e, p_f) == pytest.approx(p_f)
    mid1, mid2 = (t_v + t_e) / 2, (t_e + 1) / 2
    assert p_video(mid1, t_v, t_e, p_e, p_f) == pytest.approx((1 + p_e) / 2)
    assert p_video(mid2, t_v, t_e, p_e, p_f) == pytest.approx((p_e + p_f) / 2)


def test_p_video_rejects_bad_schedules():
    with pytest.raises(ValueError, match="t_v <= t_e"):
        p_video(0.5, 0.7, 0.6, 0.2, 0.1)
    with pytest.raises(ValueError, match="probability"):
        p_video(0.5, 0.1, 0.6, 1.2, 0.1)


def test_step_choice_is_seeded_and_follows_p_video():
    progress = [i / 49 for i in range(50)]
    a = choose_video_steps(progress, 0.1, 0.6, 0.2, 0.1, seed=3)
    assert a == choose_video_steps(progress, 0.1, 0.6, 0.2, 0.1, seed=3)
    assert all(a[:5])  # first 10% of the reverse process: always the video model
    assert choose_video_steps(progress, 0.0, 1.0, 1.0, 1.0, seed=3) == [True] * 50
    many = [choose_video_steps(progress, 0.1, 0.6, 0.2, 0.1, seed=s) for s in range(400)]
    late = sum(m[-1] for m in many) / len(many)
    assert abs(late - 0.1) < 0.05  # P_V(1) = p_f


def test_entropy_reduced_noise_statistics():
    gen = torch.Generator().manual_seed(0)
    z = entropy_reduced_noise((4000, 1, 4, 2, 2), r=0.3, gamma=0.5, generator=gen)
    flat = z.permute(2, 0, 1, 3, 4).reshape(4, -1)  # (F, N)
    assert flat.var(dim=1).mean().item() == pytest.approx(0.25, rel=0.05)  # gamma^2
    corr = torch.corrcoef(flat)
    assert corr[0, 1].item() == pytest.approx(0.3, abs=0.03)  # frames share r of the variance
    plain = entropy_reduced_noise((4000, 1, 4, 2, 2), r=0.0, gamma=1.0, generator=gen)
    assert abs(torch.corrcoef(plain.permute(2, 0, 1, 3, 4).reshape(4, -1))[0, 1].item()) < 0.03


def test_smoothing_keeps_constant_video_and_touches_only_static_positions():
    gen = torch.Generator().manual_seed(0)
    still = torch.randn(1, 4, 1, 8, 8, generator=gen).expand(1, 4, 6, 8, 8).contiguous()
    torch.testing.assert_close(smooth_latents(still, 2.0), still, rtol=0, atol=1e-6)  # mean of equal values
    video = still.clone()
    video[:, :, :, 2:4, 2:4] += 5 * torch.randn(1, 4, 6, 2, 2, generator=gen)  # a moving patch
    video += 0.01 * torch.randn(video.shape, generator=gen)  # sensor noise everywhere
    out = smooth_latents(video, 2.0)
    mu = video.mean(dim=2, keepdim=True)
    sigma = mu.flatten(3).std(dim=-1, unbiased=False)[..., None, None]
    score = ((video - mu).abs() / sigma).sum(dim=1, keepdim=True)
    static = (score < 2.0).expand_as(video)
    assert torch.equal(out[static], mu.expand_as(video)[static])
    assert torch.equal(out[~static], video[~static])  # positions over threshold untouched
    assert static[:, :, :, 5:, 5:].all() and not static[:, :, :, 2:4, 2:4].all()
