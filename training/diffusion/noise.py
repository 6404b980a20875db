"""Video noise priors (PYoCo eq. 3-4), for training noise and for the initial sampling noise.

All three draw `(B, C, F, H, W)` noise whose every frame is N(0, I); they differ in how frames
correlate:

- iid:          corr(eps^i, eps^j) = 0
- mixed:        corr(eps^i, eps^j) = a^2 / (1 + a^2)                 for every i != j
- progressive:  corr(eps^i, eps^j) = (a / sqrt(1 + a^2)) ** |i - j|

`alpha = 0` gives i.i.d. noise for every prior and `alpha = inf` one noise map shared by all frames.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

Prior = Literal["iid", "mixed", "progressive"]
PRIORS = ("iid", "mixed", "progressive")


def _shared_fraction(alpha: float) -> float:
    """a^2 / (1 + a^2): the variance share of the common part (1 at a = inf)."""
    if not alpha >= 0:  # also rejects nan
        raise ValueError(f"noise alpha must be >= 0 (inf allowed), got {alpha}")
    return 1.0 if math.isinf(alpha) else alpha**2 / (1.0 + alpha**2)


def mixed_noise(
    shape: tuple[int, int, int, int, int], alpha: float, generator: torch.Generator | None = None, **kw
) -> torch.Tensor:
    """PYoCo eq. 3: eps^i = eps_shared + eps_ind^i, variances a^2/(1+a^2) and 1/(1+a^2)."""
    b, c, f, h, w = shape
    shared_var = _shared_fraction(alpha)
    eps_shared = torch.randn((b, c, 1, h, w), generator=generator, **kw)  # (B, C, 1, H, W)
    eps_ind = torch.randn((b, c, f, h, w), generator=generator, **kw)  # (B, C, F, H, W)
    return math.sqrt(shared_var) * eps_shared + math.sqrt(1.0 - shared_var) * eps_ind


def progressive_noise(
    shape: tuple[int, int, int, int, int], alpha: float, generator: torch.Generator | None = None, **kw
) -> torch.Tensor:
    """PYoCo eq. 4: eps^0 ~ N(0, I), eps^i = a/sqrt(1+a^2) eps^(i-1) + eps_ind^i, eps_ind ~ N(0, I/(1+a^2))."""
    b, c, f, h, w = shape
    shared_var = _shared_fraction(alpha)
    decay = math.sqrt(shared_var)  # a / sqrt(1 + a^2)
    ind_std = math.sqrt(1.0 - shared_var)  # 1 / sqrt(1 + a^2)
    eps_ind = torch.randn((b, c, f, h, w), generator=generator, **kw)  # (B, C, F, H, W)
    frames = [eps_ind[:, :, 0]]  # eps^0 ~ N(0, I): (B, C, H, W)
    for i in range(1, f):
        frames.append(decay * frames[-1] + ind_std * eps_ind[:, :, i])
    return torch.stack(frames, dim=2)  # (B, C, F, H, W)


def video_noise(
    shape: tuple[int, ...] | torch.Size,
    prior: Prior = "iid",
    alpha: float = 0.0,
    generator: torch.Generator | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Standard-normal video noise of `shape` (B, C, F, H, W), correlated along F by `prior` (PYoCo eq. 3-4).

    `alpha` is PYoCo's a; it is ignored by `prior="iid"`. `device` defaults to the generator's.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 5:
        raise ValueError(f"video_noise shape must be (B, C, F, H, W), got {shape}")
    if device is None and generator is not None:
        device = generator.device
    kw = {"device": device, "dtype": dtype}
    if prior == "iid":
        _shared_fraction(alpha)  # validate anyway: a bad sweep value should fail loudly
        return torch.randn(shape, generator=generator, **kw)
    if prior == "mixed":
        return mixed_noise(shape, alpha, generator, **kw)
    if prior == "progressive":
        return progressive_noise(shape, alpha, generator, **kw)
    raise ValueError(f"noise prior must be one of {PRIORS}, got {prior!r}")


def shifted_timesteps(
    n: int, num_train_timesteps: int, shift: float, generator: torch.Generator | None, device
) -> torch.Tensor:
    """(n,) int64 training timesteps in [0, T-1], t / T = shift u / (1 + (shift - 1) u) with u ~ U(0, 1) (SD3's
    timestep shift; its inverse is u = t / (shift - (shift - 1) t), so P(t / T <= x) = x / (shift - (shift - 1) x)).
    shift 1 is t ~ U{0, T-1} exactly (the same draws as `torch.randint`); shift 3 puts the median at 0.75 T."""
    if shift == 1:
        return torch.randint(0, num_train_timesteps, (n,), generator=generator, device=device)
    u = torch.rand((n,), generator=generator, device=device)
    t = shift * u / (1 + (shift - 1) * u)  # in [0, 1)
    return (t * num_train_timesteps).long().clamp(max=num_train_timesteps - 1)
