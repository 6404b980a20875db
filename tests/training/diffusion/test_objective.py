"""The whole objective on the tiny zoo: every term finite, gradients only on trainable weights."""

from __future__ import annotations

import pytest
import torch

from training.diffusion.objective import HarivoObjective

TRAINABLE = ("motion_adapter.", "mapping_network.", "frame_tokens.", "contrastive_head.")


def batch(b: int, f: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4, f, 8, 8, generator=g), torch.randn(b, 77, 32, generator=g)


@pytest.mark.parametrize("num_frames", [16, 24])
def test_all_losses_finite_and_gradients_reach_only_trainable_weights(make_video_model, num_frames):
    model, cfg = make_video_model(**{"model.num_frames": num_frames})
    objective = HarivoObjective.for_model(cfg, model)
    latents, text = batch(2, num_frames)
    terms = objective(model, latents, text, generator=torch.Generator().manual_seed(0))
    for name, value in terms.detached().items():
        assert value.ndim == 0 and torch.isfinite(value), name
    assert terms.trs > 0 and terms.simple > 0
    expected_total = terms.simple + 0.1 * (terms.trs + terms.reg + terms.dc)
    assert torch.allclose(terms.total, expected_total)
    terms.total.backward()
    for name, p in model.named_parameters():
        if not name.startswith(TRAINABLE):
            assert p.grad is None, name
    for prefix in TRAINABLE:  # every trainable component is reached by some term
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(prefix) and p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads), prefix
        assert any(g.abs().sum() > 0 for g in grads), prefix
    assert int(objective.queue.count) == 4  # this step's positive pairs joined the negative queue


def test_reg_loss_zero_at_init(make_video_model):
    # Temporal layers and the mapping network are zero-initialised: video mode == image mode.
    model, cfg = make_video_model(**{"harivo.frame_tokens": False})
    terms = HarivoObjective.for_model(cfg, model)(
        model, *batch(2, 4), generator=torch.Generator().manual_seed(1)
    )
    assert terms.reg == 0
    # Frame-wise tokens are video-path only (HARIVO pseudo-code), so with them L_reg starts above 0.
    model, cfg = make_video_model()
    terms = HarivoObjective.for_model(cfg, model)(
        model, *batch(2, 4), generator=torch.Generator().manual_seed(1)
    )
    assert terms.reg > 0


@pytest.mark.parametrize(
    "overrides",
    [
        {"diffusion.prediction_type": "v_prediction"},
        {"noise.prior": "progressive", "noise.alpha": 2.0},
        {"diffusion.objective": "edm", "edm.kind": "edm", "model.trainable_spatial": ["*"]},
        {"diffusion.objective": "edm", "edm.kind": "sd21"},
        {"diffusion.objective": "edm", "edm.kind": "modified", "model.trainable_spatial": ["*"]},
    ],
    ids=lambda o: "-".join(str(v) for v in o.values()),
)
def test_objective_variants_are_finite(make_video_model, overrides):
    model, cfg = make_video_model(**overrides)
    terms = HarivoObjective.for_model(cfg, model)(
        model, *batch(1, 4), generator=torch.Generator().manual_seed(2)
    )
    assert all(torch.isfinite(v) for v in terms.detached().values())
    terms.total.backward()
    spatial = bool(cfg.model.trainable_spatial)  # the base gets gradients only where it trains
    assert all((p.grad is not None) == spatial for p in model.unet.parameters())


def test_image_batches_train_with_l_simple_only(make_video_model):
    model, cfg = make_video_model()
    latents, text = batch(3, 1)  # data.image_only: single images
    terms = HarivoObjective.for_model(cfg, model)(model, latents, text, image_mode=True)
    assert terms.simple > 0 and terms.reg == 0 and terms.trs == 0 and terms.dc == 0
    assert torch.equal(terms.total, terms.simple)


