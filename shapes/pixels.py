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

`read_video` reads a video frame by frame the same way (its shape, starting colour and motion, from the object's
trajectory), and `judge_dir` scores an eval dir's mp4s against their captions: the world's second judge of video
models beside its trained evaluator (pilots.md K1-K3).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

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
    x: float = 0.5  # the object pixels' centroid, as a fraction of the width (0.5 with no object)
    y: float = 0.5  # ... and of the height


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
    ys, xs = np.nonzero(mask)
    return Reading(
        background,
        list(COLOURS)[colour],
        shape,
        int(mask.sum()),
        round(ious[shape], 4),
        float((xs.mean() + 0.5) / w),
        float((ys.mean() + 0.5) / h),
    )


# --- a video, read frame by frame ------------------------------------------------------------------------------

TRAVEL = {"x": 0.6, "y": 0.6, "size": 0.31}
"""The least each motion changes over a clip (`shapes.world.geometry`): the centre moves 0.6 of the frame; the
square root of the object's area goes from 0.4x to 1.4x the base radius (0.31 of the frame for a triangle, 0.39 a
circle, 0.44 a square)."""
MIN_MOTION = 0.25
"""A trajectory's slope, as a fraction of `TRAVEL`, below which the video is read as still (no motion)."""
SLOPE_MOTIONS = {
    ("x", 1): "moves from left to right",
    ("x", -1): "moves from right to left",
    ("y", -1): "moves up",
    ("y", 1): "moves down",
    ("size", 1): "grows",
    ("size", -1): "shrinks",
}


@dataclass(frozen=True)
class VideoReading:
    shape: str | None  # the most frequent shape over the frames that show an object
    colour: str | None  # the colour of most object pixels in the first half of the object frames (a prompt
    # states the colour a clip starts with)
    motion: str | None  # `shapes.world.MOTIONS`, "still", or None with fewer than two object frames
    object_frames: int


def read_video(frames: np.ndarray) -> VideoReading:
    """What uint8 `frames` (F, H, W, 3) show, each frame by `read_frame`. The motion is "changes colour" when the
    colours of most object pixels in the first and the second half of the object frames differ; otherwise the
    largest least-squares slope over the clip of the object's centre x, y and sqrt(area), each as a fraction of its
    `TRAVEL` (below `MIN_MOTION`: "still")."""
    f, h, w, _ = frames.shape
    seen = [(i, r) for i, r in enumerate(map(read_frame, frames)) if r.colour is not None]
    if not seen:
        return VideoReading(None, None, None, 0)
    shapes = [r.shape for _, r in seen]
    shape = max(SHAPES, key=shapes.count)
    half = (len(seen) + 1) // 2
    early, late = _colour_of(seen[:half]), _colour_of(seen[half:] or seen[-1:])
    if len(seen) < 2:
        return VideoReading(shape, early, None, 1)
    if early != late:
        return VideoReading(shape, early, "changes colour", len(seen))
    t = np.array([i for i, _ in seen], np.float64) / max(f - 1, 1)
    track = {
        "x": [r.x for _, r in seen],
        "y": [r.y for _, r in seen],
        "size": [np.sqrt(r.pixels) / min(h, w) for _, r in seen],
    }
    slopes = {k: np.polyfit(t, v, 1)[0] / TRAVEL[k] for k, v in track.items()}
    axis = max(slopes, key=lambda k: abs(slopes[k]))
    if abs(slopes[axis]) < MIN_MOTION:
        return VideoReading(shape, early, "still", len(seen))
    return VideoReading(shape, early, SLOPE_MOTIONS[axis, int(np.sign(slopes[axis]))], len(seen))


def _colour_of(seen: list[tuple[int, Reading]]) -> str:
    """The colour most object pixels of `seen` frames take (a tiny object's few pixels weigh little)."""
    votes: dict[str, int] = {}
    for _, r in seen:
        votes[r.colour] = votes.get(r.colour, 0) + r.pixels
    return max(votes, key=votes.get)


def judge_videos(videos: list[np.ndarray], prompts: list[str]) -> dict:
    """The pixel judge's accuracy of uint8 videos (F, H, W, 3) against the motion, colour and shape their prompts
    (the world's captions) state: {'pixel_motion_accuracy', 'pixel_colour_accuracy', 'pixel_shape_accuracy',
    'pixel_videos', 'pixel_shape_confusion' (rows stated circle / square / triangle; columns read, then none)}."""
    from shapes.world import ATTRIBUTES
    from training.evaluation.domain import parse_prompt, prompt_grammar

    if len(videos) != len(prompts) or not videos:
        raise ValueError(f"judge_videos needs one prompt per video, got {len(videos)} / {len(prompts)}")
    vocabulary = {k: list(v) for k, v in ATTRIBUTES.items()}
    grammar = prompt_grammar(vocabulary)
    right = {k: 0 for k in ("motion", "colour", "shape")}
    confusion = np.zeros((len(SHAPES), len(SHAPES) + 1), int)
    for video, prompt in zip(videos, prompts):
        stated = parse_prompt(prompt, vocabulary, grammar)
        if any(stated[k] is None for k in right):
            raise ValueError(f"not a shapes-world caption: {prompt!r}")
        read = read_video(video)
        for k in right:
            right[k] += getattr(read, k) == vocabulary[k][stated[k]]
        confusion[stated["shape"], SHAPES.index(read.shape) if read.shape else len(SHAPES)] += 1
    out = {f"pixel_{k}_accuracy": n / len(videos) for k, n in right.items()}
    return out | {"pixel_videos": len(videos), "pixel_shape_confusion": confusion.tolist()}


def judge_dir(eval_dir: str | Path) -> dict:
    """`judge_videos` on the mp4s a `training.evaluate` output dir holds (videos/*.mp4, each with its .json)."""
    from training.sampling.video_io import read_video as read_file

    videos, prompts = [], []
    for mp4 in sorted((Path(eval_dir) / "videos").glob("*.mp4")):
        videos.append((read_file(mp4).permute(0, 2, 3, 1) * 255).round().byte().numpy())
        prompts.append(json.loads(mp4.with_suffix(".json").read_text())["prompt"])
    if not videos:
        raise FileNotFoundError(f"no videos/*.mp4 in {eval_dir}")
    return judge_videos(videos, prompts)
