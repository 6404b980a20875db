"""PYoCo's cascade (sec. 4, Fig. 3): base -> temporal interpolation -> latent super-resolution x2.

Every stage is the same video model; the upsampling stages see their conditioning by channel
concatenation (survey 2.1/4.1), which `VideoUNet` implements as zero-initialised extra input channels
of `conv_in` (a separate conv whose output is added to the frozen one: the same as widening `conv_in`
with zero columns), so a stage starts as the pretrained model.

- interp: `cat([latents * mask, mask])`, the keyframe latents at their positions (every
  `keyframe_stride`-th frame, first and last included) and a 0/1 mask channel: C + 1 channels.
  PYoCo: 16 keyframes with frame skip 5 -> 76 frames.
- sr: the low-resolution latents upsampled x`scale`, noise-augmented (`+ sigma_aug n`) with their level
  `sigma_aug` fed to the model (an embedding added to the timestep embedding): C channels.

Layout: `(B, C, F, H, W)` everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from training.config import CascadeConfig
from training.model.frames import fold_frames, unfold_frames

STAGES = ("base", "interp", "sr")


def stage_kind(stage: str) -> str:
    """Export kind of a cascade stage (recorded as t2v.kind; checked when the cascade is loaded)."""
    if stage not in STAGES:
        raise ValueError(f"cascade stage must be one of {STAGES}, got {stage!r}")
    return f"pyoco_{stage}"


@dataclass
class StageCondition:
    """What a conditioned stage samples with (training builds the same from the data)."""

    cond: torch.Tensor
    """(B, C_cond, F, h, w) concatenated to the input (interp: keyframes + mask; sr: upsampled latents)."""
    level: torch.Tensor | None = None
    """(B,) the augmentation sigma of `cond` (SR; interp trained with cascade.interp_aug_sigma_max > 0)."""
    known: torch.Tensor | None = None
    """(B, C, F, h, w) interp: latents whose frames in `known_mask` are given (the keyframes)."""
    known_mask: torch.Tensor | None = None
    """(F,) bool: the frames of `known` to keep."""


# ---- temporal interpolation ------------------------------------------------------------------------


def interp_num_frames(num_keyframes: int, keyframe_stride: int) -> int:
    """Frames after interpolation: (K - 1) * stride + 1 (PYoCo: 16 keyframes, stride 5 -> 76)."""
    if num_keyframes < 1 or keyframe_stride < 1:
        raise ValueError(
            f"need num_keyframes={num_keyframes} >= 1 and keyframe_stride={keyframe_stride} >= 1"
        )
    return (num_keyframes - 1) * keyframe_stride + 1


def keyframe_indices(num_frames: int, keyframe_stride: int) -> list[int]:
    """Positions of the keyframes among the interpolated frames: 0, stride, ..., num_frames - 1."""
    if keyframe_stride < 1 or (num_frames - 1) % keyframe_stride:
        raise ValueError(
            f"num_frames={num_frames} is not (keyframes - 1) x keyframe_stride={keyframe_stride} + 1"
        )
    return list(range(0, num_frames, keyframe_stride))


def keyframe_mask(
    num_frames: int, keyframe_stride: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """(F,) bool, True at the keyframe positions."""
    mask = torch.zeros(num_frames, dtype=torch.bool, device=device)
    mask[keyframe_indices(num_frames, keyframe_stride)] = True
    return mask


def place_keyframes(keyframes: torch.Tensor, keyframe_stride: int) -> torch.Tensor:
    """Keyframes (B, C, K, H, W) at their positions of a zero video (B, C, (K-1) stride + 1, H, W)."""
    b, c, k, h, w = keyframes.shape
    video = keyframes.new_zeros(b, c, interp_num_frames(k, keyframe_stride), h, w)
    video[:, :, ::keyframe_stride] = keyframes
    return video


def keyframe_condition(latents: torch.Tensor, keyframe_stride: int) -> torch.Tensor:
    """Interpolation conditioning (B, C + 1, F, H, W): masked keyframe latents, then the mask channel.

    `latents` (B, C, F, H, W) may hold anything between the keyframes (training: the real frames;
    sampling: `place_keyframes`); only the keyframe positions are kept.
    """
    b, _, f, h, w = latents.shape
    mask = keyframe_mask(f, keyframe_stride, latents.device).to(latents.dtype)  # (F,)
    mask = mask.reshape(1, 1, f, 1, 1).expand(b, 1, f, h, w)  # (B, 1, F, H, W)
    return torch.cat([latents * mask, mask], dim=1)


def interp_stage_condition(
    keyframes: torch.Tensor,
    keyframe_stride: int,
    sigma_aug: float | None = None,
    generator: torch.Generator | None = None,
) -> StageCondition:
    """Sampling conditioning of the interpolation stage from the base's keyframes (B, C, K, h, w).

    `sigma_aug` (a stage trained with cascade.interp_aug_sigma_max > 0): the conditioning keyframes are
    noise-augmented at that level, which the model is told; the keyframes kept exactly stay clean."""
    video = place_keyframes(keyframes, keyframe_stride)  # (B, C, F, h, w)
    mask = keyframe_mask(video.shape[2], keyframe_stride, video.device)  # (F,)
    if sigma_aug is None:
        return StageCondition(keyframe_condition(video, keyframe_stride), known=video, known_mask=mask)
    level = torch.full((video.shape[0],), float(sigma_aug), device=video.device)  # (B,)
    cond = keyframe_condition(augment_condition(video, level, generator), keyframe_stride)
    return StageCondition(cond, level=level, known=video, known_mask=mask)


# ---- super-resolution ------------------------------------------------------------------------------


def upsample_latents(latents: torch.Tensor, scale: int, mode: str = "bilinear") -> torch.Tensor:
    """(B, C, F, h, w) -> (B, C, F, scale h, scale w), frame by frame."""
    b, c, f, h, w = latents.shape
    frames = fold_frames(latents)  # (B F, C, h, w)
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    up = F.interpolate(frames.float(), scale_factor=scale, mode=mode, **kwargs).to(latents.dtype)
    return unfold_frames(up, f)  # (B, C, F, sh, sw)


def augment_condition(
    cond: torch.Tensor, sigma_aug: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Noise augmentation of the conditioning: cond + sigma_aug n, n ~ N(0, I) (cascaded diffusion)."""
    noise = torch.randn(
        cond.shape, generator=generator, device=generator.device if generator else cond.device
    )
    return cond + noise.to(cond.device, cond.dtype) * sigma_aug.to(cond.dtype).reshape(-1, 1, 1, 1, 1)


