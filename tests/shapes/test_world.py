"""Still captions say what the frame shows: the position and size words come from the geometry `frame_at` draws,
checked here against the drawn pixels; a colour change's frame is captioned with the colour the reader sees."""

from __future__ import annotations

import numpy as np
import pytest

from shapes.pixels import read_frame
from shapes.world import (
    COLOURS,
    POSITION_EDGES,
    SIZES,
    Geometry,
    Scene,
    frame_at,
    geometry,
    placement_words,
    sample_still,
    still_caption,
)

SIDE = 64


def _object_box(scene: Scene, frame: np.ndarray) -> tuple[float, float, int]:
    """(centre x, centre y as fractions of the frame, pixel count) of the object in `frame`: the pixels of exactly
    its colour (no colour changes in `sample_still`'s stills); the bounding box's centre, a triangle's too."""
    mask = (frame.astype(int) == np.array(COLOURS[scene.colour])).all(-1)
    ys, xs = np.nonzero(mask)
    return (xs.min() + xs.max()) / 2 / SIDE, (ys.min() + ys.max()) / 2 / SIDE, int(mask.sum())


@pytest.mark.parametrize(
    "motion, s, where",
    [
        ("moves from left to right", 0.0, "at the left"),
        ("moves from left to right", 0.5, "in the centre"),
        ("moves from left to right", 1.0, "at the right"),
        ("moves from right to left", 0.0, "at the right"),
        ("moves up", 0.0, "at the bottom"),
        ("moves up", 1.0, "at the top"),
        ("moves down", 0.0, "at the top"),
        ("grows", 0.3, "in the centre"),
    ],
)
def test_the_position_words_follow_the_motion(motion, s, where):
    scene = Scene("circle", "red", "dark blue", motion, "blue", False)
    size, _ = placement_words(geometry(scene, s))
    assert still_caption(scene, s) == f"a {size} red circle {where} on a dark blue background"


def test_a_still_caption_reads_as_the_issue_asks():
    scene = Scene("circle", "red", "dark blue", "moves from left to right", "blue", False)
    assert still_caption(scene, 0.0) == "a medium red circle at the left on a dark blue background"
    grows = Scene("square", "green", "grey", "grows", "blue", True)
    assert still_caption(grows, 0.0) == "a small green square in the centre on a grey background"
    assert still_caption(grows, 1.0) == "a large green square in the centre on a grey background"
    assert placement_words(Geometry(0.1, 0.9, 0.22, (0, 0, 0))) == ("medium", "at the bottom left")


def test_position_and_size_words_match_the_drawn_pixels():
    rng = np.random.default_rng(0)
    areas: dict[str, list[int]] = {w: [] for w in SIZES}
    for _ in range(200):
        scene, s, frame = sample_still(rng, SIDE, SIDE)
        assert np.array_equal(frame, frame_at(scene, s, SIDE, SIDE))
        size, where = placement_words(geometry(scene, s))
        said = f"a {size} {scene.colour} {scene.shape} {where} on a {scene.background} background"
        assert still_caption(scene, s) == said
        x, y, area = _object_box(scene, frame)
        areas[size].append(area)
        lo, hi = POSITION_EDGES
        for centre, low, high in ((x, "left", "right"), (y, "top", "bottom")):
            if min(abs(centre - lo), abs(centre - hi)) < 1.5 / SIDE:  # a pixel's rounding from a bin edge
                continue
            assert (low in where) == (centre < lo), (scene, s, where, x, y)
            assert (high in where) == (centre > hi), (scene, s, where, x, y)
    means = [np.mean(areas[w]) for w in SIZES]
    assert all(areas.values()) and means[0] < means[1] < means[2]  # small < medium < large in drawn pixels


def test_a_colour_change_is_captioned_with_the_colour_the_reader_sees():
    scene = Scene("square", "red", "black", "changes colour", "blue", False)
    assert " red square " in still_caption(scene, 0.0) and " blue square " in still_caption(scene, 1.0)
    rng = np.random.default_rng(1)
    colours = list(COLOURS)
    for _ in range(100):
        start, end = rng.choice(colours, 2, replace=False)
        scene = Scene("square", str(start), "black", "changes colour", str(end), False)
        s = float(rng.random())
        said = still_caption(scene, s).split()[2]
        assert read_frame(frame_at(scene, s, SIDE, SIDE)).colour == said, (scene, s)
