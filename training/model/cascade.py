"""The layers a PYoCo cascade stage adds to the video model (sec. 4): zero-initialised extra `conv_in`
channels for the concatenated conditioning, and SR's noise-augmentation level embedding.

The conditioning itself (keyframes + mask, upsampled noise-augmented latents) is tensor math in
`training/diffusion/cascade.py`.
"""

from __future__ import annotations

import torch
from torch import nn


def cond_channels(stage: str, latent_channels: int) -> int:
    """Extra input channels the stage concatenates to the noisy latents (0 for base / plain models)."""
    return {"interp": latent_channels + 1, "sr": latent_channels}.get(stage, 0)


def zero_conv_like(conv_in: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """The extra input channels of `conv_in`: same kernel/stride/padding, no bias, zero weights (step 0 =
    the pretrained model), so `conv_in(x) + extra(cond)` == a widened `conv_in` on `cat([x, cond])`."""
    conv = nn.Conv2d(
        in_channels,
        conv_in.out_channels,
        conv_in.kernel_size,
        stride=conv_in.stride,
        padding=conv_in.padding,
        bias=False,
    )
    nn.init.zeros_(conv.weight)
    return conv


def aug_timestep(sigma_aug: torch.Tensor, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The augmentation level as a DDPM-like timestep: T (1 - abar) with abar = 1 / (1 + sigma^2) (ours):
    0 for a clean conditioning, T for pure noise, finite at sigma = 0 (unlike ln sigma)."""
    return num_train_timesteps * sigma_aug**2 / (1 + sigma_aug**2)


class LevelEmbedding(nn.Module):
    """Embedding of the conditioning's noise-augmentation level, added to the UNet's timestep embedding.

    Sinusoidal features of `aug_timestep(sigma_aug)`, then an MLP whose last layer is zero-initialised
    (step 0: the pretrained timestep embedding unchanged).
    """

    def __init__(self, channels: int, embed_dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0):
        super().__init__()
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps

        self.proj = Timesteps(channels, flip_sin_to_cos, freq_shift)
        self.embedding = TimestepEmbedding(channels, embed_dim)
        nn.init.zeros_(self.embedding.linear_2.weight)
        nn.init.zeros_(self.embedding.linear_2.bias)

    def forward(self, sigma_aug: torch.Tensor) -> torch.Tensor:
        """(N,) sigma_aug -> (N, embed_dim)."""
        features = self.proj(aug_timestep(sigma_aug.float()))  # (N, channels), float32
        return self.embedding(features.to(self.embedding.linear_1.weight.dtype))
