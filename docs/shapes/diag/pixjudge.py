"""The pixel judge (`shapes.pixels.read_video`: no trained model) calibrated on held-out rendered clips, their
round trip through the world's VAE and both through the eval dirs' H.264 writer, then applied to eval dirs' mp4s.

    python docs/shapes/diag/pixjudge.py WORLD [EVAL_DIR ...]
"""

import json
import sys
import tempfile

import numpy as np
import torch

from shapes.evaluator import make_clips, vae_round_trip
from shapes.pixels import judge_dir, judge_videos
from shapes.world import held_out, sample_scene
from training.sampling.video_io import read_video, write_mp4


def h264(video: np.ndarray, fps: float = 2.667) -> np.ndarray:
    with tempfile.TemporaryDirectory() as d:
        path = write_mp4(torch.from_numpy(video).permute(0, 3, 1, 2).float() / 255, f"{d}/v.mp4", fps)
        return (read_video(path).permute(0, 2, 3, 1) * 255).round().byte().numpy()


def calibrate(world: str, n: int = 128) -> None:
    videos, _ = make_clips(n, seed=1234, split="val")  # (N, F, 3, H, W) uint8
    rng, prompts = np.random.default_rng(1234), []  # make_clips' scenes again, for their captions
    while len(prompts) < n:
        scene = sample_scene(rng)
        while not held_out(scene):
            scene = sample_scene(rng)
        prompts.append(scene.caption)
    rt = vae_round_trip(f"{world}/base/vae")(videos)
    as_np = lambda v: [x.permute(0, 2, 3, 1).numpy() for x in v]  # noqa: E731
    for name, v in (("rendered", as_np(videos)), ("vae round trip", as_np(rt))):
        for codec, vv in (("", v), (" + h264", [h264(x) for x in v])):
            r = judge_videos(vv, prompts)
            print(
                json.dumps(
                    dict(
                        clips=name + codec,
                        **{k: round(x, 4) if isinstance(x, float) else x for k, x in r.items()},
                    )
                )
            )


if __name__ == "__main__":
    torch.set_num_threads(2)
    calibrate(sys.argv[1])
    for d in sys.argv[2:]:
        r = judge_dir(d)
        print(
            json.dumps(dict(eval=d, **{k: round(x, 4) if isinstance(x, float) else x for k, x in r.items()}))
        )
