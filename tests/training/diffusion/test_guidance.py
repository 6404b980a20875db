"""MG sampling (HARIVO Algorithm 1) against an independent numpy computation; CFG schedule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.diffusion.guidance import MG_REFERENCE_ELEMENTS, cfg_scale, mg_effective_scale, mg_guidance


def _mg_reference(eps: np.ndarray, x_t: np.ndarray, a: float, scale: float) -> np.ndarray:
    """Algorithm 1 lines 2-5 written out per video and per frame, in float64 numpy."""
    out = eps.copy()
    for b in range(eps.shape[0]):
        x0 = (x_t[b] - math.sqrt(1 - a) * eps[b]) / math.sqrt(a)  # (C, F, H, W)
        f = x0.shape[1]
        diffs = [x0[:, j] - x0[:, j - 1] for j in range(1, f)]
        norms = np.array([np.sqrt((d**2).sum()) for d in diffs])
        median = np.sort(norms)[(len(norms) - 1) // 2]  # torch.median: the lower median
        s = median**2 / math.log(f - 1)
        w = math.sqrt((1 - a) / a)
        for j in range(1, f):
            g = 2 * math.exp(-(norms[j - 1] ** 2) / s) * diffs[j - 1] / s * w
            out[b, :, j] += scale * g
    return out


@pytest.mark.parametrize("frames", [16, 24, 5])
def test_mg_matches_independent_computation(frames):
    gen = torch.Generator().manual_seed(frames)
    eps = torch.randn(2, 4, frames, 8, 8, generator=gen)
    x_t = torch.randn(2, 4, frames, 8, 8, generator=gen) * 1.5
    a = 0.37
    got = mg_guidance(eps, x_t, a, scale=40.0)
    want = _mg_reference(eps.double().numpy(), x_t.double().numpy(), a, 40.0)
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-4, atol=1e-4)
    assert torch.equal(got[:, :, 0], eps[:, :, 0])  # frame 1 untouched
    assert not torch.allclose(got[:, :, 1:], eps[:, :, 1:])


def test_mg_pulls_frames_together_and_leaves_frozen_video_alone():
    gen = torch.Generator().manual_seed(0)
    eps = torch.randn(1, 4, 8, 8, 8, generator=gen)
    x_t = torch.randn(1, 4, 8, 8, 8, generator=gen)
    a = 0.5
    x0 = lambda e: (x_t - (1 - a) ** 0.5 * e) / a**0.5  # noqa: E731
    before = (x0(eps)[:, :, 1:] - x0(eps)[:, :, :-1]).norm()
    after_eps = mg_guidance(eps, x_t, a, scale=0.05)
    after = (x0(after_eps)[:, :, 1:] - x0(after_eps)[:, :, :-1]).norm()
    assert after < before  # predicted frames move closer
    # A video whose predicted x0 is the same in every frame gets no correction (D = 0).
    frozen_eps = eps[:, :, :1].expand_as(eps).contiguous()
    frozen_x = x_t[:, :, :1].expand_as(x_t).contiguous()
    assert torch.equal(mg_guidance(frozen_eps, frozen_x, a, 40.0), frozen_eps)
    with pytest.raises(ValueError, match="at least 3 frames"):
        mg_guidance(eps[:, :, :2], x_t[:, :, :2], a, 40.0)


def test_mg_re_referenced_pulls_as_hard_at_8x8_as_at_32x32():
    """Oracle: a 32x32 clip that is an 8x8 clip with every latent pixel repeated 4 x 4 (the same picture, 16x the
    elements). As printed, Algorithm 1's correction per element is 16x stronger at 8x8; re-referenced to 4x32x32
    (the default) it is the same at both sizes, and at 32x32 the same as printed."""
    gen = torch.Generator().manual_seed(3)
    eps = torch.randn(2, 4, 8, 8, 8, generator=gen)
    x_t = torch.randn(2, 4, 8, 8, 8, generator=gen)
    big = lambda t: t.repeat_interleave(4, dim=3).repeat_interleave(4, dim=4)  # noqa: E731
    a, alpha = 0.4, 40.0
    # The relative pull: the correction over the frame difference it pulls on, per element.
    pull = lambda e, x, ref: (mg_guidance(e, x, a, alpha, ref) - e)[:, :, 1:]  # noqa: E731
    small_printed, big_printed = pull(eps, x_t, 0), pull(big(eps), big(x_t), 0)
    torch.testing.assert_close(big(small_printed), 16 * big_printed)  # as printed: 1 / N
    small, large = pull(eps, x_t, MG_REFERENCE_ELEMENTS), pull(big(eps), big(x_t), MG_REFERENCE_ELEMENTS)
    torch.testing.assert_close(big(small), large)  # re-referenced: the same pull at both sizes
    torch.testing.assert_close(large, big_printed)  # and HARIVO's own at 4 x 32 x 32
    assert mg_effective_scale(40.0, 4 * 8 * 8) == 2.5 and mg_effective_scale(40.0, 256, 0) == 40.0


def test_drop_captions_replaces_whole_captions_at_the_rate_and_draws_nothing_at_zero():
    from training.diffusion.guidance import drop_captions

    text = torch.randn(4000, 7, 3, generator=torch.Generator().manual_seed(0))
    empty = torch.full((1, 7, 3), 9.0)
    g = torch.Generator().manual_seed(1)
    state = g.get_state()
    assert drop_captions(text, empty, 0.0, g) is text and torch.equal(g.get_state(), state)
    out = drop_captions(text, empty, 0.3, g)
    dropped = (out == 9.0).all(dim=(1, 2))
    assert torch.equal(out[~dropped], text[~dropped])  # every caption is kept whole or dropped whole
    assert abs(dropped.float().mean().item() - 0.3) < 0.03
    again = drop_captions(text, empty, 0.3, torch.Generator().manual_seed(1))
    assert torch.equal(again, out)  # drawn from the run's generator: a resumed run drops the same captions
    assert (drop_captions(text[:5], empty, 1.0, g) == 9.0).all()


def test_cfg_schedule_breakpoint():
    assert cfg_scale(0.0) == 12.5 and cfg_scale(0.29) == 12.5
    assert cfg_scale(0.3) == 7.5 and cfg_scale(1.0) == 7.5
    assert cfg_scale(0.1, early=15.0) == 15.0
    with pytest.raises(ValueError):
        cfg_scale(1.5)
