"""What a crawl's bad videos look like when only a model can tell: mis-captioned, blurred, JPEG-blocked, noisy,
letterboxed.

`other_scene` draws the scene whose caption mis-captions a clip; one function per degradation, each
`(F, H, W, 3) uint8 -> (F, H, W, 3) uint8`, deterministic given its arguments (and `rng` for noise).
`fixtures.synth` writes them into shards (`--model-bad`); `shapes.clip` trains its CLIP to score other scenes'
captions low and the aesthetic head to score degraded frames below clean ones. The defaults are the shards'
strengths; training draws strengths around them (`random_degrade`) so the head does not learn one exact filter.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFilter

from shapes.world import Scene, sample_scene

DEGRADATIONS = ("blur", "jpeg", "noise", "letterbox")


def other_scene(scene: Scene, rng: np.random.Generator) -> Scene:
    """A random scene of another shape or colour than `scene`: its caption mis-captions `scene`'s clip."""
    while (other := sample_scene(rng)).shape == scene.shape and other.colour == scene.colour:
        pass
    return other


def blur(frames: np.ndarray, radius: float = 3.0) -> np.ndarray:
    """Gaussian blur of each frame (`radius` is the kernel's standard deviation in pixels)."""
    f = ImageFilter.GaussianBlur(radius)
    return np.stack([np.asarray(Image.fromarray(x).filter(f)) for x in frames])


def jpeg(frames: np.ndarray, quality: int = 5) -> np.ndarray:
    """Each frame through JPEG at `quality` (1-95): 8x8 blocks, ringing, colour bleeding."""

    def one(x: np.ndarray) -> np.ndarray:
        buf = io.BytesIO()
        Image.fromarray(x).save(buf, format="JPEG", quality=int(quality))
        return np.asarray(Image.open(buf).convert("RGB"))

    return np.stack([one(x) for x in frames])


def noise(frames: np.ndarray, rng: np.random.Generator, sigma: float = 50.0) -> np.ndarray:
    """Gaussian pixel noise of standard deviation `sigma` (uint8 levels), independent per pixel and frame."""
    noisy = frames.astype(np.float32) + rng.normal(0.0, sigma, frames.shape).astype(np.float32)
    return np.clip(noisy.round(), 0, 255).astype(np.uint8)


def letterbox(frames: np.ndarray, fraction: float = 0.25) -> np.ndarray:
    """Black bars over the top and bottom `fraction` of the height, the picture squeezed between them (a wide
    video letterboxed into a taller frame): the bars show on any background, the squeeze on a black one."""
    f, h, w, _ = frames.shape
    bar = int(round(fraction * h))
    out = np.zeros_like(frames)
    for i, x in enumerate(frames):
        out[i, bar : h - bar] = np.asarray(Image.fromarray(x).resize((w, h - 2 * bar), Image.Resampling.BOX))
    return out


def degrade(frames: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """`frames` degraded by `kind` (one of `DEGRADATIONS`) at the shards' strength."""
    if kind == "blur":
        return blur(frames)
    if kind == "jpeg":
        return jpeg(frames)
    if kind == "noise":
        return noise(frames, rng)
    if kind == "letterbox":
        return letterbox(frames)
    raise ValueError(f"unknown degradation {kind!r}; choose from {DEGRADATIONS}")


def random_degrade(frames: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """`frames` degraded by `kind` at a strength drawn around the shards' (for training, not for shards)."""
    if kind == "blur":
        return blur(frames, float(rng.uniform(2.0, 4.5)))
    if kind == "jpeg":
        return jpeg(frames, int(rng.integers(2, 11)))
    if kind == "noise":
        return noise(frames, rng, float(rng.uniform(30.0, 70.0)))
    if kind == "letterbox":
        return letterbox(frames, float(rng.uniform(0.15, 0.3)))
    raise ValueError(f"unknown degradation {kind!r}; choose from {DEGRADATIONS}")
