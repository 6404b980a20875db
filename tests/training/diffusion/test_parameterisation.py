"""Parameterisations and weightings of L_simple against their closed forms (issue 34): epsilon and v MSE as x0
errors, min-SNR-gamma as diffusers' training script writes it, zero terminal SNR as Lin et al.'s Algorithm 1, and a
v-prediction oracle through the DDIM sampler on a zero-terminal-SNR, trailing schedule."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.configlib import load_config
from training.config import TrainConfig
from training.diffusion.losses import min_snr_weight, prediction_weight, simple_loss
from training.diffusion.objective import HarivoObjective
from training.diffusion.samplers import (
    ddim_scheduler,
    discrete_schedule,
    prediction_to_x0,
    sample_ddim,
    v_to_eps,
)


def _cfg(**overrides) -> TrainConfig:
    return load_config(TrainConfig, None, overrides)


def _draw(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0, noise, pred = (torch.randn(6, 4, 3, 5, 5, generator=g) for _ in range(3))
    t = torch.tensor([0, 10, 200, 500, 900, 999])
    return x0, noise, pred, t


@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("weighting", ["default", "min_snr"])
def test_simple_loss_is_the_parameterisations_mse(prediction_type, weighting, zero_snr):
    """L_simple in x0 units with its weight equals the MSE diffusers' train_text_to_image.py computes: epsilon or
    v target (`scheduler.get_velocity`), optionally x min(SNR, gamma) / SNR (epsilon) or / (SNR + 1) (v)."""
    if zero_snr and prediction_type == "epsilon":
        pytest.skip("refused: epsilon is undefined at SNR 0 (tested below)")
    cfg = _cfg(
        **{
            "diffusion.prediction_type": prediction_type,
            "diffusion.loss_weighting": weighting,
            "diffusion.zero_terminal_snr": zero_snr,
            "diffusion.beta_schedule": "scaled_linear",
        }
    )
    objective = HarivoObjective(cfg)
    sched = objective.scheduler
    x0, noise, pred, t = _draw()
    x_t = sched.add_noise(x0, noise, t)
    a = sched.alphas_cumprod[t].reshape(-1, 1, 1, 1, 1)
    got = simple_loss(prediction_to_x0(pred, x_t, a, prediction_type), x0, objective.loss_weight(t))

    target = noise if prediction_type == "epsilon" else sched.get_velocity(x0, noise, t)
    per_sample = F.mse_loss(pred, target, reduction="none").flatten(1).mean(1)
    if weighting == "min_snr":  # diffusers' compute_snr and its weights
        snr = sched.alphas_cumprod[t] / (1 - sched.alphas_cumprod[t])
        w = torch.minimum(snr, torch.full_like(snr, 5.0))
        per_sample = per_sample * (w / snr if prediction_type == "epsilon" else w / (snr + 1))
    torch.testing.assert_close(got, per_sample.mean(), rtol=2e-4, atol=1e-6)


def test_weights_in_x0_units():
    snr = torch.tensor([0.0, 0.01, 1.0, 5.0, 100.0])
    assert torch.equal(prediction_weight(snr, "epsilon"), snr)
    assert torch.equal(prediction_weight(snr, "v_prediction"), snr + 1)
    assert torch.equal(min_snr_weight(snr, 5.0), torch.tensor([0.0, 0.01, 1.0, 5.0, 5.0]))


def test_zero_terminal_snr_is_lin_et_al_algorithm_1():
    """sqrt(abar) shifted so its last value is 0 and scaled so its first is unchanged (Lin et al. 2024, Alg. 1)."""
    plain = HarivoObjective(_cfg(**{"diffusion.beta_schedule": "scaled_linear"})).scheduler.alphas_cumprod
    zero = HarivoObjective(
        _cfg(
            **{
                "diffusion.beta_schedule": "scaled_linear",
                "diffusion.zero_terminal_snr": True,
                "diffusion.prediction_type": "v_prediction",
            }
        )
    ).scheduler.alphas_cumprod
    s = plain.double().sqrt()
    want = ((s - s[-1]) * s[0] / (s[0] - s[-1])) ** 2
    torch.testing.assert_close(zero.double(), want, rtol=1e-5, atol=1e-9)
    assert zero[-1] == 0 and abs(plain[-1].sqrt() - 0.068) < 1e-3  # SD's schedule keeps 6.8% of the signal
    with pytest.raises(ValueError, match="zero_terminal_snr=true needs .*v_prediction"):
        _cfg(**{"diffusion.zero_terminal_snr": True}).validate()
    with pytest.raises(ValueError, match="zero_terminal_snr=true needs"):
        _cfg(
            **{"diffusion.zero_terminal_snr": True, "diffusion.prediction_type": "v_prediction"},
            **{"diffusion.objective": "edm"},
        ).validate()


def test_v_prediction_oracle_samples_the_data_on_a_zero_terminal_snr_trailing_schedule():
    """A v-model that knows x0 exactly, sampled by DDIM from pure noise on a zero-terminal-SNR schedule with trailing
    timesteps (the first step at t = T - 1, abar = 0): every step lands on x0's trajectory, and the last at abar_0
    (SD pipelines' `set_alpha_to_one=False`): sqrt(abar_0) x0 + sqrt(1 - abar_0) eps."""
    cfg = _cfg(
        **{
            "diffusion.beta_schedule": "scaled_linear",
            "diffusion.zero_terminal_snr": True,
            "diffusion.prediction_type": "v_prediction",
        }
    ).diffusion
    schedule = discrete_schedule(ddim_scheduler(cfg, spacing="trailing", steps_offset=0), 10)
    assert int(schedule.timesteps[0]) == 999
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 4, 3, 6, 6, generator=g)
    x_t = torch.randn(1, 4, 3, 6, 6, generator=g)  # pure noise: at SNR 0 x_T holds nothing of x0

    def eps_fn(x, t, i):
        a = schedule.alpha_bar[i]
        eps = (x - a**0.5 * x0) / (1 - a) ** 0.5  # the noise that takes x0 to x
        v = a**0.5 * eps - (1 - a) ** 0.5 * x0
        torch.testing.assert_close(prediction_to_x0(v, x, a, "v_prediction"), x0, rtol=1e-4, atol=1e-4)
        seen.append(eps)
        return v_to_eps(v, x, a)  # as the sampling pipeline converts a v-model's output

    seen: list[torch.Tensor] = []
    out = sample_ddim(eps_fn, x_t, schedule)
    a_end = schedule.alpha_bar_prev[-1]
    torch.testing.assert_close(out, a_end**0.5 * x0 + (1 - a_end) ** 0.5 * seen[-1], rtol=1e-3, atol=1e-3)
    assert torch.isfinite(torch.stack(seen)).all()


