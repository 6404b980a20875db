"""The clips the shapes world's CLIP and aesthetic head are trained and calibrated on (`shapes.clip`).

Scenes come from outside ('train') or inside ('val') `shapes.world.held_out`'s combinations; a clip is
`CLIP_FRAMES` frames spread over a window of the scene, as the pipeline picks the frames it embeds. A CLIP batch
pairs every scene with a twin differing in one attribute (the hard negatives), degrades some clips
(`shapes.degrade`) and adds a few stills captioned with what the frame shows (`still_caption`: size, colour,
shape, position), in pairs of one scene at two moments that the captions tell apart. The CLIP's text tower is the
base's text encoder, so both kinds of caption, the videos' and the stills', are trained here.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from shapes.degrade import DEGRADATIONS, jpeg, random_degrade
from shapes.world import (
    ATTRIBUTES,
    COLOURS,
    MOTIONS,
    Scene,
    frame_at,
    geometry,
    held_out,
    held_out_still,
    sample_scene,
    shown_colour,
    still_caption,
)

SIZE = 64
"""Frame side: the demo view's (`pipeline/configs/demo.yaml`), so CLIP's resize and crop change nothing."""
CLIP_FRAMES = 2
"""Frames per clip embedded (the demo's `clip.num_frames`)."""
TWIN_WEIGHTS = {"shape": 3, "motion": 2, "colour": 1, "background": 1, "end_colour": 1}
"""How often a twin differs in each attribute: shape is the slowest for a ViT to learn, colours the fastest."""
REVERSED = {a: b for m, n in (MOTIONS[0:2], MOTIONS[2:4], MOTIONS[4:6]) for a, b in ((m, n), (n, m))}
"""Each motion and its reverse in time."""
DEGRADED_SHARE, CODEC_SHARE = 0.25, 0.3
"""Training clips degraded by `shapes.degrade` (still paired with their caption), and clean clips mildly
JPEG-compressed as a codec leaves them."""


def draw(rng: np.random.Generator, split: str) -> Scene:
    """A random scene outside ('train') or inside ('val') the `held_out` combinations."""
    while held_out(scene := sample_scene(rng)) != (split == "val"):
        pass
    return scene


def twin(scene: Scene, rng: np.random.Generator) -> Scene:
    """`scene` with one attribute changed (the end colour too, when it changes colour): a hard negative. A motion
    is never swapped for its reverse: the pipeline's clip embedding, a mean over frames, has no frame order, so
    "moves up" and "moves down" show the same set of frames (`REVERSED`)."""
    options = [a for a in TWIN_WEIGHTS if a != "end_colour" or scene.motion == "changes colour"]
    weights = np.array([TWIN_WEIGHTS[a] for a in options], float)
    name = options[int(rng.choice(len(options), p=weights / weights.sum()))]
    if name in ("colour", "end_colour"):
        value = rng.choice([c for c in COLOURS if c not in (scene.colour, scene.end_colour)])
    else:
        skip = (
            {getattr(scene, name), REVERSED.get(scene.motion)} if name == "motion" else {getattr(scene, name)}
        )
        value = rng.choice([v for v in ATTRIBUTES[name] if v not in skip])
    return dataclasses.replace(scene, **{name: str(value)})


def clip_frames(scene: Scene, rng: np.random.Generator, k: int = CLIP_FRAMES) -> np.ndarray:
    """`k` frames (k, SIZE, SIZE, 3) uint8 spread over a window of the clip, as the pipeline picks them: the demo
    decodes a 1.75 s view of a 3 s video and embeds its first and last frames (progress ~0.17 and ~0.78)."""
    s0 = rng.uniform(0.0, 0.4)
    s1 = min(1.0, s0 + rng.uniform(0.45, 0.65))
    return np.stack([frame_at(scene, float(s), SIZE, SIZE) for s in np.linspace(s0, s1, k)])


def other_moment(scene: Scene, s: float, rng: np.random.Generator, tries: int = 20, allowed=None) -> float:
    """A progress of `scene` whose still caption differs from the one at `s` (another position, size or shown
    colour) and that `allowed` accepts; `s` itself when `tries` draws found none."""
    said = still_caption(scene, s)
    for _ in range(tries):
        t = float(rng.random())
        if still_caption(scene, t) != said and (allowed is None or allowed(t)):
            return t
    return s


def still_pair(rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    """Two stills (2, SIZE, SIZE, 3) of one training scene at two moments and their still captions, which differ
    (`other_moment`: a hard negative for the placement words). Neither still shows a `held_out_still` combination
    (the colour as shown), so the base's check draws captions its text encoder never trained on."""

    def seen(scene: Scene, s: float) -> bool:
        return not held_out_still(dataclasses.replace(scene, colour=shown_colour(geometry(scene, s))))

    while not seen(scene := draw(rng, "train"), s0 := float(rng.random())):
        pass
    s1 = other_moment(scene, s0, rng, allowed=lambda t: seen(scene, t))
    frames = np.stack([frame_at(scene, s, SIZE, SIZE) for s in (s0, s1)])
    return frames, [still_caption(scene, s0), still_caption(scene, s1)]


def spoil(frames: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, bool]:
    """(`frames` degraded with probability DEGRADED_SHARE, else maybe codec-compressed; whether degraded)."""
    if rng.random() < DEGRADED_SHARE:
        return random_degrade(frames, DEGRADATIONS[int(rng.integers(len(DEGRADATIONS)))], rng), True
    if rng.random() < CODEC_SHARE:
        return jpeg(frames, int(rng.integers(60, 96))), False
    return frames, False


def make_batch(
    rng: np.random.Generator, scenes: int, stills: int
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(frames (scenes * CLIP_FRAMES + stills, SIZE, SIZE, 3), captions (scenes + stills), degraded (scenes +
    stills,) bool): half the scenes are twins of the other half; the stills are single frames in `still_pair`s,
    captioned with what they show; some of either are degraded (`spoil`)."""
    batch = []
    for _ in range(scenes // 2):
        scene = draw(rng, "train")
        while held_out(other := twin(scene, rng)):
            pass
        batch += [scene, other]
    spoilt = [spoil(clip_frames(s, rng), rng) for s in batch]
    captions = [s.caption for s in batch]
    while len(captions) < len(batch) + stills:
        frames, said = still_pair(rng)
        for frame, caption in list(zip(frames, said))[: len(batch) + stills - len(captions)]:
            spoilt.append(spoil(frame[None], rng))
            captions.append(caption)
    return np.concatenate([f for f, _ in spoilt]), captions, np.array([d for _, d in spoilt])


def aesthetic_clips(rng: np.random.Generator, n: int, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(frames (n * CLIP_FRAMES, SIZE, SIZE, 3), degraded (n,) bool, kinds): alternately clean clips (half of
    them mildly JPEG-compressed, as a codec leaves them) and clips of a random degradation."""
    frames, bad, kinds = [], [], []
    for i in range(n):
        clip = clip_frames(draw(rng, split), rng)
        kind = "clean" if i % 2 == 0 else DEGRADATIONS[int(rng.integers(len(DEGRADATIONS)))]
        if kind != "clean":
            clip = random_degrade(clip, kind, rng)
        elif rng.random() < 0.5:
            clip = jpeg(clip, int(rng.integers(60, 96)))
        frames.append(clip)
        bad.append(kind != "clean")
        kinds.append(kind)
    return np.concatenate(frames), np.array(bad), kinds
