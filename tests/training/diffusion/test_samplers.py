"""The reverse-process samplers against diffusers' schedulers and the closed-form Gaussian ODE."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from training.config import DiffusionConfig
from training.diffusion.jvid import p_video
from training.diffusion.samplers import (
    ddim_scheduler,
    ddim_step,
    ddpm_scheduler,
    ddpm_step,
    discrete_schedule,
    karras_sigmas,
    sample_euler,
    sample_heun,
    v_to_eps,
)

STEPS = 3
FAST = {"sampler.steps": STEPS, "output.device": "cpu"}


# ---- pure sampler math ------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_step_matches_diffusers(prediction_type, eta):
    cfg = DiffusionConfig(prediction_type=prediction_type)
    ref = ddim_scheduler(cfg)
    schedule = discrete_schedule(ddim_scheduler(cfg), 25)
    ref.set_timesteps(25)
    assert torch.equal(schedule.timesteps, ref.timesteps)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 5, 8, 8, generator=gen)
    for t, a_t, a_prev in schedule:
        pred = torch.randn(x.shape, generator=gen)
        noise = torch.randn(x.shape, generator=gen)
        want = ref.step(pred, t, x, eta=eta, variance_noise=noise if eta else None).prev_sample
        eps = v_to_eps(pred, x, a_t) if prediction_type == "v_prediction" else pred
        got = ddim_step(x, eps, a_t, a_prev, eta, noise)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        x = want


def test_ddpm_step_matches_diffusers():
    cfg = DiffusionConfig()
    ref = ddpm_scheduler(cfg)
    schedule = discrete_schedule(ddpm_scheduler(cfg), 50)
    ref.set_timesteps(50)
    assert isinstance(ref, DDPMScheduler) and ref.config.variance_type == "fixed_small"
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 5, 8, 8, generator=gen)
    for i, (t, a_t, a_prev) in enumerate(schedule):
        eps = torch.randn(x.shape, generator=gen)
        want = ref.step(eps, t, x, generator=torch.Generator().manual_seed(i)).prev_sample
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(i)) if t > 0 else None
        torch.testing.assert_close(ddpm_step(x, eps, a_t, a_prev, noise), want, rtol=1e-5, atol=1e-5)
        x = want


@pytest.mark.parametrize("sampler,order", [(sample_heun, 2), (sample_euler, 1)])
def test_edm_samplers_solve_the_gaussian_ode_at_their_order(sampler, order):
    # Data N(0, s^2): D(x; sigma) = x s^2 / (s^2 + sigma^2); the ODE solution is x(sigma) ~ sqrt(s^2 + sigma^2).
    s, x_t = 0.5, torch.full((2, 4, 2, 1, 1), 80.0, dtype=torch.float64)
    want = x_t * s / (s**2 + 80.0**2) ** 0.5

    def error(steps: int) -> float:
        sigmas = karras_sigmas(steps, 0.002, 80.0).double()
        out = sampler(lambda x, sigma, i: x * s**2 / (s**2 + sigma**2), x_t, sigmas)
        return float(((out - want) / want).abs().max())

    e1, e2 = error(40), error(80)
    assert e2 < e1 and e1 / e2 == pytest.approx(2**order, rel=0.25)  # global error O(h^order)
    assert error(160) < (1e-3 if order == 2 else 2e-2)
    sigmas = karras_sigmas(5, 0.002, 80.0)
    assert sigmas[0] == pytest.approx(80.0) and sigmas[-2] == pytest.approx(0.002) and sigmas[-1] == 0


def test_p_video_without_warmup_is_a_pure_image_schedule():
    assert p_video(0.0, 0.0, 0.0, 0.0, 0.0) == 0.0
    assert p_video(0.0, 0.0, 0.5, 0.2, 0.1) == 1.0  # continuous: the ramp starts at 1
