"""Guidance during sampling: time-dependent CFG (HARIVO 4.1) and mitigating-gradient sampling.

Pure tensor functions; the sampler in `training.sample` calls them once per reverse step.
Layout everywhere: `(B, C, F, H, W)`.
"""

from __future__ import annotations

import math

import torch


def cfg_scale(progress: float, early: float = 12.5, late: float = 7.5, switch: float = 0.7) -> float:
    """HARIVO's time-dependent classifier-free guidance scale (App. D: 10-15 while t > 0.7T, then 7.5).

    `progress` is 1 - t/T of the step's timestep t (0 at pure noise; `VideoPipeline.progress`), so the
    switch is on the timestep, not on the fraction of steps taken: DDIM-25 gives 7 strong steps
    (t = 961 ... 721), not 8.
    """
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must be in [0, 1], got {progress}")
    return early if 1.0 - progress > switch else late  # t/T = 1 - progress


def drop_captions(
    text: torch.Tensor, empty: torch.Tensor, p: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Caption dropout for classifier-free guidance: each clip's text embedding (B, M, D) is replaced by the
    empty prompt's (1, M, D) with probability `p` (AnimateDiff 0.1, JVID 4.1 0.3), so the trained layers
    learn the unconditional branch CFG samples with. `p = 0` draws nothing from `generator`."""
    if p <= 0:
        return text
    device = generator.device if generator is not None else text.device
    drop = torch.rand(text.shape[0], generator=generator, device=device) < p  # (B,)
    return torch.where(drop.to(text.device)[:, None, None], empty.to(text.device, text.dtype), text)


MG_REFERENCE_ELEMENTS = 4 * 32 * 32
"""C x H x W of the latent frame HARIVO's alpha = 40 was set for (256 px through SD's VAE)."""


def mg_effective_scale(
    scale: float, frame_elements: int, reference_elements: int = MG_REFERENCE_ELEMENTS
) -> float:
    """Algorithm 1's alpha re-referenced to a latent frame of `frame_elements` = C x H x W (SPEC 10).

    The pull on D_j is alpha * 2 w exp(-||D_j||^2 / S) / S with S ~ ||D||^2 summed over the N elements of a frame,
    so for the same per-element differences it falls as 1 / N: alpha_eff = alpha * N / N_ref pulls as hard at any
    size as alpha does at N_ref. `reference_elements` 0: no re-reference (alpha as printed)."""
    return scale if reference_elements <= 0 else scale * frame_elements / reference_elements


def mg_guidance(
    eps: torch.Tensor,
    x_t: torch.Tensor,
    alpha_bar_t: float | torch.Tensor,
    scale: float,
    reference_elements: int = 0,
) -> torch.Tensor:
    """Mitigating-gradient sampling, HARIVO Algorithm 1 lines 2-5, for one reverse step.

    `eps` is the (already classifier-free-guided) noise prediction for `x_t`, both `(B, C, F, H, W)`;
    `alpha_bar_t` the cumulative alpha at this step; `scale` is Algorithm 1's alpha (HARIVO: 40), stated for
    latent frames of `reference_elements` = C x H x W (`mg_effective_scale`; 0: as printed, at any size).
    Returns the corrected eps. Frame 1 is unchanged; frame j > 1 is pulled towards frame j - 1 with
    weight `exp(-||D_j||^2 / S)`, so large jumps (outliers beyond the median difference) are pulled
    least and small flicker most.

    Reading of the pseudo-code: `norm(D, 2)` is the L2 norm of each frame difference D_j over
    (C, H, W) per video, `median()` is `torch.median` over the F - 1 differences (the lower median
    when F - 1 is even), S is per video.
    """
    if eps.shape != x_t.shape or eps.dim() != 5:
        raise ValueError(
            f"eps and x_t must both be (B, C, F, H, W); got {tuple(eps.shape)} and {tuple(x_t.shape)}"
        )
    num_frames = eps.shape[2]
    if num_frames < 3:
        raise ValueError(f"MG sampling needs at least 3 frames (S divides by log(F - 1)), got F={num_frames}")
    a = torch.as_tensor(alpha_bar_t, dtype=torch.float32, device=eps.device)
    x0 = (x_t.float() - (1 - a).sqrt() * eps.float()) / a.sqrt()  # line 2: predicted x0
    diff = x0[:, :, 1:] - x0[:, :, :-1]  # (B, C, F-1, H, W): D_j = x0^(j+1) - x0^(j)
    norms = diff.flatten(3).transpose(1, 2).flatten(2).norm(dim=-1)  # (B, F-1): ||D_j||_2 over (C, H, W)
    s = norms.median(dim=1).values.pow(2) / math.log(num_frames - 1)  # (B,): line 3
    s = s.clamp_min(torch.finfo(torch.float32).tiny)  # a frozen video has S = 0 and G = 0
    w = ((1 - a) / a).sqrt()
    weight = 2 * torch.exp(-norms.pow(2) / s[:, None]) / s[:, None] * w  # (B, F-1): line 4 scalar part
    grad = diff * weight[:, None, :, None, None]  # (B, C, F-1, H, W)
    grad = torch.cat([torch.zeros_like(grad[:, :, :1]), grad], dim=2)  # line 5: concat(0, G)
    scale = mg_effective_scale(scale, eps.shape[1] * eps.shape[3] * eps.shape[4], reference_elements)
    return (eps.float() + scale * grad).to(eps.dtype)
