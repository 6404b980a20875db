"""Metrics: the Frechet distance against scipy, its invariants; CLIP-based scores on the tiny CLIP."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.evaluation.metrics import (
    clipsim,
    frame_consistency,
    frechet_distance,
    gaussian_stats,
    latent_flicker,
)


def _scipy_frechet(mu1, s1, mu2, s2) -> float:
    from scipy import linalg

    covmean = linalg.sqrtm(s1 @ s2)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_matches_scipy_and_its_invariants():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 16)) @ rng.normal(size=(16, 16))
    b = rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16)) + 0.3
    stats_a, stats_b = gaussian_stats(a), gaussian_stats(b)
    assert frechet_distance(*stats_a, *stats_b) == pytest.approx(_scipy_frechet(*stats_a, *stats_b), rel=1e-6)
    assert frechet_distance(*stats_a, *stats_a) == pytest.approx(0.0, abs=1e-6)
    shifts = [frechet_distance(*stats_a, *gaussian_stats(a + d)) for d in (0.5, 1.0, 2.0)]
    # A pure mean shift d in every one of 16 dims adds exactly 16 d^2.
    assert shifts == pytest.approx([16 * 0.25, 16 * 1.0, 16 * 4.0], rel=1e-6)
    with pytest.raises(ValueError):
        gaussian_stats(np.zeros((1, 4)))


def test_fvd_covariance_is_biased_by_default():
    """StyleGAN-V's FeatureStats divide by N (SPEC section 8); the unbiased estimate divides by N - 1."""
    x = np.random.default_rng(0).normal(size=(10, 3))
    centred = x - x.mean(axis=0)
    assert np.allclose(gaussian_stats(x)[1], centred.T @ centred / 10)
    assert np.allclose(gaussian_stats(x, biased=False)[1], centred.T @ centred / 9)


def test_clip_scores_on_tiny_clip(tiny_zoo):
    from pipeline.models import load_clip

    clip, preprocess, tokenizer = load_clip(tiny_zoo.clip)
    gen = torch.Generator().manual_seed(0)
    still = torch.rand(2, 1, 3, 40, 40, generator=gen).expand(2, 5, 3, 40, 40)
    assert frame_consistency(clip, preprocess, still) == pytest.approx(1.0, abs=1e-5)
    noisy = torch.rand(2, 5, 3, 40, 40, generator=gen)
    assert frame_consistency(clip, preprocess, noisy) < 1.0 - 1e-4
    score = clipsim(clip, preprocess, tokenizer, noisy, ["a red circle", "a blue square"])
    assert -1.0 <= score <= 1.0
    with pytest.raises(ValueError, match="prompts"):
        clipsim(clip, preprocess, tokenizer, noisy, ["one prompt"])


def test_clipsim_embeds_frames_as_curation_does(tiny_zoo):
    """Evaluation's CLIPSIM and curation's CLIP score are one embedding function: same frames, same score."""
    import numpy as np

    from pipeline.models import clip_image_embeds, clip_text_embeds, load_clip

    clip, preprocess, tokenizer = load_clip(tiny_zoo.clip)
    frames = np.random.default_rng(0).integers(0, 256, (1, 3, 40, 56, 3), dtype=np.uint8)  # (B, F, H, W, 3)
    img = clip_image_embeds(clip, preprocess, frames[0])  # what pipeline/filters.py computes per frame
    txt = clip_text_embeds(clip, tokenizer, ["a red circle"])
    expected = float((img @ txt[0]).mean())
    videos = torch.from_numpy(frames).permute(0, 1, 4, 2, 3).float() / 255  # (B, F, 3, H, W)
    assert clipsim(clip, preprocess, tokenizer, videos, ["a red circle"]) == pytest.approx(expected, abs=1e-6)


def test_latent_flicker():
    gen = torch.Generator().manual_seed(0)
    still = torch.randn(1, 4, 1, 8, 8, generator=gen).expand(1, 4, 6, 8, 8)
    assert latent_flicker(still) == 0.0
    assert latent_flicker(torch.randn(1, 4, 6, 8, 8, generator=gen)) > 0.5
