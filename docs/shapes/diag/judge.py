"""Does the world's VAE cap the evaluator's reads? The evaluator's accuracy and shape confusion on held-out rendered
clips, and on the same clips through the base's VAE (encode, mode, decode: what a perfect latent model would give),
and after a 3x3 blur of the round trip.

    python docs/shapes/diag/judge.py WORLD [N=256]
"""

import json
import sys

import numpy as np
import torch
import torch.nn.functional as F

from shapes.evaluator import accuracy, load, make_clips, vae_round_trip
from shapes.world import ATTRIBUTES

world, n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 256
ev, _ = load(f"{world}/evaluator")
round_trip = vae_round_trip(f"{world}/base/vae")
videos, y = make_clips(n, seed=1234, split="val")  # (N, F, 3, H, W) uint8


@torch.no_grad()
def confusion(v: torch.Tensor) -> list[list[int]]:
    called = torch.cat([ev(c.float() / 255)["shape"].argmax(1) for c in v.split(128)])
    k = len(ATTRIBUTES["shape"])
    m = np.zeros((k, k), int)
    for s, c in zip(y["shape"].tolist(), called.tolist()):
        m[s, c] += 1
    return m.tolist()


rt = round_trip(videos)
blur = (F.avg_pool2d(rt.flatten(0, 1).float(), 3, 1, 1, count_include_pad=False).round().byte()).view_as(rt)
for name, v in (("rendered", videos), ("vae round trip", rt), ("round trip + 3x3 blur", blur)):
    acc = {k: round(a, 3) for k, a in accuracy(ev, v, y).items()}
    print(json.dumps(dict(clips=name, n=n, accuracy=acc, shape_confusion=confusion(v))))
