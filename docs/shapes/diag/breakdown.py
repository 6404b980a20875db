"""Per-motion breakdown of an eval dir: the world's evaluator's motion call per video, and the drawn object's
pixel trajectory (centroid x / y and sqrt(area) of pixels far from the border colour, first vs last frame), and
the fraction of videos whose trajectory has the sign the caption asks for on its axis ("sign ok").""" 
import sys, collections, json
from pathlib import Path
import decord, numpy as np, torch
from shapes.evaluator import load
from shapes.world import ATTRIBUTES
ev, _ = load("runs/pilot_tok/evaluator")
rows = collections.defaultdict(list)
vids, motions = [], []
for mp4 in sorted(Path(sys.argv[1], "videos").glob("*.mp4")):
    meta = json.loads(mp4.with_suffix(".json").read_text())
    f = decord.VideoReader(str(mp4)).get_batch(list(range(8))).asnumpy().astype(np.float32)  # (F, H, W, 3)
    motion = next(m for m in ATTRIBUTES["motion"] if m in meta["prompt"] or ("changes colour" in meta["prompt"] and m == "changes colour"))
    vids.append(torch.from_numpy(f).permute(0, 3, 1, 2)); motions.append(motion)
    geo = []
    for fr in f:
        border = np.concatenate([fr[0], fr[-1], fr[:, 0], fr[:, -1]]).mean(0)
        d = np.linalg.norm(fr - border, axis=-1); w = np.clip(d - 20, 0, None) + 1e-6
        yy, xx = np.mgrid[0:fr.shape[0], 0:fr.shape[1]]
        geo.append(((w * xx).sum() / w.sum(), (w * yy).sum() / w.sum(), np.sqrt((d > 40).sum())))
    geo = np.array(geo); rows[motion].append(geo[-1] - geo[0])
with torch.no_grad():
    o = ev(torch.stack(vids))["motion"].argmax(-1).tolist()
calls = collections.defaultdict(collections.Counter)
for p, m in zip(o, motions): calls[m][ATTRIBUTES["motion"][p]] += 1
WANT = {"moves from left to right": (0, 1), "moves from right to left": (0, -1), "moves up": (1, -1),
        "moves down": (1, 1), "grows": (2, 1), "shrinks": (2, -1)}  # (axis, sign) in image coordinates
for m in ATTRIBUTES["motion"]:
    if m in rows:
        r = np.array(rows[m]); d = r.mean(0)
        ok = f" sign ok {(np.sign(r[:, WANT[m][0]]) == WANT[m][1]).mean():.2f}" if m in WANT else ""
        print(f"{m:26s} n={len(rows[m]):2d} last-first dx {d[0]:+5.1f} dy {d[1]:+5.1f} dsize {d[2]:+5.1f}{ok} | called {dict(calls[m])}")
