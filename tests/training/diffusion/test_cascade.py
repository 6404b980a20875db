"""PYoCo cascade (sec. 4, Fig. 3) on tiny models, single process: conditioning, zero-init channels, the
stage objectives and keyframe fidelity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fixtures.checkpoints import CONFIGS, stage_config, stage_model
from fixtures.checkpoints import perturb_trainable as perturb
from pipeline.configlib import load_config
from training.config import TrainConfig
from training.diffusion import cascade
from training.diffusion.edm import Denoiser, ddpm_sigmas
from training.diffusion.objective import HarivoObjective
from training.model.cascade import aug_timestep
from training.model.unet import VideoUNet


def text(model: VideoUNet, b: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.randn(b, 77, model.unet.config.cross_attention_dim, generator=g)


# ---- index arithmetic and conditioning builders ------------------------------------------------------


def test_keyframe_arithmetic_16_to_76():
    # PYoCo: the base makes frames 1, 6, ..., 76 (1-based) of a 76-frame clip; interpolation fills the rest.
    assert cascade.interp_num_frames(16, 5) == 76
    assert cascade.keyframe_indices(76, 5) == [i - 1 for i in range(1, 77, 5)]
    assert len(cascade.keyframe_indices(76, 5)) == 16 and cascade.keyframe_indices(76, 5)[-1] == 75
    # The base's data.frame_stride=5 over the 76 stored frames picks exactly these frames.
    assert list(range(76))[0 : (16 - 1) * 5 + 1 : 5] == cascade.keyframe_indices(76, 5)
    assert cascade.interp_num_frames(4, 5) == 16 and cascade.keyframe_indices(16, 5) == [0, 5, 10, 15]
    assert int(cascade.keyframe_mask(76, 5).sum()) == 16
    with pytest.raises(ValueError, match="num_frames=75"):
        cascade.keyframe_indices(75, 5)
    keyframes = torch.randn(2, 4, 16, 3, 3)
    video = cascade.place_keyframes(keyframes, 5)  # (B, C, 76, h, w)
    assert video.shape == (2, 4, 76, 3, 3)
    assert torch.equal(video[:, :, ::5], keyframes) and video[:, :, 1:5].abs().sum() == 0


def test_keyframe_condition_is_masked_latents_plus_mask():
    latents = torch.randn(2, 4, 16, 4, 4)
    cond = cascade.keyframe_condition(latents, 5)
    assert cond.shape == (2, 5, 16, 4, 4)
    mask = cascade.keyframe_mask(16, 5)
    assert torch.equal(cond[:, :4, mask], latents[:, :, mask])
    assert cond[:, :4, ~mask].abs().sum() == 0
    assert torch.equal(cond[:, 4], mask.float().reshape(1, 16, 1, 1).expand(2, 16, 4, 4))
    # Sampling builds the same conditioning from the keyframes alone.
    stage = cascade.interp_stage_condition(latents[:, :, mask], 5)
    assert torch.equal(stage.cond, cond) and torch.equal(stage.known_mask, mask)


def test_sr_condition_upsamples_and_augments():
    low = torch.randn(2, 4, 3, 4, 4)
    up = cascade.upsample_latents(low, 2)
    assert up.shape == (2, 4, 3, 8, 8)
    # Bilinear x2 keeps the per-frame mean and the layout (frames are not mixed).
    assert torch.allclose(up.mean(dim=(3, 4)), low.mean(dim=(3, 4)), atol=1e-5)
    assert torch.equal(cascade.upsample_latents(low, 2, "nearest")[..., ::2, ::2], low)
    clean = cascade.sr_condition(low, torch.zeros(2), 2)
    assert torch.equal(clean, up)
    g = torch.Generator().manual_seed(0)
    noisy = cascade.sr_condition(low, torch.tensor([0.0, 0.5]), 2, generator=g)
    assert torch.equal(noisy[0], up[0]) and 0.4 < (noisy[1] - up[1]).std() < 0.6
    # The level the model sees: 0 for a clean conditioning, increasing, bounded by T.
    levels = aug_timestep(torch.tensor([0.0, 0.1, 1.0, 100.0]))
    assert levels[0] == 0 and bool((levels.diff() > 0).all()) and levels[2] == 500 and levels[3] < 1000


def test_stage_kinds_and_config_validation(tiny_zoo):
    assert [cascade.stage_kind(s) for s in cascade.STAGES] == ["pyoco_base", "pyoco_interp", "pyoco_sr"]
    for stage in cascade.STAGES:  # the shipped presets load, with EDM and a correlated prior
        for suffix in ("", "_demo"):
            cfg = load_config(TrainConfig, CONFIGS / f"pyoco_{stage}{suffix}.yaml")
            assert cfg.cascade.stage == stage and cfg.diffusion.objective == "edm"
            assert cfg.noise.prior in ("mixed", "progressive") and cfg.noise.alpha > 0
    with pytest.raises(ValueError, match="model.num_frames=15 must be"):
        stage_config(tiny_zoo.sd, "interp", "model.num_frames=15")
    with pytest.raises(ValueError, match="needs diffusion.objective=edm"):
        stage_config(tiny_zoo.sd, "base", "diffusion.objective=ddpm")
    with pytest.raises(ValueError, match="needs cascade.cond_view"):
        stage_config(tiny_zoo.sd, "sr", "cascade.cond_view=null")
    with pytest.raises(ValueError, match="data.images_per_clip must be 0"):
        stage_config(
            tiny_zoo.sd,
            "interp",
            "data.images_per_clip=2",
            "data.image_path=x",
            "model.trainable_spatial=['*']",
        )
    from training.run import export_kind

    assert export_kind(stage_config(tiny_zoo.sd, "sr")) == "pyoco_sr"
    assert export_kind(load_config(TrainConfig, CONFIGS / "demo.yaml")) == "harivo"
    with pytest.raises(ValueError, match="contradicts cascade.stage=interp"):
        export_kind(stage_config(tiny_zoo.sd, "interp"), "harivo")


def test_collate_stage_takes_the_same_window_of_both_views():
    from training.distributed.data import StoreInfo, collate_stage

    # Stored latents whose value is the frame index: (B, F_s, C, h, w) at two resolutions.
    frames = np.arange(16, dtype=np.float32)
    hi = np.broadcast_to(frames.reshape(1, 16, 1, 1, 1), (2, 16, 4, 8, 8)).copy()
    lo = np.broadcast_to(frames.reshape(1, 16, 1, 1, 1), (2, 16, 4, 4, 4)).copy()
    batch = {"key": np.array(["a", "b"]), "caption": np.array(["x", "y"]), "latents_sr": hi, "latents": lo}
    info = StoreInfo("clips", "latents_sr", [16, 4, 8, 8], False, {}, 0, "latents", [16, 4, 4, 4])
    g = torch.Generator().manual_seed(0)
    starts = set()
    for _ in range(8):
        latents, _, _, cond = collate_stage(batch, info, 4, 2, g, torch.device("cpu"))
        assert latents.shape == (2, 4, 4, 8, 8) and cond.shape == (2, 4, 4, 4, 4)
        assert torch.equal(latents[0, 0, :, 0, 0], cond[0, 0, :, 0, 0])  # same source frames
        starts.add(int(latents[0, 0, 0, 0, 0]))
    assert len(starts) > 1  # random windows, shared by both views


# ---- the model: zero-initialised extra channels -------------------------------------------------------


@pytest.mark.parametrize("stage", ["interp", "sr"])
def test_zero_init_stage_is_the_pretrained_model_at_step_0(tiny_zoo, perturb_temporal, stage):
    model, cfg = stage_model(tiny_zoo.sd, stage)
    plain, _ = stage_model(tiny_zoo.sd, stage, "cascade.stage=none", "cascade.cond_view=null")
    perturb_temporal(model)  # the same "trained" temporal layers in both
    perturb_temporal(plain)
    assert plain.cond_conv_in is None and model.cond_conv_in is not None
    assert set(plain.trainable_state_dict()) < set(model.trainable_state_dict())
    f, size = cfg.model.num_frames, cfg.model.latent_size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, f, size, size, generator=g)
    cond = torch.randn(1, model.cond_conv_in.in_channels, f, size, size, generator=g)
    level = torch.tensor([0.3]) if stage == "sr" else None
    t, txt = torch.tensor([500]), text(model)
    with torch.no_grad():
        base = plain(x, t, txt)
        staged = model(x, t, txt, cond=cond, cond_level=level)
        assert torch.allclose(staged, base, atol=1e-6), "zero-init conditioning must keep step-0 behaviour"
        # ...and the conditioning is wired: once its weights move, the output depends on it.
        torch.nn.init.normal_(model.cond_conv_in.weight, std=0.1)
        assert not torch.allclose(model(x, t, txt, cond=cond, cond_level=level), base, atol=1e-4)
        assert not torch.allclose(
            model(x, t, txt, cond=torch.zeros_like(cond), cond_level=level),
            model(x, t, txt, cond=cond, cond_level=level),
            atol=1e-4,
        )
        if stage == "sr":
            torch.nn.init.normal_(model.level_embedding.embedding.linear_2.weight, std=0.1)
            a = model(x, t, txt, cond=cond, cond_level=torch.tensor([0.0]))
            assert not torch.allclose(
                a, model(x, t, txt, cond=cond, cond_level=torch.tensor([1.0])), atol=1e-5
            )
    # The frozen base is still a plain image model outside VideoUNet.forward (hooks are inert).
    sample = x[:, :, 0]
    out = model.unet(sample, t, encoder_hidden_states=txt).sample
    assert torch.allclose(out, plain.unet(sample, t, encoder_hidden_states=txt).sample, atol=1e-6)


def test_stage_model_refuses_missing_or_wrong_conditioning(tiny_zoo):
    model, _ = stage_model(tiny_zoo.sd, "sr")
    x, t, txt = torch.randn(1, 4, 2, 8, 8), torch.tensor([10]), text(model)
    with pytest.raises(ValueError, match=r"needs cond of shape \(1, 4, 2, 8, 8\), got None"):
        model(x, t, txt)
    with pytest.raises(ValueError, match="needs cond_level"):
        model(x, t, txt, cond=torch.zeros(1, 4, 2, 8, 8))
    base, _ = stage_model(tiny_zoo.sd, "base")
    with pytest.raises(ValueError, match="takes no conditioning"):
        base(x, t, txt, cond=torch.zeros(1, 4, 2, 8, 8))


# ---- the stage objectives: a few optimiser steps each ------------------------------------------------


@pytest.mark.parametrize("stage", ["base", "interp", "sr"])
def test_each_stage_trains_a_few_steps(tiny_zoo, stage):
    model, cfg = stage_model(tiny_zoo.sd, stage)
    objective = HarivoObjective.for_model(cfg, model)
    frozen = {k: v.clone() for k, v in model.unet.state_dict().items()}
    before = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    optimizer = torch.optim.AdamW(list(model.trainable_parameters()), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    f, size = cfg.model.num_frames, cfg.model.latent_size
    latents = torch.randn(2, 4, f, size, size, generator=g)
    low = torch.randn(2, 4, f, size // 2, size // 2, generator=g) if stage == "sr" else None
    losses = []
    for _ in range(3):
        terms = objective(model, latents, text(model, 2), generator=g, cond_latents=low)
        optimizer.zero_grad()
        terms.total.backward()
        optimizer.step()
        losses.append(float(terms.total.detach()))
    assert all(np.isfinite(losses))
    after = model.trainable_state_dict()
    moved = {k for k in after if not torch.equal(after[k], before[k])}
    assert any(k.startswith("motion_adapter.") for k in moved)
    if stage != "base":  # the zero-initialised conditioning channels learn
        assert "cond_conv_in.weight" in moved
    if stage == "sr":
        assert "level_embedding.embedding.linear_2.weight" in moved
    assert all(torch.equal(v, frozen[k]) for k, v in model.unet.state_dict().items())
    if stage == "sr":
        with pytest.raises(ValueError, match="needs the low-resolution latents"):
            objective(model, latents, text(model, 2), generator=g)


@pytest.mark.parametrize("kind", ["edm", "sd21", "modified"])
def test_interp_stage_returns_the_keyframes_at_low_noise(tiny_zoo, kind):
    spatial = (
        [] if kind == "sd21" else ["model.trainable_spatial=['*']"]
    )  # edm / modified: a trained base only
    model, cfg = stage_model(tiny_zoo.sd, "interp", f"edm.kind={kind}", *spatial)
    perturb(model)  # "trained" temporal layers and conditioning channels
    g = torch.Generator().manual_seed(5)
    video = torch.randn(1, 4, 16, 4, 4, generator=g)  # keyframes at 0, 5, 10, 15
    condition = cascade.interp_stage_condition(video[:, :, ::5], cfg.cascade.keyframe_stride)
    sigmas = ddpm_sigmas(HarivoObjective(cfg).scheduler.alphas_cumprod)
    denoiser = Denoiser(model, kind, cfg.edm.sigma_data, sigmas)
    sigma = torch.tensor([0.002])  # sd21: below the smallest DDPM level, c_noise is timestep 0
    x = video + sigma * torch.randn(video.shape, generator=g)
    with torch.no_grad():
        denoised = denoiser(x, sigma, encoder_hidden_states=text(model), cond=condition.cond)
    mask = condition.known_mask
    err = (denoised[:, :, mask] - video[:, :, mask]).abs().max()
    assert err < 0.05, f"keyframes moved by {err}"


def test_interp_keyframe_augmentation_is_drawn_told_and_off_by_default(tiny_zoo):
    """cascade.interp_aug_sigma_max > 0: the keyframes are noise-augmented at sigma ~ U(0, max) per clip and the
    level reaches the model through a zero-initialised level embedding (as SR); 0 keeps clean keyframes."""
    clean_cfg = stage_config(tiny_zoo.sd, "interp")
    aug_cfg = stage_config(tiny_zoo.sd, "interp", "cascade.interp_aug_sigma_max=0.5")
    f = clean_cfg.model.num_frames
    latents = torch.randn(3, 4, f, 4, 4, generator=torch.Generator().manual_seed(0))
    cond, level = cascade.training_condition(
        clean_cfg.cascade, latents, None, torch.Generator().manual_seed(1)
    )
    assert level is None and torch.equal(cond, cascade.keyframe_condition(latents, 5))
    cond, level = cascade.training_condition(aug_cfg.cascade, latents, None, torch.Generator().manual_seed(1))
    assert level.shape == (3,) and ((level >= 0) & (level <= 0.5)).all()
    mask = cond[:, -1:].bool().expand(-1, 4, -1, -1, -1)  # the mask channel marks the keyframes
    diff = (cond[:, :-1] - latents)[mask]
    assert diff.abs().max() > 0 and (cond[:, :-1][~mask] == 0).all()  # keyframes noised, the rest empty
    model, _ = stage_model(tiny_zoo.sd, "interp", "cascade.interp_aug_sigma_max=0.5")
    assert model.level_embedding is not None
    assert stage_model(tiny_zoo.sd, "interp")[0].level_embedding is None
    objective = HarivoObjective(aug_cfg)
    terms = objective(model, latents, text(model, 3), generator=torch.Generator().manual_seed(2))
    assert torch.isfinite(terms.total)
    # Sampling: augmented conditioning with its level; the kept keyframes stay clean.
    keyframes = latents[:, :, ::5]
    s = cascade.interp_stage_condition(keyframes, 5, 0.2, torch.Generator().manual_seed(3))
    assert torch.equal(s.level, torch.full((3,), 0.2)) and torch.equal(s.known[:, :, ::5], keyframes)
    assert not torch.equal(s.cond[:, :-1, ::5], keyframes)
