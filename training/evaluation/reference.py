"""FVD's real set: random windows of real videos, decoded as `pipeline.run` decodes them (SPEC section 8).

Never VAE reconstructions. `real_clips(source, ...)` reads, in a fixed order:

- webdataset shards (a `.tar`, a directory of them, a glob or a URI: the user's shards, as `pipeline.run`
  takes them); a pipeline output directory stands for the shards its `summary.json` says it read;
- `ucf101:ROOT` (the official test list of fold 1; `ucf101:ROOT:train:2` for another) or `msrvtt:ROOT`
  (every `.mp4` under the copy);
- a directory of video files (mp4, webm, avi, mov, mkv, gif).

Each video gives one window of `frames` frames at `fps` (frames shown at those times, as the pipeline's
views sample them) or, with `stride`, every stride-th source frame; its start is random (seeded per
video), resized on the short side and centre-cropped (`pipeline.decode.resize_crop`), kept as uint8.
Videos too short for the window are skipped and counted. The protocol comes back with the clips.
"""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

VIDEO_EXTS = (".mp4", ".webm", ".avi", ".mov", ".mkv", ".gif")


@dataclass
class RealProtocol:
    """How the real set was drawn: recorded beside every FVD score."""

    source: str
    kind: str  # "shards" | "ucf101" | "msrvtt" | "files"
    num_videos: int
    frames: int
    fps: float | None
    """Window frame rate (None: a source-frame stride instead)."""
    stride: int | None
    """Source frames between window frames (None: an fps instead)."""
    height: int
    width: int
    seed: int
    skipped: int
    """Videos read but not usable (shorter than the window, or undecodable)."""
    window: str = "random"
    pixels: str = "uint8, short side resized (bicubic), centre crop"

    def to_dict(self) -> dict:
        return asdict(self)


def _video_sources(source: str) -> tuple[str, Iterator[tuple[str, bytes]]]:
    """(kind, iterator of (key, video bytes)) for a real-set spec."""
    if source.startswith("ucf101:"):
        from training.evaluation.datasets import ucf101_videos

        root, *rest = source[len("ucf101:") :].split(":")
        split, fold = (rest + ["test", "1"])[:2] if rest else ("test", "1")
        return "ucf101", ((str(p), p.read_bytes()) for p, _ in ucf101_videos(root, split, int(fold)))
    if source.startswith("msrvtt:"):
        root = Path(source[len("msrvtt:") :])
        return "msrvtt", ((str(p), p.read_bytes()) for p in sorted(root.rglob("*.mp4")))
    p = Path(source)
    if p.is_dir() and (p / "summary.json").is_file() and (p / "clips").is_dir():
        recorded = json.loads((p / "summary.json").read_text()).get("input")
        if not recorded:
            raise ValueError(
                f"eval.reference={source} is a latent store whose summary.json names no input shards"
            )
        log.info("eval.reference %s: decoding the shards it was curated from, %s", source, recorded)
        return _video_sources(str(recorded))
    if p.is_dir() and not any(p.rglob("*.tar")):
        files = sorted(q for q in p.iterdir() if q.suffix.lower() in VIDEO_EXTS)
        return "files", ((str(q), q.read_bytes()) for q in files)
    return "shards", _shard_videos(source)


def _shard_videos(spec: str) -> Iterator[tuple[str, bytes]]:
    from pipeline.read import Skipped, iter_tar, list_shards, open_shard, split_key

    fs, shards = list_shards(spec)
    for shard in shards:
        f, _ = open_shard(fs, shard)  # decompressed by its first bytes, whatever its name
        with f:
            for name, data in iter_tar(f):
                key, ext = split_key(name)
                if f".{ext.lower()}" in VIDEO_EXTS and not isinstance(data, Skipped):  # Skipped: over 1 GiB
                    yield f"{shard.uri}:{key}", data


def real_clips(
    source: str,
    num_videos: int,
    frames: int,
    height: int,
    width: int,
    fps: float | None = None,
    stride: int | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, RealProtocol]:
    """(videos (N, F, 3, H, W) uint8, protocol): up to `num_videos` random windows of real videos."""
    from pipeline.decode import decode_sample

    if (fps is None) == (stride is None):
        raise ValueError("give the real window exactly one of fps or stride")
    view = {
        "name": "fvd",
        "num_frames": frames,
        "fps": float(fps) if fps is not None else 0.0,
        "frame_stride": int(stride or 1),
        "height": height,
        "width": width,
    }
    kind, videos = _video_sources(source)
    out, skipped = [], 0
    for key, data in videos:
        if len(out) >= num_videos:
            break
        req = {"media": "video", "data": data, "views": [view], "clips": 1, "start": "random"}
        result = decode_sample({**req, "seed": (seed * 1_000_003 + zlib.crc32(key.encode())) & 0xFFFFFFFF})
        if "error" in result:
            skipped += 1
            log.debug("real video %s skipped: %s", key, result["error"])
            continue
        _, pixels, _ = result["clips"][0]["views"]["fvd"]  # (F, H, W, 3) uint8
        out.append(torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2))  # (F, 3, H, W)
    if len(out) < 2:
        raise ValueError(
            f"eval.reference={source}: {len(out)} usable real videos ({skipped} too short for {frames} frames "
            f"or undecodable); FVD needs real videos decoded from the dataset"
        )
    if skipped:
        log.warning("eval.reference %s: %d videos skipped (too short or undecodable)", source, skipped)
    protocol = RealProtocol(source, kind, len(out), frames, fps, stride, height, width, seed, skipped)
    return torch.stack(out), protocol
