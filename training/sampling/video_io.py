"""Writing generated videos (H.264 mp4 via PyAV, gif via Pillow) and reading videos/images back.

Frames are float tensors in [0, 1], `(F, 3, H, W)`.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

VIDEO_SUFFIXES = (".mp4", ".gif", ".webm", ".avi", ".mov", ".mkv")


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """(F, 3, H, W) in [0, 1] -> (F, H, W, 3) uint8."""
    if frames.dim() != 4 or frames.shape[1] != 3:
        raise ValueError(f"frames must be (F, 3, H, W), got {tuple(frames.shape)}")
    return (frames.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def write_mp4(frames: torch.Tensor, path: str | Path, fps: float, crf: int = 18) -> Path:
    """H.264 (libx264, yuv420p) mp4; H and W must be even (the VAE's multiples of 8 are)."""
    import av

    path = Path(path)
    arr = to_uint8(frames)
    h, w = arr.shape[1:3]
    if h % 2 or w % 2:
        raise ValueError(f"mp4 (yuv420p) needs even height and width, got {h}x{w}")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in arr:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())  # flush
    return path


def write_gif(frames: torch.Tensor, path: str | Path, fps: float) -> Path:
    """Looping gif, one frame every 1000/fps ms."""
    from PIL import Image

    path = Path(path)
    images = [Image.fromarray(f) for f in to_uint8(frames)]
    images[0].save(
        path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0, optimize=False
    )
    return path


def read_video(path: str | Path) -> torch.Tensor:
    """All frames of a video file (mp4, gif, ...) as (F, 3, H, W) in [0, 1]."""
    import av

    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if not frames:
        raise ValueError(f"no video frames in {path}")
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255


def read_image(path: str | Path) -> torch.Tensor:
    """An image file as (3, H, W) in [0, 1]."""
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255


def resize_crop_frames(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] -> (N, 3, height, width): curation's rule (`pipeline.decode.resize_crop`:
    resize the shorter side, centre crop) on uint8 frames, so real videos are shaped as training saw them."""
    from pipeline.decode import resize_crop

    out = resize_crop(to_uint8(frames), height, width)  # (N, height, width, 3) uint8
    return torch.from_numpy(out).permute(0, 3, 1, 2).float() / 255


def resize_frames(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear resize of (N, 3, H, W) frames (no-op when the size already matches)."""
    if frames.shape[-2:] == (height, width):
        return frames
    return torch.nn.functional.interpolate(
        frames, size=(height, width), mode="bilinear", align_corners=False, antialias=True
    ).clamp(0, 1)