@pytest.mark.parametrize("objective_kind", ["ddpm", "edm"])
def test_joint_images_train_the_spatial_layers_and_leave_the_clips_terms(make_video_model, objective_kind):
    """PYoCo's joint training: images after each clip add to L_simple and reach the trainable spatial layers;
    the clip's own L_reg and L_TRS are what they are without images (images drawn after the clip's noise)."""
    from fixtures.checkpoints import perturb_temporal

    overrides = {"model.trainable_spatial": ["*attentions*"], "loss.lambda_dc": 0.0}
    if objective_kind == "edm":
        overrides.update({"diffusion.objective": "edm", "diffusion.beta_schedule": "scaled_linear"})
    model, cfg = make_video_model(**overrides)
    perturb_temporal(model)
    objective = HarivoObjective.for_model(cfg, model)
    latents, text = batch(2, 4)
    images, _ = batch(2, 3, seed=1)  # (B, C, N, H, W)
    image_text = torch.randn(2, 3, 77, 32, generator=torch.Generator().manual_seed(2))
    clip_only = objective(model, latents, text, torch.Generator().manual_seed(0))
    joint = objective(
        model, latents, text, torch.Generator().manual_seed(0), images=images, image_text=image_text
    )
    assert torch.allclose(joint.reg, clip_only.reg, atol=1e-6) and joint.reg > 0
    assert torch.allclose(joint.trs, clip_only.trs, atol=1e-6) and joint.trs > 0
    assert not torch.allclose(joint.simple, clip_only.simple)
    # Images alone (no clip term) still reach the spatial layers and nothing temporal.
    model.zero_grad()
    only_images = objective(model, images[:, :, :1], text, torch.Generator().manual_seed(0), image_mode=True)
    only_images.total.backward()
    assert all(p.grad is not None for n, p in model.unet.named_parameters() if n in model.spatial_names)
    assert all(p.grad is None for p in model.motion_adapter.parameters())
    with pytest.raises(ValueError, match="images and image_text go together"):
        objective(model, latents, text, images=images)


def test_seeded_step_is_reproducible(make_video_model):
    model, cfg = make_video_model(**{"loss.lambda_dc": 0.0})
    objective = HarivoObjective.for_model(cfg, model)
    a = objective(model, *batch(1, 4), generator=torch.Generator().manual_seed(3))
    b = objective(model, *batch(1, 4), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.total, b.total)
    assert objective.queue is None and a.dc == 0


def _config(**overrides):
    from pipeline.configlib import load_config
    from training.config import TrainConfig

    return load_config(TrainConfig, None, overrides)


def test_sd21_trains_on_uniform_timesteps_and_reads_the_base_prediction_type():
    """On SD's schedule the log-normal sigmas put ~8% of samples at t >= 500; uniform t puts half there."""
    from training.diffusion.edm import sigma_to_timestep

    sd = {"diffusion.objective": "edm", "diffusion.beta_schedule": "scaled_linear", "edm.kind": "sd21"}
    uniform = HarivoObjective(_config(**sd))
    lognormal = HarivoObjective(_config(**sd, **{"edm.sigma_sampling": "lognormal"}))
    assert uniform.cfg.edm.sigmas_from == "uniform_t"  # the default for sd21
    g = torch.Generator().manual_seed(0)
    t_u = sigma_to_timestep(uniform.training_sigmas(20_000, g, "cpu"), uniform.sigmas)
    t_l = sigma_to_timestep(lognormal.training_sigmas(20_000, g, "cpu"), lognormal.sigmas)
    assert abs((t_u >= 500).float().mean().item() - 0.5) < 0.02
    assert (t_l >= 500).float().mean().item() < 0.15
    assert uniform.denoiser(lambda *a: None).prediction_type == "epsilon"
    v = HarivoObjective(_config(**sd, **{"diffusion.prediction_type": "v_prediction"}))
    assert v.denoiser(lambda *a: None).prediction_type == "v_prediction"
    edm = {"diffusion.objective": "edm", "edm.kind": "edm", "model.trainable_spatial": ["*"]}
    assert HarivoObjective(_config(**edm)).cfg.edm.sigmas_from == "lognormal"


def test_noise_offset_adds_one_constant_per_sample_and_channel(make_video_model, monkeypatch):
    """diffusion.noise_offset: the training noise is the offset-free draw plus offset x N(0, 1) per (sample,
    channel), the same over frames and pixels; with 0 the noise is exactly the offset-free draw."""
    seen = []

    def run(offset):
        model, cfg = make_video_model(**{"diffusion.noise_offset": offset})
        objective = HarivoObjective.for_model(cfg, model)
        add_noise = objective.scheduler.add_noise

        def capture(latents, noise, t):
            seen.append(noise.clone())
            return add_noise(latents, noise, t)

        monkeypatch.setattr(objective.scheduler, "add_noise", capture)
        objective(model, *batch(4, 4), generator=torch.Generator().manual_seed(3))
        return seen[-1]

    plain, offset = run(0.0), run(0.5)
    diff = offset - plain  # (B, C, F, H, W)
    assert torch.allclose(diff, diff[:, :, :1, :1, :1].expand_as(diff), atol=1e-6)
    assert diff.abs().amin() > 0 and diff[:, :, 0, 0, 0].std() > 0.1


