"""Demo and test shards in the real WebVid format, generated procedurally.

    python -m pipeline.synth --out data/demo --shards 2 --per-shard 8 --bad

writes webdataset tars exactly as video2dataset writes WebVid: per sample `KEY.mp4` (H.264, yuv420p,
moov atom first as web video is), `KEY.txt` (caption) and `KEY.json` (WebVid's columns videoid,
contentUrl, duration, page_dir, name; video2dataset's url, key, status, error_message, caption; and
ffprobe-style `video_metadata`). `--kind image` writes `KEY.jpg` + `KEY.txt` + `KEY.json` instead,
for joint image-video training.

Videos are scenes of coloured shapes that move, grow, shrink or change colour over a varied
background, captioned with what happens ("a red circle moves from left to right on a dark blue
background"). Everything is seeded: the same arguments give byte-identical shards.

`--bad` mixes in the failures a real crawl produces, one of each kind per shard; the key says which
(`000000012_bad_truncated`). `manifest.json` lists every sample with its kind so tests can check
that each one was accounted for.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import tarfile
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

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

# The bad samples a crawl produces; each key ends with `_bad_<kind>`.
BAD_KINDS = (
    "truncated",  # mp4 cut part-way (interrupted download)
    "zero_bytes",  # empty mp4 member
    "not_video",  # HTML error page saved as .mp4
    "missing_txt",  # no caption member at all
    "non_utf8_caption",  # caption bytes that are not UTF-8
    "empty_caption",  # caption member present but blank
    "one_frame",  # a single-frame video
    "too_short",  # fewer frames than a requested clip
    "huge_resolution",  # metadata declares an absurd frame size
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
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    bg = np.array(BACKGROUNDS[scene.background], np.float32)
    if scene.gradient:  # a vertical shading so the background is not flat
        shade = 0.75 + 0.5 * (yy / max(height - 1, 1))[..., None]
        background = np.clip(bg * shade, 0, 255)
    else:
        background = np.broadcast_to(bg, (height, width, 3)).copy()
    c0, c1 = np.array(COLOURS[scene.colour], np.float32), np.array(COLOURS[scene.end_colour], np.float32)
    base = 0.22 * min(height, width)
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for i in range(num_frames):
        s = i / max(num_frames - 1, 1)  # progress through the clip, 0 -> 1
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
        frames[i] = frame.astype(np.uint8)
    return frames


def encode_mp4(frames: np.ndarray, fps: int, gop: int = 0) -> bytes:
    """H.264 mp4 bytes, yuv420p, moov first; deterministic (single-threaded x264, no timestamps).

    `gop`: frames between keyframes (0: x264's default of 250, i.e. one keyframe for a short clip).
    """
    # faststart rewrites the file in a second pass, which needs a real file rather than BytesIO.
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "clip.mp4")
        _write_mp4(path, frames, fps, gop)
        with open(path, "rb") as f:
            return f.read()


def _write_mp4(path: str, frames: np.ndarray, fps: int, gop: int = 0) -> None:
    with av.open(path, mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "20", "preset": "veryfast", "threads": "1", "bf": "0"}
        if gop:
            stream.options["g"] = str(gop)
        stream.codec_context.thread_count = 1
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def encode_jpg(frame: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def iso_duration(seconds: float) -> str:
    """WebVid's duration format, e.g. 'PT00H00M03S'."""
    s = int(round(seconds))
    return f"PT{s // 3600:02d}H{s % 3600 // 60:02d}M{s % 60:02d}S"


def sample_json(
    key: str, index: int, caption: str, num_frames: int, fps: int, height: int, width: int, size: int
) -> dict:
    """The per-sample json video2dataset writes for WebVid (plus ffprobe-style video metadata)."""
    duration = num_frames / fps
    url = f"https://synthetic.t2v-ray.invalid/videos/{key}.mp4"
    return {
        # WebVid csv columns
        "videoid": 1_000_000 + index,
        "contentUrl": url,
        "duration": iso_duration(duration),
        "page_dir": f"synthetic/{index // 100:03d}",
        "name": caption,
        # video2dataset bookkeeping
        "url": url,
        "key": key,
        "status": "success",
        "error_message": None,
        "caption": caption,
        "video_metadata": {
            "streams": [
                {
                    "index": 0,
                    "codec_type": "video",
                    "codec_name": "h264",
                    "pix_fmt": "yuv420p",
                    "width": width,
                    "height": height,
                    "r_frame_rate": f"{fps}/1",
                    "avg_frame_rate": f"{fps}/1",
                    "nb_frames": str(num_frames),
                    "duration": f"{duration:.6f}",
                }
            ],
            "format": {
                "format_name": "mov,mp4,m4a,3gp,3g2,mj2",
                "duration": f"{duration:.6f}",
                "size": str(size),
            },
        },
    }


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o644, "t2v", "t2v"
    tar.addfile(info, io.BytesIO(data))


def make_video_sample(
    index: int,
    seed: int,
    frames: int,
    fps: int,
    height: int,
    width: int,
    bad: str | None = None,
    short_frames: int = 3,
    gop: int = 0,
) -> tuple[str, dict[str, bytes]]:
    """(key, {extension: bytes}) for one sample; `bad` picks one of `BAD_KINDS`."""
    rng = np.random.default_rng([seed, index])
    scene = sample_scene(rng)
    key = f"{index:09d}" + (f"_bad_{bad}" if bad else "")
    n = {"one_frame": 1, "too_short": short_frames}.get(bad or "", frames)
    mp4 = encode_mp4(render(scene, n, height, width), fps, gop)
    meta = sample_json(key, index, scene.caption, n, fps, height, width, len(mp4))
    caption = scene.caption.encode("utf-8")
    if bad == "truncated":
        mp4 = mp4[: len(mp4) * 2 // 5]
    elif bad == "zero_bytes":
        mp4 = b""
    elif bad == "not_video":
        mp4 = b"<html><body><h1>403 Forbidden</h1></body></html>\n" * 4
    elif bad == "non_utf8_caption":
        caption = scene.caption.encode("latin-1") + b" \xff\xfe caf\xe9"
    elif bad == "empty_caption":
        caption = b"   \n"
        meta["caption"] = meta["name"] = ""
    elif bad == "huge_resolution":
        meta["video_metadata"]["streams"][0].update(width=100_000, height=100_000)
    if bad is not None and bad not in BAD_KINDS:
        raise ValueError(f"unknown bad kind {bad!r}; choose from {BAD_KINDS}")
    members = {"mp4": mp4, "txt": caption, "json": json.dumps(meta, sort_keys=True).encode()}
    if bad == "missing_txt":
        del members["txt"]
    return key, members


def make_image_sample(index: int, seed: int, height: int, width: int) -> tuple[str, dict[str, bytes]]:
    rng = np.random.default_rng([seed, index, 1])
    scene = sample_scene(rng)
    frame = render(scene, 1, height, width)[0]
    caption = f"a {scene.colour} {scene.shape} on a {scene.background} background"
    key = f"{index:09d}"
    meta = {
        "key": key,
        "url": f"https://synthetic.t2v-ray.invalid/images/{key}.jpg",
        "caption": caption,
        "status": "success",
        "error_message": None,
        "width": width,
        "height": height,
    }
    return key, {
        "jpg": encode_jpg(frame),
        "txt": caption.encode(),
        "json": json.dumps(meta, sort_keys=True).encode(),
    }


def write_shards(
    out: str | Path,
    shards: int = 2,
    per_shard: int = 8,
    kind: str = "video",
    frames: int = 24,
    fps: int = 8,
    height: int = 64,
    width: int = 64,
    seed: int = 0,
    bad: bool = False,
    short_frames: int = 3,
    cut_last: bool = False,
    gop: int = 0,
    first_index: int = 0,
) -> dict:
    """Write `shards` tars of `per_shard` good samples (+ one of each bad kind per shard if `bad`).

    `cut_last` truncates the last shard's tar mid-way (a partial upload); its lost keys are listed
    in the manifest under `cut_keys`. `gop` is the keyframe interval in frames (0: x264's default).
    Sample keys count up from `first_index`, so sets written separately can share one dataset.
    Returns the manifest, also written to `out/manifest.json`.
    """
    if kind not in ("video", "image"):
        raise ValueError(f"kind must be 'video' or 'image', not {kind!r}")
    if height % 2 or width % 2:
        raise ValueError(f"H.264 yuv420p needs even frame sizes, got {height}x{width}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict = {
        "kind": kind,
        "frames": frames,
        "fps": fps,
        "height": height,
        "width": width,
        "seed": seed,
        "gop": gop,
        "shards": {},
    }
    index = first_index
    for s in range(shards):
        name = f"{s:05d}.tar"
        samples = []
        kinds: list[str | None] = [None] * per_shard + (list(BAD_KINDS) if bad and kind == "video" else [])
        tmp = out / (name + ".tmp")
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for bad_kind in kinds:
                if kind == "video":
                    key, members = make_video_sample(
                        index, seed, frames, fps, height, width, bad_kind, short_frames, gop
                    )
                else:
                    key, members = make_image_sample(index, seed, height, width)
                for ext, data in members.items():
                    _add(tar, f"{key}.{ext}", data)
                samples.append({"key": key, "bad": bad_kind})
                index += 1
        tmp.replace(out / name)
        manifest["shards"][name] = {"samples": samples}
    if cut_last and shards:
        name = f"{shards - 1:05d}.tar"
        path = out / name
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        with tarfile.open(path, "r", ignore_zeros=False) as tar:
            complete = set()
            try:
                for m in tar:
                    if m.offset_data + m.size <= len(data) // 2:
                        complete.add(m.name)
            except tarfile.ReadError:
                pass
        entry = manifest["shards"][name]
        entry["cut"] = True
        entry["cut_keys"] = [s["key"] for s in entry["samples"] if f"{s['key']}.json" not in complete]
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m pipeline.synth", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for the .tar shards and manifest.json")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--per-shard", type=int, default=8, help="good samples per shard")
    p.add_argument("--kind", choices=("video", "image"), default="video")
    p.add_argument("--frames", type=int, default=24, help="frames per video")
    p.add_argument("--fps", type=int, default=8)
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--bad",
        action="store_true",
        help=f"add one bad sample of each kind per shard: {', '.join(BAD_KINDS)}",
    )
    p.add_argument("--short-frames", type=int, default=3, help="frames in the 'too_short' bad video")
    p.add_argument("--cut-last", action="store_true", help="truncate the last shard's tar half-way")
    p.add_argument("--gop", type=int, default=0, help="keyframe interval in frames (0: x264 default, 250)")
    a = p.parse_args(argv)
    m = write_shards(
        a.out,
        a.shards,
        a.per_shard,
        a.kind,
        a.frames,
        a.fps,
        a.height,
        a.width,
        a.seed,
        a.bad,
        a.short_frames,
        a.cut_last,
        a.gop,
    )
    n = sum(len(s["samples"]) for s in m["shards"].values())
    print(f"wrote {len(m['shards'])} {a.kind} shards, {n} samples, to {a.out}")


if __name__ == "__main__":
    main()
