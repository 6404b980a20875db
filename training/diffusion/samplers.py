"""Reverse-process samplers sharing one signature (k-diffusion style), plus their single steps.

    sampler(model_fn, x, schedule, step_noise, **options) -> x_0

- `model_fn(x, level, i)`: the guided prediction at reverse step `i` (0 at pure noise): for the
  discrete samplers `level` is the timestep and the result is eps; for the EDM samplers `level` is
  sigma and the result is the denoised D(x; sigma). CFG, MG and JVID's model choice live in it.
- `schedule`: `DiscreteSchedule` (timesteps with their cumulative alphas) or a sigma tensor ending in 0.
- `step_noise(i)`: the standard-normal noise injected at step `i` (JVID swaps in entropy-reduced
  noise on image-model steps), drawn only when a step injects noise.

DDIM and DDPM take the noise schedule the model was trained with from diffusers' schedulers;
`ddim_step` / `ddpm_step` write the updates out and agree with `DDIMScheduler.step` /
`DDPMScheduler.step` on the same inputs (tested). Layout: `(B, C, F, H, W)`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from training.config import DiffusionConfig
from training.model.export import schedule_kwargs, training_scheduler

ModelFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
StepNoise = Callable[[int], torch.Tensor]


@dataclass
class DiscreteSchedule:
    """The reverse steps of a discrete sampler: timestep t_i, abar(t_i) and abar of the step it lands on."""

    timesteps: torch.Tensor
    """(N,) int64, decreasing."""
    alpha_bar: torch.Tensor
    """(N,) float32: abar_t at each step."""
    alpha_bar_prev: torch.Tensor
    """(N,) float32: abar of the previous (less noisy) timestep; the scheduler's final value after the last."""
    num_train_timesteps: int

    def __len__(self) -> int:
        return len(self.timesteps)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return iter(zip(self.timesteps, self.alpha_bar, self.alpha_bar_prev))


SCHEDULE_FIELDS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")
"""What fixes a model's discrete noise levels (diffusers scheduler config keys = DiffusionConfig fields)."""


def base_scheduler_config(pretrained: str, revision: str | None = None) -> dict | None:
    """The `scheduler/scheduler_config.json` of a diffusers SD directory or hub id (None: it has none, or a
    hub id that cannot be reached)."""
    path = Path(pretrained).expanduser() / "scheduler" / "scheduler_config.json"
    if path.is_file():
        return json.loads(path.read_text())
    if Path(pretrained).expanduser().exists():
        return None
    try:
        return dict(DDPMScheduler.load_config(pretrained, subfolder="scheduler", revision=revision))
    except (OSError, ValueError):
        return None


def schedule_mismatch(cfg: DiffusionConfig, scheduler_config: dict) -> dict[str, tuple]:
    """{field: (configured, the other model's)} for every schedule field that differs (empty: the same levels)."""
    ours = {k: getattr(cfg, k) for k in SCHEDULE_FIELDS}
    ours["rescale_betas_zero_snr"] = cfg.zero_terminal_snr
    theirs = {
        **scheduler_config,
        "rescale_betas_zero_snr": scheduler_config.get("rescale_betas_zero_snr", False),
    }
    return {k: (v, theirs.get(k)) for k, v in ours.items() if theirs.get(k) != v}


def ddim_scheduler(cfg: DiffusionConfig, spacing: str = "leading", steps_offset: int = 1) -> DDIMScheduler:
    """diffusers DDIM with the model's training schedule (SD pipelines: set_alpha_to_one=False)."""
    return training_scheduler(cfg, spacing, steps_offset)


def ddpm_scheduler(cfg: DiffusionConfig, spacing: str = "leading", steps_offset: int = 1) -> DDPMScheduler:
    """diffusers DDPM with the model's training schedule and the posterior variance ('fixed_small')."""
    return DDPMScheduler(**schedule_kwargs(cfg, spacing, steps_offset), variance_type="fixed_small")


