"""loss.temporal_off_every: steps that train the per-frame text with the temporal layers off (pilots.md D6d)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fixtures.checkpoints import tiny_train_config
from pipeline.configlib import load_config
from training.config import TrainConfig
from training.diffusion.objective import HarivoObjective
from training.distributed.worker import temporal_off

FRAME_TEXT = {"harivo.frame_text": "basis", "model.num_frames": 4}


def trained(model, perturb_temporal) -> None:
    """Temporal layers, mapping network and frame-text module as training leaves them (non-zero)."""
    perturb_temporal(model)
    for p in model.mapping_network.parameters():
        torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(3))
    torch.nn.init.normal_(
        model.frame_tokens.mlp[-1].weight, std=0.1, generator=torch.Generator().manual_seed(2)
    )


@torch.no_grad()
@pytest.mark.parametrize("text_conditioning", ["none", "cross_attention"])
def test_without_temporal_layers_each_frame_is_the_base_on_its_own_frame_text(
    make_video_model, perturb_temporal, text_conditioning
):
    model, _ = make_video_model(**FRAME_TEXT, **{"model.text_conditioning": text_conditioning})
    trained(model, perturb_temporal)
    g = torch.Generator().manual_seed(0)
    latents, t, text = (
        torch.randn(2, 4, 4, 8, 8, generator=g),
        torch.tensor([50, 700]),
        torch.randn(2, 77, 32, generator=g),
    )
    frame_text = text[:, None] + model.frame_tokens(text)  # (B, F, M, D): what each frame is asked for
    expected = torch.stack(
        [model.unet(latents[:, :, i], t, encoder_hidden_states=frame_text[:, i]).sample for i in range(4)], 2
    )  # the closed form: the frozen base per frame, with that frame's text
    out = model(latents, t, text, temporal=False)
    assert (out - expected).abs().max() <= 1e-5
    assert (model(latents, t, text) - expected).abs().max() > 1e-3  # the temporal layers do act
    image_mode = model(latents, t, text, image_mode=True)  # the mapping network on, the frame text off
    assert (image_mode - expected).abs().max() > 1e-3


def test_an_off_step_trains_the_frame_text_alone_with_l_simple(make_video_model, perturb_temporal):
    model, cfg = make_video_model(**FRAME_TEXT)
    trained(model, perturb_temporal)
    objective = HarivoObjective.for_model(cfg, model)
    g = torch.Generator().manual_seed(0)
    latents, text = torch.randn(2, 4, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    terms = objective(model, latents, text, torch.Generator().manual_seed(1), temporal=False)
    assert terms.trs == 0 and terms.reg == 0 and terms.dc == 0 and terms.simple > 0
    assert torch.equal(terms.total, terms.simple)
    terms.total.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(grads[n] is None for n in grads if n.startswith(("motion_adapter.", "mapping_network.")))
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith("frame_tokens."))
    # The same draws as a step with them on: only the model differs.
    on = objective(model, latents, text, torch.Generator().manual_seed(1))
    assert on.simple != terms.simple and on.trs > 0


def test_off_steps_are_every_kth_step_on_every_rank_and_need_frame_text(tiny_zoo):
    cfg = load_config(TrainConfig, None, {"model.pretrained": tiny_zoo.sd, "loss.temporal_off_every": 3})
    off = [s for s in range(9) if temporal_off(cfg, SimpleNamespace(step=s))]
    assert off == [2, 5, 8]  # the 3rd, 6th, 9th optimiser steps; a function of the step alone (rank, resume)
    never = load_config(TrainConfig, None, {"model.pretrained": tiny_zoo.sd})
    assert not any(temporal_off(never, SimpleNamespace(step=s)) for s in range(9))
    with pytest.raises(ValueError, match="temporal_off_every=2 .* needs harivo.frame_tokens=true"):
        load_config(
            TrainConfig,
            None,
            {"model.pretrained": tiny_zoo.sd, "loss.temporal_off_every": 2, "harivo.frame_tokens": False},
        )


@torch.no_grad()
def test_off_steps_draw_their_levels_with_their_own_shift(make_video_model, perturb_temporal):
    model, cfg = make_video_model(**FRAME_TEXT, **{"loss.temporal_off_shift": 30.0})
    trained(model, perturb_temporal)
    g = torch.Generator().manual_seed(0)
    latents, text = torch.randn(2, 4, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)

    def loss(cfg, temporal: bool) -> torch.Tensor:
        return HarivoObjective.for_model(cfg, model)(
            model, latents, text, torch.Generator().manual_seed(1), temporal=temporal
        ).simple

    plain = tiny_train_config(cfg.model.pretrained, **FRAME_TEXT)
    shifted = tiny_train_config(cfg.model.pretrained, **FRAME_TEXT, **{"diffusion.timestep_shift": 30.0})
    assert torch.equal(
        loss(cfg, False), loss(shifted, False)
    )  # the off step: as if the whole run were shifted
    assert torch.equal(loss(cfg, True), loss(plain, True))  # the other steps: unchanged
    assert not torch.equal(loss(cfg, False), loss(plain, False))
    levels = HarivoObjective(cfg).training_levels(20_000, torch.Generator().manual_seed(2), "cpu", shift=30.0)
    assert (levels >= 850).float().mean() > 0.8  # 84% at t >= 850 (P(t/T <= x) = x / (30 - 29 x))
    with pytest.raises(ValueError, match="loss.temporal_off_shift=3.0 shifts discrete timesteps"):
        load_config(
            TrainConfig,
            None,
            {
                "model.pretrained": cfg.model.pretrained,
                "loss.temporal_off_shift": 3.0,
                "diffusion.objective": "edm",
                "edm.sigma_sampling": "lognormal",
            },
        )


def test_the_off_steps_loss_is_reported_as_the_mean_of_those_steps(tiny_zoo):
    from training.distributed.progress import StepLogger

    cfg = load_config(TrainConfig, None, {"model.pretrained": tiny_zoo.sd, "loss.temporal_off_every": 2})
    logger = StepLogger(cfg, rank=1, tensorboard_dir=None, start_step=0)
    one = lambda v: torch.tensor(v)  # noqa: E731
    logger.add({"loss": one(1.0), "loss_simple": one(1.0)}, 2, 0.0, 1.0)
    logger.add({"loss": one(3.0), "loss_simple": one(3.0), "loss_temporal_off": one(3.0)}, 2, 0.0, 1.0)
    m = logger.metrics(2, 0, 1e-3, torch.device("cpu"))
    assert m["loss"] == 2.0 and m["loss_simple"] == 2.0 and m["loss_temporal_off"] == 3.0
