"""A tiny TorchScript stand-in for StyleGAN-V's `i3d_torchscript.pt` (tests, demos; no download).

Same file format (`torch.jit.load`) and call signature as the real detector:

    features = detector(x, rescale=False, resize=True, return_features=True)   # x (B, 3, F, H, W) in [-1, 1]

It returns `(B, 32)` features from a seeded random 3D conv net, so FVD code paths run end to end; the
numbers mean nothing. Build one with `python -m training.tiny_i3d --out runs/tiny-zoo/tiny_i3d.pt`.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class TinyI3D(nn.Module):
    """Conv3d features of a video; `resize` resamples to 8 x 32 x 32 like I3D's fixed 224^2 input."""

    def __init__(self, features: int = 32):
        super().__init__()
        self.conv1 = nn.Conv3d(3, 16, kernel_size=3, stride=(1, 2, 2), padding=1)
        self.conv2 = nn.Conv3d(16, features, kernel_size=3, stride=2, padding=1)
        self.head = nn.Linear(features, 10)

    def forward(
        self, x: torch.Tensor, rescale: bool = False, resize: bool = True, return_features: bool = True
    ) -> torch.Tensor:
        if rescale:  # StyleGAN-V: inputs in [0, 255] are rescaled to [-1, 1]
            x = x / 127.5 - 1.0
        if resize:
            x = F.interpolate(x, size=(8, 32, 32), mode="trilinear", align_corners=False)
        h = F.relu(self.conv1(x))
        h = F.relu(self.conv2(h))
        feats = h.mean(dim=(2, 3, 4))  # (B, features)
        return feats if return_features else self.head(feats)


def build_tiny_i3d(path: str | Path, seed: int = 0) -> Path:
    """Save a seeded TinyI3D as TorchScript at `path`."""
    torch.manual_seed(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, but it is I3D's file format
        torch.jit.script(TinyI3D().eval()).save(str(path))
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m training.tiny_i3d", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/tiny-zoo/tiny_i3d.pt")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(f"tiny I3D stand-in written to {build_tiny_i3d(a.out, a.seed)}")


if __name__ == "__main__":
    main()
