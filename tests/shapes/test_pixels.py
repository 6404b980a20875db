"""The pixel reader the base's check relies on: right on the world's own frames, and it fails what is not there."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from shapes.pixels import VideoReading, judge_dir, judge_videos, read_frame, read_video
from shapes.world import BACKGROUNDS, Scene, frame_at, render, sample_scene, sample_still
from training.sampling.video_io import write_mp4


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


def test_reads_the_worlds_videos_motion_colour_and_shape():
    rng = np.random.default_rng(2)
    for _ in range(120):
        scene = sample_scene(rng)
        r = read_video(render(scene, 8, 64, 64))
        assert (r.motion, r.colour, r.shape) == (scene.motion, scene.colour, scene.shape), (scene, r)


def test_a_still_or_shuffled_video_is_not_read_as_its_motion():
    scene = Scene("square", "red", "grey", "moves from left to right", "blue", False)
    frames = render(scene, 8, 64, 64)
    assert read_video(np.repeat(frames[3:4], 8, 0)).motion == "still"
    assert read_video(frames[::-1]).motion == "moves from right to left"
    empty = np.broadcast_to(np.array(BACKGROUNDS["grey"], np.uint8), frames.shape).copy()
    assert read_video(empty) == VideoReading(None, None, None, 0)


def test_judge_dir_scores_the_mp4s_an_eval_dir_holds(tmp_path):
    rng = np.random.default_rng(3)
    scenes = [sample_scene(rng) for _ in range(6)]
    (tmp_path / "videos").mkdir()
    for i, scene in enumerate(scenes):
        frames = render(scene, 8, 64, 64)
        if i < 2:  # two videos drawn still: their motion is wrong, their colour and shape right
            frames = np.repeat(frames[:1], 8, 0)
        video = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255
        write_mp4(video, tmp_path / "videos" / f"{i}.mp4", fps=4)
        (tmp_path / "videos" / f"{i}.json").write_text(json.dumps({"prompt": scene.caption}))
    r = judge_dir(tmp_path)
    assert r["pixel_videos"] == 6
    assert r["pixel_motion_accuracy"] == 4 / 6
    assert r["pixel_colour_accuracy"] == r["pixel_shape_accuracy"] == 1.0
    assert np.trace(np.array(r["pixel_shape_confusion"])[:, :3]) == 6
    with pytest.raises(ValueError, match="not a shapes-world caption"):
        judge_videos([frames], ["a photo of a cat"])
