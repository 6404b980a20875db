"""The png strip: one row per prompt, the baseline's row of the same prompt and seed after it, frames in order."""

import json

import numpy as np
from PIL import Image

from shapes.strip import CAPTION_H, write_strip


def _videos(d, prompts, value):
    d.mkdir(parents=True)
    videos = []
    for i, prompt in enumerate(prompts):
        frames = [Image.fromarray(np.full((8, 8, 3), value + 10 * f, np.uint8)) for f in range(3)]
        name = f"{i:03d}-0"
        frames[0].save(d / f"{name}.gif", save_all=True, append_images=frames[1:], duration=100)
        videos.append({"prompt": prompt, "seed": i, "name": name, "files": {"gif": f"{name}.gif"}})
    (d / "samples.json").write_text(json.dumps({"videos": videos}))


def test_rows_follow_prompts_and_their_baseline(tmp_path):
    _videos(tmp_path / "video", ["a", "b", "c"], 100)
    _videos(tmp_path / "frames", ["a", "b", "c"], 20)
    out = write_strip(tmp_path / "video", tmp_path / "strip.png", tmp_path / "frames", rows=2, scale=2)
    im = np.array(Image.open(out))
    row_h = 16 + CAPTION_H + 2
    assert im.shape == (4 * row_h, 3 * 18, 3)  # 2 prompts x (video, baseline), 3 frames of 16 px + 2 px gaps
    for r, value in enumerate((100, 20, 100, 20)):
        for c in range(3):
            y, x = r * row_h + CAPTION_H + 8, c * 18 + 8
            assert abs(int(im[y, x, 0]) - (value + 10 * c)) <= 2, (r, c)
