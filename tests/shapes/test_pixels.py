"""The pixel reader the base's check relies on: right on the world's own frames, and it fails what is not there."""

import io

import numpy as np
from PIL import Image

from shapes.pixels import read_frame
from shapes.world import BACKGROUNDS, Scene, frame_at, sample_still


def test_reads_the_worlds_stills_and_their_jpegs():
    rng = np.random.default_rng(1)
    for i in range(300):
        scene, _, frame = sample_still(rng, 64, 64)
        if i % 2:  # as image shards store them
            buf = io.BytesIO()
            Image.fromarray(frame).save(buf, format="JPEG", quality=90)
            frame = np.array(Image.open(buf))
        r = read_frame(frame)
        assert (r.background, r.colour, r.shape) == (scene.background, scene.colour, scene.shape), (scene, r)


def test_an_empty_or_noisy_frame_is_not_read_as_an_object():
    empty = frame_at(Scene("circle", "red", "grey", "grows", "blue", False), 0.0, 64, 64)
    empty[:] = BACKGROUNDS["grey"]
    assert read_frame(empty).colour is None
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    r = read_frame(noise)
    assert r.iou < 0.5  # noise has a colour somewhere but no shape


def test_a_wrong_shape_or_colour_is_read_as_such():
    scene = Scene("triangle", "orange", "black", "moves up", "red", True)
    r = read_frame(frame_at(scene, 0.3, 64, 64))
    assert (r.colour, r.shape) == ("orange", "triangle")
    yellow = frame_at(Scene("square", "yellow", "black", "moves up", "red", True), 0.3, 64, 64)
    assert (read_frame(yellow).colour, read_frame(yellow).shape) == ("yellow", "square")
