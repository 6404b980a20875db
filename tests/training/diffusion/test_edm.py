"""EDM preconditioning: the three parameterisations against their formulas; SD 2.1-as-EDM == DDPM x0."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from training.diffusion.edm import Denoiser, ddpm_sigmas, edm_coefficients, loss_weight, sample_sigmas

SIGMAS = [0.002, 0.1, 0.5, 1.0, 3.0, 14.6, 80.0]


def linear_schedule() -> DDPMScheduler:
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear", num_train_timesteps=1000)


@pytest.mark.parametrize("sigma", SIGMAS)
def test_edm_kind(sigma):
    for sd in (0.5, 1.0):
        s_star = math.sqrt(sigma**2 + sd**2)
        want = (sd**2 / s_star**2, sigma * sd / s_star, 1 / s_star, math.log(sigma) / 4)
        got = edm_coefficients(torch.tensor(sigma, dtype=torch.float64), "edm", sigma_data=sd)
        assert [float(x) for x in got] == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("sigma", SIGMAS)
def test_modified_kind_eq_14_17(sigma):
    want = (
        1 / (sigma**2 + 1),
        -sigma / math.sqrt(sigma**2 + 1),
        1 / math.sqrt(sigma**2 + 1),
        0.25 * math.log(sigma),
    )
    got = edm_coefficients(torch.tensor(sigma, dtype=torch.float64), "modified")
    assert [float(x) for x in got] == pytest.approx(want, rel=1e-12)


def test_sd21_kind_eq_9_12():
    sigmas = ddpm_sigmas(linear_schedule().alphas_cumprod)
    assert torch.all(sigmas[1:] > sigmas[:-1])
    sigma = torch.tensor([float(sigmas[0]), float(sigmas[417]) * 1.001, 0.5, 200.0])
    c_skip, c_out, c_in, c_noise = edm_coefficients(sigma, "sd21", sigmas=sigmas)
    assert torch.equal(c_skip, torch.ones(4))
    assert torch.equal(c_out, -sigma)
    assert torch.allclose(c_in, 1 / (sigma**2 + 1).sqrt())
    nearest = (sigma[:, None] - sigmas[None, :]).abs().argmin(dim=1)
    assert c_noise.tolist() == nearest.float().tolist()
    assert c_noise[0] == 0 and c_noise[1] == 417 and c_noise[3] == 999
    with pytest.raises(ValueError, match="sigmas"):
        edm_coefficients(sigma, "sd21")
    with pytest.raises(ValueError, match="'karras'"):
        edm_coefficients(sigma, "karras")


def test_loss_weight_and_lognormal_sampler():
    sigma = torch.tensor([0.1, 1.0, 10.0])
    assert torch.allclose(loss_weight(sigma, 0.5), (sigma**2 + 0.25) / (sigma * 0.5) ** 2)
    log_sigma = sample_sigmas(200_000, -1.2, 1.2, torch.Generator().manual_seed(0)).log()
    assert abs(log_sigma.mean().item() + 1.2) < 0.01 and abs(log_sigma.std().item() - 1.2) < 0.01


@torch.no_grad()
def test_sd21_as_edm_matches_ddpm_x0(tiny_zoo):
    """Wrapping an epsilon UNet, D(x; sigma_t) is the DDPM x0 estimate at timestep t."""
    unet = UNet2DConditionModel.from_pretrained(tiny_zoo.sd, subfolder="unet").eval()
    scheduler = linear_schedule()
    abar = scheduler.alphas_cumprod
    sigmas = ddpm_sigmas(abar)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 8, 8, generator=g)
    noise = torch.randn(3, 4, 8, 8, generator=g)
    text = torch.randn(3, 77, 32, generator=g)
    timesteps = torch.tensor([5, 400, 999])
    x_t = scheduler.add_noise(x0, noise, timesteps)
    a = abar[timesteps].reshape(3, 1, 1, 1)
    eps = unet(x_t, timesteps, encoder_hidden_states=text).sample
    x0_ddpm = (x_t - (1 - a).sqrt() * eps) / a.sqrt()

    denoiser = Denoiser(
        lambda x, c_noise, **kw: unet(x, c_noise, encoder_hidden_states=text).sample, "sd21", sigmas=sigmas
    )
    x = x_t / a.sqrt()  # the same point in EDM's variance-exploding coordinates: x0 + sigma_t noise
    x0_edm = denoiser(x, sigmas[timesteps])
    assert (x0_edm - x0_ddpm).abs().max() <= 1e-4 * max(1.0, x0_ddpm.abs().max().item())


def test_modified_kind_is_v_prediction_in_edm_form():
    """Eq. 14-17 with F = v reproduce the v-prediction x0 = sqrt(abar) x_t - sqrt(1 - abar) v."""
    g = torch.Generator().manual_seed(1)
    abar = torch.tensor([0.9, 0.3, 0.01], dtype=torch.float64)
    x_t = torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64)
    v = torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64)
    a = abar.reshape(3, 1, 1, 1)
    sigma = ((1 - abar) / abar).sqrt()
    denoiser = Denoiser(lambda x, c_noise: v, "modified")
    assert torch.allclose(denoiser(x_t / a.sqrt(), sigma), a.sqrt() * x_t - (1 - a).sqrt() * v)


def test_sd21_reads_a_v_prediction_unet_exactly():
    """An oracle v-model (it returns the true v of x_t) read as EDM gives D(x; sigma) = x0: the v-coefficients
    c_skip = 1/(sigma^2+1), c_out = -sigma/sqrt(sigma^2+1); read as epsilon the same model is far off."""

    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    levels = ddpm_sigmas(torch.cumprod(1 - betas, 0))
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 2, 5, 5, generator=g, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    sigma = levels[torch.tensor([10, 400, 990])]  # on the discrete levels: c_noise is exact
    x = x0 + noise * sigma.reshape(-1, 1, 1, 1, 1)

    def oracle_v(x_in, c_noise):
        abar = 1 / (1 + levels[c_noise.long()] ** 2).reshape(-1, 1, 1, 1, 1)
        return abar.sqrt() * noise - (1 - abar).sqrt() * x0  # v = sqrt(abar) eps - sqrt(1 - abar) x0

    v_model = Denoiser(oracle_v, "sd21", sigmas=levels, prediction_type="v_prediction")
    assert (v_model(x, sigma) - x0).abs().max() < 1e-9
    as_eps = Denoiser(oracle_v, "sd21", sigmas=levels)
    assert (as_eps(x, sigma) - x0).abs().max() > 1.0
    c_skip, c_out, c_in, _ = edm_coefficients(sigma, "sd21", sigmas=levels, prediction_type="v_prediction")
    torch.testing.assert_close(c_skip, 1 / (sigma**2 + 1))
    torch.testing.assert_close(c_out, -sigma / (sigma**2 + 1).sqrt())
    torch.testing.assert_close(c_in, 1 / (sigma**2 + 1).sqrt())
