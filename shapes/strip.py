"""A png strip of generated videos: one row of frames per prompt, its caption above (README, `make demo`).

    python -m shapes.strip runs/shapes/eval/video --out strip.png [--baseline runs/shapes/eval/frames]

Reads a `training.sample` / `training.evaluate` videos directory (`samples.json` + each video's gif); with
`baseline`, each prompt's row of the other directory (the same prompt and seed) follows it, labelled.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageSequence

CAPTION_H = 12


def _frames(gif: Path) -> list[np.ndarray]:
    with Image.open(gif) as im:
        return [np.array(f.convert("RGB")) for f in ImageSequence.Iterator(im)]


def _videos(d: Path) -> list[dict]:
    d = d / "videos" if (d / "videos" / "samples.json").exists() else d
    return [v | {"dir": d} for v in json.loads((d / "samples.json").read_text())["videos"]]


def write_strip(
    videos: str | Path, out: str | Path, baseline: str | Path | None = None, rows: int = 6, scale: int = 2
) -> Path:
    """Write `out`: the first `rows` videos (one per prompt) of `videos`, each followed by `baseline`'s video of
    the same prompt and seed when given. Frames are upscaled `scale`x (nearest) so 64 px shapes read."""
    firsts = {}
    for v in _videos(Path(videos)):
        firsts.setdefault(v["prompt"], v)
    chosen = list(firsts.values())[:rows]
    other = {(v["prompt"], v["seed"]): v for v in _videos(Path(baseline))} if baseline else {}
    lines: list[tuple[str, list[np.ndarray]]] = []
    for v in chosen:
        lines.append((v["prompt"], _frames(v["dir"] / v["files"]["gif"])))
        b = other.get((v["prompt"], v["seed"]))
        if b is not None:
            lines.append(("  frame by frame (image model), same seed", _frames(b["dir"] / b["files"]["gif"])))
    if not lines:
        raise ValueError(f"no videos in {videos}")
    h, w, _ = lines[0][1][0].shape
    h, w = h * scale, w * scale
    n = max(len(f) for _, f in lines)
    canvas = Image.new("RGB", (n * (w + 2), len(lines) * (h + CAPTION_H + 2)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, (caption, frames) in enumerate(lines):
        y = r * (h + CAPTION_H + 2)
        draw.text((2, y), caption, fill=(0, 0, 0))
        for c, f in enumerate(frames):
            canvas.paste(Image.fromarray(f).resize((w, h), Image.NEAREST), (c * (w + 2), y + CAPTION_H))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m shapes.strip", description=__doc__.split("\n\n")[0])
    p.add_argument("videos", help="a videos directory (samples.json) or an evaluate output")
    p.add_argument("--out", required=True)
    p.add_argument("--baseline", help="another videos directory of the same prompts and seeds")
    p.add_argument("--rows", type=int, default=6)
    a = p.parse_args(argv)
    print(write_strip(a.videos, a.out, a.baseline, a.rows))


if __name__ == "__main__":
    main()