def test_trs_from_chunked_queries_and_keys_equals_the_whole_maps_through_the_model(
    make_video_model, perturb_temporal
):
    # The objective builds L_TRS from captured q/k a chunk at a time; through the tiny model its value and
    # its gradient on every trainable weight match L_TRS of the whole captured maps.
    from training.diffusion.losses import attention_frame_distances, frame_distances, trs_loss

    model, cfg = make_video_model()
    perturb_temporal(model)
    latents, text = batch(2, 4)
    with model.capture(attention_maps=True, hspace=False, attention_qk=True) as captured:
        model(latents, torch.tensor([200, 700]), text)
    assert len(captured.attention_qk) == len(captured.attention_maps) > 0
    whole = trs_loss([frame_distances(m) for m in captured.attention_maps])
    chunked = trs_loss(
        [
            attention_frame_distances(a.query, a.key, a.scale, a.upcast_softmax, 1, 2)
            for a in captured.attention_qk
        ]
    )
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-7)
    params = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith(TRAINABLE)]
    g_whole = torch.autograd.grad(whole, params, retain_graph=True, allow_unused=True)
    g_chunked = torch.autograd.grad(chunked, params, allow_unused=True)
    reached = 0
    for a, b in zip(g_chunked, g_whole):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
            reached += int(b.abs().sum() > 0)
    assert reached > 0


def test_reg_recompute_keeps_the_loss_and_gradients_without_the_image_paths_activations(
    make_video_model, perturb_temporal
):
    results = []
    for recompute in (False, True):
        model, cfg = make_video_model(
            **{"loss.reg_recompute": recompute, "loss.lambda_trs": 0.0, "loss.lambda_dc": 0.0}
        )
        perturb_temporal(model)
        objective = HarivoObjective.for_model(cfg, model)
        saved = []

        def pack(t, saved=saved):
            saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            terms = objective(model, *batch(2, 4), generator=torch.Generator().manual_seed(3))
        assert terms.reg > 0
        terms.total.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((terms.detached(), grads, sum(saved)))
    (t0, g0, bytes0), (t1, g1, bytes1) = results
    for k in t0:
        torch.testing.assert_close(t1[k], t0[k])
    assert g0.keys() == g1.keys() and any(n.startswith("mapping_network.") for n in g0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-7)
    # The video path's activations are kept either way; the image path's only without recompute.
    assert bytes1 < 0.7 * bytes0, (bytes1, bytes0)


def test_a_timestep_shift_moves_the_training_levels_to_more_noise():
    """Shift 3 (SD3's): half the timesteps above 0.75 T, against a quarter without, for 'ddpm' and sd21's levels."""
    from training.diffusion.edm import sigma_to_timestep

    g = torch.Generator().manual_seed(0)
    plain = HarivoObjective(_config()).training_levels(20_000, g, "cpu")
    shifted = HarivoObjective(_config(**{"diffusion.timestep_shift": 3.0})).training_levels(20_000, g, "cpu")
    assert abs((plain >= 750).float().mean().item() - 0.25) < 0.02
    assert abs((shifted >= 750).float().mean().item() - 0.5) < 0.02
    sd = {"diffusion.objective": "edm", "edm.kind": "sd21", "diffusion.timestep_shift": 3.0}
    edm = HarivoObjective(_config(**sd))
    t = sigma_to_timestep(edm.training_sigmas(20_000, g, "cpu"), edm.sigmas)
    assert abs((t >= 750).float().mean().item() - 0.5) < 0.02
    with pytest.raises(ValueError, match="timestep_shift"):
        _config(
            **{"diffusion.objective": "edm", "edm.kind": "sd21", "edm.sigma_sampling": "lognormal"}
            | {"diffusion.timestep_shift": 2.0}
        )
