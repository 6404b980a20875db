"""Frame folding: a video batch `(B, C, F, H, W)` <-> the image batch `(B F, C, H, W)` the 2D layers run on.

Frame f of clip b sits at row `b F + f` (clip-major), as diffusers' `UNetMotionModel` folds frames, so
per-frame tensors (timesteps, text) are repeated with `repeat_interleave(F)`.
"""

from __future__ import annotations

import torch


def fold_frames(x: torch.Tensor) -> torch.Tensor:
    """(B, C, F, H, W) -> (B F, C, H, W)."""
    b, c, f, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)


def unfold_frames(x: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(B F, C, H, W) -> (B, C, F, H, W)."""
    bf, c, h, w = x.shape
    return x.reshape(bf // num_frames, num_frames, c, h, w).permute(0, 2, 1, 3, 4)


def per_frame(values: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Per-clip values (B, ...) -> per-frame values (B F, ...), in `fold_frames`' row order."""
    return values.repeat_interleave(num_frames, dim=0)


def frame_windows(num_frames: int, window: int, overlap: int) -> list[tuple[int, int]]:
    """[(start, end), ...] windows of `window` frames covering 0..num_frames, consecutive ones sharing at
    least `overlap` frames (the last one ends at num_frames); one window when the clip fits."""
    if num_frames <= window:
        return [(0, num_frames)]
    if not 0 <= overlap < window:
        raise ValueError(f"window overlap {overlap} must be in [0, window={window})")
    starts = list(range(0, num_frames - window, window - overlap)) + [num_frames - window]
    return [(s, s + window) for s in starts]
