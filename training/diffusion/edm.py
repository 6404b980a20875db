"""EDM preconditioning (Karras et al. 2022; PYoCo sec. 3; seed 000 eq. 8-17), k-diffusion style.

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma))        (eq. 8)

with `x = x0 + sigma n` (variance-exploding). The network F knows nothing about sigma beyond
`c_noise`; `Denoiser` owns the preconditioning. Three parameterisations:

- 'edm':      Karras et al. (PYoCo, sigma_data = 0.5), F predicts a scaled x0/noise mix.
- 'sd21':     a DDPM epsilon-UNet (SD 1.5 / 2.1-base) read as EDM (eq. 9-12): F = eps, c_noise = the
              discrete timestep whose sigma is nearest.
- 'modified': eq. 14-17 (sigma_data = 1, continuous c_noise): F = v-prediction in EDM form.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

Kind = Literal["edm", "sd21", "modified"]
KINDS = ("edm", "sd21", "modified")
PredictionType = Literal["epsilon", "v_prediction"]
PREDICTION_TYPES = ("epsilon", "v_prediction")


def ddpm_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """EDM noise level of each DDPM timestep: sigma_t = sqrt((1 - abar_t) / abar_t), increasing in t."""
    return ((1.0 - alphas_cumprod) / alphas_cumprod).sqrt()


def sigma_to_timestep(sigma: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """argmin_j |sigma - sigma_j| (eq. 12): the discrete timestep nearest to each sigma, as int64."""
    sigmas = sigmas.to(device=sigma.device, dtype=torch.float64)
    dist = (sigma.double().reshape(-1, 1) - sigmas.reshape(1, -1)).abs()  # (N, T)
    return dist.argmin(dim=1).reshape(sigma.shape)


def edm_coefficients(
    sigma: torch.Tensor | float,
    kind: Kind = "edm",
    sigma_data: float = 0.5,
    sigmas: torch.Tensor | None = None,
    prediction_type: PredictionType = "epsilon",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(c_skip, c_out, c_in, c_noise) of eq. 8 for noise level(s) `sigma`, each shaped like `sigma`.

    `sigma_data` is used by kind 'edm' only ('modified' fixes it at 1, 'sd21' has none). `sigmas` are
    the discrete DDPM levels (`ddpm_sigmas`) that kind 'sd21' needs for c_noise. `prediction_type`
    ('sd21' only) is what the discrete UNet predicts: 'epsilon' (eq. 9-12) or 'v_prediction', for which
    x_t = x / sqrt(sigma^2 + 1), eps = sqrt(abar) v + sqrt(1 - abar) x_t and D = x - sigma eps give
    c_skip = 1 / (sigma^2 + 1) and c_out = -sigma / sqrt(sigma^2 + 1) (the 'modified' coefficients).
    """
    sigma = torch.as_tensor(sigma, dtype=torch.get_default_dtype()) if not torch.is_tensor(sigma) else sigma
    if kind == "edm":
        # PYoCo's formula below eq. 1 / EDM Table 1.
        if sigma_data <= 0:
            raise ValueError(f"sigma_data must be positive, got {sigma_data}")
        s_star = (sigma**2 + sigma_data**2).sqrt()
        c_skip = sigma_data**2 / s_star**2
        c_out = sigma * sigma_data / s_star
        c_in = 1.0 / s_star
        c_noise = sigma.log() / 4
    elif kind == "sd21":
        # Seed 000 eq. 9-12.
        if sigmas is None:
            raise ValueError("edm_coefficients(kind='sd21') needs `sigmas`, the discrete DDPM noise levels")
        if prediction_type == "epsilon":
            c_skip = torch.ones_like(sigma)
            c_out = -sigma
        elif prediction_type == "v_prediction":
            c_skip = 1.0 / (sigma**2 + 1)
            c_out = -sigma / (sigma**2 + 1).sqrt()
        else:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        c_in = 1.0 / (sigma**2 + 1).sqrt()
        c_noise = sigma_to_timestep(sigma, sigmas).to(sigma.dtype)
    elif kind == "modified":
        # Seed 000 eq. 14-17.
        c_skip = 1.0 / (sigma**2 + 1)
        c_out = -sigma / (sigma**2 + 1).sqrt()
        c_in = 1.0 / (sigma**2 + 1).sqrt()
        c_noise = 0.25 * sigma.log()
    else:
        raise ValueError(f"EDM kind must be one of {KINDS}, got {kind!r}")
    return c_skip, c_out, c_in, c_noise


def effective_sigma_data(kind: Kind, sigma_data: float) -> float:
    """sigma_data the loss weight uses: the configured one for 'edm', 1 for 'sd21' and 'modified' (eq. 14-17)."""
    return sigma_data if kind == "edm" else 1.0


def loss_weight(sigma: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 (PYoCo eq. 1, EDM)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def sample_sigmas(
    n: int,
    p_mean: float = -1.2,
    p_std: float = 1.2,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """ln(sigma) ~ N(p_mean, p_std^2) (EDM / PYoCo training distribution); shape (n,)."""
    return (p_mean + p_std * torch.randn((n,), generator=generator, device=device)).exp()


def append_dims(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """Trailing singleton dims so a per-sample (B,) tensor broadcasts against a (B, ...) tensor."""
    if x.ndim > ndim:
        raise ValueError(f"cannot broadcast a {x.ndim}-d tensor to {ndim} dims")
    return x.reshape(x.shape + (1,) * (ndim - x.ndim))


class Denoiser(nn.Module):
    """D(x; sigma) around any network F(x_in, c_noise, **kwargs) (eq. 8); owns the preconditioning.

    `inner_model(x_in, c_noise, **kwargs)` gets the scaled input and the per-sample (B,) noise
    conditioning. Inputs are `x = x0 + sigma n` with sigma of shape (B,).
    """

    def __init__(
        self,
        inner_model: Callable[..., torch.Tensor],
        kind: Kind = "edm",
        sigma_data: float = 0.5,
        sigmas: torch.Tensor | None = None,
        prediction_type: PredictionType = "epsilon",
    ):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"EDM kind must be one of {KINDS}, got {kind!r}")
        if kind == "sd21" and sigmas is None:
            raise ValueError("Denoiser(kind='sd21') needs `sigmas`, the discrete DDPM noise levels")
        self.inner_model = inner_model
        self.kind = kind
        self.sigma_data = sigma_data
        self.prediction_type = prediction_type
        self.register_buffer("sigmas", sigmas if sigmas is not None else torch.empty(0), persistent=False)

    def coefficients(
        self, sigma: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        sigmas = self.sigmas if self.kind == "sd21" else None
        return edm_coefficients(sigma, self.kind, self.sigma_data, sigmas, self.prediction_type)

    def forward(
        self, x: torch.Tensor, sigma: torch.Tensor, return_model_pred: bool = False, **kwargs: Any
    ) -> Any:
        """D(x; sigma); with `return_model_pred` also F's raw output (what L_reg compares)."""
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        model_pred = self.inner_model(x * append_dims(c_in, x.ndim), c_noise, **kwargs)
        denoised = x * append_dims(c_skip, x.ndim) + model_pred * append_dims(c_out, x.ndim)
        return (denoised, model_pred) if return_model_pred else denoised