def discrete_schedule(scheduler: DDIMScheduler | DDPMScheduler, steps: int) -> DiscreteSchedule:
    """The (t, abar_t, abar_prev) of each reverse step, exactly as the diffusers scheduler's `step` uses them."""
    scheduler.set_timesteps(steps)
    ts = scheduler.timesteps.to(torch.int64)
    ab = scheduler.alphas_cumprod
    if isinstance(scheduler, DDIMScheduler):
        prev = ts - scheduler.config.num_train_timesteps // steps  # DDIMScheduler.step
        final = scheduler.final_alpha_cumprod
    else:
        prev = torch.cat([ts[1:], ts.new_tensor([-1])])  # DDPMScheduler.previous_timestep
        final = torch.tensor(1.0)
    a_prev = torch.stack([ab[p] if p >= 0 else final for p in prev.tolist()])
    # Zero terminal SNR (abar_T = 0): the first trailing step gets 2^-24, as diffusers' Euler scheduler does, so
    # eps and x0 stay finite; a v-prediction model's x0 there is -v to within 2^-12.
    return DiscreteSchedule(
        ts, ab[ts].clamp_min(ZERO_SNR_ALPHA_BAR), a_prev, scheduler.config.num_train_timesteps
    )


ZERO_SNR_ALPHA_BAR = 2.0**-24
"""abar that stands for 0 at the last timestep of a zero-terminal-SNR schedule when sampling."""