def sr_condition(
    low_res: torch.Tensor,
    sigma_aug: torch.Tensor,
    scale: int,
    mode: str = "bilinear",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """SR conditioning (B, C, F, scale h, scale w): low-resolution latents upsampled, then noise-augmented."""
    return augment_condition(upsample_latents(low_res, scale, mode), sigma_aug, generator)


def sr_stage_condition(
    low_res: torch.Tensor,
    sigma_aug: float,
    scale: int,
    mode: str = "bilinear",
    generator: torch.Generator | None = None,
) -> StageCondition:
    """Sampling conditioning of the SR stage from the lower-resolution latents (B, C, F, h, w)."""
    sigma = torch.full((low_res.shape[0],), float(sigma_aug), device=low_res.device)  # (B,)
    return StageCondition(sr_condition(low_res, sigma, scale, mode, generator), level=sigma)


def _uniform_levels(b: int, sigma_max: float, generator: torch.Generator | None, device) -> torch.Tensor:
    """(B,) augmentation levels sigma_aug ~ U(0, sigma_max), drawn from the rank's generator."""
    gen_device = generator.device if generator is not None else device
    return (sigma_max * torch.rand((b,), generator=generator, device=gen_device)).to(device)


def training_condition(
    cfg: CascadeConfig,
    latents: torch.Tensor,
    low_res: torch.Tensor | None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(cond, cond_level) of a training batch of clean latents (B, C, F, H, W); (None, None) for base / none.

    `low_res` (B, C, F, h, w) are the SR stage's paired low-resolution latents of the same frames.
    """
    if cfg.stage == "interp":
        if cfg.interp_aug_sigma_max <= 0:
            return keyframe_condition(latents, cfg.keyframe_stride), None
        sigma_aug = _uniform_levels(latents.shape[0], cfg.interp_aug_sigma_max, generator, latents.device)
        return keyframe_condition(
            augment_condition(latents, sigma_aug, generator), cfg.keyframe_stride
        ), sigma_aug
    if cfg.stage != "sr":
        return None, None
    if low_res is None:
        raise ValueError("cascade.stage=sr needs the low-resolution latents of cascade.cond_view")
    sigma_aug = _uniform_levels(latents.shape[0], cfg.aug_sigma_max, generator, latents.device)
    cond = sr_condition(low_res, sigma_aug, cfg.scale, cfg.upsample, generator)
    if cond.shape != latents.shape:
        raise ValueError(
            f"upsampled cascade.cond_view latents {tuple(cond.shape)} do not match the target latents "
            f"{tuple(latents.shape)} (cascade.scale={cfg.scale})"
        )
    return cond, sigma_aug
