"""Read a frame of the shapes world back from its pixels: which background, which object colour, which shape.

The base's check (issue 18: "for held-out captions, the prompt's colour and shape are in the frame") needs a
judge that is not a trained model, so a model's errors are not graded by a model that shares them. `read_frame`
knows only the world's palette and geometry (`shapes.world`):
1. background: the palette background (flat or shaded, as `frame_at` draws them) nearest to the frame's border
   pixels, by the median distance (an object touching the border does not move a median);
2. object: the pixels nearer an object colour than that background (`BACKGROUND_NOISE`); each takes its nearest
   object colour, and the most frequent colour is the object's (None when fewer than `MIN_PIXELS` pixels);
3. shape: the object colour's mask against each shape's silhouette fitted to the mask's bounding box (circle,
   square, upward triangle; a box cut by the frame border is completed on the cut side), by IoU.
On the world's own frames it is right on every still it is tested on (tests/shapes/test_pixels.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shapes.world import BACKGROUNDS, COLOURS, SHAPES

BACKGROUND_NOISE = 15.0
"""A pixel is the object's where it is nearer an object colour than the background and farther than this from
the background (JPEG and sampling noise; a shaded beige or pink background's bright bottom rows are ~24 from
white)."""
MIN_PIXELS = 20
"""Fewer object pixels than this: no object drawn (the smallest object of the world covers ~60 of 64x64)."""


@dataclass(frozen=True)
class Reading:
    background: str
    colour: str | None
    shape: str | None
    pixels: int  # object pixels found
    iou: float  # the chosen shape's silhouette IoU (0 with no object)


def _backgrounds(h: int, w: int) -> dict[tuple[str, bool], np.ndarray]:
    """Every background the world draws, (H, W, 3) float, by (name, shaded)."""
    shade = (0.75 + 0.5 * (np.arange(h, dtype=np.float32) / max(h - 1, 1)))[:, None, None]
    out = {}
    for name, rgb in BACKGROUNDS.items():
        bg = np.array(rgb, np.float32)
        out[name, False] = np.broadcast_to(bg, (h, w, 3))
        out[name, True] = np.broadcast_to(np.clip(bg * shade, 0, 255), (h, w, 3))
    return out


def _masks(shape: str, cy: float, cx: float, r: float, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """`shape` at centre (cy, cx) and radius r, as `shapes.world.frame_at` draws it."""
    if shape == "circle":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2
    if shape == "square":
        return (np.abs(xx - cx) <= r) & (np.abs(yy - cy) <= r)
    return (yy <= cy + r) & (yy - (cy - r) >= 2 * np.abs(xx - cx))


def shape_ious(mask: np.ndarray) -> dict[str, float]:
    """Each shape's best IoU with `mask` over silhouettes fitted to its bounding box (centre and radius searched
    half a pixel either way), completed on a side cut by the frame border."""
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    top, bottom, left, right = ys.min(), ys.max(), xs.min(), xs.max()
    size = max(bottom - top, right - left) + 1  # the uncut extent (the world moves objects along one axis)

    def centre(lo: int, hi: int, n: int) -> float:
        if lo == 0 and hi < n - 1:  # cut at the low border: the far side is real
            return hi - (size - 1) / 2
        if hi == n - 1 and lo > 0:
            return lo + (size - 1) / 2
        return (lo + hi) / 2

    cy, cx, r = centre(top, bottom, h), centre(left, right, w), size / 2
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    best = dict.fromkeys(SHAPES, 0.0)
    for shape in SHAPES:
        for dr in (-1.0, -0.5, 0.0, 0.5):
            for dy in (-0.5, 0.0, 0.5):
                for dx in (-0.5, 0.0, 0.5):
                    m = _masks(shape, cy + dy, cx + dx, r + dr, yy, xx)
                    best[shape] = max(best[shape], float((m & mask).sum() / (m | mask).sum()))
    return best


def read_frame(frame: np.ndarray) -> Reading:
    """What uint8 `frame` (H, W, 3) shows, by the world's palette and geometry."""
    x = frame.astype(np.float32)
    h, w, _ = x.shape
    border = np.zeros((h, w), bool)
    border[[0, -1], :] = border[:, [0, -1]] = True
    candidates = _backgrounds(h, w)
    cost = {
        k: float(np.median(np.linalg.norm(x[border] - bg[border], axis=-1))) for k, bg in candidates.items()
    }
    (background, shaded) = min(cost, key=cost.get)
    palette = np.array(list(COLOURS.values()), np.float32)  # (8, 3)
    d_obj = np.linalg.norm(x[:, :, None] - palette, axis=-1)  # (H, W, 8)
    d_bg = np.linalg.norm(x - candidates[background, shaded], axis=-1)
    fg = (d_obj.min(-1) < d_bg) & (d_bg > BACKGROUND_NOISE)
    if fg.sum() < MIN_PIXELS:
        return Reading(background, None, None, int(fg.sum()), 0.0)
    nearest = d_obj[fg].argmin(1)
    colour = int(np.bincount(nearest, minlength=len(palette)).argmax())
    mask = np.zeros((h, w), bool)
    mask[fg] = nearest == colour
    ious = shape_ious(mask)
    shape = max(SHAPES, key=ious.get)
    return Reading(background, list(COLOURS)[colour], shape, int(mask.sum()), round(ious[shape], 4))