def prediction_to_x0(
    pred: torch.Tensor, x: torch.Tensor, a_t: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """x0 from a discrete UNet's output at x_t = sqrt(abar) x0 + sqrt(1 - abar) eps: epsilon (DDPM eq. 15, undefined
    at abar = 0) or v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022: x0 = sqrt(abar) x_t - sqrt(1 - abar) v,
    defined at every abar). `a_t` broadcasts against `x`."""
    if prediction_type == "epsilon":
        return predicted_x0(x, pred, a_t)
    if prediction_type == "v_prediction":
        return a_t**0.5 * x - (1 - a_t) ** 0.5 * pred
    raise ValueError(f"prediction_type must be epsilon or v_prediction, got {prediction_type!r}")


def predicted_x0(x: torch.Tensor, eps: torch.Tensor, a_t: torch.Tensor) -> torch.Tensor:
    """x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) (DDPM eq. 15)."""
    return (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5


def v_to_eps(v: torch.Tensor, x: torch.Tensor, a_t: torch.Tensor) -> torch.Tensor:
    """eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t for a v-prediction model (Salimans & Ho 2022)."""
    return a_t**0.5 * v + (1 - a_t) ** 0.5 * x


def ddim_step(
    x: torch.Tensor,
    eps: torch.Tensor,
    a_t: torch.Tensor,
    a_prev: torch.Tensor,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """z_{t-1} = sqrt(a_{t-1}) (z_t - sqrt(1-a_t) eps) / sqrt(a_t) + sqrt(1-a_{t-1}-s^2) eps + s z (seed 000 eq. 4).

    `s = eta sqrt((1-a_{t-1})/(1-a_t) (1 - a_t/a_{t-1}))` (Song et al. eq. 16); eta = 0 is deterministic DDIM.
    """
    x0 = predicted_x0(x, eps, a_t)
    std = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
    out = a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * eps
    if eta > 0:
        if noise is None:
            raise ValueError("ddim_step with eta > 0 needs noise")
        out = out + std * noise
    return out


def ddpm_step(
    x: torch.Tensor, eps: torch.Tensor, a_t: torch.Tensor, a_prev: torch.Tensor, noise: torch.Tensor | None
) -> torch.Tensor:
    """Ancestral step from the posterior q(x_{t'} | x_t, x0) with variance beta~ (DDPM eq. 6-7; JVID eq. 5).

    With skipped timesteps the per-step beta is `1 - abar_t / abar_t'`. `noise` is z (JVID: on image
    steps `gamma (z_shared + z_ind)`); None adds none.
    """
    beta_prod_t, beta_prod_prev = 1 - a_t, 1 - a_prev
    alpha_step = a_t / a_prev
    beta_step = 1 - alpha_step
    x0 = predicted_x0(x, eps, a_t)
    mean = (a_prev**0.5 * beta_step) / beta_prod_t * x0 + alpha_step**0.5 * beta_prod_prev / beta_prod_t * x
    if noise is None:
        return mean
    variance = torch.clamp(beta_prod_prev / beta_prod_t * beta_step, min=1e-20)
    return mean + variance**0.5 * noise


@torch.no_grad()
def sample_ddim(
    model_fn: ModelFn,
    x: torch.Tensor,
    schedule: DiscreteSchedule,
    step_noise: StepNoise | None = None,
    eta: float = 0.0,
) -> torch.Tensor:
    """DDIM (HARIVO: 25 steps, eta 0) from x_T to x_0."""
    for i, (t, a_t, a_prev) in enumerate(schedule):
        eps = model_fn(x, t, i)
        noise = step_noise(i) if eta > 0 and step_noise is not None else None
        x = ddim_step(x, eps, a_t.to(x.device), a_prev.to(x.device), eta, noise)
    return x


@torch.no_grad()
def sample_ddpm(
    model_fn: ModelFn, x: torch.Tensor, schedule: DiscreteSchedule, step_noise: StepNoise | None = None
) -> torch.Tensor:
    """Ancestral DDPM (JVID: 50 steps); noise at every step with t > 0, as diffusers' DDPMScheduler."""
    for i, (t, a_t, a_prev) in enumerate(schedule):
        eps = model_fn(x, t, i)
        noise = step_noise(i) if int(t) > 0 and step_noise is not None else None
        x = ddpm_step(x, eps, a_t.to(x.device), a_prev.to(x.device), noise)
    return x


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """EDM's sigma_i = (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho, then 0 (Karras eq. 5)."""
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min={sigma_min} < sigma_max={sigma_max}")
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()  # (N + 1,)


@torch.no_grad()
def _sample_edm(
    model_fn: ModelFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    step_noise: StepNoise | None,
    heun: bool,
    s_churn: float,
    s_tmin: float,
    s_tmax: float,
    s_noise: float,
) -> torch.Tensor:
    """Karras et al. Algorithm 2 (churn > 0) / the deterministic ODE (churn = 0); x starts at sigma_0 scale."""
    n = len(sigmas) - 1
    for i in range(n):
        sigma, sigma_next = sigmas[i].to(x.device), sigmas[i + 1].to(x.device)
        gamma = min(s_churn / n, math.sqrt(2) - 1) if s_tmin <= float(sigma) <= s_tmax else 0.0
        sigma_hat = sigma * (gamma + 1)
        if gamma > 0:
            if step_noise is None:
                raise ValueError("EDM churn needs step_noise")
            x = x + step_noise(i) * s_noise * (sigma_hat**2 - sigma**2) ** 0.5
        d = (x - model_fn(x, sigma_hat, i)) / sigma_hat  # dx/dsigma of the probability-flow ODE
        dt = sigma_next - sigma_hat
        if heun and float(sigma_next) > 0:
            x_next = x + d * dt
            d_next = (x_next - model_fn(x_next, sigma_next, i)) / sigma_next
            x = x + (d + d_next) / 2 * dt  # Heun's 2nd-order correction
        else:
            x = x + d * dt  # Euler (always the last step to sigma = 0)
    return x


def sample_euler(
    model_fn: ModelFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    step_noise: StepNoise | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
) -> torch.Tensor:
    """EDM Euler (Karras et al. 2022, Alg. 2 without the 2nd-order step)."""
    return _sample_edm(model_fn, x, sigmas, step_noise, False, s_churn, s_tmin, s_tmax, s_noise)


def sample_heun(
    model_fn: ModelFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    step_noise: StepNoise | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
) -> torch.Tensor:
    """EDM Heun (Karras et al. 2022, Alg. 1/2)."""
    return _sample_edm(model_fn, x, sigmas, step_noise, True, s_churn, s_tmin, s_tmax, s_noise)
