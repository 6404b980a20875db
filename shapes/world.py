"""The shapes world: 3 shapes x 8 colours x 6 backgrounds (flat or shaded), each scene one of 7 motions.

What a scene is (`Scene`), how one is drawn at random (`sample_scene`), how it is rendered (`render`), what it
is captioned ("a red circle moves from left to right on a dark blue background") and its labels (`labels`: the
class indices a domain evaluator predicts). `fixtures.synth` writes these scenes as WebVid-format shards.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 200),
    "orange": (250, 140, 30),
    "white": (245, 245, 245),
    "cyan": (40, 210, 220),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (10, 10, 10),
    "dark blue": (15, 25, 70),
    "grey": (120, 120, 120),
    "dark green": (20, 60, 30),
    "beige": (225, 210, 180),
    "pink": (240, 180, 200),
}
SHAPES = ("circle", "square", "triangle")
MOTIONS = (
    "moves from left to right",
    "moves from right to left",
    "moves up",
    "moves down",
    "grows",
    "shrinks",
    "changes colour",
)


@dataclass(frozen=True)
class Scene:
    """One procedurally generated clip: what is drawn and the caption that says so."""

    shape: str
    colour: str
    background: str
    motion: str
    end_colour: str
    gradient: bool

    @property
    def caption(self) -> str:
        if self.motion == "changes colour":
            what = f"a {self.colour} {self.shape} changes colour to {self.end_colour}"
        else:
            what = f"a {self.colour} {self.shape} {self.motion}"
        return f"{what} on a {self.background} background"


def sample_scene(rng: np.random.Generator) -> Scene:
    colour, end_colour = rng.choice(list(COLOURS), size=2, replace=False)
    return Scene(
        shape=str(rng.choice(SHAPES)),
        colour=str(colour),
        background=str(rng.choice(list(BACKGROUNDS))),
        motion=str(rng.choice(MOTIONS)),
        end_colour=str(end_colour),
        gradient=bool(rng.random() < 0.5),
    )


def render(scene: Scene, num_frames: int, height: int, width: int) -> np.ndarray:
    """Frames of `scene` as uint8 `(F, H, W, 3)`."""
    return np.stack([frame_at(scene, i / max(num_frames - 1, 1), height, width) for i in range(num_frames)])


def frame_at(scene: Scene, s: float, height: int, width: int) -> np.ndarray:
    """The frame of `scene` at progress `s` through the clip (0: first frame, 1: last) as uint8 `(H, W, 3)`."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    bg = np.array(BACKGROUNDS[scene.background], np.float32)
    if scene.gradient:  # a vertical shading so the background is not flat
        shade = 0.75 + 0.5 * (yy / max(height - 1, 1))[..., None]
        background = np.clip(bg * shade, 0, 255)
    else:
        background = np.broadcast_to(bg, (height, width, 3)).copy()
    c0, c1 = np.array(COLOURS[scene.colour], np.float32), np.array(COLOURS[scene.end_colour], np.float32)
    base = 0.22 * min(height, width)
    cx, cy, radius, colour = 0.5 * width, 0.5 * height, base, c0
    if scene.motion == "moves from left to right":
        cx = (0.2 + 0.6 * s) * width
    elif scene.motion == "moves from right to left":
        cx = (0.8 - 0.6 * s) * width
    elif scene.motion == "moves up":
        cy = (0.8 - 0.6 * s) * height
    elif scene.motion == "moves down":
        cy = (0.2 + 0.6 * s) * height
    elif scene.motion == "grows":
        radius = base * (0.4 + 1.0 * s)
    elif scene.motion == "shrinks":
        radius = base * (1.4 - 1.0 * s)
    elif scene.motion == "changes colour":
        colour = (1 - s) * c0 + s * c1
    if scene.shape == "circle":
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2
    elif scene.shape == "square":
        mask = (np.abs(xx - cx) <= radius) & (np.abs(yy - cy) <= radius)
    else:  # triangle pointing up
        mask = (yy <= cy + radius) & (yy - (cy - radius) >= 2 * np.abs(xx - cx))
    frame = background.copy()
    frame[mask] = colour
    return frame.astype(np.uint8)


def still_caption(scene: Scene) -> str:
    """What one frame of `scene` shows, with no motion: "a red circle on a dark blue background"."""
    return f"a {scene.colour} {scene.shape} on a {scene.background} background"


def held_out(scene: Scene) -> bool:
    """A tenth of the (shape, colour, background, motion) combinations, never trained on: the world renders only
    a few thousand distinct videos at one size, so clips of another seed alone would repeat training clips."""
    combo = f"{scene.shape}|{scene.colour}|{scene.background}|{scene.motion}"
    return zlib.crc32(combo.encode()) % 10 == 0


def held_out_still(scene: Scene) -> bool:
    """A tenth of the (shape, colour, background) combinations, kept out of the base's training stills so that
    its check draws captions it never saw (16 of the 144)."""
    return zlib.crc32(f"{scene.shape}|{scene.colour}|{scene.background}".encode()) % 10 == 0


def sample_still(
    rng: np.random.Generator, height: int, width: int, split: str = "any"
) -> tuple[Scene, np.ndarray]:
    """A still of the world for training an image model: a scene that does not change colour, drawn at a random
    point of its motion, so the objects stand at the positions and sizes the videos pass through. `split`
    'train' / 'val' keeps only combinations outside / inside `held_out_still`."""
    if split not in ("any", "train", "val"):
        raise ValueError(f"split must be 'any', 'train' or 'val', not {split!r}")
    scene = sample_scene(rng)
    while split != "any" and held_out_still(scene) != (split == "val"):
        scene = sample_scene(rng)
    if scene.motion == "changes colour":
        scene = Scene(
            scene.shape,
            scene.colour,
            scene.background,
            str(rng.choice(MOTIONS[:6])),
            scene.end_colour,
            scene.gradient,
        )
    return scene, frame_at(scene, float(rng.random()), height, width)


ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "background": tuple(BACKGROUNDS),
    "motion": MOTIONS,
}
"""Every label of a scene and its classes, in index order (`colour` is the colour at the first frame)."""


def labels(scene: Scene) -> dict[str, int]:
    """{attribute: class index} of `scene` (see `ATTRIBUTES`)."""
    return {name: classes.index(getattr(scene, name)) for name, classes in ATTRIBUTES.items()}
