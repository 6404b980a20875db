"""The shapes world: 3 shapes x 8 colours x 6 backgrounds (flat or shaded), each scene one of 7 motions.

What a scene is (`Scene`), how one is drawn at random (`sample_scene`), how it is rendered (`render`), what it
is captioned ("a red circle moves from left to right on a dark blue background"; a single frame: "a small red
circle at the left on a dark blue background", `still_caption`) and its labels (`labels`: the
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


BASE_RADIUS = 0.22
"""An object's radius as a fraction of the frame's shorter side; "grows" / "shrinks" scale it from 0.4x to 1.4x."""


@dataclass(frozen=True)
class Geometry:
    """Where `frame_at` draws a scene's object, in fractions of the frame: what a still's caption says."""

    x: float
    """Centre, as a fraction of the width (0: left edge)."""
    y: float
    """Centre, as a fraction of the height (0: top edge)."""
    radius: float
    """Half the object's extent (a circle's radius, half a square's side), as a fraction of the shorter side."""
    rgb: tuple[float, float, float]
    """The object's colour, a blend of the start and end colours while it changes colour."""


def geometry(scene: Scene, s: float) -> Geometry:
    """Where, how big and what colour the object of `scene` is at progress `s` (0: first frame, 1: last)."""
    x, y, scale = 0.5, 0.5, 1.0
    c0, c1 = np.array(COLOURS[scene.colour], np.float32), np.array(COLOURS[scene.end_colour], np.float32)
    colour = c0
    if scene.motion == "moves from left to right":
        x = 0.2 + 0.6 * s
    elif scene.motion == "moves from right to left":
        x = 0.8 - 0.6 * s
    elif scene.motion == "moves up":
        y = 0.8 - 0.6 * s
    elif scene.motion == "moves down":
        y = 0.2 + 0.6 * s
    elif scene.motion == "grows":
        scale = 0.4 + 1.0 * s
    elif scene.motion == "shrinks":
        scale = 1.4 - 1.0 * s
    elif scene.motion == "changes colour":
        colour = (1 - s) * c0 + s * c1
    return Geometry(x, y, BASE_RADIUS * scale, tuple(float(v) for v in colour))


def background(scene: Scene, height: int, width: int) -> np.ndarray:
    """The scene's background alone, float32 `(H, W, 3)` in 0..255: flat, or shaded vertically."""
    yy = np.mgrid[0:height, 0:width][0].astype(np.float32)
    bg = np.array(BACKGROUNDS[scene.background], np.float32)
    if scene.gradient:  # a vertical shading so the background is not flat
        shade = 0.75 + 0.5 * (yy / max(height - 1, 1))[..., None]
        return np.clip(bg * shade, 0, 255)
    return np.broadcast_to(bg, (height, width, 3)).copy()


def frame_at(scene: Scene, s: float, height: int, width: int) -> np.ndarray:
    """The frame of `scene` at progress `s` through the clip (0: first frame, 1: last) as uint8 `(H, W, 3)`."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    g = geometry(scene, s)
    cx, cy, radius = g.x * width, g.y * height, g.radius * min(height, width)
    if scene.shape == "circle":
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2
    elif scene.shape == "square":
        mask = (np.abs(xx - cx) <= radius) & (np.abs(yy - cy) <= radius)
    else:  # triangle pointing up
        mask = (yy <= cy + radius) & (yy - (cy - radius) >= 2 * np.abs(xx - cx))
    frame = background(scene, height, width)
    frame[mask] = np.array(g.rgb, np.float32)
    return frame.astype(np.uint8)


# --- what a still shows, in words ------------------------------------------------------------------------------

HORIZONTAL = ("left", "centre", "right")
VERTICAL = ("top", "middle", "bottom")
SIZES = ("small", "medium", "large")
POSITION_EDGES = (0.4, 0.6)
"""Bin edges of the centre's position along either axis, as a fraction of the frame: the thirds of the path an
object moving left / right / up / down travels (0.2 to 0.8), so each word holds a third of such a clip's frames.
Below the first edge: left / top; above the second: right / bottom."""
SIZE_EDGES = (BASE_RADIUS * (0.4 + 1 / 3), BASE_RADIUS * (0.4 + 2 / 3))
"""Bin edges of `Geometry.radius`: the thirds of the radii "grows" / "shrinks" pass through (0.4x to 1.4x
`BASE_RADIUS`), so an object that neither grows nor shrinks (1x) is "medium"."""


def _bin(value: float, edges: tuple[float, float], words: tuple[str, str, str]) -> str:
    return words[0] if value < edges[0] else words[2] if value > edges[1] else words[1]


def placement_words(g: Geometry) -> tuple[str, str]:
    """(size word, position phrase) of geometry `g`: "small" / "medium" / "large", and "at the left", "at the
    top", "in the centre", "at the top left" (the world moves objects along one axis, so a corner is never drawn)."""
    size = _bin(g.radius, SIZE_EDGES, SIZES)
    across, down = _bin(g.x, POSITION_EDGES, HORIZONTAL), _bin(g.y, POSITION_EDGES, VERTICAL)
    if across == "centre" and down == "middle":
        return size, "in the centre"
    if down == "middle":
        return size, f"at the {across}"
    if across == "centre":
        return size, f"at the {down}"
    return size, f"at the {down} {across}"


def shown_colour(g: Geometry) -> str:
    """The named object colour nearest (RGB distance) to the colour `g` draws, as `shapes.pixels.read_frame`
    names an object's pixels: the scene's colour, or for a colour change the blend's nearest name (the start
    colour early on, the end colour late, and between them whichever palette colour the blend is closest to)."""
    rgb = np.array(g.rgb, np.float32)
    return min(COLOURS, key=lambda c: float(np.linalg.norm(rgb - np.array(COLOURS[c], np.float32))))


def still_words(size: str, colour: str, shape: str, where: str, background: str) -> str:
    """A still's caption from its words: "a small red circle at the left on a dark blue background"."""
    return f"a {size} {colour} {shape} {where} on a {background} background"


def still_caption(scene: Scene, s: float) -> str:
    """What the frame of `scene` at progress `s` shows, with no motion: its size, colour, shape and position
    (`still_words`), from the geometry `frame_at` draws."""
    g = geometry(scene, s)
    size, where = placement_words(g)
    return still_words(size, shown_colour(g), scene.shape, where, scene.background)


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
) -> tuple[Scene, float, np.ndarray]:
    """A still of the world for training an image model: (scene, progress s, frame). The scene does not change
    colour (the stills keep the palette's colours) and is drawn at a random point s of its motion, so the
    objects stand at the positions and sizes the videos pass through; `still_caption(scene, s)` says what it
    shows. `split` 'train' / 'val' keeps only combinations outside / inside `held_out_still`."""
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
    s = float(rng.random())
    return scene, s, frame_at(scene, s, height, width)


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