def test_the_export_scheduler_carries_the_parameterisation_and_the_rescaled_betas():
    from training.model.export import training_scheduler

    cfg = _cfg(**{"diffusion.zero_terminal_snr": True, "diffusion.prediction_type": "v_prediction"}).diffusion
    s = training_scheduler(cfg, "trailing", 0)
    assert s.config.prediction_type == "v_prediction" and s.config.rescale_betas_zero_snr
    assert s.alphas_cumprod[-1] == 0


def test_term_grad_norms_are_each_weighted_terms_gradient(make_video_model):
    """grad_<term> is ||d(lambda_k L_k)/d theta|| over the trainable parameters: the same as backpropagating that term
    alone; terms that are off are not measured."""
    from fixtures.checkpoints import perturb_temporal
    from training.diffusion.losses import term_grad_norms

    model, cfg = make_video_model(**{"loss.lambda_dc": 0.0, "loss.lambda_trs": 0.5})
    perturb_temporal(model)
    objective = HarivoObjective.for_model(cfg, model)
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(0)
    latents, text = torch.randn(2, 4, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    terms = objective(model, latents, text, generator=torch.Generator().manual_seed(0))
    norms = term_grad_norms(terms, cfg.loss, params)
    assert set(norms) == {"grad_simple", "grad_reg", "grad_trs"}
    (0.5 * terms.trs).backward()
    want = torch.stack([p.grad.pow(2).sum() for p in params if p.grad is not None]).sum().sqrt()
    torch.testing.assert_close(norms["grad_trs"], want)
    assert norms["grad_simple"] > 0 and norms["grad_reg"] > 0
