"""JVID: mixing an image and a video denoiser during sampling (JVID 3.4-3.6, 4.3).

- `p_video`: the probability that the video model takes a reverse step;
- `choose_video_steps`: the seeded per-step choice;
- `entropy_reduced_noise`: DDPM noise with a shared component and a gamma scale (eq. 8-9), used on
  image-model steps;
- `smooth_latents`: temporal latent smoothing of the final latent video (3.6).
Layout: `(B, C, F, H, W)`.
"""

from __future__ import annotations

import torch


def p_video(progress: float, t_v: float, t_e: float, p_e: float, p_f: float) -> float:
    """Probability that the video model denoises at `progress` (1 - t/T: the fraction of the reverse process done).

    1 for the first `t_v` of the reverse process, linear 1 -> `p_e` until `t_e`, then linear
    `p_e` -> `p_f` until the end (P_V(t_v) = 1, P_V(t_e) = p_e). The paper's printed inequalities
    (`t >= t_v` -> 1) contradict its Table 6 (`t_v < t_e`); following SPEC we read `t` as the fraction
    of reverse steps done.
    """
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must be in [0, 1], got {progress}")
    if not 0.0 <= t_v <= t_e <= 1.0:
        raise ValueError(f"need 0 <= t_v <= t_e <= 1, got t_v={t_v}, t_e={t_e}")
    for name, p in (("p_e", p_e), ("p_f", p_f)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be a probability, got {p}")
    # Strict inequalities: each piece is continuous at its breakpoints, and t_v = t_e = 0 means no
    # video-only warm-up at all (P_V(0) = p_e), so p_e = p_f = 0 is a pure image-model schedule.
    if progress < t_v:
        return 1.0
    if progress < t_e:
        return 1.0 + (p_e - 1.0) * (progress - t_v) / (t_e - t_v)
    if t_e >= 1.0:
        return p_e
    return p_e + (p_f - p_e) * (progress - t_e) / (1.0 - t_e)


def choose_video_steps(
    progress: list[float], t_v: float, t_e: float, p_e: float, p_f: float, seed: int
) -> list[bool]:
    """Seeded per-step choice: True where the video model takes reverse step i, at `progress[i]` (1 - t/T of
    the step's noise level, the clock CFG's schedule uses too: `VideoPipeline.progress`)."""
    gen = torch.Generator().manual_seed(seed)
    draws = torch.rand(len(progress), generator=gen).tolist()
    return [u < p_video(p, t_v, t_e, p_e, p_f) for p, u in zip(progress, draws)]


def entropy_reduced_noise(
    shape: tuple[int, ...],
    r: float,
    gamma: float,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """JVID eq. 8-9: `gamma * (z_shared + z_ind^f)`, `z_shared ~ N(0, r I)`, `z_ind ~ N(0, (1-r) I)`.

    Used as the DDPM step noise on image-model steps; `r = 0, gamma = 1` is ordinary i.i.d. noise.
    `shape` is `(B, C, F, H, W)`; the shared part is the same for every frame.
    """
    if not 0.0 <= r <= 1.0:
        raise ValueError(f"r must be in [0, 1], got {r}")
    b, c, f, h, w = shape
    shared = torch.randn((b, c, 1, h, w), generator=generator, device=device) * r**0.5
    ind = torch.randn((b, c, f, h, w), generator=generator, device=device) * (1 - r) ** 0.5
    return gamma * (shared + ind)


def smooth_latents(latents: torch.Tensor, threshold: float) -> torch.Tensor:
    """JVID temporal latent smoothing on a final latent video `(B, C, F, H, W)`.

    `mu[c,h,w]` = mean over frames; `sigma[c]` = std of `mu` over (h, w) (population std);
    score `(f,h,w) = sum_c |v - mu| / sigma[c]`; where score < `threshold` (JVID: 2) every channel at
    (f, h, w) is replaced by `mu`. Static regions are flattened to their mean; moving ones are kept.
    """
    if latents.dim() != 5:
        raise ValueError(f"latents must be (B, C, F, H, W), got {tuple(latents.shape)}")
    x = latents.float()
    mu = x.mean(dim=2, keepdim=True)  # (B, C, 1, H, W)
    sigma = mu.flatten(3).std(dim=-1, unbiased=False)  # (B, C, 1)
    sigma = sigma.clamp_min(torch.finfo(torch.float32).eps)[..., None, None]  # (B, C, 1, 1, 1)
    score = ((x - mu).abs() / sigma).sum(dim=1, keepdim=True)  # (B, 1, F, H, W)
    out = torch.where(score < threshold, mu.expand_as(x), x)
    return out.to(latents.dtype)
